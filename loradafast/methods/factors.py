"""What the per-layer formulas of every method but LoRA-DA share (docs/design.md §5): the type
:class:`Factors` they return, :func:`lora_scaling`, and the helpers that split singular triplets
into factors and a stack's results into layers.  The formulas themselves live in
:mod:`.weight_svd` (LoRA, PiSSA, MiLoRA), :mod:`.gradient_svd` (LoRA-GA, LoRA-One) and
:mod:`.fisher` (the Fisher subspace); LoRA-DA in :mod:`.lora_da`.

Each formula takes the tensors of one layer in the PyTorch ``[out, in]`` convention and returns
:class:`Factors`: ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]`` and whether the base weight must
become ``W − s·B·A`` (``s`` = LoRA scaling) so that the model's output is unchanged at
initialisation.  Nothing here knows about models, PEFT or ``Conv1D`` (callers transpose at the
boundary).

Stacks.  The SVD-based formulas also come as ``*_stack`` functions over a stack ``[B, out, in]``
of same-shaped layers of the same rank, returning one :class:`Factors` per layer: the same
arithmetic on a leading batch dimension (one batched SVD, or one batched randomized SVD,
:func:`loradafast.linalg.lowrank.top_singular_triplets_batched`), so that a GPU solve of a deep model does
not pay launches and host synchronisations per layer.  The one-layer functions are stacks of one.

Sign conventions.  A singular triplet ``(u, σ, v)`` is defined up to a joint sign flip; where a
method keeps ``u`` and ``v`` of the same triplet (PiSSA, MiLoRA, LoRA-One, the Fisher subspace)
the product ``B·A`` does not depend on it, and where it does not (LoRA-GA puts different triplets
into A and B) ``B·A`` does.  For reproducible output across devices and LAPACK builds, every
kept vector is given a canonical sign (largest-magnitude entry positive, see
:func:`loradafast.linalg.dense.canonical_signs`); a comparison with another implementation must allow a sign per
rank-1 component.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..layer_init import LayerDiagnostics
from ..linalg.dense import canonical_sign_factors


@dataclass
class Factors:
    """What a method's formula returns for one layer (the solver turns it into a ``LayerInit``)."""

    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    moves_base: bool  # True: the base weight becomes W − s·B·A
    diagnostics: LayerDiagnostics = field(default_factory=LayerDiagnostics)


def lora_scaling(lora_alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's ``scaling``: ``lora_alpha / r``, or ``lora_alpha / √r`` with rsLoRA."""
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank


def paired_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical signs for triplets kept together: flip ``u_i`` and ``v_i`` jointly (``u``
    ``[..., m, k]``, ``vh`` ``[..., k, n]``)."""
    signs = canonical_sign_factors(vh.mT)  # [..., 1, k]: the rows of vh are the right singular vectors
    return u * signs, vh * signs.mT


def split_triplets(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                   scaling: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's split of ``U S Vᵀ`` into ``B = U √(S/s)``, ``A = √(S/s) Vᵀ``, so ``s·B·A = U S Vᵀ``
    (``scaling`` a number, or ``[B, 1]`` for a stack)."""
    u, vh = paired_signs(u, vh)
    root = (s / scaling).clamp_min(0).sqrt()
    return root[..., :, None] * vh, u * root[..., None, :]


def stack_scalings(scalings: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A stack's per-layer LoRA scalings as ``[B, 1]``, to divide its singular values ``[B, k]``."""
    return torch.as_tensor(list(scalings), dtype=like.dtype).to(like.device)[:, None]


def _layers(tensor: torch.Tensor) -> list[torch.Tensor]:
    """A stack's layers, each in its own storage where there are several (a layer's factors are
    saved and freed on their own; safetensors refuses tensors that share one)."""
    return list(tensor.unbind(0)) if tensor.shape[0] == 1 else [t.clone() for t in tensor.unbind(0)]


def layer_factors(a: torch.Tensor, b: torch.Tensor, moves_base: bool,
                  diagnostics: list[LayerDiagnostics]) -> list[Factors]:
    """One :class:`Factors` per layer of a stack's factors ``a`` ``[B, r, in]`` and ``b`` ``[B, out, r]``."""
    return [Factors(x, y, moves_base, d) for x, y, d in zip(_layers(a), _layers(b), diagnostics)]
