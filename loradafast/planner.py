"""The memory planner: how many statistics passes a budget allows (docs/design.md §6.4).

The statistics of every target layer (fp32 ``G`` per layer, ``Z`` per input group, ``Y`` per
layer) may not fit the device beside the model: Llama-2-13B's take ≈ 95 GB.  The planner estimates,
from the layer shapes and one batch's activations, what one pass over a set of input groups holds
at its peak:

* the statistics of those groups (what the method's pass collects);
* plus the larger of two moments that never coexist: a batch in flight (the activations autograd
  saves and the input rows the hooks keep, learnt from one sequence of the first batch by
  :mod:`.statistics.probe`, plus the accumulators' per-batch products) and the solve (the
  workspace of the largest input group: its float64 copies, Cholesky factors, preconditioner
  factors, LOBPCG blocks and one dense fallback, or a per-layer SVD), whichever the method says;
* plus the factors of every layer, which are kept until the adapter is applied.

Input groups are packed greedily in model order: a group joins the current pass if the pass's
estimate stays within the budget, and starts the next pass otherwise.  An input group is never
split (its layers share one ``Z`` and one factorisation).  A group that does not fit alone is an
error naming it.  The estimates are a model of the code (counted from the tensors each stage
allocates), not a measurement; the budget excludes the model itself, and the default budget's
margin is for the allocator's fragmentation and whatever else runs.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .device_memory import free_memory
from .device_memory import host_memory as _host_memory  # a module global: tests stub it

# The default budget keeps this fraction of the free memory free: the allocator's fragmentation,
# batches longer than the first, and whatever else runs.
DEFAULT_MARGIN = 0.10
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class MemoryBudgetError(ValueError):
    """An input group needs more memory than the budget, even in a pass of its own."""


@dataclass(frozen=True)
class LayerShape:
    """What the planner knows of a target layer: no weights, no model."""

    name: str
    in_features: int
    out_features: int
    input_group: str  # layers with the same input_group read the same input (share one Z)
    rank: int = 8


@dataclass(frozen=True)
class PassPlan:
    """One statistics pass of a :class:`MemoryPlan`: its layers (whole input groups), its
    statistics' size once complete and its estimated peak."""

    layers: tuple[str, ...]
    input_groups: tuple[str, ...]
    statistics_bytes: int  # what the pass's statistics hold once complete
    peak_bytes: int  # estimated peak of the pass and its solve, the kept factors included

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "input_groups": list(self.input_groups),
                "statistics_bytes": self.statistics_bytes, "peak_bytes": self.peak_bytes}


@dataclass
class MemoryPlan:
    """The passes of an initialisation: ``result.plan``.  ``str(plan)`` is a table."""

    passes: list[PassPlan]
    budget_bytes: int | None  # None: no limit
    budget_source: str  # where the budget came from
    statistics_bytes: int  # all layers' statistics, as one pass would hold them
    method: str = ""
    notes: list[str] = field(default_factory=list)
    smallest_budget_bytes: int = 0  # the largest input group alone: no plan exists below it

    @property
    def num_passes(self) -> int:
        return len(self.passes)

    @property
    def peak_bytes(self) -> int:
        return max((p.peak_bytes for p in self.passes), default=0)

    def to_dict(self) -> dict:
        return {"method": self.method, "budget_bytes": self.budget_bytes, "budget_source": self.budget_source,
                "statistics_bytes": self.statistics_bytes, "peak_bytes": self.peak_bytes,
                "smallest_budget_bytes": self.smallest_budget_bytes, "num_passes": self.num_passes,
                "passes": [p.to_dict() for p in self.passes], "notes": list(self.notes)}

    def __repr__(self) -> str:
        budget = "no limit" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        return (f"MemoryPlan({self.num_passes} pass{'es' if self.num_passes != 1 else ''}, "
                f"{sum(len(p.layers) for p in self.passes)} layers, statistics {format_bytes(self.statistics_bytes)}, "
                f"estimated peak {format_bytes(self.peak_bytes)}, budget {budget} ({self.budget_source}))")

    def __str__(self) -> str:
        lines = [f"loradafast memory plan ({self.method}): " + repr(self)[len("MemoryPlan("):-1]]
        width = len(str(self.num_passes))
        for i, p in enumerate(self.passes, 1):
            span = p.layers[0] if len(p.layers) == 1 else f"{p.layers[0]} … {p.layers[-1]}"
            lines.append(f"  pass {i:>{width}}: {len(p.layers):>4} layers, {len(p.input_groups):>3} input groups, "
                         f"statistics {format_bytes(p.statistics_bytes):>9}, peak {format_bytes(p.peak_bytes):>9}  "
                         f"({span})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_bytes(value) -> int | None:
    """``memory_budget`` as bytes: a number, or a string such as ``"40GB"`` (10⁹) or ``"40GiB"``
    (2³⁰); ``math.inf`` or ``"unlimited"`` for no limit (None)."""
    if isinstance(value, bool):
        raise TypeError(f"memory_budget must be a number of bytes or a string like '40GB', got {value!r}")
    if isinstance(value, (int, float)):
        if value == math.inf:
            return None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {value!r}")
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "").upper()
        if text in ("UNLIMITED", "INF", "NONE"):
            return None
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)([KMGT]I?B|B)?", text)
        if match is None or match.group(2) not in _UNITS and match.group(2) is not None:
            raise ValueError(f"memory_budget {value!r} is not a size; write e.g. '40GB', '512MiB' or 2e9")
        return parse_bytes(float(match.group(1)) * _UNITS[match.group(2) or ""])
    raise TypeError(f"memory_budget must be a number of bytes or a string like '40GB', got {type(value).__name__}")


