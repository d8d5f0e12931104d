"""Ω of every layer that reads one input, for a stack of same-shaped inputs, applied without
forming Δ.

For the layers ``i`` that share an input (q, k, v of one attention block), with ``Zλ = LLᵀ``::

    Δᵢ X  = −Yᵢλ⁻¹ Gᵢ (Zλ⁻¹ X)                  (``gradient="raw"``: −Gᵢ X)
    Δᵢᵀ V = −Zλ⁻¹ Gᵢᵀ (Yᵢλ⁻¹ V)
    Ωᵢ X  = cᵢ Zλ⁻¹X − (α/σᵢ²) Δᵢᵀ(Δᵢ X),   σᵢ = ‖Δᵢ‖₂,  cᵢ = β tr(Yᵢλ⁻¹)/(N σᵢ²)

A product with ``k`` columns costs ``O((n² + n·out)·k)``: two triangular solves with the shared
factor and two products with ``Gᵢ``.  Nothing of size ``n × n`` is formed per layer, so the only
``O(n³)`` work is one Cholesky factorisation of ``Zλ`` per input and one of the preconditioner per
cluster of layers (below); Δ (``2n²·out`` to form), ‖Δ‖₂ by a dense eigenvalue problem, the QR of
Δ̂ and a Cholesky per layer are gone.  :mod:`.formulas` keeps the dense per-layer formulas as the
reference these products are tested against.

σ is not needed for the eigenvectors (``σ²Ω = β tr(Yλ⁻¹)/N·Zλ⁻¹ − αΔᵀΔ`` does not contain it);
it scales ``lora_B`` and the reported eigenvalues.  A rough σ (a few power steps) sets the
preconditioner; after the eigensolve, LOBPCG on ``ΔᵀΔ`` started from the eigenvectors makes it
exact, and the eigenvalues are rescaled.

Stacks.  The input groups of every block of a model come in a few shapes (q/k/v, o, gate/up,
down): ``B`` groups of one shape, ``p`` layers each, are one operator whose batch is the ``B·p``
layers (layer ``b·p + j`` is position ``j`` of group ``b``), so each product is a fixed number of
batched kernels (triangular solves with the ``[B, n, n]`` factors, products with each position's
``[B, out_j, n]`` gradients) whatever the depth of the model.

Preconditioner.  ``(cᵢZλ⁻¹ + sI)⁻¹ = Zλ(sZλ + cᵢI)⁻¹`` (see :func:`.eigen.omega_preconditioner`)
needs one factorisation per distinct ``cᵢ``.  Layers whose ``cᵢ`` lie within a factor
``PRECOND_SHARE_RATIO`` share one, made with the geometric mean ``c``: for any direction the
shared and the exact preconditioner differ by at most that factor, which costs LOBPCG a few
iterations and saves a factorisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...linalg import eigen

PRECOND_SHARE_RATIO = 8.0
PRECOND_SHIFT = 1.1  # as in eigen.omega_preconditioner
PRECOND_SHORTCUT = 1000.0  # how far c/λ must sit from s for M to be sI or cZλ⁻¹ to 0.1 %


def cholesky_solve(chol: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(LLᵀ)⁻¹ rhs`` by two triangular solves (batched over leading dimensions).
    ``torch.cholesky_solve`` copies the ``n × n`` factor into column-major order on every call;
    ``solve_triangular`` reads a row-major ``L`` as the column-major ``Lᵀ`` without a copy."""
    y = torch.linalg.solve_triangular(chol, rhs, upper=False)
    return torch.linalg.solve_triangular(chol.mT, y, upper=True)


