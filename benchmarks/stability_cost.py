"""What the split-half stability diagnostic costs: ``initialize`` with and without ``split_halves``,
side by side, on the demo's model and data (SmolLM2-135M, standard-library source).

Each run is a child process of its own (peak memory is its resident set), and the two settings
alternate.  Reported per setting: wall time of ``initialize``, its pass, solve and split-half
stages, the peak resident memory above the loaded model, and the median split-half overlap.

    python benchmarks/stability_cost.py                 # 32 × 128 tokens, rank 8, 2 repetitions
    python benchmarks/stability_cost.py --tiny          # a tiny random Llama, seconds (smoke test)

Results: ``benchmarks/results/stability_cost_<device>.json``, one entry per configuration
(``--config KEY``: default ``default``, ``tiny`` with ``--tiny``; the file's other entries are kept).
The device is the CPU: each child builds its model there and its peak memory is its resident set.
Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PeakMemory, config_key, environment, results_path, run_child, write_entry  # noqa: E402

DEVICE = "cpu"  # where every child builds its model and runs initialize (PeakMemory: its resident set)


def worker(spec: dict) -> dict:
    import sysconfig

    import torch

    import loradafast

    torch.manual_seed(0)
    if spec["tiny"]:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2)).eval()
        ids = torch.randint(0, 97, (spec["samples"], spec["length"]), generator=torch.Generator().manual_seed(1))
    else:
        from loradafast.demo import load_smollm2, stdlib_chunks

        model, tokenizer = load_smollm2()
        files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 20_000)
        ids = stdlib_chunks(tokenizer, count=spec["samples"], length=spec["length"], files=files[0::2])
    loader = [{"input_ids": ids[i:i + spec["batch_size"]]} for i in range(0, len(ids), spec["batch_size"])]
    with PeakMemory(DEVICE) as peak:
        started = time.perf_counter()
        result = loradafast.initialize(model, loader, rank=spec["rank"], max_samples=None, progress=False,
                                       memory_budget=float("inf"), split_halves=spec["split_halves"])
        wall = time.perf_counter() - started
    overlaps = sorted(layer.diagnostics.split_half_overlap for layer in result.layers.values()
                      if layer.diagnostics.split_half_overlap is not None)
    return {"ok": True, "wall_s": wall, "timings": result.timings, "peak_rss_delta_bytes": peak.peak_delta,
            "median_overlap": overlaps[len(overlaps) // 2] if overlaps else None, "layers": len(result.layers)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker")
    p.add_argument("--result")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--config", type=config_key, default=None, metavar="KEY",
                   help="the entry of the results file this run writes (default: 'default', 'tiny' with --tiny); "
                        "the file's other entries are kept")
    p.add_argument("--out", help="the results file (default benchmarks/results/stability_cost_<device>.json)")
    args = p.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return
    args.config = args.config or ("tiny" if args.tiny else "default")
    path = results_path("stability_cost", DEVICE, args.out)
    runs = {"off": [], "on": []}
    record = {"benchmark": "stability_cost", "environment": environment(DEVICE), "load_average_at_start":
              os.getloadavg(), "settings": vars(args) | {"model": "tiny random Llama" if args.tiny else
                                                          "SmolLM2-135M-Instruct (fp32)"}, "runs": runs}
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.repeats):
            for setting in ("off", "on"):  # alternated: the machine's drift falls on both
                spec = {"tiny": args.tiny, "samples": args.samples, "length": args.length,
                        "batch_size": args.batch_size, "rank": args.rank, "split_halves": setting == "on"}
                out = run_child(__file__, spec, Path(work), f"{setting}{i}", timeout=args.timeout,
                                threads=args.threads)
                out["load_average"] = os.getloadavg()
                runs[setting].append(out)
                print(setting, i, {k: out.get(k) for k in ("wall_s", "timings", "peak_rss_delta_bytes", "error")})

    def median(setting, key, sub=None):
        values = [(r[key] if sub is None else r[key].get(sub, 0.0)) for r in runs[setting] if r.get("ok")]
        return statistics.median(values) if values else None

    summary = {s: {"wall_s": median(s, "wall_s"), "pass_s": median(s, "timings", "pass_s"),
                   "solve_s": median(s, "timings", "solve_s"), "split_half_s": median(s, "timings", "split_half_s"),
                   "peak_rss_delta_bytes": median(s, "peak_rss_delta_bytes")} for s in runs}
    on, off = summary["on"], summary["off"]
    if on["wall_s"] and off["wall_s"]:
        summary["ratio_wall_on_off"] = on["wall_s"] / off["wall_s"]
        summary["ratio_pass_on_off"] = on["pass_s"] / off["pass_s"]
        summary["extra_peak_bytes"] = on["peak_rss_delta_bytes"] - off["peak_rss_delta_bytes"]
    record["summary"] = summary
    record["median_overlap"] = [r.get("median_overlap") for r in runs["on"]]
    write_entry(record, path, args.config, benchmark="stability_cost", device=DEVICE)


if __name__ == "__main__":
    main()