def default_budget(device) -> tuple[int | None, str]:
    """Free memory of ``device`` less :data:`DEFAULT_MARGIN` of it, and where it came from (a margin
    of the *total* left nothing, and refused a small job, wherever less than that was free).  On
    CUDA the allocator's cached but unused blocks count as free; on CPU the kernel's
    ``MemAvailable``; elsewhere no limit."""
    device = torch.device(device)
    margin = f"less {DEFAULT_MARGIN:.0%}"
    if device.type == "cuda":
        free, total = free_memory(device)
        return _less_margin(free, total), f"free CUDA memory {margin}"
    if device.type == "cpu":
        available, total = _host_memory()
        if available is not None:
            return _less_margin(available, total), f"available RAM {margin}"
    return None, f"free memory of {device.type} unknown: no limit"


def _less_margin(free: int, total: int) -> int:
    return max(int((1 - DEFAULT_MARGIN) * min(free, total)), 1)


def resolve_budget(memory_budget, device) -> tuple[int | None, str]:
    """The budget in bytes (None: no limit) and its source; the smallest over the ranks of a
    distributed run, so that every rank makes the same plan and joins the same collectives."""
    if memory_budget is None:
        budget, source = default_budget(device)
    else:
        budget, source = parse_bytes(memory_budget), "memory_budget"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([-1 if budget is None else budget], dtype=torch.int64, device=device)
        t = torch.where(t < 0, torch.iinfo(torch.int64).max, t)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        budget = None if int(t) == torch.iinfo(torch.int64).max else int(t)
    return budget, source


# ---- the memory model ----------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryModel:
    """What a pass collects and how a method solves, as far as memory goes.  The method supplies
    its solve's workspace and cost (``methods.registry.memory_model`` fills them from its record);
    without them, one exact SVD per layer."""

    method: str = ""  # for messages
    statistics: frozenset = frozenset("GYZ")  # what the pass collects (of "G", "Y", "Z")
    y_factor: str = "diag"
    solve_dtype: torch.dtype = torch.float64
    # The method's options (its MethodConfig), which its workspace may read (LoRA-DA: its
    # eigensolver, dense or iterative); None: the method's defaults.
    options: object = field(default=None, compare=False)
    device_type: str = "cuda"
    world_size: int = 1  # ranks of a distributed run: each solves, and keeps the statistics of, its share
    # Split halves (collect(split_halves=True)): the odd batches' sums beside the totals, and the even
    # half the solve derives from them while it solves the halves: three times the statistics.
    halves: bool = False
    # One batch in flight: what autograd saves and the hooks keep (statistics.probe); 0: unknown.
    activation_bytes: int = 0
    # (model, one input group's layers) → bytes of the method's solve of that group.
    workspace: Callable[[MemoryModel, list[LayerShape]], int] | None = field(default=None, compare=False)
    # (one input group's layers) → estimated FLOPs of solving it: who solves what, in a distributed run.
    cost: Callable[[list[LayerShape]], float] | None = field(default=None, compare=False)

    @property
    def d(self) -> int:
        return torch.finfo(self.solve_dtype).bits // 8


def _group_statistics(m: MemoryModel, layers: list[LayerShape]) -> int:
    n = layers[0].in_features
    total = 4 * n * n if "Z" in m.statistics else 0
    for s in layers:
        total += 4 * s.out_features * n if "G" in m.statistics else 0
        if "Y" in m.statistics:
            total += 4 * (s.out_features if m.y_factor == "diag" else s.out_features ** 2)
    return total


def statistics_bytes(shapes: Iterable, factors, y_factor: str) -> int:
    """The fp32 sums a pass keeps for ``shapes`` (:class:`LayerShape`; one Z per input group)."""
    m = MemoryModel(statistics=frozenset(factors), y_factor=y_factor)
    return sum(_group_statistics(m, g) for g in _input_groups(shapes).values())