@dataclass
class StackFactors:
    """The damped K-FAC factors of ``B`` same-shaped input groups of ``p`` layers each.

    ``Zλ`` per group (``z_chol``, ``z_lambda`` ``[B, n, n]``); per position ``j`` of the group,
    ``Yλ`` of its ``B`` layers through its inverse's diagonal (``y_inverse_diag[j]`` ``[B, out_j]``)
    or its Cholesky factor (``y_chol[j]`` ``[B, out_j, out_j]``).  Dampings and flags stay on the
    device (``[B]``, ``[B, p]``) until the diagnostics read them once."""

    z_chol: torch.Tensor
    z_lambda: torch.Tensor
    z_damping: torch.Tensor  # [B] float64: used; above the requested one where round-off made Z indefinite
    z_raised: torch.Tensor  # [B] bool
    y_inverse_diag: list[torch.Tensor] | None
    y_chol: list[torch.Tensor] | None
    y_damping: torch.Tensor  # [B, p]
    y_raised: torch.Tensor  # [B, p] bool
    dtype: torch.dtype  # the working precision of the stack: the highest any factor needed

    @property
    def positions(self) -> int:
        return self.y_damping.shape[1]

    def apply_y_inverse(self, j: int, v: torch.Tensor) -> torch.Tensor:
        """``Yλ⁻¹ v`` for the ``B`` layers of position ``j``, ``v`` ``[B, out_j, k]``."""
        if self.y_inverse_diag is not None:
            return self.y_inverse_diag[j].unsqueeze(-1) * v
        return torch.cholesky_solve(v, self.y_chol[j])

    def apply_y_inverse_one(self, j: int, b: int, m: torch.Tensor) -> torch.Tensor:
        """``Yλ⁻¹ m`` for the one layer at position ``j`` of group ``b``, ``m`` ``[out_j, k]``."""
        if self.y_inverse_diag is not None:
            return self.y_inverse_diag[j][b].unsqueeze(-1) * m
        return torch.cholesky_solve(m, self.y_chol[j][b])

    def trace_y_inverse(self) -> torch.Tensor:
        """``tr(Yλ⁻¹)`` of every layer, ``[B·p]`` in layer order."""
        if self.y_inverse_diag is not None:
            traces = [y.sum(-1) for y in self.y_inverse_diag]
        else:  # tr(Yλ⁻¹) = ‖L⁻¹‖_F² for Yλ = LLᵀ
            traces = [torch.linalg.solve_triangular(c, torch.eye(c.shape[-1], dtype=c.dtype, device=c.device),
                                                    upper=False).square().sum((-2, -1)) for c in self.y_chol]
        return torch.stack(traces, 1).reshape(-1)

    def condition_estimates(self, tight: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower bounds on cond(Zλ) and cond(Yλ) of every layer, ``[B·p]`` each (see
        :func:`.formulas.condition_estimate`, whose batched form this is)."""
        from .formulas import chol_condition_estimate

        p = self.positions
        z = chol_condition_estimate(self.z_chol, tight).repeat_interleave(p)
        if self.y_inverse_diag is not None:
            tiny = torch.finfo(self.y_inverse_diag[0].dtype).tiny
            y = [d.amax(-1) / d.amin(-1).clamp_min(tiny) for d in self.y_inverse_diag]
        else:
            y = [chol_condition_estimate(c, tight) for c in self.y_chol]
        return z, torch.stack(y, 1).reshape(-1)


class GroupOmega:
    """The Ω operators of the ``B·p`` layers of a stack of input groups, as batched callables."""

    def __init__(self, factors: StackFactors, gradients: list[torch.Tensor], *, beta: float,
                 num_train_samples: int, alpha_b: float, gradient: str,
                 gradient_dtype: torch.dtype | None = None, explicit_inverse: bool = False):
        dtype = factors.dtype
        self.factors = factors
        self.chol = factors.z_chol
        self.z_lambda = factors.z_lambda
        self.z_damping = factors.z_damping
        # Zλ⁻¹ as a matrix: a product is then one GEMM instead of two triangular solves, which on a
        # GPU run at a fraction of its throughput for a few dozen right-hand sides.
        self.z_inverse = torch.cholesky_inverse(self.chol) if explicit_inverse else None
        # G is an fp32 sum: holding it in float64 adds no information, only twice the memory
        # traffic of the bandwidth-bound skinny products (gradient_dtype=float32: mixed precision).
        self.gradient_dtype = dtype if gradient_dtype is None else gradient_dtype
        self.g = [g.to(self.gradient_dtype) for g in gradients]  # per position: [B, out_j, n]
        self.fisher = gradient == "fisher"
        self.alpha = float(alpha_b)
        self.dtype = dtype
        self.blocks, self.n = self.chol.shape[0], self.chol.shape[-1]
        self.positions = len(gradients)
        self.batch = self.blocks * self.positions
        self.trace_y = factors.trace_y_inverse().to(dtype)
        self._variance = beta * self.trace_y / num_train_samples  # c·σ², free of σ
        self.sigma: torch.Tensor | None = None
        self.sigma_iterations = 0
        self.power_block: torch.Tensor | None = None  # [B·p, n, k], orthonormal: where σ's power steps ended

    # -- layout: [B·p, n, k] (layers) ↔ [B, n, p·k] (one right-hand side block per group) ------------

    def _per_group(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        return x.reshape(self.blocks, self.positions, self.n, k).transpose(1, 2).reshape(self.blocks, self.n, -1)

    def _per_layer(self, y: torch.Tensor) -> torch.Tensor:
        k = y.shape[-1] // self.positions
        return y.reshape(self.blocks, self.n, self.positions, k).transpose(1, 2).reshape(self.batch, self.n, k)

    def _position(self, x: torch.Tensor, j: int) -> torch.Tensor:
        return x.reshape(self.blocks, self.positions, *x.shape[1:])[:, j]

    def _stacked(self, per_position: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(per_position, 1).reshape(self.batch, *per_position[0].shape[1:])

    # -- Zλ⁻¹ and Δ ------------------------------------------------------------------------------

    def z_solve(self, x: torch.Tensor) -> torch.Tensor:
        rhs = self._per_group(x)
        return self._per_layer(self.z_inverse @ rhs if self.z_inverse is not None else cholesky_solve(self.chol, rhs))

    def z_times(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = self.dtype if dtype is None else dtype
        return self._per_layer(self.z_lambda.to(dtype) @ self._per_group(x.to(dtype)))

    def delta(self, x: torch.Tensor, wx: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``Δ x`` per position, ``[B, out_j, k]``, for ``x`` ``[B·p, n, k]``; ``wx = Zλ⁻¹x`` if known."""
        if not self.fisher:
            return [-self._g_times(g, self._position(x, j)) for j, g in enumerate(self.g)]
        wx = self.z_solve(x) if wx is None else wx
        return [-self.factors.apply_y_inverse(j, self._g_times(g, self._position(wx, j)))
                for j, g in enumerate(self.g)]

    def _g_times(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``g @ x`` for a thin ``x`` ``[B, n, k]``, computed as ``(xᵀgᵀ)ᵀ``: the same products in
        another order, but MKL runs a GEMM whose result is thin several times slower than one whose
        result is wide (benchmarks/README.md)."""
        return (x.mT.to(self.gradient_dtype) @ g.mT).mT.to(self.dtype)

    def delta_t(self, v: list[torch.Tensor]) -> torch.Tensor:
        """``Δᵀ v`` of every layer, ``[B·p, n, k]``, for ``v`` per position ``[B, out_j, k]``."""
        if not self.fisher:
            return -self._stacked([self._g_times(g.mT, vj) for g, vj in zip(self.g, v)])
        u = self._stacked([self._g_times(g.mT, self.factors.apply_y_inverse(j, vj))
                           for j, (g, vj) in enumerate(zip(self.g, v))])
        return -self.z_solve(u)

    def apply_delta_gram(self, x: torch.Tensor) -> torch.Tensor:
        """``ΔᵀΔ x`` (the Gram operator of Δ, unnormalised)."""
        return self.delta_t(self.delta(x))

    def _layer_values(self, per_position: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(per_position, 1).reshape(-1)

    # -- σ = ‖Δ‖₂ ---------------------------------------------------------------------------------

    def estimate_sigma(self, *, k: int = 8, steps: int = 4, seed: int = 0) -> None:
        """A first σ from a few block power steps (a lower bound within a few percent): enough
        for the preconditioner, whose shift it sets; :meth:`refine_sigma` makes it exact.  The
        block the steps end with, ``power_block``, leans towards Δ's top right singular vectors,
        which are (near) the wanted eigenvectors of Ω when the variance term is small: the
        eigensolve starts from it."""
        gen = torch.Generator(device=self.chol.device).manual_seed(seed)
        x = torch.randn(self.batch, self.n, min(k, self.n), dtype=self.dtype, device=self.chol.device, generator=gen)
        tiny = torch.finfo(self.dtype).tiny
        est = torch.zeros(self.batch, dtype=self.dtype, device=self.chol.device)
        for _ in range(steps):
            x = torch.linalg.qr(x).Q
            dx = self.delta(x)
            norms = [_spectral_norms(d) for d in dx]
            est = self._layer_values(norms)
            # Δᵀ(Δx/σ), not ΔᵀΔx: σ² passes float32's range once σ > 1.8e19.
            x = self.delta_t([d / e.clamp_min(tiny).reshape(-1, 1, 1) for d, e in zip(dx, norms)])
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
        b, j = divmod(i, self.positions)
        g = self.g[j][b].to(self.dtype)
        if not self.fisher:
            return -g
        g_zinv = cholesky_solve(self.chol[b], g.T).T  # G Zλ⁻¹, Zλ symmetric
        return -self.factors.apply_y_inverse_one(j, b, g_zinv)

    def dense(self, layers: torch.Tensor) -> torch.Tensor:
        """The matrices ``Ωᵢ`` of the given layers, ``[len(layers), n, n]``."""
        inverses: dict[int, torch.Tensor] = {}
        out = []
        for i in layers.tolist():
            b = i // self.positions
            if b not in inverses:
                inverses[b] = torch.cholesky_inverse(self.chol[b])
            d_hat = self._dense_delta(i) / self.sigma[i]
            omega = self.variance_coef[i] * inverses[b] - self.alpha * (d_hat.T @ d_hat)
            out.append(0.5 * (omega + omega.T))
        return torch.stack(out)

    # -- preconditioner ----------------------------------------------------------------------------

    def preconditioner(self, dtype: torch.dtype | None = None):
        """``X ↦ Zλ(sZλ + cI)⁻¹X`` with ``c`` shared by clusters of a group's layers (module docstring).

        Where ``c/λ_min(Zλ) ≤ s/1000`` the operator ``M = cZλ⁻¹ + sI`` is ``sI`` to 0.1 %, and
        where ``c/λ_max(Zλ) ≥ 1000·s`` it is ``cZλ⁻¹`` to 0.1 %: those clusters need no
        factorisation (``λ ≤ λ_min`` and ``tr Zλ ≥ λ_max`` bound the spectrum).  The clusters that
        need one, over every group of the stack, are factorised in one batch.  Returns the callable
        and the number of factorisations it made."""
        plan = _PreconditionerPlan(self, dtype)
        self.layer_preconditioner = plan.kinds
        return plan.apply, plan.factorisations

    def lora_b(self, a0: torch.Tensor) -> list[torch.Tensor]:
        """``Δ̂ᵢ A0ᵢ`` for every layer, ``a0`` ``[B·p, n, r]``, per position ``[B, out_j, r]``."""
        sigma = self.sigma.reshape(self.blocks, self.positions)
        return [d / sigma[:, j].reshape(-1, 1, 1) for j, d in enumerate(self.delta(a0.to(self.dtype)))]


def _spectral_norms(d: torch.Tensor) -> torch.Tensor:
    """``‖dᵢ‖₂`` of a stack of thin matrices ``[B, out, k]`` by the small Gram matrix's largest
    eigenvalue (``k ≤ out`` here): one batched ``eigh`` instead of a batched SVD."""
    # Scaled by the largest entry first: σ² passes float32's range once σ > 1.8e19.
    scale = d.abs().amax((-2, -1)).clamp_min(torch.finfo(d.dtype).tiny)
    d = d / scale.reshape(-1, 1, 1)
    gram = d.mT @ d if d.shape[-1] <= d.shape[-2] else d @ d.mT
    return scale * eigen.batched_eigh(gram)[0][..., -1].clamp_min(0).sqrt()


class _PreconditionerPlan:
    """Which layers' preconditioner is ``sI`` ("identity"), ``cZλ⁻¹`` ("scaled") or needs a
    factor, and the batched factors: ``plan.apply`` costs a fixed number of kernels per call."""

    def __init__(self, group: GroupOmega, dtype: torch.dtype | None):
        self.group = group
        self.dtype = group.dtype if dtype is None else dtype
        coef = group.variance_coef.tolist()
        s = self.shift = PRECOND_SHIFT * group.alpha
        p = group.positions
        z = group.z_lambda
        lam_min = group.z_damping.tolist()
        lam_max = z.diagonal(dim1=-2, dim2=-1).sum(-1).tolist()
        self.kinds: dict[int, str] = {}
        factor_slots: list[list[int]] = []
        factor_coefs: list[float] = []
        factor_blocks: list[int] = []
        for b in range(group.blocks):
            layer_coefs = coef[b * p:(b + 1) * p]
            for members in _clusters(layer_coefs, PRECOND_SHARE_RATIO):
                layers = [b * p + j for j in members]
                cs = [layer_coefs[j] for j in members]
                if max(cs) <= s * lam_min[b] / PRECOND_SHORTCUT:
                    kind = "identity"
                elif min(cs) >= PRECOND_SHORTCUT * s * lam_max[b]:
                    kind = "scaled"
                else:
                    kind = "factor"
                    factor_slots.append(layers + [-1] * (p - len(layers)))
                    factor_coefs.append(_geometric_mean(cs))
                    factor_blocks.append(b)
                self.kinds.update(dict.fromkeys(layers, kind))
        dev = z.device
        by_kind = {kind: torch.tensor([i for i, k in sorted(self.kinds.items()) if k == kind], dtype=torch.long,
                                      device=dev) for kind in ("identity", "scaled", "factor")}
        self.identity, self.scaled = by_kind["identity"], by_kind["scaled"]
        self.scaled_coef = torch.tensor([coef[i] for i in self.scaled.tolist()], dtype=self.dtype,
                                        device=dev).reshape(-1, 1, 1)
        self.factorisations = len(factor_slots)
        if factor_slots:
            slots = torch.tensor(factor_slots, dtype=torch.long, device=dev)  # [F, p], −1: an empty slot
            self.slots = slots
            self.filled = (slots >= 0).reshape(-1).nonzero().flatten()
            self.filled_layers = slots.reshape(-1)[self.filled]
            blocks = torch.tensor(factor_blocks, dtype=torch.long, device=dev)
            eye = torch.eye(group.n, dtype=self.dtype, device=dev)
            coefs = torch.tensor(factor_coefs, dtype=self.dtype, device=dev).reshape(-1, 1, 1)
            self.chol, _ = torch.linalg.cholesky_ex(s * z.to(self.dtype)[blocks] + coefs * eye)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        group, s = self.group, self.shift
        out = torch.empty_like(x)
        if len(self.identity):
            out[self.identity] = (x[self.identity].to(self.dtype) / s).to(x.dtype)
        if not len(self.scaled) and not self.factorisations:
            return out
        zx = group.z_times(x, self.dtype)  # Zλ(sZλ + cI)⁻¹ = (sZλ + cI)⁻¹Zλ: they commute
        if len(self.scaled):
            out[self.scaled] = (zx[self.scaled] / self.scaled_coef).to(x.dtype)
        if self.factorisations:
            f, p = self.slots.shape
            k = x.shape[-1]
            padded = torch.cat([zx, torch.zeros_like(zx[:1])])  # slot −1 reads the zero row
            rhs = padded[self.slots.reshape(-1)].reshape(f, p, group.n, k).transpose(1, 2).reshape(f, group.n, p * k)
            solved = cholesky_solve(self.chol, rhs).reshape(f, group.n, p, k).transpose(1, 2).reshape(f * p, group.n, k)
            out[self.filled_layers] = solved[self.filled].to(x.dtype)
        return out


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
