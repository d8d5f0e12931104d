"""The weight-SVD methods (docs/design.md §5): LoRA (random, no SVD), PiSSA and MiLoRA, from the
singular triplets of the base weight alone: their options, diagnostics, formulas and records.
Conventions (``[out, in]`` tensors, :class:`.Factors`, stacks, canonical signs) as described in
:mod:`.factors`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..layer_init import LayerDiagnostics, reported
from ..options import MethodConfig, option
from ..plots import singular_values as singular_values_plot
from .factors import Factors, layer_factors, split_triplets, stack_scalings
from .method import Method, per_layer, per_shape, scalings_of, stacked_weights
from .problem import Problem


@dataclass(kw_only=True)
class RandomLoraConfig(MethodConfig):
    """PEFT's default LoRA init: ``seed`` of the generator of the random ``lora_A`` (None: the
    global RNG, as PEFT)."""

    seed: int | None = option(None, "seed of the random lora_A (none: the global RNG, as PEFT)")

    def __post_init__(self):
        super().__post_init__()
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")


@dataclass(kw_only=True)
class PissaConfig(MethodConfig):
    """PiSSA: ``niter`` None for the exact SVD, n for ``torch.svd_lowrank`` with n iterations
    (PEFT's ``"pissa_niter_<n>"``)."""

    niter: int | None = option(None, "none: the exact SVD; n: torch.svd_lowrank with n iterations",
                               keyword="pissa_niter")

    def __post_init__(self):
        super().__post_init__()
        if self.niter is not None and (not isinstance(self.niter, int) or isinstance(self.niter, bool)
                                       or self.niter < 0):
            raise ValueError(f"pissa_niter must be None (exact SVD) or a non-negative integer, got {self.niter!r}")


@dataclass(kw_only=True)
class MiloraConfig(MethodConfig):
    """MiLoRA: no options beyond the working ``dtype``."""


def singular_columns(values: list | None) -> dict:
    """The report's s_1 and s_r: the largest and the r-th kept singular value."""
    return {"s_1": values[0], "s_r": values[-1]} if values else {}


@dataclass
class SingularDiagnostics(LayerDiagnostics):
    """PiSSA, MiLoRA: the kept singular values of the weight."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("s_1", "s_r")
    COLUMN_NOTES: ClassVar[str] = "s_1, s_r: the largest and the r-th kept singular value"
    PLOTS: ClassVar[tuple] = (("singular_values.png", singular_values_plot("singular_values", "weight")),)

    singular_values: torch.Tensor | None = reported()

    @classmethod
    def derived_columns(cls, entry: dict) -> dict:
        return singular_columns(entry.get("singular_values"))


def lora(out_features: int, in_features: int, rank: int, *, generator: torch.Generator | None = None,
         dtype: torch.dtype = torch.float32) -> Factors:
    """PEFT's default (``init_lora_weights=True``, ``LoraLayer.reset_lora_parameters``), itself the
    reference implementation of LoRA (Hu et al., arXiv 2106.09685, microsoft/LoRA ``loralib``):
    ``lora_A`` kaiming-uniform with ``a = √5``, i.e. U(−1/√in, 1/√in), and ``lora_B = 0``.

    Drawn on the CPU from ``generator`` (the global RNG when None, as PEFT does), so a seed gives
    the same factors on every device.
    """
    a = torch.empty(rank, in_features, dtype=dtype)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return Factors(a, torch.zeros(out_features, rank, dtype=dtype), moves_base=False)


def pissa(weight: torch.Tensor, rank: int, scaling: float, *, niter: int | None = None) -> Factors:
    """PiSSA (Meng et al., arXiv 2404.02948), as PEFT's ``init_lora_weights="pissa"``.

    From ``W = U S Vᵀ``: ``lora_A = diag(√(S_r/s)) V_rᵀ``, ``lora_B = U_r diag(√(S_r/s))`` over the
    r largest singular triplets, and the base weight becomes the residual ``W − s·B·A``.
    ``niter`` switches to the randomised ``torch.svd_lowrank(W, q=r, niter)`` (PEFT's
    ``"pissa_niter_<n>"``): much faster on large layers, approximate, and random (global RNG).
    """
    if niter is None:
        return pissa_stack(weight[None], rank, [scaling])[0]
    u, s, v = torch.svd_lowrank(weight, q=rank, niter=niter)
    a, b = split_triplets(u, s, v.T, scaling)
    return Factors(a, b, moves_base=True, diagnostics=SingularDiagnostics(singular_values=s.detach().cpu()))


def pissa_stack(weights: torch.Tensor, rank: int, scalings: Sequence[float]) -> list[Factors]:
    """:func:`pissa` (exact SVD) of every layer of a stack ``[B, out, in]``: one batched SVD."""
    u, s, vh = torch.linalg.svd(weights, full_matrices=False)
    return _split_stack(u[..., :rank], s[:, :rank], vh[:, :rank], scalings)


def milora(weight: torch.Tensor, rank: int, scaling: float) -> Factors:
    """MiLoRA (Wang et al., arXiv 2406.09044): PiSSA's split applied to the r *smallest* singular
    triplets of ``W`` (its minor components), leaving the principal ones in the base weight
    ``W − s·B·A``."""
    return milora_stack(weight[None], rank, [scaling])[0]


def milora_stack(weights: torch.Tensor, rank: int, scalings: Sequence[float]) -> list[Factors]:
    """:func:`milora` of every layer of a stack ``[B, out, in]``: one batched SVD."""
    u, s, vh = torch.linalg.svd(weights, full_matrices=False)
    return _split_stack(u[..., -rank:], s[:, -rank:], vh[:, -rank:], scalings)


def _split_stack(u, s, vh, scalings: Sequence[float]) -> list[Factors]:
    a, b = split_triplets(u, s, vh, stack_scalings(scalings, s))
    return layer_factors(a, b, True, [SingularDiagnostics(singular_values=v) for v in s.detach().cpu().unbind(0)])


def _lora(p: Problem, name: str, c: RandomLoraConfig) -> Factors:
    fin, fout, _ = p.shapes[name]
    return lora(fout, fin, p.ranks[name], generator=p.generator)


def _pissa(p: Problem, name: str, c: PissaConfig) -> Factors:
    return pissa(p.weight(name, c.dtype), p.ranks[name], p.scalings[name], niter=c.niter)


def _pissa_stack(p: Problem, names: list[str], c: PissaConfig) -> list[Factors]:
    return pissa_stack(stacked_weights(p, names, c.dtype), p.ranks[names[0]], scalings_of(p, names))


def _milora(p: Problem, name: str, c: MiloraConfig) -> Factors:
    return milora(p.weight(name, c.dtype), p.ranks[name], p.scalings[name])


def _milora_stack(p: Problem, names: list[str], c: MiloraConfig) -> list[Factors]:
    return milora_stack(stacked_weights(p, names, c.dtype), p.ranks[names[0]], scalings_of(p, names))


LORA = Method("lora", "LoRA", RandomLoraConfig, per_layer(_lora))
# PiSSA's niter: svd_lowrank draws from the global RNG, layer by layer as PEFT does.
PISSA = Method("pissa", "PiSSA", PissaConfig, per_shape(_pissa_stack, _pissa, stackable=lambda c: c.niter is None),
               diagnostics=SingularDiagnostics, needs_weights=True, moves_base=True)
MILORA = Method("milora", "MiLoRA", MiloraConfig, per_shape(_milora_stack, _milora),
                diagnostics=SingularDiagnostics, needs_weights=True, moves_base=True)
