"""Per-layer initialisation formulas of every method but LoRA-DA (docs/design.md §5).

Each function takes the tensors of one layer in the PyTorch ``[out, in]`` convention and returns
:class:`Factors`: ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]`` and whether the base weight must
become ``W − s·B·A`` (``s`` = LoRA scaling) so that the model's output is unchanged at
initialisation.  Nothing here knows about models, PEFT or ``Conv1D`` (callers transpose at the
boundary); LoRA-DA itself lives in :mod:`.lora_da`.

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
from dataclasses import dataclass, field

import torch

from ..linalg.dense import canonical_sign_factors, canonical_signs
from ..linalg.lowrank import TopSingular, top_singular_triplets
from ..options import LORAGA_VARIANTS, SVD_MODES, check_choice
from ..result import FisherSubspaceDiagnostics, GradientDiagnostics, LayerDiagnostics, SingularDiagnostics


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
    """Canonical signs for triplets kept together: flip ``u_i`` and ``v_i`` jointly."""
    signs = canonical_sign_factors(vh.T)[0]  # the rows of vh are the right singular vectors
    return u * signs, vh * signs[:, None]


def _split_triplets(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                    scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's split of ``U S Vᵀ`` into ``B = U √(S/s)``, ``A = √(S/s) Vᵀ``, so ``s·B·A = U S Vᵀ``."""
    u, vh = _paired_signs(u, vh)
    root = (s / scaling).clamp_min(0).sqrt()
    return root[:, None] * vh, u * root


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
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, v = torch.svd_lowrank(weight, q=rank, niter=niter)
        vh = v.T
    a, b = _split_triplets(u, s, vh, scaling)
    return Factors(a, b, moves_base=True, diagnostics=SingularDiagnostics(singular_values=s.detach().cpu()))


def milora(weight: torch.Tensor, rank: int, scaling: float) -> Factors:
    """MiLoRA (Wang et al., arXiv 2406.09044): PiSSA's split applied to the r *smallest* singular
    triplets of ``W`` (its minor components), leaving the principal ones in the base weight
    ``W − s·B·A``."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    u, s, vh = u[:, -rank:], s[-rank:], vh[-rank:]
    a, b = _split_triplets(u, s, vh, scaling)
    return Factors(a, b, moves_base=True, diagnostics=SingularDiagnostics(singular_values=s.detach().cpu()))


# ---- gradient methods ---------------------------------------------------------------------------

def _gradient_diagnostics(top: TopSingular, singular_values: torch.Tensor) -> GradientDiagnostics:
    return GradientDiagnostics(gradient_singular_values=singular_values.detach().cpu(), svd=top.path,
                               svd_backward_error=top.backward_error, svd_sine_estimate=top.sine_estimate,
                               svd_krylov_depth=top.iterations)


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
    check_choice("loraga_variant", variant, LORAGA_VARIANTS)  # a direct call has no LoraGAConfig
    check_choice("svd", svd, SVD_MODES)
    out_features, in_features = grad.shape
    if 2 * rank > min(out_features, in_features):
        raise ValueError(
            f"LoRA-GA takes 2r = {2 * rank} singular triplets of the gradient but the layer has only "
            f"min(in, out) = {min(out_features, in_features)}; lower the rank or exclude the layer"
        )
    top = top_singular_triplets(grad, 2 * rank, boundaries=(rank, 2 * rank), mode=svd, dtype=dtype)
    u, s, vh = top.u, top.s, top.vh
    scale = out_features**0.25 / math.sqrt(gamma)
    # A and B come from different triplets, so each gets its own canonical sign.
    a = canonical_signs(vh[:rank].T).T
    b = canonical_signs(u[:, rank:2 * rank])
    if variant == "paper":
        a, b = a * scale, b * scale
    else:
        b = b * s[rank:2 * rank] * scale
    return Factors(a, b, moves_base=True, diagnostics=_gradient_diagnostics(top, s[:2 * rank]))


def lora_one(grad: torch.Tensor, rank: int, *, gamma: float = 128.0, svd: str = "auto",
             dtype: torch.dtype | None = None) -> Factors:
    """LoRA-One (Zhang et al., arXiv 2502.01235; the authors' ``gradient_reinit``).

    From ``−G = U S Vᵀ``: ``lora_A = diag(√S_r) V_rᵀ / √(S_1 γ)``, ``lora_B = U_r diag(√S_r) / √(S_1 γ)``,
    so ``B·A = −G_r / (S_1 γ)``: the adapter starts one (normalised) gradient-descent step along
    the best rank-r approximation of the negative gradient.  The base weight is unchanged, so the
    model's output moves at initialisation (by design).  ``svd`` and ``dtype`` as in :func:`lora_ga`,
    for the top r triplets.
    """
    check_choice("svd", svd, SVD_MODES)
    if not bool(torch.isfinite(grad).all()):
        raise FloatingPointError("the layer's gradient is zero or not finite; LoRA-One has no direction for it")
    top = top_singular_triplets(-grad, rank, mode=svd, dtype=dtype)
    u, s, vh = top.u, top.s, top.vh
    if not bool(torch.isfinite(s[0])) or float(s[0]) == 0.0:
        raise FloatingPointError("the layer's gradient is zero or not finite; LoRA-One has no direction for it")
    u, vh = _paired_signs(u, vh)
    root = s.sqrt() / (s[0] * gamma).sqrt()
    return Factors(root[:, None] * vh, u * root, moves_base=False, diagnostics=_gradient_diagnostics(top, s))


# ---- Fisher-weighted weight subspace ------------------------------------------------------------

def fisher_energies(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, Y: torch.Tensor,
                    Z: torch.Tensor) -> torch.Tensor:
    """K-FAC Fisher energy of each rank-1 component ``σ_i u_i v_iᵀ`` of a weight ``[out, in]``.

    With ``F ≈ Y ⊗ Z`` (Y ``[out, out]`` or its diagonal ``[out]``, Z ``[in, in]``)::

        vec(σ u vᵀ)ᵀ F vec(σ u vᵀ) = σ² (uᵀ Y u)(vᵀ Z v)

    the second-order loss increase of removing the component from the weight.
    """
    if Y.dim() == 1:
        uyu = (u.square() * Y[:, None]).sum(0)
    else:
        uyu = ((Y @ u) * u).sum(0)
    vzv = ((vh @ Z) * vh).sum(1)
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
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    # In float64 whatever the working dtype: the product of three squares leaves float32's range
    # (both ways) for weights and factors far from 1, and the ranking would then sort ties.
    f64 = torch.float64
    energy = fisher_energies(u.to(f64), s.to(f64), vh.to(f64), Y.to(f64), Z.to(f64))
    order = torch.argsort(energy, descending=True)[:rank]
    a, b = _split_triplets(u[:, order], s[order], vh[order], scaling)
    total = energy.sum()
    return Factors(a, b, moves_base=True, diagnostics=FisherSubspaceDiagnostics(
        fisher_energy=energy[order].detach().cpu(),
        energy_fraction=float(energy[order].sum() / total) if float(total) > 0 else float("nan"),
        singular_indices=order.detach().cpu(),
        singular_values=s[order].detach().cpu(),
    ))
