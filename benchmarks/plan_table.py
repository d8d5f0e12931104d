"""The memory planner's plans for Llama-2 shapes on one 80 GB GPU, from shapes alone (no model,
no GPU): the table of docs/design.md §6.4.

    python benchmarks/plan_table.py            # the Markdown table
    python benchmarks/plan_table.py --plans    # and every plan in full

All linear layers of the decoder (q, k, v, o, gate, up, down), rank 8, LoRA-DA with diagonal Y,
fp32 statistics, float64 solve with LOBPCG (what "auto" takes on CUDA).  The budget is what the
default would be on an otherwise empty 80 GB (80·10⁹ bytes) GPU holding the bf16 weights: 80 GB
less the weights less the 10 % margin.  Llama-2-70B's bf16 weights (138 GB) do not fit one such
GPU; its row assumes them elsewhere (another GPU, CPU offload), leaving 80 GB less the margin.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loradafast import planner  # noqa: E402
from loradafast.planner import format_bytes  # noqa: E402

GPU_BYTES = 80e9
# name: (hidden, intermediate, layers, k/v width, parameters)
MODELS = {
    "Llama-2-7B": (4096, 11008, 32, 4096, 6.738e9),
    "Llama-2-13B": (5120, 13824, 40, 5120, 13.016e9),
    "Llama-2-70B": (8192, 28672, 80, 1024, 68.977e9),
}


def plans(rank: int = 8):
    """(model, weights bytes, budget, whether the weights are on the GPU, plan, smallest budget)."""
    out = []
    for name, (hidden, inter, layers, kv, params) in MODELS.items():
        shapes = planner.llama_shapes(hidden, inter, layers, kv_dim=kv, rank=rank)
        weights = 2 * params
        on_gpu = weights < GPU_BYTES * (1 - planner.DEFAULT_MARGIN)
        budget = GPU_BYTES * (1 - planner.DEFAULT_MARGIN) - (weights if on_gpu else 0)
        plan = planner.plan_for_shapes(shapes, memory_budget=budget)
        one_pass = planner.plan_for_shapes(shapes, memory_budget=1e15)
        out.append((name, weights, budget, on_gpu, plan, plan.smallest_budget_bytes, one_pass.peak_bytes))
    return out


def _runs(counts: list[int]) -> str:
    """``28 ×20`` for twenty passes of 28 layers."""
    out, i = [], 0
    while i < len(counts):
        j = i
        while j < len(counts) and counts[j] == counts[i]:
            j += 1
        out.append(f"{counts[i]}" + (f" ×{j - i}" if j - i > 1 else ""))
        i = j
    return ", ".join(out)


def table(rows) -> str:
    lines = ["| model | bf16 weights | budget | statistics (fp32) | one pass would peak at | passes | layers per pass "
             "| estimated peak | smallest workable budget |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, weights, budget, on_gpu, plan, smallest, one_peak in rows:
        per_pass = _runs([len(p.layers) for p in plan.passes])
        where = format_bytes(weights) + ("" if on_gpu else " (not on the GPU)")
        lines.append(f"| {name} | {where} | {format_bytes(budget)} | {format_bytes(plan.statistics_bytes)} | "
                     f"{format_bytes(one_peak)} | {plan.num_passes} | {per_pass} | {format_bytes(plan.peak_bytes)} | "
                     f"{format_bytes(smallest)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", action="store_true", help="print every plan in full too")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    rows = plans(args.rank)
    print(table(rows))
    if args.plans:
        for row in rows:
            print(f"\n{row[0]}:\n{row[4]}")


if __name__ == "__main__":
    main()
