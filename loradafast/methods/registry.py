"""One record per method: what it needs, what it does to the model, its options, its solve, its
memory and cost for the planner, what the report draws.

Adding a method is adding one :class:`Method` to :data:`REGISTRY` (and its formulas to a module
of this package).  Everything else (the API's checks, whether a statistics pass runs, whether the
base weight moves, the defaults, the memory plan, who solves what on many ranks, the report's
spectra) reads these records: no other module names a method.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..options import (KEYWORDS, FisherSubspaceConfig, LoraDAConfig, LoraGAConfig, LoraOneConfig, MethodConfig,
                       MiloraConfig, PissaConfig, RandomLoraConfig)
from .. import planner
from ..planner import LayerShape, MemoryModel
from ..progress import track
from . import gradient_svd, lora_da, lora_da_solve, stability, weight_svd
from .factors import Factors
from .fisher import fisher_subspace, fisher_subspace_stack
from .problem import Problem


@dataclass(frozen=True)
class Method:
    """One initialisation method: its name, options class, solve function and what it needs."""

    name: str
    title: str  # as papers write it, for messages
    config: type[MethodConfig]  # its options class
    # Every layer at once: Problem, options → {layer: Factors}.
    solve: Callable[[Problem, MethodConfig], dict[str, Factors]]
    statistics: frozenset = frozenset()  # of "G", "Y", "Z"; empty: weight-only, no statistics pass
    needs_weights: bool = False  # reads the base weights
    moves_base: bool = False  # the base weight becomes W − s·B·A
    rank_factor: int = 1  # singular triplets taken per rank (LoRA-GA: 2r)
    # The planner's view of its solve: (memory model, one input group's layers) → bytes, and
    # (that group's layers) → estimated FLOPs; default one exact SVD per layer.
    workspace: Callable[[MemoryModel, list[LayerShape]], int] = planner.svd_workspace
    solve_cost: Callable[[list[LayerShape]], float] = planner.svd_cost
    # For the report: (result ranks, options, statistics, max width) → per layer, the smallest
    # eigenvalues of the matrix whose eigenvectors the method keeps; None: nothing to draw.
    spectra: Callable | None = None
    # What the split-half warning advises when the data barely determine the method's subspaces.
    noise_advice: str = stability.MORE_SAMPLES

    @property
    def data_aware(self) -> bool:
        return bool(self.statistics)

    @property
    def default_gamma(self) -> float | None:
        """The default scale denominator γ (None for methods without one)."""
        fields = {f.name: f.default for f in dataclasses.fields(self.config)}
        return fields.get("gamma")


# Where the layers of one shape and rank are solved as stacks (per_shape): on a GPU, a loop over
# layers is bound by its launches and host synchronisations, which grow with the model's depth.  On
# a CPU launches cost little and a stack streams all its matrices through each product where a
# layer at a time keeps its matrix in cache; stacks were not shown to be faster there
# (benchmarks/README.md), so the CPU solves a layer at a time.
BATCHED_DEVICES = ("cuda",)
# A stack copies its layers' matrices: at most this many bytes of them per stack (counted as
# float64, with the K-FAC factors a method stacks beside them), so a shape of many large layers is
# solved in several stacks.  The SVDs' workspaces (the exact SVD's factors, or the Krylov bases)
# take up to about twice as much again.
STACK_BYTES = 1 << 30


def per_layer(formula: Callable[[Problem, str, MethodConfig], Factors]):
    """A method solved layer by layer with ``formula(problem, name, config)``."""
    def solve(problem: Problem, config: MethodConfig) -> dict[str, Factors]:
        return {name: formula(problem, name, config) for name in track(problem.shapes, desc="loradafast: solve")}
    return solve


def per_shape(stacked: Callable[[Problem, list[str], MethodConfig], list[Factors]],
              formula: Callable[[Problem, str, MethodConfig], Factors], *, factors: bool = False,
              stackable: Callable[[MethodConfig], bool] = lambda config: True):
    """A method solved in stacks of same-shaped layers: ``stacked(problem, names, config)`` returns
    the factors of the layers ``names``, which share their device, shape ``[out, in]`` and rank,
    in that order.  Where the device is not in :data:`BATCHED_DEVICES`, or ``stackable(config)``
    is False, ``formula`` layer by layer in the problem's order (:func:`per_layer`); both give
    the same factors up to rounding.  ``factors``: the method also stacks Y and Z, counted in the
    stack's bytes (:data:`STACK_BYTES`)."""
    def solve(problem: Problem, config: MethodConfig) -> dict[str, Factors]:
        batches = _shape_batches(problem, factors) if stackable(config) else []
        if not any(batched for batched, _ in batches):
            return per_layer(formula)(problem, config)
        solved = {}
        for batched, names in track(batches, total=len(problem.shapes), desc="loradafast: solve",
                                    weight=lambda batch: len(batch[1])):
            if batched:
                solved.update(zip(names, stacked(problem, names, config)))
            else:
                solved[names[0]] = formula(problem, names[0], config)
        return {name: solved[name] for name in problem.shapes}
    return solve


