"""The Fisher-weighted weight subspace (docs/design.md §5): :func:`fisher_energies` scores the
singular triplets of a weight by their K-FAC Fisher energy, and :func:`fisher_subspace` keeps the
r highest-scoring ones, split PiSSA-style.  Conventions (``[out, in]`` tensors, :class:`.Factors`,
stacks, canonical signs) as described in :mod:`.factors`.  Its options, diagnostics and record too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import planner
from ..layer_init import reported
from ..options import Y_FACTORS, MethodConfig, check_choice, option
from ..planner import LayerShape, MemoryModel
from .factors import Factors, layer_factors, split_triplets, stack_scalings
from .method import Method, per_shape, scalings_of, stacked_statistics, stacked_weights
from .problem import Problem
from .weight_svd import SingularDiagnostics


@dataclass(kw_only=True)
class FisherSubspaceConfig(MethodConfig):
    """The Fisher subspace: ``y_factor`` as in :class:`~loradafast.LoraDAConfig`."""

    y_factor: str | None = option(None, "the output-gradient factor Y: diag, or full (out×out per layer); none: diag")

    def __post_init__(self):
        super().__post_init__()
        if self.y_factor is not None:
            check_choice("y_factor", self.y_factor, Y_FACTORS)


@dataclass
class FisherSubspaceDiagnostics(SingularDiagnostics):
    """Fisher subspace: the Fisher energy of the kept singular triplets of the weight."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("s_1", "s_r", "energy_fraction")
    COLUMN_NOTES: ClassVar[str] = ("s_1, s_r: the largest and the r-th kept singular value; energy_fraction: the "
                                   "share of the Fisher energy the kept triplets hold")

    fisher_energy: torch.Tensor | None = None  # of the kept triplets, in decreasing order
    energy_fraction: float | None = reported()
    singular_indices: torch.Tensor | None = None  # positions in the σ-descending order


def fisher_energies(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, Y: torch.Tensor,
                    Z: torch.Tensor) -> torch.Tensor:
    """K-FAC Fisher energy of each rank-1 component ``σ_i u_i v_iᵀ`` of a weight ``[out, in]``.

    With ``F ≈ Y ⊗ Z`` (Y ``[out, out]`` or its diagonal ``[out]``, Z ``[in, in]``)::

        vec(σ u vᵀ)ᵀ F vec(σ u vᵀ) = σ² (uᵀ Y u)(vᵀ Z v)

    the second-order loss increase of removing the component from the weight.  All arguments may
    carry the same leading batch dimension (a stack of layers).
    """
    if Y.dim() == u.dim() - 1:
        uyu = (u.square() * Y[..., :, None]).sum(-2)
    else:
        uyu = ((Y @ u) * u).sum(-2)
    vzv = ((vh @ Z) * vh).sum(-1)
    return s.square() * uyu * vzv


def fisher_subspace(weight: torch.Tensor, Y: torch.Tensor, Z: torch.Tensor, rank: int, scaling: float) -> Factors:
    """Fisher-subspace initialisation: OUR instantiation, in the spirit of "Learning in the Fisher
    Subspace" (arXiv 2605.01046), whose algorithm text we did not have; this is not that paper's
    algorithm.

    Score every singular triplet ``(u, σ, v)`` of ``W`` by its K-FAC Fisher energy
    ``σ²(uᵀYu)(vᵀZv)`` (:func:`fisher_energies`), keep the r highest-scoring triplets (in
    decreasing score), and split them PiSSA-style: ``lora_A = diag(√(σ/s)) Vᵀ``,
    ``lora_B = U diag(√(σ/s))``, base weight ``W − s·B·A``.  PiSSA ranks the triplets by ``σ``
    alone; this ranks them by how much the loss on the initialisation samples depends on them.
    With ``Y = I`` and ``Z = I`` it is PiSSA.
    """
    return fisher_subspace_stack(weight[None], Y[None], Z[None], rank, [scaling])[0]


def fisher_subspace_stack(weights: torch.Tensor, Y: torch.Tensor, Z: torch.Tensor, rank: int,
                          scalings: Sequence[float]) -> list[Factors]:
    """:func:`fisher_subspace` of every layer of a stack: ``weights`` ``[B, out, in]``, ``Y``
    ``[B, out]`` (diagonal) or ``[B, out, out]``, ``Z`` ``[B, in, in]``; one batched SVD."""
    u, s, vh = torch.linalg.svd(weights, full_matrices=False)
    # In float64 whatever the working dtype: the product of three squares leaves float32's range
    # (both ways) for weights and factors far from 1, and the ranking would then sort ties.
    f64 = torch.float64
    energy = fisher_energies(u.to(f64), s.to(f64), vh.to(f64), Y.to(f64), Z.to(f64))
    order = torch.argsort(energy, dim=-1, descending=True)[:, :rank]
    u = u.gather(-1, order[:, None, :].expand(-1, u.shape[-2], -1))
    vh = vh.gather(-2, order[..., None].expand(-1, -1, vh.shape[-1]))
    s, kept = s.gather(-1, order), energy.gather(-1, order)
    a, b = split_triplets(u, s, vh, stack_scalings(scalings, s))
    total = energy.sum(-1)
    fractions = torch.where(total > 0, kept.sum(-1) / total, torch.full_like(total, float("nan"))).tolist()
    kept, order, values = (t.detach().cpu().unbind(0) for t in (kept, order, s))
    return layer_factors(a, b, True, [FisherSubspaceDiagnostics(fisher_energy=e, energy_fraction=f, singular_indices=i,
                                                                 singular_values=v)
                                       for e, f, i, v in zip(kept, fractions, order, values)])


def _fisher_subspace(p: Problem, name: str, c: FisherSubspaceConfig) -> Factors:
    return fisher_subspace(p.weight(name, c.dtype), p.Y(name, c.dtype), p.Z(name, c.dtype), p.ranks[name],
                           p.scalings[name])


def _fisher_subspace_stack(p: Problem, names: list[str], c: FisherSubspaceConfig) -> list[Factors]:
    return fisher_subspace_stack(stacked_weights(p, names, c.dtype), stacked_statistics(p, "Y", names, c.dtype),
                                 stacked_statistics(p, "Z", names, c.dtype), p.ranks[names[0]], scalings_of(p, names))


def _workspace(m: MemoryModel, layers: list[LayerShape]) -> int:
    """An exact SVD per layer, and the group's Z and Y in the solve dtype with the energies' products."""
    n, out = layers[0].in_features, max(s.out_features for s in layers)
    y = out * out if m.y_factor == "full" else out
    return planner.svd_workspace(m, layers) + m.d * (2 * n * n + 2 * y + 2 * min(n, out) * (n + out))


FISHER_SUBSPACE = Method("fisher-subspace", "Fisher subspace", FisherSubspaceConfig,
                         per_shape(_fisher_subspace_stack, _fisher_subspace, factors=True),
                         diagnostics=FisherSubspaceDiagnostics, statistics=frozenset("YZ"), needs_weights=True,
                         moves_base=True, workspace=_workspace)
