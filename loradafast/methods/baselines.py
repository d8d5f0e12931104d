"""Per-layer initialisation formulas of every method but LoRA-DA (docs/design.md §5).

Each function takes the tensors of one layer in the PyTorch ``[out, in]`` convention and returns
:class:`Factors`: ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]`` and whether the base weight must
become ``W − s·B·A`` (``s`` = LoRA scaling) so that the model's output is unchanged at
initialisation.  Nothing here knows about models, PEFT or ``Conv1D`` (callers transpose at the
boundary); LoRA-DA itself lives in :mod:`.lora_da`.

Stacks.  The SVD-based formulas also come as ``*_stack`` functions over a stack ``[B, out, in]``
of same-shaped layers of the same rank, returning one :class:`Factors` per layer: the same
arithmetic on a leading batch dimension (one batched SVD, or one batched randomized SVD,
:func:`.linalg.lowrank.top_singular_triplets_batched`), so that a GPU solve of a deep model does
not pay launches and host synchronisations per layer.  The one-layer functions are stacks of one.

Sign conventions.  A singular triplet ``(u, σ, v)`` is defined up to a joint sign flip; where a
method keeps ``u`` and ``v`` of the same triplet (PiSSA, MiLoRA, LoRA-One, the Fisher subspace)
the product ``B·A`` does not depend on it, and where it does not (LoRA-GA puts different triplets
into A and B) ``B·A`` does.  For reproducible output across devices and LAPACK builds, every
kept vector is given a canonical sign (largest-magnitude entry positive, see
:func:`.linalg.canonical_signs`); a comparison with another implementation must allow a sign per
rank-1 component.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..layer_init import FisherSubspaceDiagnostics, GradientDiagnostics, LayerDiagnostics, SingularDiagnostics
from ..linalg.dense import canonical_sign_factors, canonical_signs
from ..linalg.lowrank import TopSingularStack, top_singular_triplets_batched
from ..options import LORAGA_VARIANTS, SVD_MODES, check_choice


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


def _paired_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical signs for triplets kept together: flip ``u_i`` and ``v_i`` jointly (``u``
    ``[..., m, k]``, ``vh`` ``[..., k, n]``)."""
    signs = canonical_sign_factors(vh.mT)  # [..., 1, k]: the rows of vh are the right singular vectors
    return u * signs, vh * signs.mT


