"""The LoRA-DA solve of this checkout against the solve of another commit, side by side.

    python benchmarks/bench_solve_vs.py --baseline e4606df                   # SmolLM2-135M, 32 × 128 tokens
    python benchmarks/bench_solve_vs.py --baseline e4606df --synthetic 0.25 --blocks 4 --spectra decay,flat

The baseline commit is checked out into a temporary git worktree; both trees solve the same saved
statistics (``Statistics.save``) in their own subprocesses, alternating, ``--repeats`` times each,
after an untimed warm-up solve (the native eigensolver's build and first-call costs).  Reported:
each tree's solve seconds (the best and all), the ratio ours / baseline, and the largest sine
between the two trees' subspaces.  ``--synthetic SCALE`` uses bench_scale.py's synthetic
Llama-2-7B-shaped statistics at that width (``--blocks`` blocks of them) instead of SmolLM2's.
Results: ``benchmarks/results/solve_vs_<device>.json``, one entry per configuration: ``--config KEY``
(default ``default``; ``synthetic`` with ``--synthetic``) names the entry this run writes, the
file's other entries are kept; an entry's ``runs`` hold one item per statistics.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Run inside each tree's subprocess: load, warm up, time one solve, save lora_A for the comparison.
CHILD = r"""
import json, sys, time, warnings
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[4]))
import loradafast
from loradafast.statistics import Statistics
warnings.simplefilter("ignore")
stats = Statistics.load(sys.argv[2])
first = stats.layers[sorted(stats.layers)[0]]
warm = Statistics({first.name: first}, {first.input_group: stats.z_sums[first.input_group]},
                  stats.num_tokens, stats.num_sequences, stats.y_factor, {})
loradafast.solve(warm, int(sys.argv[5]), num_train_samples=100_000)
start = time.perf_counter()
result = loradafast.solve(stats, int(sys.argv[5]))
seconds = time.perf_counter() - start
torch.save({n: l.lora_A for n, l in result.layers.items()}, sys.argv[3])
print(json.dumps({"seconds": seconds, "loradafast": loradafast.__file__}))
"""


def _worktree(ref: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="loradafast-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), ref], check=True,
                   capture_output=True)
    return path


def _solve(tree: Path, stats_path: Path, out: Path, threads: int, rank: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(stats_path), str(out), str(threads), str(rank)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"the solve in {tree} failed:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["loradafast"].startswith(str(tree)), info  # the tree's own package, not an installed one
    return info["seconds"]


def _statistics(args, spectrum: str | None):
    if spectrum is None:
        from bench_solve import smollm2_stats

        return smollm2_stats(args.samples, args.seq_len), f"SmolLM2-135M, {args.samples} × {args.seq_len} tokens"
    import torch
    from bench_scale import HIDDEN, INTERMEDIATE, synthetic_stats

    hidden, inter = int(HIDDEN * args.synthetic), int(INTERMEDIATE * args.synthetic)
    stats = synthetic_stats(hidden, inter, spectrum, torch.device("cpu"), blocks=args.blocks)
    return stats, f"bench_scale {spectrum}, 7B block × {args.synthetic} ({hidden}/{inter}), {args.blocks} block(s)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a git ref of this repository")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--synthetic", type=float, help="bench_scale's synthetic statistics at this width scale")
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--spectra", default="decay,tokens,flat")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", metavar="KEY",
                        help="the entry of the results file this run writes (default: 'default', 'synthetic' "
                             "with --synthetic); the file's other entries are kept")
    parser.add_argument("--out", help="the results file (default benchmarks/results/solve_vs_<device>.json)")
    args = parser.parse_args(argv)

    import subprocess as sp

    import torch
    from _common import config_key, environment, results_path, write_entry
    from loradafast.linalg.eigen import span_sine

    key = config_key(args.config or ("synthetic" if args.synthetic else "default"))
    # The run's device: each tree's child solves the saved statistics where Statistics.load puts
    # them, on the CPU, whatever collected them (bench_solve's SmolLM2 statistics, on a GPU if any).
    device = torch.device("cpu")
    path = results_path("solve_vs", device, args.out)
    torch.set_num_threads(args.threads)
    baseline = _worktree(args.baseline)
    sha = sp.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                 text=True).stdout.strip()
    dirty = bool(sp.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "loradafast"], capture_output=True,
                        text=True).stdout.strip())
    record = {"benchmark": "bench_solve_vs", **environment(device), "rank": args.rank,
              "ours": f"{sha}{' + uncommitted changes' if dirty else ''}", "baseline": args.baseline,
              "load_average_start": list(os.getloadavg()), "runs": []}
    try:
        for spectrum in (args.spectra.split(",") if args.synthetic else [None]):
            stats, label = _statistics(args, spectrum)
            with tempfile.TemporaryDirectory() as tmp:
                stats_path = Path(tmp) / "stats.safetensors"
                stats.save(stats_path)
                times = {"baseline": [], "ours": []}
                for _ in range(args.repeats):
                    for name, tree in (("baseline", baseline), ("ours", ROOT)):
                        times[name].append(_solve(tree, stats_path, Path(tmp) / f"{name}.pt", args.threads,
                                                  args.rank))
                a, b = (torch.load(Path(tmp) / f"{n}.pt") for n in ("baseline", "ours"))
                sines = {n: span_sine(a[n].T, b[n].T) for n in a}
            run = {"statistics": label, "layers": len(sines), "baseline_s": times["baseline"], "ours_s": times["ours"],
                   "ratio_best": min(times["ours"]) / min(times["baseline"]),
                   "max_sin_theta_between_trees": max(sines.values())}
            record["runs"].append(run)
            print(json.dumps(run), flush=True)
    finally:
        record["load_average_end"] = list(os.getloadavg())
        sp.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], capture_output=True)
    write_entry(record, path, key, benchmark="solve_vs", device=device, indent=1)


if __name__ == "__main__":
    main()