def _shape_batches(problem: Problem, factors: bool) -> list[tuple[bool, list[str]]]:
    """(stacked?, layer names): the layers grouped by device, shape and rank, in stacks of at most
    :data:`STACK_BYTES`; one layer per entry where the device is not in :data:`BATCHED_DEVICES`."""
    groups = defaultdict(list)
    for name, (fin, fout, _) in problem.shapes.items():
        groups[(torch.device(problem.device_of(name)), fout, fin, problem.ranks[name])].append(name)
    batches = []
    for (device, fout, fin, _), names in groups.items():
        if device.type not in BATCHED_DEVICES:
            batches.extend((False, [name]) for name in names)
            continue
        nbytes = 8 * (fout * fin + (fin * fin + fout * fout if factors else 0))
        size = max(1, STACK_BYTES // nbytes)
        batches.extend((True, names[i:i + size]) for i in range(0, len(names), size))
    return batches


def _weights(p: Problem, names: list[str], dtype: torch.dtype) -> torch.Tensor:
    """The base weights of ``names`` stacked ``[B, out, in]``, the values of ``Problem.weight``."""
    tensors = [p.weights[name] for name in names]
    device = torch.device(p.device_of(names[0]))
    if all(t.dtype == dtype and t.device == device for t in tensors):
        return torch.stack(tensors)
    out = torch.empty(len(tensors), *tensors[0].shape, dtype=dtype, device=device)
    for row, t in zip(out, tensors):
        row.copy_(t)
    return out


def _stats(p: Problem, factor: str, names: list[str], dtype: torch.dtype) -> torch.Tensor:
    """``G``, ``Y`` or ``Z`` of ``names`` stacked, the values of ``Problem.G`` (``.Y``, ``.Z``)."""
    return p.stats.stack(factor, names, dtype, device=p.device_of(names[0]))


def _scalings(p: Problem, names: list[str]) -> list[float]:
    return [p.scalings[name] for name in names]


def _lora(p: Problem, name: str, c: RandomLoraConfig) -> Factors:
    fin, fout, _ = p.shapes[name]
    return weight_svd.lora(fout, fin, p.ranks[name], generator=p.generator)


def _pissa(p: Problem, name: str, c: PissaConfig) -> Factors:
    return weight_svd.pissa(p.weight(name, c.dtype), p.ranks[name], p.scalings[name], niter=c.niter)


def _pissa_stack(p: Problem, names: list[str], c: PissaConfig) -> list[Factors]:
    return weight_svd.pissa_stack(_weights(p, names, c.dtype), p.ranks[names[0]], _scalings(p, names))


def _milora(p: Problem, name: str, c: MiloraConfig) -> Factors:
    return weight_svd.milora(p.weight(name, c.dtype), p.ranks[name], p.scalings[name])


def _milora_stack(p: Problem, names: list[str], c: MiloraConfig) -> list[Factors]:
    return weight_svd.milora_stack(_weights(p, names, c.dtype), p.ranks[names[0]], _scalings(p, names))


# G is an fp32 sum: it is read in float32, and only the exact SVD works in c.dtype (the
# randomized one runs in float32, so a float64 copy of every G would be a needless cost;
# measurements: benchmarks/README.md, 'Measurements behind the library's constants').
def _lora_ga(p: Problem, name: str, c: LoraGAConfig) -> Factors:
    return gradient_svd.lora_ga(p.G(name, _gradient_dtype(c)), p.ranks[name], gamma=c.gamma, variant=c.variant,
                                svd=c.svd, dtype=c.dtype)


def _lora_ga_stack(p: Problem, names: list[str], c: LoraGAConfig) -> list[Factors]:
    return gradient_svd.lora_ga_stack(_stats(p, "G", names, _gradient_dtype(c)), p.ranks[names[0]], gamma=c.gamma,
                                      variant=c.variant, svd=c.svd, dtype=c.dtype)


def _lora_one(p: Problem, name: str, c: LoraOneConfig) -> Factors:
    return gradient_svd.lora_one(p.G(name, _gradient_dtype(c)), p.ranks[name], gamma=c.gamma, svd=c.svd,
                                 dtype=c.dtype)


def _lora_one_stack(p: Problem, names: list[str], c: LoraOneConfig) -> list[Factors]:
    return gradient_svd.lora_one_stack(_stats(p, "G", names, _gradient_dtype(c)), p.ranks[names[0]], gamma=c.gamma,
                                       svd=c.svd, dtype=c.dtype)


def _gradient_dtype(c) -> torch.dtype:
    return c.dtype if c.svd == "exact" else torch.float32


def _fisher_subspace(p: Problem, name: str, c: FisherSubspaceConfig) -> Factors:
    return fisher_subspace(p.weight(name, c.dtype), p.Y(name, c.dtype), p.Z(name, c.dtype),
                           p.ranks[name], p.scalings[name])


def _fisher_subspace_stack(p: Problem, names: list[str], c: FisherSubspaceConfig) -> list[Factors]:
    return fisher_subspace_stack(_weights(p, names, c.dtype), _stats(p, "Y", names, c.dtype),
                                 _stats(p, "Z", names, c.dtype), p.ranks[names[0]], _scalings(p, names))


def _fisher_subspace_workspace(m: MemoryModel, layers: list[LayerShape]) -> int:
    """An exact SVD per layer, and the group's Z and Y in the solve dtype with the energies' products."""
    n, out = layers[0].in_features, max(s.out_features for s in layers)
    y = out * out if m.y_factor == "full" else out
    return planner.svd_workspace(m, layers) + m.d * (2 * n * n + 2 * y + 2 * min(n, out) * (n + out))


def _lora_da(p: Problem, c: LoraDAConfig) -> dict[str, Factors]:
    return lora_da_solve.solve_lora_da(p.stats, p.ranks, c, device=p.device)


REGISTRY: dict[str, Method] = {m.name: m for m in (
    # All layers together: one factorisation per input group, its cost and workspace per group.
    Method("lora-da", "LoRA-DA", LoraDAConfig, _lora_da, statistics=frozenset("GYZ"),
           workspace=lora_da_solve.planned_workspace, solve_cost=lora_da_solve.solve_cost,
           spectra=lora_da.omega_spectra, noise_advice=lora_da.NOISE_ADVICE),
    Method("lora", "LoRA", RandomLoraConfig, per_layer(_lora)),
    # PiSSA's niter: svd_lowrank draws from the global RNG, layer by layer as PEFT does.
    Method("pissa", "PiSSA", PissaConfig, per_shape(_pissa_stack, _pissa, stackable=lambda c: c.niter is None),
           needs_weights=True, moves_base=True),
    Method("milora", "MiLoRA", MiloraConfig, per_shape(_milora_stack, _milora), needs_weights=True,
           moves_base=True),
    Method("lora-ga", "LoRA-GA", LoraGAConfig, per_shape(_lora_ga_stack, _lora_ga), statistics=frozenset("G"),
           moves_base=True, rank_factor=2),
    Method("lora-one", "LoRA-One", LoraOneConfig, per_shape(_lora_one_stack, _lora_one), statistics=frozenset("G")),
    Method("fisher-subspace", "Fisher subspace", FisherSubspaceConfig,
           per_shape(_fisher_subspace_stack, _fisher_subspace, factors=True), statistics=frozenset("YZ"),
           needs_weights=True, moves_base=True, workspace=_fisher_subspace_workspace),
)}
METHODS = tuple(REGISTRY)
DEFAULT_METHOD = METHODS[0]
WEIGHT_ONLY_METHODS = tuple(name for name, m in REGISTRY.items() if not m.data_aware)


def get_method(method: str) -> Method:
    record = REGISTRY.get(method)
    if record is None:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return record


def method_keywords(caller: str, options: dict, dtype_keyword: str) -> dict:
    """``options`` if every keyword is a method option (the solve dtype under ``dtype_keyword``,
    the caller's name for it); else the TypeError of an unknown keyword argument."""
    for key in options:
        if key not in KEYWORDS or (KEYWORDS[key] == "dtype" and key != dtype_keyword):
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}")
    return options