def _split_triplets(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                    scaling: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's split of ``U S Vᵀ`` into ``B = U √(S/s)``, ``A = √(S/s) Vᵀ``, so ``s·B·A = U S Vᵀ``
    (``scaling`` a number, or ``[B, 1]`` for a stack)."""
    u, vh = _paired_signs(u, vh)
    root = (s / scaling).clamp_min(0).sqrt()
    return root[..., :, None] * vh, u * root[..., None, :]


def _scalings(scalings: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A stack's per-layer LoRA scalings as ``[B, 1]``, to divide its singular values ``[B, k]``."""
    return torch.as_tensor(list(scalings), dtype=like.dtype).to(like.device)[:, None]


def _layers(tensor: torch.Tensor) -> list[torch.Tensor]:
    """A stack's layers, each in its own storage where there are several (a layer's factors are
    saved and freed on their own; safetensors refuses tensors that share one)."""
    return list(tensor.unbind(0)) if tensor.shape[0] == 1 else [t.clone() for t in tensor.unbind(0)]


def _factors(a: torch.Tensor, b: torch.Tensor, moves_base: bool, diagnostics: list[LayerDiagnostics]) -> list[Factors]:
    return [Factors(x, y, moves_base, d) for x, y, d in zip(_layers(a), _layers(b), diagnostics)]


# ---- weight-only methods ------------------------------------------------------------------------

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
    a, b = _split_triplets(u, s, v.T, scaling)
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
    a, b = _split_triplets(u, s, vh, _scalings(scalings, s))
    return _factors(a, b, True, [SingularDiagnostics(singular_values=v) for v in s.detach().cpu().unbind(0)])


# ---- gradient methods ---------------------------------------------------------------------------

def _gradient_diagnostics(top: TopSingularStack, singular_values: torch.Tensor) -> list[GradientDiagnostics]:
    """Per layer of a stack: how its triplets were found, and the singular values it used
    (``[B, j]``, read to the host once)."""
    values = singular_values.detach().cpu().unbind(0)
    return [GradientDiagnostics(gradient_singular_values=v, svd=path, svd_backward_error=backward,
                                svd_sine_estimate=sine, svd_krylov_depth=depth)
            for v, path, backward, sine, depth in zip(values, top.paths, top.backward_errors, top.sine_estimates,
                                                      top.iterations)]


def lora_ga(grad: torch.Tensor, rank: int, *, gamma: float = 16.0, variant: str = "paper",
            svd: str = "auto", dtype: torch.dtype | None = None) -> Factors:
    """LoRA-GA (Wang et al., arXiv 2407.05000), "ArB2r" directions with "stable" scale.

    From the gradient ``G = U S Vᵀ`` ``[out, in]`` (docs/design.md §3), with ``c = out^¼/√γ``:

    * ``variant="paper"`` (the authors' code, github.com/Outsider565/LoRA-GA, ``lora_ga_init``):
      ``lora_A = V[:, :r]ᵀ·c``, ``lora_B = U[:, r:2r]·c``; both factors orthonormal up to ``c``.
    * ``variant="peft"`` (PEFT's ``LoraLayer.lora_ga_init``, as of peft 0.21):
      ``lora_A = V[:, :r]ᵀ`` unscaled, ``lora_B = U[:, r:2r] diag(S[r:2r])·c``.  Same subspaces,
      but B carries the gradient's singular values, so the adapter's size depends on the loss
      scale (and A is not scaled by ``c``).  (For ``Conv1D`` layers
      PEFT 0.21 takes ``out`` from the stored ``[in, out]`` weight, i.e. uses ``in^¼``; this
      variant uses the layer's true ``out``.)

    Both move the base weight to ``W − s·B·A``.  ``svd`` (:func:`.linalg.lowrank.top_singular_triplets`):
    "auto" takes randomized triplets whose backward error is below 1e-3, the exact SVD otherwise;
    "exact" always the exact SVD; "randomized" never falls back.  Both reference implementations use
    ``torch.svd_lowrank(q=4r, niter=4)`` unchecked (backward error up to ~1e-2 on SmolLM2).
    ``dtype``: of the exact SVD and of the factors (default ``grad.dtype``).  Their
    gradient is the mean over batches of the batch's token-mean loss gradient; ours (docs/design.md §3)
    is the mean over sequences of each sequence's token-mean loss gradient.  The two agree when
    all sequences have equally many labelled tokens and all batches equally many sequences.
    """
    return lora_ga_stack(grad[None], rank, gamma=gamma, variant=variant, svd=svd, dtype=dtype)[0]


def lora_ga_stack(grads: torch.Tensor, rank: int, *, gamma: float = 16.0, variant: str = "paper",
                  svd: str = "auto", dtype: torch.dtype | None = None) -> list[Factors]:
    """:func:`lora_ga` of every layer of a stack of gradients ``[B, out, in]``: one batched
    randomized SVD (each layer's result checked on its own), or one batched exact SVD."""
    check_choice("loraga_variant", variant, LORAGA_VARIANTS)  # a direct call has no LoraGAConfig
    check_choice("svd", svd, SVD_MODES)
    _, out_features, in_features = grads.shape
    if 2 * rank > min(out_features, in_features):
        raise ValueError(
            f"LoRA-GA takes 2r = {2 * rank} singular triplets of the gradient but the layer has only "
            f"min(in, out) = {min(out_features, in_features)}; lower the rank or exclude the layer"
        )
    top = top_singular_triplets_batched(grads, 2 * rank, boundaries=(rank, 2 * rank), mode=svd, dtype=dtype)
    u, s, vh = top.u, top.s, top.vh
    scale = out_features**0.25 / math.sqrt(gamma)
    # A and B come from different triplets, so each gets its own canonical sign.
    a = canonical_signs(vh[:, :rank].mT).mT
    b = canonical_signs(u[..., rank:2 * rank])
    if variant == "paper":
        a, b = a * scale, b * scale
    else:
        b = b * s[:, None, rank:2 * rank] * scale
    return _factors(a, b, True, _gradient_diagnostics(top, s[:, :2 * rank]))


def lora_one(grad: torch.Tensor, rank: int, *, gamma: float = 128.0, svd: str = "auto",
             dtype: torch.dtype | None = None) -> Factors:
    """LoRA-One (Zhang et al., arXiv 2502.01235; the authors' ``gradient_reinit``).

    From ``−G = U S Vᵀ``: ``lora_A = diag(√S_r) V_rᵀ / √(S_1 γ)``, ``lora_B = U_r diag(√S_r) / √(S_1 γ)``,
    so ``B·A = −G_r / (S_1 γ)``: the adapter starts one (normalised) gradient-descent step along
    the best rank-r approximation of the negative gradient.  The base weight is unchanged, so the
    model's output moves at initialisation (by design).  ``svd`` and ``dtype`` as in :func:`lora_ga`,
    for the top r triplets.
    """
    return lora_one_stack(grad[None], rank, gamma=gamma, svd=svd, dtype=dtype)[0]


def lora_one_stack(grads: torch.Tensor, rank: int, *, gamma: float = 128.0, svd: str = "auto",
                   dtype: torch.dtype | None = None) -> list[Factors]:
    """:func:`lora_one` of every layer of a stack of gradients ``[B, out, in]``: one batched SVD."""
    check_choice("svd", svd, SVD_MODES)
    nothing = "the layer's gradient is zero or not finite; LoRA-One has no direction for it"
    if not bool(torch.isfinite(torch.stack(torch.aminmax(grads))).all()):  # NaN and ±Inf reach the extremes
        raise FloatingPointError(nothing)
    # G's triplets with u negated are −G's: no negated copy of the stack.
    top = top_singular_triplets_batched(grads, rank, mode=svd, dtype=dtype)
    u, s, vh = -top.u, top.s, top.vh
    first = s[:, :1]
    if not bool((torch.isfinite(first) & (first != 0)).all()):
        raise FloatingPointError(nothing)
    u, vh = _paired_signs(u, vh)
    root = s.sqrt() / (first * gamma).sqrt()
    return _factors(root[..., :, None] * vh, u * root[:, None, :], False, _gradient_diagnostics(top, s))


# ---- Fisher-weighted weight subspace ------------------------------------------------------------

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
    a, b = _split_triplets(u, s, vh, _scalings(scalings, s))
    total = energy.sum(-1)
    fractions = torch.where(total > 0, kept.sum(-1) / total, torch.full_like(total, float("nan"))).tolist()
    kept, order, values = (t.detach().cpu().unbind(0) for t in (kept, order, s))
    return _factors(a, b, True, [FisherSubspaceDiagnostics(fisher_energy=e, energy_fraction=f, singular_indices=i,
                                                            singular_values=v)
                                  for e, f, i, v in zip(kept, fractions, order, values)])
