"""The weight-SVD methods (docs/design.md §5): LoRA (random, no SVD), PiSSA and MiLoRA, from the
singular triplets of the base weight alone.  Conventions (``[out, in]`` tensors, :class:`.Factors`,
stacks, canonical signs) as described in :mod:`.factors`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..layer_init import SingularDiagnostics
from .factors import Factors, layer_factors, split_triplets, stack_scalings


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