def _pass_transient(m: MemoryModel, groups: list[list[LayerShape]]) -> int:
    """The accumulators' transients: per batch, the reference kernels' products (``xᵀx`` and its
    ``tril``, ``gᵀx``); at the end of ``collect``, the in-place mirroring of every lower-triangle
    accumulator (:func:`loradafast.kernels.reference.symmetrize_lower_`), which needs a few diagonal tiles."""
    z = [s[0].in_features ** 2 for s in groups] if "Z" in m.statistics else []
    y = [s.out_features ** 2 for g in groups for s in g] if "Y" in m.statistics and m.y_factor == "full" else []
    g = [s.out_features * s.in_features for grp in groups for s in grp] if "G" in m.statistics else []
    per_batch = max([2 * v for v in z + y] + g + [0])
    end = 3 * 256 * 256 if z or y else 0
    return 4 * max(per_batch, end)


def svd_workspace(m: MemoryModel, layers: list[LayerShape]) -> int:
    """The largest per-layer exact SVD of an ``[out, in]`` matrix in the solve dtype (LoRA-GA,
    LoRA-One, the Fisher subspace): the matrix, LAPACK's copy and workspace, U and Vᵀ."""
    return max(_svd_bytes(m.d, s.out_features, s.in_features) for s in layers)


def _svd_bytes(d: int, out: int, n: int) -> int:
    k = min(out, n)
    return d * (3 * out * n + out * k + k * n + 4 * k * k)


def svd_cost(layers: list[LayerShape]) -> float:
    """Estimated FLOPs of one exact SVD per layer: ``4·out·in·min(out, in)``."""
    return float(sum(4 * s.out_features * s.in_features * min(s.out_features, s.in_features) for s in layers))


def _group_workspace(m: MemoryModel, layers: list[LayerShape]) -> int:
    return (m.workspace or svd_workspace)(m, layers)


def _pass_peak(m: MemoryModel, groups: list[list[LayerShape]], kept: int) -> tuple[int, int]:
    """(statistics, peak) of one pass over ``groups``; ``kept``: the factors of every layer."""
    stats = sum(_group_statistics(m, g) for g in groups)
    if m.world_size > 1:
        return stats, kept + _rank_peak(m, groups, stats)
    work = max(_group_workspace(m, g) for g in groups)
    in_flight = m.activation_bytes + _pass_transient(m, groups)  # a batch; the solve comes after the last
    return stats, kept + stats * (3 if m.halves else 1) + max(in_flight, work)


def _rank_peak(m: MemoryModel, groups: list[list[LayerShape]], stats: int) -> int:
    """One rank of a distributed run (docs/design.md §6.5): during the pass it accumulates its
    shard's sums of every layer (plus one reduction bucket at the end); after the reduction to the
    owners it keeps only the statistics of the groups it solves, and solves them one at a time."""
    from .statistics.hooks import BUCKET_BYTES

    layers = [s for g in groups for s in g]
    owners = assign_owners(layers, m.world_size, m.cost)
    solve = 0
    for r in range(m.world_size):
        mine = [g for g in groups if owners[g[0].input_group] == r]
        if mine:
            owned = sum(_group_statistics(m, g) for g in mine)
            solve = max(solve, owned + max(_group_workspace(m, g) for g in mine))
    in_flight = m.activation_bytes + _pass_transient(m, groups)
    return max(stats + max(in_flight, min(BUCKET_BYTES, stats)), solve)


def _input_groups(shapes: Iterable[LayerShape]) -> dict[str, list[LayerShape]]:
    """Input group → its layers, groups in the order their first layer comes in the model."""
    groups: dict[str, list[LayerShape]] = {}
    for s in shapes:
        groups.setdefault(s.input_group, []).append(s)
    for key, layers in groups.items():
        if len({s.in_features for s in layers}) != 1:
            raise ValueError(f"input group {key!r} has layers of different input widths: they cannot share one Z")
    return groups


def plan_passes(shapes: list[LayerShape], model: MemoryModel, budget: int | None, budget_source: str,
                notes: list[str] | None = None) -> MemoryPlan:
    """Greedy packing of whole input groups, in model order, into passes whose estimated peak
    stays within ``budget`` (module docstring).  Raises :class:`MemoryBudgetError` naming the
    largest input group when it does not fit alone (it sets the smallest budget any plan needs)."""
    groups = _input_groups(shapes)
    kept = sum(4 * s.rank * (s.in_features + s.out_features) for s in shapes)
    alone = {key: _pass_peak(model, [layers], kept) for key, layers in groups.items()}
    key = max(alone, key=lambda k: alone[k][1])
    stats, peak = alone[key]
    if budget is not None and peak > budget:
        layers = groups[key]
        raise MemoryBudgetError(
            f"input group {key!r} ({len(layers)} layer(s): {', '.join(s.name for s in layers)}; in="
            f"{layers[0].in_features}) needs an estimated {format_bytes(peak)} in a pass of its own (statistics "
            f"{format_bytes(stats)}, the rest the larger of the solve's workspace and a batch in flight (activations "
            f"{format_bytes(model.activation_bytes)}), and the factors kept for all {len(shapes)} layers), but the "
            f"memory budget is {format_bytes(budget)} ({budget_source}); no plan "
            f"fits below {format_bytes(peak)}: raise memory_budget, free device memory, use smaller batches (fewer "
            "activations), or exclude these layers with target_modules"
        )
    passes, current = [], []
    for layers in groups.values():
        if current and budget is not None and _pass_peak(model, current + [layers], kept)[1] > budget:
            passes.append(_pass_plan(model, current, kept))
            current = []
        current.append(layers)
    if current:
        passes.append(_pass_plan(model, current, kept))
    total = sum(_group_statistics(model, g) for g in groups.values())
    return MemoryPlan(passes, budget, budget_source, total, model.method, list(notes or []), peak)