def build_config(method: Method, config: MethodConfig | None, keywords: dict) -> MethodConfig:
    """``method``'s options: ``config`` as given, or built from the keyword arguments that are
    not None (None means "the default").  A keyword that is not an option of ``method`` raises."""
    given = {k: v for k, v in keywords.items() if v is not None}
    if config is not None:
        if given:
            raise ValueError(f"pass the options either as config= or as keywords, not both (got config= and "
                             f"{', '.join(given)})")
        if not isinstance(config, method.config):
            raise TypeError(f"method {method.name!r} takes a {method.config.__name__}, got {type(config).__name__}")
        return config
    fields = {f.name for f in dataclasses.fields(method.config)}
    foreign = [k for k in given if KEYWORDS[k] not in fields]
    if foreign:
        options = sorted(k for k, f in KEYWORDS.items() if f in fields and k != "dtype")
        raise ValueError(f"{', '.join(foreign)} do(es) not apply to method {method.name!r} ({method.title}); its "
                         f"options are {', '.join(options)} ({method.config.__name__})")
    return method.config(**{KEYWORDS[k]: v for k, v in given.items()})


def generator_for(config: MethodConfig) -> torch.Generator | None:
    seed = getattr(config, "seed", None)
    return torch.Generator().manual_seed(seed) if seed is not None else None


