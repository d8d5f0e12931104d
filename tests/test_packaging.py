"""The package as users get it: a wheel that carries the native sources, installed into a fresh
virtual environment, running an initialisation, the PEFT-shaped entry points, the Trainer callback, the CLI
and the report; and no triton on CPU."""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a wheel is built from (a copy: setuptools writes build/ and *.egg-info beside the sources).
SOURCES = ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "loradafast", "csrc")

# Blocks `import triton` as on a CPU machine without it; then runs the snippet.
NO_TRITON = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError("triton is blocked for this test")
    sys.meta_path.insert(0, _Block())
""")


def _run(argv, cwd, env=None, timeout=900):
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{argv}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (ROOT / name).is_dir() else {}))
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
         cwd=src)
    (path,) = dist.glob("loradafast-*.whl")
    return path


def test_wheel_carries_native_sources_types_and_the_command(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        metadata = next(z.read(n).decode() for n in names if n.endswith("METADATA"))
    assert {"loradafast/csrc/eigh.cpp", "loradafast/csrc/eigh_cuda.cu", "loradafast/py.typed",
            "loradafast/__main__.py", "loradafast/report_plots.py"} <= names
    assert "loradafast = loradafast.cli:main" in entry_points
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    triton = [line for line in requires if "triton" in line]
    assert triton and all("extra ==" in line for line in triton)  # only in an extra
    assert any(line.startswith("Requires-Dist: peft") and ">=0.18" in line for line in requires)


FROM_WHEEL = textwrap.dedent("""
    import sys, torch, loradafast
    from loradafast.linalg import native
    assert "site-packages" in loradafast.__file__ and "{root}" not in loradafast.__file__, loradafast.__file__
    assert native.load() is not None, native.build_error()  # csrc/ found inside the installed package
    assert native._CSRC.is_relative_to(__import__("pathlib").Path(loradafast.__file__).parent)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    batches = [dict(input_ids=torch.randint(0, 50, (2, 8))) for _ in range(2)]
    result = loradafast.initialize(model, batches, 2, progress=False)
    assert len(result.layers) == 7 and "triton" not in sys.modules
    result.report(sys.argv[1])
    # The PEFT-shaped entry points and the Trainer callback, from the installed package too.
    import peft, transformers
    from loradafast.integrations import LoraDACallback
    config = lambda: peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    stats_file = sys.argv[1] + "/stats.safetensors"
    same = LlamaForCausalLM(model.config)  # the same weights (statistics of another model are refused)
    same.load_state_dict(model.state_dict())
    loradafast.preprocess_lora_da(model, config(), batches, cache_file=stats_file, progress=False)
    wrapped = loradafast.get_peft_model(model, config())
    state = loradafast.get_lora_da_state_dict(same, peft_config=config(), stats=stats_file)
    assert state and all(k.endswith(".weight") for k in state), sorted(state)[:3]
    for key, value in state.items():
        assert torch.equal(value, wrapped.get_parameter(key.replace(".weight", ".default.weight"))), key
    data = [dict(input_ids=ids, labels=ids) for ids in torch.randint(0, 50, (8, 8))]
    args = transformers.TrainingArguments(sys.argv[1] + "/trainer", max_steps=1, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no")
    trainer = transformers.Trainer(model=peft.get_peft_model(LlamaForCausalLM(model.config), config()), args=args,
                                   train_dataset=data, callbacks=[LoraDACallback(progress=False)])
    trainer.train()
    print("ok", loradafast.__file__)
""")


@pytest.mark.slow
def test_fresh_install_runs_initialize_entry_points_callback_report_and_cli_without_triton(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    # The test environment's packages (torch, transformers, peft, ...) behind the fresh install; a path
    # line in a .pth file adds that directory only, not the editable checkout its own .pth files point to.
    # A venv made with --system-site-packages (a machine whose python already has torch) also reads the
    # base interpreter's site-packages: those go in too.
    dirs = [sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("site-packages"))]
    (site / "test_env.pth").write_text("\n".join(dict.fromkeys(dirs)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
         cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")  # a fresh build of the shipped sources
    script = tmp_path / "from_wheel.py"
    script.write_text(NO_TRITON + FROM_WHEEL.replace("{root}", str(ROOT)))
    out = _run([str(python), str(script), str(tmp_path / "report")], cwd=tmp_path, env=env)
    assert out.stdout.splitlines()[-1].startswith("ok ")  # the Trainer prints its metrics before
    assert (tmp_path / "report" / "layers.csv").exists()
    # the console script and python -m
    help_text = _run([str(venv / "bin" / "loradafast"), "--help"], cwd=tmp_path, env=env).stdout
    assert "loradafast init" in help_text
    _run([str(python), "-m", "loradafast", "report", str(tmp_path / "report"), "--out", str(tmp_path / "again")],
         cwd=tmp_path, env=env)
    assert (tmp_path / "again" / "report.md").exists()


def test_loradafast_itself_never_imports_triton_on_cpu():
    """With triton absent (a CPU install), the package imports and solves; triton is only reached
    through the kernels' dispatch, on CUDA tensors."""
    code = NO_TRITON + textwrap.dedent("""
        import loradafast, torch
        from loradafast import kernels
        assert not kernels.triton_available()
        acc = kernels.kfac_accumulate(torch.zeros(3, 3), torch.randn(4, 3))
        assert "triton" not in sys.modules
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _run([sys.executable, "-c", code], cwd=ROOT, env=env)
