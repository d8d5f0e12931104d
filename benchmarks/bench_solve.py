"""LoRA-DA solve stage on real statistics: dense eigh vs batched LOBPCG, side by side.

    python benchmarks/bench_solve.py                   # SmolLM2-135M statistics (collected here)
    python benchmarks/bench_solve.py --stats s.safetensors --repeats 3
    python benchmarks/bench_solve.py --ranks 16,32 --config ranks_16_32   # another entry of the results file

Times ``loradafast.solve(stats, r, eigensolver=...)`` for each solver, alternating them, and
reports the subspace agreement between them (sin of the largest principal angle, per layer).
Decides ``eigensolver="auto"`` on CPU (``loradafast.methods.lora_da.solve.auto_is_dense``).
Results: benchmarks/results/solve_<device>.json, one entry per configuration (``--config KEY``,
default ``default``; the file's other entries are kept).
"""
from __future__ import annotations

import argparse
import json
import statistics as st
from collections import Counter
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import loradafast  # noqa: E402
from loradafast.linalg import native as _native  # noqa: E402
from loradafast.linalg.eigen import span_sine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_key, default_device, environment, results_path, timed, write_entry  # noqa: E402


def smollm2_stats(samples: int, length: int):
    import sysconfig

    from loradafast.demo import load_smollm2, stdlib_chunks

    model, tokenizer = load_smollm2()
    if torch.cuda.is_available():
        model = model.cuda()
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 20_000)
    ids = stdlib_chunks(tokenizer, count=samples, length=length, files=files[0::2])
    loader = [{"input_ids": ids[i:i + 8]} for i in range(0, samples, 8)]
    return loradafast.collect(model, loader, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stats", help="a Statistics file (default: collect SmolLM2-135M statistics)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ranks", default="8,64")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--config", type=config_key, default="default", metavar="KEY",
                        help="the entry of the results file this run writes (the file's other entries are kept)")
    parser.add_argument("--out", help="the results file (default benchmarks/results/solve_<device>.json)")
    args = parser.parse_args()

    device = default_device()
    path = results_path("solve", device, args.out)
    stats = loradafast.Statistics.load(args.stats) if args.stats else smollm2_stats(args.samples, args.seq_len)
    _native.load()  # build (or load) the native eigensolver outside the timings
    if device.type == "cuda":
        stats = stats.to("cuda")
    widths = sorted({s.in_features for s in stats.layers.values()})
    runs = []
    for r in [int(x) for x in args.ranks.split(",")]:
        times = {"dense": [], "lobpcg": []}
        results = {}
        for _ in range(args.repeats):
            for solver in ("dense", "lobpcg"):  # alternate so drift hits both
                results[solver], seconds = timed(lambda: loradafast.solve(stats, r, eigensolver=solver), device)
                times[solver].append(seconds)
        sines = [span_sine(results["dense"].layers[n].lora_A.T, results["lobpcg"].layers[n].lora_A.T)
                 for n in stats.layers]
        fallbacks = sum(layer.diagnostics["eigensolver_fallback"] for layer in results["lobpcg"].layers.values())
        runs.append({
            "rank": r,
            "dense_s": times["dense"], "lobpcg_s": times["lobpcg"],
            "dense_median_s": st.median(times["dense"]), "lobpcg_median_s": st.median(times["lobpcg"]),
            "lobpcg_over_dense": st.median(times["lobpcg"]) / st.median(times["dense"]),
            "max_sin_theta_between_solvers": max(sines),
            "median_sin_theta_between_solvers": st.median(sines),
            "lobpcg_fallbacks": int(fallbacks),
            "lobpcg_iterations": sorted({layer.diagnostics["eigensolver_iterations"]
                                         for layer in results["lobpcg"].layers.values()}),
            "lobpcg_methods": dict(Counter(layer.diagnostics["eigensolver"]
                                           for layer in results["lobpcg"].layers.values())),
        })
        print(json.dumps(runs[-1]))
    env = environment(device)
    write_entry({
        "benchmark": "LoRA-DA solve stage, dense eigh vs batched LOBPCG (eigensolver=)",
        "date": time.strftime("%Y-%m-%d"),
        "device": env["device"],
        "threads": env["threads"],
        "torch": env["torch"], "python": env["python"], "loradafast": loradafast.__version__,
        "statistics": args.stats or f"SmolLM2-135M, {args.samples}x{args.seq_len} stdlib tokens",
        "layers": len(stats.layers), "widths": widths, "num_tokens": stats.num_tokens,
        "runs": runs,
    }, path, args.config, benchmark="solve", device=device)


if __name__ == "__main__":
    main()
