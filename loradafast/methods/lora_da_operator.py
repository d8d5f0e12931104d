"""Ω of every layer that reads one input, applied without forming Δ.

For the layers ``i`` that share an input (q, k, v of one attention block), with ``Zλ = LLᵀ``::

    Δᵢ X  = −Yᵢλ⁻¹ Gᵢ (Zλ⁻¹ X)                  (``gradient="raw"``: −Gᵢ X)
    Δᵢᵀ V = −Zλ⁻¹ Gᵢᵀ (Yᵢλ⁻¹ V)
    Ωᵢ X  = cᵢ Zλ⁻¹X − (α/σᵢ²) Δᵢᵀ(Δᵢ X),   σᵢ = ‖Δᵢ‖₂,  cᵢ = β tr(Yᵢλ⁻¹)/(N σᵢ²)

A product with ``k`` columns costs ``O((n² + n·out)·k)``: two triangular solves with the shared
factor and two products with ``Gᵢ``.  Nothing of size ``n × n`` is formed per layer, so the only
``O(n³)`` work is one Cholesky factorisation of ``Zλ`` per input and one of the preconditioner per
cluster of layers (below); Δ (``2n²·out`` to form), ‖Δ‖₂ by a dense eigenvalue problem, the QR of
Δ̂ and a Cholesky per layer are gone.  :mod:`.lora_da` keeps the dense per-layer formulas as the
reference these products are tested against.

σ is not needed for the eigenvectors (``σ²Ω = β tr(Yλ⁻¹)/N·Zλ⁻¹ − αΔᵀΔ`` does not contain it);
it scales ``lora_B`` and the reported eigenvalues.  A rough σ (a few power steps) sets the
preconditioner; after the eigensolve, LOBPCG on ``ΔᵀΔ`` started from the eigenvectors makes it
exact, and the eigenvalues are rescaled.

Preconditioner.  ``(cᵢZλ⁻¹ + sI)⁻¹ = Zλ(sZλ + cᵢI)⁻¹`` (see :func:`.eigen.omega_preconditioner`)
needs one factorisation per distinct ``cᵢ``.  Layers whose ``cᵢ`` lie within a factor
``PRECOND_SHARE_RATIO`` share one, made with the geometric mean ``c``: for any direction the
shared and the exact preconditioner differ by at most that factor, which costs LOBPCG a few
iterations and saves a factorisation.
"""
from __future__ import annotations

import math

import torch

from ..linalg import eigen
from .lora_da import DampedFactors, DampedZ

PRECOND_SHARE_RATIO = 8.0
PRECOND_SHIFT = 1.1  # as in eigen.omega_preconditioner
PRECOND_SHORTCUT = 1000.0  # how far c/λ must sit from s for M to be sI or cZλ⁻¹ to 0.1 %


def _columns(x: torch.Tensor) -> torch.Tensor:
    """``[b, n, k]`` → ``[n, b·k]``: one triangular solve for every layer of the group."""
    b, n, k = x.shape
    return x.transpose(0, 1).reshape(n, b * k)


