"""What a method is to the rest of the package: one :class:`Method` record, built by the method's
own module, which the registry collects.

A method's module holds its options class, its diagnostics class, its solve and its record; the
record tells the pipeline whether a statistics pass runs and what it collects, whether the base
weight moves, how the planner counts its workspace and cost, and what the report draws.  The
helpers below (:func:`per_layer`, :func:`per_shape` and the stacking of a :class:`Problem`'s
tensors) are what the methods solved layer by layer or in stacks of same-shaped layers share.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import planner
from ..layer_init import LayerDiagnostics
from ..options import MethodConfig
from ..planner import LayerShape, MemoryModel
from ..progress import track
from . import stability
from .factors import Factors
from .problem import Problem


@dataclass(frozen=True)
class Method:
    """One initialisation method: its name, options class, solve function and what it needs."""

    name: str
    title: str  # as papers write it, for messages
    config: type[MethodConfig]  # its options class
    # Every layer at once: Problem, options → {layer: Factors}.
    solve: Callable[[Problem, MethodConfig], dict[str, Factors]]
    # Its diagnostics class: the checks, warnings and report columns of what the solve reports.
    diagnostics: type[LayerDiagnostics] = LayerDiagnostics
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


def stacked_weights(p: Problem, names: list[str], dtype: torch.dtype) -> torch.Tensor:
    """The base weights of ``names`` stacked ``[B, out, in]``, the values of ``Problem.weight``."""
    tensors = [p.weights[name] for name in names]
    device = torch.device(p.device_of(names[0]))
    if all(t.dtype == dtype and t.device == device for t in tensors):
        return torch.stack(tensors)
    out = torch.empty(len(tensors), *tensors[0].shape, dtype=dtype, device=device)
    for row, t in zip(out, tensors):
        row.copy_(t)
    return out


def stacked_statistics(p: Problem, factor: str, names: list[str], dtype: torch.dtype) -> torch.Tensor:
    """``G``, ``Y`` or ``Z`` of ``names`` stacked, the values of ``Problem.G`` (``.Y``, ``.Z``)."""
    return p.stats.stack(factor, names, dtype, device=p.device_of(names[0]))


def scalings_of(p: Problem, names: list[str]) -> list[float]:
    return [p.scalings[name] for name in names]
