"""The gradient methods (docs/design.md §5): LoRA-GA and LoRA-One, from the singular triplets of
each layer's gradient ``G``: their options, diagnostics, formulas and records.  Conventions
(``[out, in]`` tensors, :class:`.Factors`, stacks, canonical signs) as described in :mod:`.factors`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..layer_init import LayerDiagnostics, reported
from ..linalg.dense import canonical_signs
from ..linalg.lowrank import TopSingularStack, top_singular_triplets_batched
from ..options import MethodConfig, check_choice, check_positive, option
from ..plots import singular_values as singular_values_plot
from .factors import Factors, paired_signs, layer_factors
from .method import Method, per_shape, stacked_statistics
from .problem import Problem
from .weight_svd import singular_columns

LORAGA_VARIANTS = ("paper", "peft")
SVD_MODES = ("auto", "exact", "randomized")  # how the gradient's top singular triplets are found


@dataclass(kw_only=True)
class LoraGAConfig(MethodConfig):
    """LoRA-GA: ``gamma`` (16), ``variant`` ("paper": the authors' code, "peft": PEFT's) and
    ``svd``: how the gradient's top 2r singular triplets are found, "auto" (randomized subspace
    iteration, checked, the exact SVD where the check fails; :mod:`loradafast.linalg.lowrank`),
    "exact" (``torch.linalg.svd``) or "randomized" (never falls back)."""

    gamma: float = option(16.0, "the scale denominator γ of the factors")
    variant: str = option("paper", "paper (the authors' code) or peft (PEFT's LoRA-GA)", keyword="loraga_variant")
    svd: str = option("auto", "auto, exact or randomized: how the gradient's top singular triplets are found")

    def __post_init__(self):
        super().__post_init__()
        check_positive("gamma", self.gamma)
        check_choice("loraga_variant", self.variant, LORAGA_VARIANTS)
        check_choice("svd", self.svd, SVD_MODES)


@dataclass(kw_only=True)
class LoraOneConfig(MethodConfig):
    """LoRA-One: ``gamma`` (128) and ``svd`` as in :class:`LoraGAConfig` (top r triplets)."""

    gamma: float = option(128.0, "the scale denominator γ of the factors")
    svd: str = option("auto", "auto, exact or randomized: how the gradient's top singular triplets are found")

    def __post_init__(self):
        super().__post_init__()
        check_positive("gamma", self.gamma)
        check_choice("svd", self.svd, SVD_MODES)


@dataclass
class GradientDiagnostics(LayerDiagnostics):
    """LoRA-GA, LoRA-One: the gradient's singular values they used, and how they were found
    (:mod:`loradafast.linalg.lowrank`)."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("s_1", "s_r")
    COLUMN_NOTES: ClassVar[str] = "s_1, s_r: the largest and the r-th kept singular value of the gradient"
    PLOTS: ClassVar[tuple] = (("singular_values.png", singular_values_plot("gradient_singular_values", "gradient G")),)

    gradient_singular_values: torch.Tensor | None = reported()
    svd: str | None = None  # "exact", "randomized", or "exact-fallback" (the randomized check failed)
    svd_backward_error: float | None = None  # ‖GV − US‖_F / σ₁ of the randomized triplets (the check)
    svd_sine_estimate: float | None = None  # estimated sin θ to the exact SVD's subspaces (inf: no gap)
    svd_krylov_depth: int | None = None  # products with GGᵀ the randomized SVD used (it grows where the check fails)

    @classmethod
    def derived_columns(cls, entry: dict) -> dict:
        return singular_columns(entry.get("gradient_singular_values"))


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

    Both move the base weight to ``W − s·B·A``.  ``svd`` (:func:`loradafast.linalg.lowrank.top_singular_triplets`):
    "auto" takes randomized triplets whose backward error is below 1e-3, the exact SVD otherwise;
    "exact" always the exact SVD; "randomized" never falls back.  Both reference implementations use
    ``torch.svd_lowrank(q=4r, niter=4)`` unchecked, whose backward error misses 1e-3 on many layers of
    a real model (measurements: benchmarks/README.md, 'Measurements behind the library's constants').
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
    return layer_factors(a, b, True, _gradient_diagnostics(top, s[:, :2 * rank]))


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
    u, vh = paired_signs(u, vh)
    root = s.sqrt() / (first * gamma).sqrt()
    return layer_factors(root[..., :, None] * vh, u * root[:, None, :], False, _gradient_diagnostics(top, s))


# G is an fp32 sum: it is read in float32, and only the exact SVD works in c.dtype (the
# randomized one runs in float32, so a float64 copy of every G would be a needless cost;
# measurements: benchmarks/README.md, 'Measurements behind the library's constants').
def _gradient_dtype(c) -> torch.dtype:
    return c.dtype if c.svd == "exact" else torch.float32


def _lora_ga(p: Problem, name: str, c: LoraGAConfig) -> Factors:
    return lora_ga(p.G(name, _gradient_dtype(c)), p.ranks[name], gamma=c.gamma, variant=c.variant, svd=c.svd,
                   dtype=c.dtype)


def _lora_ga_stack(p: Problem, names: list[str], c: LoraGAConfig) -> list[Factors]:
    return lora_ga_stack(stacked_statistics(p, "G", names, _gradient_dtype(c)), p.ranks[names[0]], gamma=c.gamma,
                         variant=c.variant, svd=c.svd, dtype=c.dtype)


def _lora_one(p: Problem, name: str, c: LoraOneConfig) -> Factors:
    return lora_one(p.G(name, _gradient_dtype(c)), p.ranks[name], gamma=c.gamma, svd=c.svd, dtype=c.dtype)


def _lora_one_stack(p: Problem, names: list[str], c: LoraOneConfig) -> list[Factors]:
    return lora_one_stack(stacked_statistics(p, "G", names, _gradient_dtype(c)), p.ranks[names[0]], gamma=c.gamma,
                          svd=c.svd, dtype=c.dtype)


LORA_GA = Method("lora-ga", "LoRA-GA", LoraGAConfig, per_shape(_lora_ga_stack, _lora_ga),
                 diagnostics=GradientDiagnostics, statistics=frozenset("G"), moves_base=True, rank_factor=2)
LORA_ONE = Method("lora-one", "LoRA-One", LoraOneConfig, per_shape(_lora_one_stack, _lora_one),
                  diagnostics=GradientDiagnostics, statistics=frozenset("G"))