def cholesky_solve(chol: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(LLᵀ)⁻¹ rhs`` by two triangular solves.  ``torch.cholesky_solve`` copies the ``n × n``
    factor into column-major order on every call (most of the solve's time at n = 2752, measured);
    ``solve_triangular`` reads a row-major ``L`` as the column-major ``Lᵀ`` without a copy."""
    y = torch.linalg.solve_triangular(chol, rhs, upper=False)
    return torch.linalg.solve_triangular(chol.mT, y, upper=True)


def _batches(x: torch.Tensor, b: int) -> torch.Tensor:
    n = x.shape[0]
    return x.reshape(n, b, -1).transpose(0, 1)


class GroupOmega:
    """The Ω operators of ``len(gradients)`` layers sharing ``Zλ``, as batched callables."""

    def __init__(self, z: DampedZ, z_lambda: torch.Tensor, gradients: list[torch.Tensor],
                 factors: list[DampedFactors], *, beta: float, num_train_samples: int, alpha_b: float,
                 gradient: str, dtype: torch.dtype, gradient_dtype: torch.dtype | None = None):
        self.chol = z.chol.to(dtype)
        self.z_damping = float(z.damping)
        self.z_lambda = z_lambda.to(dtype)
        # G is an fp32 sum: holding it in float64 adds no information, only twice the memory
        # traffic of the bandwidth-bound skinny products (gradient_dtype=float32: mixed precision).
        self.gradient_dtype = dtype if gradient_dtype is None else gradient_dtype
        self.g = [g.to(self.gradient_dtype) for g in gradients]
        self.factors = factors
        self.fisher = gradient == "fisher"
        self.alpha = float(alpha_b)
        self.dtype = dtype
        self.n = self.chol.shape[-1]
        self.batch = len(gradients)
        self.trace_y = torch.stack([f.trace_y_inverse().to(dtype) for f in factors])
        self._variance = beta * self.trace_y / num_train_samples  # c·σ², free of σ
        self.sigma: torch.Tensor | None = None
        self.sigma_iterations = 0
        self.power_block: torch.Tensor | None = None  # [b, n, k], orthonormal: where σ's power steps ended
        self._precond = None

    # -- Zλ⁻¹ and Δ ------------------------------------------------------------------------------

    def z_solve(self, x: torch.Tensor) -> torch.Tensor:
        return _batches(cholesky_solve(self.chol, _columns(x)), x.shape[0])

    def _y_solve(self, i: int, v: torch.Tensor) -> torch.Tensor:
        return self.factors[i].apply_y_inverse(v.to(self.factors[i].y_dtype)).to(self.dtype)

    def delta(self, x: torch.Tensor, wx: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``[Δᵢ xᵢ]`` ``[out_i, k]`` for ``x`` ``[b, n, k]``; ``wx = Zλ⁻¹x`` if already known."""
        if not self.fisher:
            return [-self._g_times(g, x[i]) for i, g in enumerate(self.g)]
        wx = self.z_solve(x) if wx is None else wx
        return [-self._y_solve(i, self._g_times(g, wx[i])) for i, g in enumerate(self.g)]

    def _g_times(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``g @ x`` for a thin ``x`` ``[n, k]``, computed as ``(xᵀgᵀ)ᵀ``: the same products in
        another order, but MKL (float64, 1 thread, measured on this project's CPU) runs a GEMM
        whose result is thin 3-4× slower than one whose result is wide (k = 8-32, n = 4096)."""
        return (x.mT.to(self.gradient_dtype).contiguous() @ g.mT).mT.to(self.dtype)

    def delta_t(self, v: list[torch.Tensor]) -> torch.Tensor:
        """``[Δᵢᵀ vᵢ]`` stacked ``[b, n, k]``."""
        if not self.fisher:
            return torch.stack([-self._g_times(g.T, vi) for g, vi in zip(self.g, v)])
        u = torch.stack([self._g_times(g.T, self._y_solve(i, vi)) for i, (g, vi) in enumerate(zip(self.g, v))])
        return -self.z_solve(u)

    def apply_delta_gram(self, x: torch.Tensor) -> torch.Tensor:
        """``ΔᵀΔ x`` (the Gram operator of Δ, unnormalised)."""
        return self.delta_t(self.delta(x))

    # -- σ = ‖Δ‖₂ ---------------------------------------------------------------------------------

    def estimate_sigma(self, *, k: int = 8, steps: int = 4, seed: int = 0) -> None:
        """A first σ from a few block power steps (a lower bound within a few percent): enough
        for the preconditioner, whose shift it sets; :meth:`refine_sigma` makes it exact.  The
        block the steps end with, ``power_block``, leans towards Δ's top right singular vectors,
        which are (near) the wanted eigenvectors of Ω when the variance term is small: the
        eigensolve starts from it."""
        gen = torch.Generator(device=self.chol.device).manual_seed(seed)
        x = torch.randn(self.batch, self.n, min(k, self.n), dtype=self.dtype, device=self.chol.device, generator=gen)
        est = torch.zeros(self.batch, dtype=self.dtype, device=self.chol.device)
        for _ in range(steps):
            x = torch.linalg.qr(x).Q
            dx = self.delta(x)
            est = torch.stack([torch.linalg.matrix_norm(d, ord=2) for d in dx])
            # Δᵀ(Δx/σ), not ΔᵀΔx: σ² passes float32's range once σ > 1.8e19.
            x = self.delta_t([d / e for d, e in zip(dx, est.clamp_min(torch.finfo(est.dtype).tiny))])
        self.sigma = est
        self.power_block = torch.linalg.qr(x).Q

    def refine_sigma(self, x0: torch.Tensor | None, *, tol: float, max_iter: int = 100, seed: int = 0,
                     check_every: int = 2) -> None:
        """σᵢ² = the largest eigenvalue of ΔᵢᵀΔᵢ, by LOBPCG on ``−ΔᵀΔ`` (Krylov speed, unlike power
        iteration, which stalls on the clustered top of a gradient's spectrum), started from
        ``x0``: LoRA-DA's eigenvectors, which hold Δ's top right singular vector when the variance
        term is small, so that this takes a few iterations.  The Ritz value is accurate to about
        the square of the residual, so it is kept even where the residual misses ``tol`` (no
        dense fallback: that would form Δ)."""
        # ΔᵀΔ divided by the rough σ² (within a few percent of its norm, so no power steps for the
        # norm): with the official damping σ² reaches 1e22 on real statistics, and its square, in
        # the solver's Gram matrices, overflows float32.
        rough = self.sigma
        scale = rough.reshape(-1, 1, 1) ** -2
        res = eigen.smallest_eigenpairs(lambda x: -scale * self.apply_delta_gram(x), self.n, 1, self.batch,
                                        dtype=self.dtype, device=self.chol.device, tol=tol, max_iter=max_iter,
                                        seed=seed, x0=x0, fallback=False, check_every=check_every,
                                        dense=lambda layers: scale[layers] * self._dense_minus_delta_gram(layers),
                                        op_norm=torch.ones_like(rough))
        refined = rough * (-res.eigenvalues[:, 0].to(rough.dtype)).clamp_min(0).sqrt()
        self.sigma = torch.fmax(rough, refined)  # fmax: a refinement that failed (NaN) keeps the rough σ
        self.sigma_iterations = res.iterations

    def _dense_minus_delta_gram(self, layers: torch.Tensor) -> torch.Tensor:
        return -torch.stack([self._dense_delta(int(i)).T @ self._dense_delta(int(i)) for i in layers])

    # -- Ω -----------------------------------------------------------------------------------------

    @property
    def variance_coef(self) -> torch.Tensor:
        return self._variance / self.sigma**2

    def omega(self, x: torch.Tensor) -> torch.Tensor:
        wx = self.z_solve(x)
        dx = self.delta(x, wx)
        scale = (self.alpha / self.sigma**2).reshape(-1, 1, 1)
        return self.variance_coef.reshape(-1, 1, 1) * wx - scale * self.delta_t(dx)

    def rounding_floor(self, k: int = 4, seed: int = 0) -> torch.Tensor:
        """Per layer, the asymmetry ``‖XᵀΩY − (YᵀΩX)ᵀ‖ / ‖ΩY‖`` of the products as computed, for
        random orthonormal ``X``, ``Y``: exact Ω is symmetric, so this measures the rounding of
        the implicit products (≈ eps·cond(Zλ)), below which no residual can be trusted."""
        gen = torch.Generator(device=self.chol.device).manual_seed(seed)
        xy = torch.randn(self.batch, self.n, 2 * k, dtype=self.dtype, device=self.chol.device, generator=gen)
        xy = torch.linalg.qr(xy).Q
        oxy = self.omega(xy)  # one product with 2k columns: each reads every G once
        x, y, ox, oy = xy[..., :k], xy[..., k:], oxy[..., :k], oxy[..., k:]
        asym = torch.linalg.matrix_norm(x.mT @ oy - (y.mT @ ox).mT)
        return asym / torch.linalg.matrix_norm(oy).clamp_min(torch.finfo(self.dtype).tiny)

    def _dense_delta(self, i: int) -> torch.Tensor:
        """``Δᵢ`` ``[out, n]``: for the dense path and the fallback only (``O(n²·out)``)."""
        g = self.g[i].to(self.dtype)
        if not self.fisher:
            return -g
        return -self._y_solve(i, cholesky_solve(self.chol, g.T).T)

    def dense(self, layers: torch.Tensor) -> torch.Tensor:
        """The matrices ``Ωᵢ`` of the given layers, ``[len(layers), n, n]``."""
        w = torch.cholesky_inverse(self.chol)
        out = []
        for i in layers.tolist():
            d_hat = self._dense_delta(i) / self.sigma[i]
            omega = self.variance_coef[i] * w - self.alpha * (d_hat.T @ d_hat)
            out.append(0.5 * (omega + omega.T))
        return torch.stack(out)

    # -- preconditioner ----------------------------------------------------------------------------

    def preconditioner(self, dtype: torch.dtype | None = None):
        """``X ↦ Zλ(sZλ + cI)⁻¹X`` with ``c`` shared by clusters of layers (module docstring).

        Where ``c/λ_min(Zλ) ≤ s/1000`` the operator ``M = cZλ⁻¹ + sI`` is ``sI`` to 0.1 %, and
        where ``c/λ_max(Zλ) ≥ 1000·s`` it is ``cZλ⁻¹`` to 0.1 %: those clusters need no
        factorisation (``λ ≤ λ_min`` and ``tr Zλ ≥ λ_max`` bound the spectrum).  Returns the
        callable and the number of factorisations it made."""
        dtype = self.dtype if dtype is None else dtype
        coef = self.variance_coef.tolist()
        s = PRECOND_SHIFT * self.alpha
        z = self.z_lambda.to(dtype)
        lam_min, lam_max = self.z_damping, float(z.diagonal().sum())
        parts = []
        for members in _clusters(coef, PRECOND_SHARE_RATIO):
            cs = [coef[i] for i in members]
            if max(cs) <= s * lam_min / PRECOND_SHORTCUT:
                parts.append((members, "identity", None))
            elif min(cs) >= PRECOND_SHORTCUT * s * lam_max:
                parts.append((members, "scaled", torch.tensor(cs, dtype=dtype, device=z.device).reshape(-1, 1, 1)))
            else:
                eye = torch.eye(self.n, dtype=dtype, device=z.device)
                chol, _ = torch.linalg.cholesky_ex(s * z + _geometric_mean(cs) * eye)
                parts.append((members, "factor", chol))
        self.layer_preconditioner = {i: kind for members, kind, _ in parts for i in members}

        def apply(x: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(x)
            for members, kind, data in parts:
                idx = torch.tensor(members, device=x.device)
                part = x[idx].to(dtype)
                if kind == "identity":
                    out[idx] = (part / s).to(x.dtype)
                elif kind == "scaled":
                    out[idx] = (z @ part / data).to(x.dtype)
                else:
                    solved = _batches(cholesky_solve(data, _columns(part)), len(members))
                    out[idx] = (z @ solved).to(x.dtype)
            return out
        return apply, sum(kind == "factor" for _, kind, _ in parts)

    def lora_b(self, a0: torch.Tensor) -> torch.Tensor:
        """``Δ̂ᵢ A0ᵢ`` for every layer, ``a0`` ``[b, n, r]``; a list (output sizes differ)."""
        return [d / self.sigma[i] for i, d in enumerate(self.delta(a0.to(self.dtype)))]


def _geometric_mean(values: list[float]) -> float:
    if min(values) <= 0:
        return 0.0 if max(values) <= 0 else sum(values) / len(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _clusters(values: list[float], ratio: float) -> list[list[int]]:
    """Indices grouped so that within a group max/min ≤ ratio (zeros together)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            first = values[groups[-1][0]]
            if (first <= 0 and values[i] <= 0) or (first > 0 and values[i] <= ratio * first):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups
