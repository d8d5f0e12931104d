"""``make floors``: the package at the dependency floors that pyproject.toml declares.

Two modes, both without network at run time:

* ``python scripts/floors_smoke.py --pins`` prints one ``name==version`` line per runtime
  dependency, the floor of its ``>=`` in pyproject.toml (a dependency without one is an error), so
  that the Makefile installs exactly what is declared;
* ``python scripts/floors_smoke.py`` (in the floors venv, the package installed from a wheel) checks
  that the installed versions are those floors, then runs the README's Python blocks top to bottom
  on a tiny Llama built from its config (no download; ``model``, ``loader`` and ``dataset`` given, as
  tests/integrations/test_peft_edges.py gives them), then the round trip
  ``initialize`` → ``result.save(dir)`` → ``PeftModel.from_pretrained``: the loaded adapter holds the
  solved factors and its outputs equal the base model's with ``W + s·B·A`` written in by hand.

``FLOORS_TORCH_FALLBACK=1`` (set by the Makefile where the torch floor could not be installed)
reports torch's version instead of failing on it.
"""
from __future__ import annotations

import copy
import importlib.metadata as md
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def declared_floors(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """``{name: floor}`` of ``[project] dependencies`` (read without tomllib, absent on Python 3.10)."""
    text = pyproject.read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, flags=re.S | re.M)
    if block is None:
        raise SystemExit("pyproject.toml: no [project] dependencies list")
    body = "\n".join(line.split("#", 1)[0] for line in block.group(1).splitlines())
    floors = {}
    for spec in re.findall(r'"([^"]+)"', body):
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", spec)
        name, constraint = m.group(1).lower(), m.group(2)
        low = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", constraint)
        if low is None:
            raise SystemExit(f"pyproject.toml: {spec!r} declares no floor (>=): make floors cannot check it")
        floors[name] = low.group(1)
    return floors


def _same_version(installed: str, floor: str) -> bool:
    # "2.4" is 2.4.0; a local tag (+cpu) does not change the release.
    def release(v):
        parts = [int(p) for p in re.match(r"[0-9.]+", v).group(0).strip(".").split(".")]
        while parts and parts[-1] == 0:
            parts.pop()
        return parts

    return release(installed) == release(floor)


def check_versions(floors: dict[str, str]) -> None:
    fallback = os.environ.get("FLOORS_TORCH_FALLBACK", "") not in ("", "0")
    wrong = []
    for name, floor in floors.items():
        installed = md.version(name)
        ok = _same_version(installed, floor)
        note = "" if ok else ("  <- NOT the floor (it could not be installed here)" if name == "torch" and fallback
                              else "  <- NOT the floor")
        print(f"  {name:<12} {installed:<14} declared >= {floor}{note}")
        if not ok and not (name == "torch" and fallback):
            wrong.append(f"{name} {installed} (floor {floor})")
    if wrong:
        raise SystemExit("floors: installed versions are not the declared floors: " + ", ".join(wrong))


def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # Wide enough for the README's rank 16 on every layer (as tests/integrations/test_peft_edges.py).
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def padded_batches(count: int = 8, batch_size: int = 4) -> list[dict]:
    """Right-padded dict batches (input_ids, attention_mask) of random lengths."""
    import torch

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (int(torch.randint(5, 13, (1,), generator=g)),), generator=g) for _ in range(count)]
    out = []
    for i in range(0, count, batch_size):
        chunk = seqs[i:i + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.zeros((len(chunk), length), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(chunk):
            ids[j, :len(s)], mask[j, :len(s)] = s, 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def train_set(count: int = 8) -> list[dict]:
    """A Trainer's train set (the README's ``dataset``): one dict per sample, padded to one length."""
    (whole,) = padded_batches(count, count)
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
            for ids, mask in zip(whole["input_ids"], whole["attention_mask"])]


def readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def round_trip(model, loader, workdir: Path) -> float:
    """``initialize`` → ``save`` → ``PeftModel.from_pretrained``; returns the largest logit difference
    against the base model with ``W + s·B·A`` written into its weights."""
    import torch
    from peft import PeftModel

    import loradafast

    result = loradafast.initialize(model, loader, rank=8, progress=False)
    directory = result.save(workdir / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(directory)).eval()
    merged = copy.deepcopy(model)
    scaling = result.lora_alpha / result.rank
    with torch.no_grad():
        for name, layer in result.layers.items():
            prefix = f"base_model.model.{name}."
            a = loaded.get_parameter(prefix + "lora_A.default.weight")
            b = loaded.get_parameter(prefix + "lora_B.default.weight")
            assert torch.equal(a, layer.lora_A.to(a.dtype)) and torch.equal(b, layer.lora_B.to(b.dtype)), name
            merged.get_submodule(name).weight += scaling * (layer.lora_B.double() @ layer.lora_A.double()).float()
        batch = loader[0]
        got, want = loaded(**batch).logits, merged(**batch).logits
        base = model(**batch).logits
    diff = float((got - want).abs().max())
    assert diff <= 1e-4 * float(want.abs().max()), f"PeftModel.from_pretrained differs from W + s·B·A by {diff}"
    assert float((got - base).abs().max()) > 0, "the adapter changed nothing"
    return diff


def main() -> None:
    floors = declared_floors()
    if sys.argv[1:] == ["--pins"]:
        print("\n".join(f"{name}=={floor}" for name, floor in floors.items()))
        return
    if sys.argv[1:]:
        raise SystemExit(__doc__)
    print("floors: installed versions")
    check_versions(floors)
    import torch

    import loradafast
    from loradafast.linalg import native

    installed = Path(loradafast.__file__).resolve()
    assert "site-packages" in installed.parts, f"loradafast imported from the checkout ({installed}), not the install"
    assert native.load() is not None, f"the native eigensolver did not build: {native.build_error()}"
    print(f"floors: loradafast {loradafast.__version__} from {installed.parent}; native eigensolver built with ninja")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    blocks = readme_blocks()
    assert blocks, "README.md has no python block"
    with tempfile.TemporaryDirectory(prefix="loradafast-floors-") as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            # The names the README's blocks take as given (as tests/integrations/test_peft_edges.py).
            namespace = {"model": tiny_llama(), "loader": padded_batches(), "dataset": train_set()}
            for i, block in enumerate(blocks):
                exec(compile(block, f"README.md python block {i}", "exec"), namespace)
            print(f"floors: README.md's {len(blocks)} python block(s) ran top to bottom on a tiny Llama")
            diff = round_trip(tiny_llama(), padded_batches(), Path(tmp))
        finally:
            os.chdir(cwd)
    print(f"floors: initialize -> result.save -> PeftModel.from_pretrained gives W + s·B·A's outputs "
          f"(largest logit difference {diff:.1e})")
    print("floors: OK")


if __name__ == "__main__":
    main()
