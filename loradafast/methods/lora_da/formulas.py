"""LoRA-DA, exactly as docs/design.md §4 writes it.

Per layer, with ``Zλ = Z + λI`` and ``Yλ = Y + λI``::

    Δ  = −Yλ⁻¹ G Zλ⁻¹                                  natural-gradient estimate of W_tgt − W0
    σ  = ‖Δ‖₂,  Δ̂ = Δ / σ
    Ω  = β·tr(Yλ⁻¹)/(N σ²) · Zλ⁻¹ − α_b · Δ̂ᵀΔ̂          Initialization Guidance Matrix [in, in]
    A0 = the r eigenvectors of Ω with the smallest eigenvalues
    lora_A = A0ᵀ/√γ,  lora_B = Δ̂ A0/√γ

The functions here are the per-layer mathematics; :mod:`.solve` batches them over every layer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ...kernels.reference import omega_apply, omega_dense
from ...linalg.dense import damped_cholesky, damping_for
from .config import LoraDAConfig


@dataclass
class DampedFactors:
    """The damped K-FAC factors ``Zλ``, ``Yλ`` of one layer, factorised, and the damping used."""

    z_chol: torch.Tensor  # lower Cholesky factor of Zλ [in, in]
    # Yλ through one of: its inverse's diagonal [out] (diagonal Y), or its lower Cholesky factor [out, out].
    y_inverse_diag: torch.Tensor | None
    y_chol: torch.Tensor | None
    damping_z: float
    damping_y: float
    cholesky_dtype: torch.dtype
    damping_raised: bool = False  # a factor needed more than the requested damping

    @property
    def y_is_diag(self) -> bool:
        return self.y_inverse_diag is not None

    @property
    def y_dtype(self) -> torch.dtype:
        return (self.y_inverse_diag if self.y_is_diag else self.y_chol).dtype

    def apply_y_inverse(self, m: torch.Tensor) -> torch.Tensor:
        """``Yλ⁻¹ m`` for ``m`` ``[out, k]``."""
        if self.y_is_diag:
            return self.y_inverse_diag[:, None] * m
        return torch.cholesky_solve(m, self.y_chol)

    def trace_y_inverse(self) -> torch.Tensor:
        if self.y_is_diag:
            return self.y_inverse_diag.sum()
        # tr(Yλ⁻¹) = ‖L⁻¹‖_F² for Yλ = L Lᵀ.
        eye = torch.eye(self.y_chol.shape[0], dtype=self.y_chol.dtype, device=self.y_chol.device)
        return torch.linalg.solve_triangular(self.y_chol, eye, upper=False).square().sum()

    def apply_z_inverse(self, m: torch.Tensor) -> torch.Tensor:
        """``Zλ⁻¹ m`` for ``m`` ``[in, k]``."""
        return torch.cholesky_solve(m, self.z_chol)

    def z_inverse(self) -> torch.Tensor:
        return torch.cholesky_inverse(self.z_chol)


@dataclass
class DampedZ:
    """``Zλ = Z + λI`` through its Cholesky factor; shared by the layers that read the same input."""

    chol: torch.Tensor
    damping: float  # used; above the requested one when round-off made Z indefinite
    dtype: torch.dtype  # float64 when the working dtype needed the retry
    raised: bool = False


def damped_z(Z: torch.Tensor, damping: float, damping_mode: str = "absolute") -> DampedZ:
    requested = damping_for(Z, damping, damping_mode)
    chol, used, lam = damped_cholesky(Z, requested)
    return DampedZ(chol, lam, used, lam != requested)


def damped_factors(Z: torch.Tensor | DampedZ, Y: torch.Tensor, damping: float,
                   damping_mode: str = "absolute") -> DampedFactors:
    """Damped K-FAC factors; ``Z`` may be an already factorised :class:`DampedZ`."""
    z = Z if isinstance(Z, DampedZ) else damped_z(Z, damping, damping_mode)
    lam_y = damping_for(Y, damping, damping_mode)
    if Y.dim() == 1:
        y_damped = Y + lam_y
        if not bool((y_damped > 0).all()):
            raise torch.linalg.LinAlgError("the damped output factor Y has non-positive entries; increase damping")
        return DampedFactors(z.chol, (1.0 / y_damped).to(z.chol.dtype), None, z.damping, lam_y, z.dtype, z.raised)
    y_chol, used_y, lam_used = damped_cholesky(Y, lam_y)
    used = torch.float64 if torch.float64 in (used_y, z.dtype) else z.dtype
    return DampedFactors(z.chol.to(used), None, y_chol.to(used), z.damping, lam_used, used,
                         z.raised or lam_used != lam_y)


def condition_estimate(factors: DampedFactors, *, tight: bool | None = None) -> tuple[float, float]:
    """Lower bounds on cond(Zλ) and cond(Yλ) (exact for the diagonal Y).  A large value flags a
    factor worth more damping, and, in float32, a subspace that rounding may have moved.

    ``(max Lᵢᵢ / min Lᵢᵢ)²`` of the Cholesky factor costs nothing but can be orders of magnitude low
    (1e4 for a Zλ of condition 5e5).  ``tight`` (default: where the factor is float32, whose warning
    threshold of 1e5 that gap hides) also takes the ratio of the Rayleigh quotients after a few
    power and inverse power steps: 32 reads of the factor."""
    if factors.y_is_diag:
        y = factors.y_inverse_diag
        y_cond = float(y.max() / y.min().clamp_min(torch.finfo(y.dtype).tiny))
    else:
        y_cond = float(chol_condition_estimate(factors.y_chol, tight))
    return float(chol_condition_estimate(factors.z_chol, tight)), y_cond


def chol_condition_estimate(chol: torch.Tensor, tight: bool | None = None) -> torch.Tensor:
    """The lower bound of :func:`condition_estimate` on cond(LLᵀ) for lower Cholesky factors
    ``[..., n, n]``, as a tensor ``[...]`` (no host synchronisation)."""
    d = chol.diagonal(dim1=-2, dim2=-1).abs()
    tiny = torch.finfo(d.dtype).tiny
    diagonal = (d.amax(-1) / d.amin(-1).clamp_min(tiny)) ** 2
    if not (chol.dtype != torch.float64 if tight is None else tight):
        return diagonal
    return torch.maximum(diagonal, _extreme_eigenvalue_ratio(chol, tiny))


def _extreme_eigenvalue_ratio(chol: torch.Tensor, tiny: float, steps: int = 8) -> torch.Tensor:
    """λ_max / λ_min of ``A = LLᵀ`` from Rayleigh quotients after ``steps`` power steps on ``A`` and
    inverse power steps (``cholesky_solve``): each quotient lies inside the spectrum, so this is a
    lower bound on cond(A), at O(n²) per step."""
    gen = torch.Generator(device=chol.device).manual_seed(0)
    x = torch.randn(chol.shape[-1], 2, dtype=chol.dtype, device=chol.device, generator=gen)
    x = x.expand(*chol.shape[:-2], -1, -1)
    top, bottom = x[..., :1], x[..., 1:]
    for _ in range(steps):
        top = chol @ (chol.mT @ top)
        top = top / torch.linalg.vector_norm(top, dim=-2, keepdim=True).clamp_min(tiny)
        bottom = torch.cholesky_solve(bottom, chol)
        bottom = bottom / torch.linalg.vector_norm(bottom, dim=-2, keepdim=True).clamp_min(tiny)
    quotient = torch.linalg.vector_norm(chol.mT @ torch.cat([top, bottom], -1), dim=-2) ** 2  # xᵀAx, ‖x‖ = 1
    return quotient[..., 0] / quotient[..., 1].clamp_min(tiny)


def natural_gradient(G: torch.Tensor, factors: DampedFactors) -> torch.Tensor:
    """``Δ = −Yλ⁻¹ G Zλ⁻¹`` through Cholesky solves (no explicit inverse)."""
    G = G.to(factors.z_chol.dtype)
    g_zinv = factors.apply_z_inverse(G.T).T  # G Zλ⁻¹ = (Zλ⁻¹ Gᵀ)ᵀ, Zλ symmetric
    return -factors.apply_y_inverse(g_zinv)


def spectral_norm(m: torch.Tensor) -> torch.Tensor:
    """``‖m‖₂`` as the root of the largest eigenvalue of the smaller Gram matrix: a symmetric
    eigenvalue problem of size min(out, in) instead of an SVD, accurate to ~eps relative."""
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt()


@dataclass
class OmegaTerms:
    """Everything Ω is built from, kept so Ω can be applied without being materialised."""

    sigma: torch.Tensor  # ‖Δ‖₂
    delta_hat: torch.Tensor  # Δ/σ
    variance_coef: torch.Tensor  # c = β tr(Yλ⁻¹)/(N σ²)
    alpha_b: float
    factors: DampedFactors

    # One layer as a batch of one through the kernels' reference, so that Ω has one definition.
    def dense(self) -> torch.Tensor:
        omega = omega_dense(self.factors.z_chol[None], self.variance_coef.reshape(1), self.delta_hat[None],
                            self.alpha_b)[0]
        return 0.5 * (omega + omega.T)  # exact symmetry for eigh

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return omega_apply(x[None], self.factors.z_chol[None], self.variance_coef.reshape(1), self.delta_hat[None],
                           self.alpha_b)[0]


def omega_terms(G: torch.Tensor, factors: DampedFactors, *, beta: float, num_train_samples: int,
                alpha_b: float = 1.0, gradient: str = "fisher") -> OmegaTerms:
    if gradient == "fisher":
        delta = natural_gradient(G, factors)
    elif gradient == "raw":  # ablation (and Remark 4.3): no Fisher preconditioning
        delta = -G.to(factors.z_chol.dtype)
    else:
        raise ValueError(f"gradient must be 'fisher' or 'raw', got {gradient!r}")
    sigma = spectral_norm(delta)
    if not bool(torch.isfinite(sigma)) or float(sigma) == 0.0:
        raise FloatingPointError(
            "the layer's gradient estimate is zero or not finite, so it defines no direction; the layer "
            "does not influence the loss on these samples (exclude it, or use more samples)"
        )
    delta_hat = delta / sigma
    coef = beta * factors.trace_y_inverse() / (num_train_samples * sigma**2)
    # Δ itself is not kept: Δ̂ carries it, and one [out, in] float64 copy per layer is enough.
    return OmegaTerms(sigma, delta_hat, coef, alpha_b, factors)


def lora_da_factors(terms: OmegaTerms, eigenvectors: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``lora_A = A0ᵀ/√γ`` ``[r, in]``, ``lora_B = Δ̂A0/√γ`` ``[out, r]``."""
    scale = gamma ** -0.5
    a0 = eigenvectors.to(terms.delta_hat.dtype)
    return a0.T * scale, (terms.delta_hat @ a0) * scale


