"""The memory planner's plans for Llama-2 shapes on one 80 GB GPU, from shapes alone (no model,
no GPU): the table of docs/design.md §6.4.

    python benchmarks/plan_table.py            # the Markdown table
    python benchmarks/plan_table.py --plans    # and every plan in full

All linear layers of the decoder (q, k, v, o, gate, up, down), rank 8, LoRA-DA with diagonal Y,
fp32 statistics, float64 solve with LOBPCG (what "auto" takes on CUDA), batches of 1 × 1024 and
2 × 1024 tokens (``--batch`` picks one) whose activations are :func:`loradafast.planner.llama_activation_bytes`
(SDPA attention, bf16).  The budget is what the default would be on an otherwise empty 80 GB
(80·10⁹ bytes) GPU holding the bf16 weights: the free 80 GB less the weights, less the 10 % margin
of that.  Llama-2-70B's bf16 weights (138 GB) do not fit one such GPU; its row assumes them
elsewhere (another GPU, CPU offload).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loradafast import planner  # noqa: E402
from loradafast.methods import registry  # noqa: E402
from loradafast.planner import format_bytes  # noqa: E402

GPU_BYTES = 80e9
# name: (hidden, intermediate, layers, k/v width, attention heads, parameters)
MODELS = {
    "Llama-2-7B": (4096, 11008, 32, 4096, 32, 6.738e9),
    "Llama-2-13B": (5120, 13824, 40, 5120, 40, 13.016e9),
    "Llama-2-70B": (8192, 28672, 80, 1024, 64, 68.977e9),
}
VOCAB = 32000
LORA_DA = registry.get_method(registry.DEFAULT_METHOD)
BATCHES = ((1, 1024), (2, 1024))  # sequences × tokens


def activations(name: str, batch) -> int:
    hidden, inter, layers, kv, heads, _ = MODELS[name]
    return planner.llama_activation_bytes(hidden, inter, layers, heads=heads, kv_dim=kv, vocab=VOCAB,
                                          tokens=batch[0] * batch[1])


def plans(rank: int = 8, batches=BATCHES):
    """(model, weights bytes, budget, whether the weights are on the GPU, plan, smallest budget,
    one pass's peak, a batch's activations, the batch)."""
    out = []
    for (name, (hidden, inter, layers, kv, _, params)), batch in itertools.product(MODELS.items(), batches):
        shapes = planner.llama_shapes(hidden, inter, layers, kv_dim=kv, rank=rank)
        weights = 2 * params
        on_gpu = weights < GPU_BYTES * (1 - planner.DEFAULT_MARGIN)
        budget = (GPU_BYTES - (weights if on_gpu else 0)) * (1 - planner.DEFAULT_MARGIN)
        act = activations(name, batch)
        plan = registry.plan_for_shapes(shapes, memory_budget=budget, activation_bytes=act)
        one_pass = registry.plan_for_shapes(shapes, memory_budget=1e15, activation_bytes=act)
        out.append((name, weights, budget, on_gpu, plan, plan.smallest_budget_bytes, one_pass.peak_bytes, act,
                    batch))
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
    lines = ["| model | bf16 weights | budget | batch | its activations | statistics (fp32) | one pass would peak at "
             "| passes | layers per pass | estimated peak | smallest workable budget |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, weights, budget, on_gpu, plan, smallest, one_peak, act, batch in rows:
        per_pass = _runs([len(p.layers) for p in plan.passes])
        where = format_bytes(weights) + ("" if on_gpu else " (not on the GPU)")
        lines.append(f"| {name} | {where} | {format_bytes(budget)} | {batch[0]} × {batch[1]} | {format_bytes(act)} | "
                     f"{format_bytes(plan.statistics_bytes)} | {format_bytes(one_peak)} | {plan.num_passes} | "
                     f"{per_pass} | {format_bytes(plan.peak_bytes)} | {format_bytes(smallest)} |")
    return "\n".join(lines)


def distributed_rows(world: int = 8, rank: int = 8, batch=BATCHES[0]):
    """Per model, one rank of ``world`` GPUs of 80 GB with the weights sharded by FSDP2 (bf16 / world
    per GPU): the plan, what a rank holds, sends and solves (docs/design.md §6.5)."""
    out = []
    for name, (hidden, inter, layers, kv, _, params) in MODELS.items():
        shapes = planner.llama_shapes(hidden, inter, layers, kv_dim=kv, rank=rank)
        weights = 2 * params / world
        budget = (GPU_BYTES - weights) * (1 - planner.DEFAULT_MARGIN)
        plan = registry.plan_for_shapes(shapes, memory_budget=budget, world_size=world,
                                       activation_bytes=activations(name, batch))
        by_name = {s.name: s for s in shapes}
        kept, solve_share = [], []
        for p in plan.passes:
            pass_shapes = [by_name[n] for n in p.layers]
            owners = planner.assign_owners(pass_shapes, world, LORA_DA.solve_cost)
            groups = planner._input_groups(pass_shapes)
            owned, load = [0] * world, [0.0] * world
            for key, g in groups.items():
                owned[owners[key]] += planner._group_statistics(planner.MemoryModel(), g)
                load[owners[key]] += LORA_DA.solve_cost(g)
            kept.append(max(owned))
            solve_share.append(max(load) / sum(load))
        factors = sum(4 * s.rank * (s.in_features + s.out_features) for s in shapes)
        out.append(dict(model=name, weights=weights, budget=budget, plan=plan, kept=max(kept),
                        accumulated=max(p.statistics_bytes for p in plan.passes),
                        sent=plan.statistics_bytes * (world - 1) / world,
                        all_reduce=2 * plan.statistics_bytes * (world - 1) / world,
                        factors=factors * (world - 1) / world, solve_share=max(solve_share)))
    return out


def distributed_table(rows, world: int) -> str:
    lines = ["| model | bf16 weights per GPU (FSDP2) | budget per GPU | passes "
             "| statistics accumulated per rank (largest pass) "
             "| statistics kept per rank after the reduction (largest) "
             "| estimated peak per rank | sent per rank: sums "
             "| (an all-reduce would send) | received per rank: factors | largest rank's share of the solve |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        plan = r["plan"]
        lines.append(f"| {r['model']} | {format_bytes(r['weights'])} | {format_bytes(r['budget'])} | "
                     f"{plan.num_passes} | {format_bytes(r['accumulated'])} | {format_bytes(r['kept'])} | "
                     f"{format_bytes(plan.peak_bytes)} | "
                     f"{format_bytes(r['sent'])} | {format_bytes(r['all_reduce'])} | {format_bytes(r['factors'])} | "
                     f"{r['solve_share']:.1%} (ideal {1 / world:.1%}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", action="store_true", help="print every plan in full too")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--world", type=int, default=0, help="the table for this many 80 GB GPUs (FSDP2) instead")
    parser.add_argument("--batch", type=int, nargs=2, metavar=("SEQUENCES", "TOKENS"),
                        help="one batch shape (default: 1 1024 and 2 1024; with --world, 1 1024 per rank)")
    args = parser.parse_args(argv)
    if args.world:
        print(distributed_table(distributed_rows(args.world, args.rank, tuple(args.batch or BATCHES[0])),
                                args.world))
        return
    rows = plans(args.rank, [tuple(args.batch)] if args.batch else BATCHES)
    print(table(rows))
    if args.plans:
        for row in rows:
            print(f"\n{row[0]}, batch {row[8][0]} × {row[8][1]}:\n{row[4]}")


if __name__ == "__main__":
    main()