def _pass_plan(m: MemoryModel, groups: list[list[LayerShape]], kept: int) -> PassPlan:
    stats, peak = _pass_peak(m, groups, kept)
    return PassPlan(tuple(s.name for g in groups for s in g), tuple(g[0].input_group for g in groups), stats, peak)


# ---- shapes for plans without a model (docs, what-if: methods.registry.plan_for_shapes) ----------------

def llama_shapes(hidden: int, intermediate: int, num_layers: int, *, kv_dim: int | None = None,
                 rank: int = 8) -> list[LayerShape]:
    """Every linear layer of a Llama decoder (q, k, v, o, gate, up, down per block), in model order,
    with its input groups (q/k/v share the attention input, gate/up the MLP input)."""
    kv = hidden if kv_dim is None else kv_dim
    out = []
    for i in range(num_layers):
        p = f"model.layers.{i}"
        attn, mlp = f"{p}.self_attn.q_proj", f"{p}.mlp.gate_proj"
        out += [LayerShape(f"{p}.self_attn.q_proj", hidden, hidden, attn, rank),
                LayerShape(f"{p}.self_attn.k_proj", hidden, kv, attn, rank),
                LayerShape(f"{p}.self_attn.v_proj", hidden, kv, attn, rank),
                LayerShape(f"{p}.self_attn.o_proj", hidden, hidden, f"{p}.self_attn.o_proj", rank),
                LayerShape(f"{p}.mlp.gate_proj", hidden, intermediate, mlp, rank),
                LayerShape(f"{p}.mlp.up_proj", hidden, intermediate, mlp, rank),
                LayerShape(f"{p}.mlp.down_proj", intermediate, hidden, f"{p}.mlp.down_proj", rank)]
    return out


def llama_activation_bytes(hidden: int, intermediate: int, num_layers: int, *, heads: int, kv_dim: int,
                           vocab: int, tokens: int, itemsize: int = 2) -> int:
    """What one batch of ``tokens`` tokens holds for its backward in the statistics pass of a Llama
    decoder in half precision (``itemsize`` 2) with SDPA attention, every linear layer a target, as
    :mod:`.statistics.probe` measures it (tests/pipeline/test_planner.py checks the two agree).  Per token and
    block: the four ``hidden``-wide half-precision tensors (the two normed inputs the hooks keep,
    the query after RoPE, the attention output), the key and value (``kv_dim`` each), the
    normalisations' float32 inputs and inverse RMS, the attention's log-sum-exp per head, and
    four ``intermediate``-wide tensors (gate, up, their activation and product); per token, the
    float32 log-probabilities over the vocabulary."""
    per_block = (4 * itemsize * hidden + 2 * itemsize * kv_dim + 2 * 4 * hidden + 2 * 4 + 4 * heads
                 + 4 * itemsize * intermediate)
    return tokens * (num_layers * per_block + 4 * vocab)


# ---- the cost model: which rank solves which input group (docs/design.md §6.5) ---------------------

def assign_owners(shapes: Iterable, world_size: int, cost: Callable[[list[LayerShape]], float] | None = None
                  ) -> dict[str, int]:
    """Input group → the rank that solves it: longest estimated ``cost`` (the method's; default
    :func:`svd_cost`) first, each to the rank with the least estimated work so far (ties to the
    lowest rank; groups of equal cost in name order).  Deterministic, so every rank computes the
    same assignment.  After the last group, the estimated work of any two ranks differs by at most
    the cost of one input group.  Only the ratios between groups matter."""
    groups = _input_groups(s if isinstance(s, LayerShape) else LayerShape(*s) for s in shapes)
    costs = {key: (cost or svd_cost)(layers) for key, layers in groups.items()}
    load = [0.0] * world_size
    owners = {}
    for key in sorted(costs, key=lambda k: (-costs[k], k)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[key] = rank
        load[rank] += costs[key]
    return owners