def omega_spectra(ranks: dict[str, int], config, stats, max_width: int) -> dict[str, list[float]]:
    """Per layer of input width up to ``max_width``, the ``3r`` smallest eigenvalues of the dense
    Ω (ascending; the first r are the kept ones) with ``config`` (a
    :class:`~loradafast.LoraDAConfig`, or the options a result recorded): the report's spectra."""
    config = config if isinstance(config, LoraDAConfig) else _recorded_config(config)
    out = {}
    for name, rank in ranks.items():
        s = stats.layers.get(name)
        if s is None or s.in_features > max_width:
            continue
        factors = damped_factors(stats.Z(name, config.dtype), stats.Y(name, config.dtype), config.damping,
                                 config.damping_mode)
        terms = omega_terms(stats.G(name, config.dtype), factors, beta=config.beta,
                            num_train_samples=config.num_train_samples, alpha_b=config.alpha_b,
                            gradient=config.gradient)
        out[name] = [float(v) for v in torch.linalg.eigvalsh(terms.dense())[: 3 * rank].tolist()]
    return out


def _recorded_config(options: dict) -> LoraDAConfig:
    """The :class:`~loradafast.LoraDAConfig` of recorded options (``InitResult.options``)."""
    fields = {f.name for f in dataclasses.fields(LoraDAConfig)} - {"dtype"}
    kept = {k: v for k, v in options.items() if k in fields}
    return LoraDAConfig(**kept, dtype=getattr(torch, str(options.get("dtype", "float64")).replace("torch.", "")))
