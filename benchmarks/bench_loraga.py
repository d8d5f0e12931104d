"""LoRA-GA side by side: loradafast's ``lora-ga`` against PEFT's ``preprocess_loraga`` (issue 12's
goal: "loradafast's lora-ga no slower than PEFT's preprocess_loraga side by side").

    python benchmarks/bench_loraga.py                  # SmolLM2-135M, CPU, 16 × 128 tokens, 3 repetitions
    python benchmarks/bench_loraga.py --tiny           # tiny random Llama: a check that it runs (seconds)
    python benchmarks/bench_loraga.py --gpu            # the same on CUDA (bf16)
    python benchmarks/bench_loraga.py --methods lora-ga,peft-lora-ga --repeats 6 --config pair   # another entry

The timed methods are those of ``benchmarks/overhead.py`` (``_overhead/``), run the same way: the
same model, samples and batches, alternated over repetitions, one child process per (method,
repetition) unless ``--inline``:

* ``lora-ga``: ``loradafast.get_peft_model(..., method="lora-ga")``: a G-only statistics pass and
  the checked randomized SVD (``svd="auto"``);
* ``peft-lora-ga``: ``preprocess_loraga`` + ``peft.get_peft_model`` with ``LoraGAConfig()``;
* ``lora-ga-exact``: loradafast with ``svd="exact"`` (float64 ``torch.linalg.svd``), the reference.

After the timed region each run saves its adapter's factors; the subspace agreement of repetition
0 is reported per pair of methods: over the layers, the sine of the largest principal angle between
the row spaces of ``lora_A`` and between the column spaces of ``lora_B`` (scales differ by design:
PEFT puts the singular values into B).  The ``paper`` and ``peft`` variants of loradafast share
those spaces.  Results go to ``benchmarks/results/loraga_<device-slug>.json``, one entry per
configuration: ``--config KEY`` (default ``default``; ``tiny`` with the tiny model) names the entry
this run writes, and the file's other entries are kept.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_key, results_path, write_entry  # noqa: E402
from _overhead.config import MODEL_DEFAULTS  # noqa: E402
from _overhead.report import summarize  # noqa: E402
from _overhead.runner import run_model  # noqa: E402
from overhead import available_methods, log, result_header  # noqa: E402

METHODS = ["lora-ga", "peft-lora-ga", "lora-ga-exact"]
REPEATS = {"tiny": 3, "smollm2": 3, "llama2-7b": 2}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--model", default=None, help="tiny, smollm2 or llama2-7b (CUDA only); overrides --tiny")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated among {METHODS} and floor")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help=f"repetitions (defaults {REPEATS})")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--gpu", action="store_true", help="run on CUDA in bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: 1 on CPU)")
    parser.add_argument("--inline", action="store_true", help="no child processes (CPU memory not measured)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    parser.add_argument("--config", type=config_key, default=None, metavar="KEY",
                        help="the entry of the results file this run writes (default: 'default', 'tiny' with the "
                             "tiny model); the file's other entries are kept")
    parser.add_argument("--out", default=None, help="the results file (default benchmarks/results/loraga_<slug>.json)")
    return parser.parse_args(argv)


def _span_sine(a, b) -> float:
    from loradafast.linalg.eigen import span_sine

    return span_sine(a, b)


def agreement(paths: dict[str, str]) -> dict:
    """Per pair of methods: sin θ between their lora_A row spaces and lora_B column spaces, over layers."""
    import torch

    factors = {m: torch.load(p) for m, p in paths.items()}
    out = {}
    for x, y in itertools.combinations(sorted(factors), 2):
        layers = sorted(set(factors[x]) & set(factors[y]))
        a = [_span_sine(factors[x][n][0].T, factors[y][n][0].T) for n in layers]
        b = [_span_sine(factors[x][n][1], factors[y][n][1]) for n in layers]
        out[f"{x} vs {y}"] = {"layers": len(layers),
                              "sin_A": {"median": statistics.median(a), "max": max(a)} if a else None,
                              "sin_B": {"median": statistics.median(b), "max": max(b)} if b else None}
    return out


def verdict(summary: dict) -> dict | None:
    """loradafast's lora-ga over PEFT's: ratio of the median wall times (≤ 1: the goal is met)."""
    ours, theirs = summary.get("lora-ga", {}).get("wall_s"), summary.get("peft-lora-ga", {}).get("wall_s")
    if not ours or not theirs:
        return None
    ratio = ours["median"] / theirs["median"]
    return {"lora_ga_over_peft_wall": ratio, "goal_met": ratio <= 1.0,
            "pass_s": {"lora-ga": summary["lora-ga"]["pass_s"], "peft-lora-ga": summary["peft-lora-ga"]["pass_s"]},
            "solve_s": {"lora-ga": summary["lora-ga"]["solve_s"], "peft-lora-ga": summary["peft-lora-ga"]["solve_s"]}}


def main(argv=None) -> None:
    import torch

    args = parse_args(argv)
    model = args.model or ("tiny" if args.tiny else "smollm2")
    if model not in MODEL_DEFAULTS:
        raise SystemExit(f"unknown model {model!r}; choose among {list(MODEL_DEFAULTS)}")
    if (args.gpu or model == "llama2-7b") and not torch.cuda.is_available():
        raise SystemExit("--gpu and the Llama-2-7B-shaped model need CUDA")
    device = "cuda" if args.gpu or model == "llama2-7b" else "cpu"
    settings = dict(MODEL_DEFAULTS[model], repeats=REPEATS[model])
    for key in ("samples", "seq_len", "batch_size", "repeats"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.threads is None and device == "cpu":
        args.threads = 1  # as overhead.py: OpenMP teams stall on a shared CPU
    methods, skipped = available_methods(args.methods.split(","))
    dtype = "bfloat16" if device == "cuda" else "float32"
    result = result_header(args, argv, device, {model: settings}, dtype, skipped)
    result.update(benchmark="LoRA-GA side by side (project issue 12)",
                  command=" ".join([Path(sys.executable).name, "benchmarks/bench_loraga.py",
                                    *(argv if argv is not None else sys.argv[1:])]))
    key = args.config or ("tiny" if model == "tiny" else "default")
    out_path = results_path("loraga", device, args.out)
    with tempfile.TemporaryDirectory(prefix="loradafast_loraga_") as tmp:
        spec_common = {"device": device, "dtype": dtype, "rank": args.rank, "alpha": args.alpha,
                       "threads": args.threads, "factors_dir": tmp}
        info, runs, orders, seconds = run_model(model, settings, methods, spec_common, Path(tmp),
                                                inline=args.inline, timeout=args.timeout, log=log)
        first = {m: r["factors_path"] for m, rs in runs.items() for r in rs
                 if r.get("ok") and r["repetition"] == 0 and r.get("factors_path")}
        agree = agreement(first)
    summary = summarize(methods, runs)
    result["models"][model] = {"description": info["description"], "data": info["data"], "dtype": dtype,
                               "rank": args.rank, **settings, "order_per_repetition": orders,
                               "benchmark_wall_s": seconds, "summary": summary, "verdict": verdict(summary),
                               "subspace_agreement_rep0": agree, "runs": runs}
    write_entry(result, out_path, key, benchmark="loraga", device=device)
    print(report(model, result["models"][model]))


def report(model: str, block: dict) -> str:
    lines = [f"**{model}**: {block['samples']} × {block['seq_len']} tokens, batch {block['batch_size']}, "
             f"rank {block['rank']}, {block['repeats']} repetition(s)", "",
             "| method | wall s (median) | pass s | solve s | svd paths |", "| --- | --- | --- | --- | --- |"]
    for m, s in block["summary"].items():
        paths = next((r["extra"].get("svd_paths") for r in block["runs"][m] if r.get("ok")), None)
        cells = [s[k]["median"] if s.get(k) else None for k in ("wall_s", "pass_s", "solve_s")]
        lines.append(f"| {m} | " + " | ".join("—" if c is None else f"{c:.3g}" for c in cells) + f" | {paths or '—'} |")
    v = block["verdict"]
    if v:
        lines += ["", f"lora-ga / peft-lora-ga wall time: {v['lora_ga_over_peft_wall']:.2f} "
                      f"({'goal met' if v['goal_met'] else 'goal NOT met'})"]
    lines += ["", "| pair | layers | sin θ A median / max | sin θ B median / max |", "| --- | --- | --- | --- |"]
    for pair, a in block["subspace_agreement_rep0"].items():
        if not a["layers"]:  # a method without factors (floor) shares no layer with the others
            continue
        lines.append(f"| {pair} | {a['layers']} | {a['sin_A']['median']:.1e} / {a['sin_A']['max']:.1e} | "
                     f"{a['sin_B']['median']:.1e} / {a['sin_B']['max']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