def memory_model(method: Method, **fields) -> MemoryModel:
    """The planner's :class:`~loradafast.planner.MemoryModel` of ``method``: what its pass
    collects, its workspace and its cost; ``fields`` as the model's (y_factor, solve_dtype, ...)."""
    return MemoryModel(method.name, method.statistics, workspace=method.workspace, cost=method.solve_cost,
                       **fields)


def plan_for_shapes(shapes, *, memory_budget, method: str = DEFAULT_METHOD, statistics=None,
                    **fields) -> planner.MemoryPlan:
    """The plan :func:`loradafast.initialize` would make for these layers, without a model.

    ``shapes``: :class:`~loradafast.planner.LayerShape` or ``(name, in, out, input_group[, rank])``
    tuples, in model order.  ``memory_budget`` as in ``initialize`` (bytes or e.g. ``"80GB"``),
    per rank.  ``statistics`` defaults to what ``method``'s pass collects.  ``fields``: the memory
    model's (``y_factor``, ``solve_dtype``, ``eigensolver``, ``device_type``, ``world_size``: the
    ranks of a distributed run, each solving its share; ``activation_bytes``: one batch's
    activations, :func:`loradafast.planner.llama_activation_bytes` for a Llama)."""
    layers = [s if isinstance(s, LayerShape) else LayerShape(*s) for s in shapes]
    model = memory_model(get_method(method), **fields)
    if statistics is not None:
        model = dataclasses.replace(model, statistics=frozenset(statistics))
    return planner.plan_passes(layers, model, planner.parse_bytes(memory_budget), "memory_budget")
