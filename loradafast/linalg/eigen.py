"""Batched eigensolver for the r smallest eigenpairs of many symmetric operators at once.

LoRA-DA needs, per layer, the eigenvectors of the r smallest eigenvalues of the Initialization
Guidance Matrix ``Ω = c·Zλ⁻¹ − α·Δ̂ᵀΔ̂`` (docs/design.md §4).  All layers of one width ``n`` are solved as
one batch by a block LOBPCG (Knyazev 2001) written for fixed shapes:

* every tensor keeps its shape through the iteration (no column dropping); layers that converge
  are frozen by masking, and rank-deficient search directions are masked instead of removed;
* the solver's own host synchronisations are the early-exit test every ``check_every`` iterations
  and the final convergence test.  The four small eigendecompositions of an iteration (two SVQB
  passes on ``W``, the Rayleigh–Ritz step, the SVQB of ``P``'s coefficients) are synchronisation
  free only on the native solver of csrc/ (on CPU up to 40 rows; on CUDA with
  ``LORADAFAST_NATIVE_CUDA=1``), whose error codes are never read on the host: a failed small
  solve yields non-finite Ritz vectors, whose residual fails the convergence test, and the layer
  goes to the dense fallback.  ``torch.linalg.eigh`` has no ``_ex`` variant and reads its error
  codes with ``.item()``, so on CUDA without the native solver an iteration synchronises four
  times (tests/linalg/test_eigen.py counts them); each costs the launch latency of the next kernels,
  small beside an iteration of a large batch of wide layers, but not beside one of a small
  batch (LoRA-DA solves one input group, 1–3 layers, at a time: ``methods/lora_da/solve.py``);
* search directions are orthonormalised with masked SVQB (Stathopoulos & Wu 2002), applied twice,
  and the implicit-difference direction ``P`` is built in the coefficient space of the
  Rayleigh–Ritz step (Hetmaniuk & Lehoucq 2006; Duersch et al. 2018), so the basis ``[X, W, P]``
  stays orthonormal to working precision and the Rayleigh–Ritz step is a *standard* symmetric
  eigenproblem of size ``3m`` (batched; see :mod:`loradafast.linalg.native`);
* a layer whose final residual misses the tolerance is re-solved with dense float64
  ``torch.linalg.eigh`` and reported in ``EigenResult.fallback``.

Indefiniteness.  Ω is indefinite and the wanted eigenvalues are its most negative ones.  Nothing
here needs definiteness: the Rayleigh–Ritz step picks the ``m`` smallest Ritz values of the
projected matrix whatever their sign, and the residual ``ΩX − XΘ`` is invariant under a shift
``Ω → Ω + sI``, so the iterates are exactly those of LOBPCG on any shifted positive operator.
Shifting explicitly would only add rounding (``s`` must be about ``‖Ω‖``, which for LoRA-DA is
``c/λ`` and can be 10⁶ times the wanted eigenvalues).

Convergence speed.  Without a preconditioner LOBPCG converges at a rate set by
``gap / (λ_max − λ_min)``; LoRA-DA's Ω spans ~``c/λ`` with gaps of ~10⁻³ between the wanted
eigenvalues, which takes thousands of iterations.  Pass ``precond``: for Ω of the LoRA-DA form,
:func:`omega_preconditioner` (``(c·Zλ⁻¹ + sI)⁻¹``, provably within a factor ``shift/(shift−1)``
of ``Ω + sI`` whatever the conditioning of ``Zλ``) makes LOBPCG converge in tens of iterations.
Oversampling the block beyond ``r`` makes the convergence of the r wanted pairs depend on the
gap ``λ_{m+1} − λ_r`` instead of ``λ_{r+1} − λ_r``.

Block Lanczos first, where there is no preconditioner (``krylov_columns``).  LOBPCG keeps three
blocks; block Lanczos with full reorthogonalisation keeps the whole Krylov space and takes its
Rayleigh–Ritz pairs, which without a preconditioner needs fewer products for the same residual
(on the q/k/v group of a Llama-2-7B block, well under half of LOBPCG's column-products; measurements:
benchmarks/README.md, 'Measurements behind the library's constants').
Its memory is the basis and its image, ``2·n·krylov_columns`` per operator, preallocated (fixed
shapes; dependent directions masked as in LOBPCG); the projected matrix grows by one block of
columns per product.  Layers it leaves unconverged when the basis is full continue in LOBPCG from
its Ritz vectors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import native as _native
from .dense import canonical_signs as canonicalize_signs  # one definition for every solver

Operator = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "EigenResult",
    "batched_eigh",
    "canonicalize_signs",
    "omega_preconditioner",
    "smallest_eigenpairs",
    "span_sine",
    "subspace_sine",
]


@dataclass
class EigenResult:
    """The r smallest eigenpairs of a batch of symmetric operators.

    ``residuals[b] = ‖Ω_b X_b − X_b Λ_b‖_F / ‖Ω_b‖₂`` over the r returned pairs, where ``‖Ω_b‖₂`` is
    the estimate in ``op_norm`` (for LOBPCG layers: the largest of a few block power steps and of
    all Ritz values, a lower bound that is tight to a few percent in practice; after block Lanczos:
    the largest ``|θ|`` of its Krylov space; for dense layers: the exact ``max |eigenvalue|``).
    By Davis–Kahan, the sine of the largest principal angle to the exact eigenspace is at most
    ``residuals·op_norm / gap`` with ``gap = λ_{r+1} − λ_r``.
    """

    eigenvalues: torch.Tensor  # [batch, r], ascending
    eigenvectors: torch.Tensor  # [batch, n, r], orthonormal columns, canonical signs
    residuals: torch.Tensor  # [batch]
    op_norm: torch.Tensor  # [batch], the ‖Ω‖₂ estimate the residuals are relative to
    iterations: int  # LOBPCG iterations, block Lanczos blocks (+ LOBPCG iterations after them); 0 if dense
    converged: torch.Tensor  # [batch] bool: LOBPCG met ``tol``
    fallback: torch.Tensor  # [batch] bool: re-solved with dense float64 eigh
    method: str  # "lobpcg", "block-lanczos" (+"+lobpcg" where LOBPCG finished), or "dense" (small n, by choice)
    tol: torch.Tensor | None = None  # [batch]: the residual tolerance ``converged`` was decided by


# --------------------------------------------------------------------------------------------
# small helpers


EIGH_PATHS = ("torch", "native", "host")


def batched_eigh(a: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a batch of small symmetric matrices.

    ``path``: "torch" (``torch.linalg.eigh``: on CUDA cuSOLVER's batched Jacobi up to 32 rows, one
    call per matrix above), "native" (the batched solver of csrc/), or "host" (one copy to the CPU
    and back: a fixed number of launches and one synchronisation whatever the batch).  Default:
    the environment's ``LORADAFAST_EIGH_PATH``, else "native" where
    :func:`loradafast.linalg.native.prefer_native` measured it faster, else "torch".  Which is
    fastest on a GPU for the Rayleigh–Ritz sizes (48-100 rows) is for a GPU run to decide
    (``benchmarks/bench_eigen.py``).  Only the lower triangle is read.
    """
    path = path or os.environ.get("LORADAFAST_EIGH_PATH") or ("native" if _native.prefer_native(a) else "torch")
    if path not in EIGH_PATHS:
        raise ValueError(f"batched_eigh path must be one of {EIGH_PATHS}, got {path!r}")
    if path == "native":
        return _native.eigh(a)
    if path == "host" and a.device.type != "cpu":
        values, vectors = torch.linalg.eigh(a.cpu())
        return values.to(a.device, non_blocking=True), vectors.to(a.device, non_blocking=True)
    return torch.linalg.eigh(a)


def subspace_sine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sine of the largest principal angle between the column spans of orthonormal ``u`` and ``v``.

    ``u``, ``v``: ``[..., n, k]``.  Computed as ``‖(I − UUᵀ)V‖₂``, which, unlike ``arccos`` of the
    singular values of ``UᵀV``, is accurate for small angles.
    """
    u = u.to(torch.float64)
    v = v.to(torch.float64)
    resid = v - u @ (u.mT @ v)
    return torch.linalg.matrix_norm(resid, ord=2)


def span_sine(a: torch.Tensor, b: torch.Tensor) -> float:
    """:func:`subspace_sine` for any full-column-rank ``a``, ``b`` ``[n, k]`` (orthonormalised first),
    e.g. two ``lora_A.T`` (orthonormal only up to 1/√γ) or singular vectors."""
    return float(subspace_sine(torch.linalg.qr(a.double())[0], torch.linalg.qr(b.double())[0]))


def _svqb(u: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked SVQB: orthonormalise the columns of ``u`` [b, n, k] without changing the shape.

    The Gram matrix of the column-scaled block is eigendecomposed, ``G = QΣQᵀ``, and the block is
    replaced by ``u D Q Σ^{-1/2}``.  Directions with ``σ ≤ tau·σ_max`` (linear dependence, or
    zero columns) cannot be normalised reliably; instead of dropping them, which would change the
    shape and need a host synchronisation, their columns are set to zero and reported in the
    returned mask ``[b, k]`` so that the Rayleigh–Ritz step can ignore them.
    """
    norms = torch.linalg.vector_norm(u, dim=-2, keepdim=True)
    tiny = torch.finfo(u.dtype).tiny
    us = u * torch.where(norms > tiny ** 0.5, 1.0 / norms.clamp_min(tiny), torch.zeros_like(norms))
    gram = us.mT @ us
    sig, q = batched_eigh(gram)
    keep = sig > tau * sig[..., -1:].clamp_min(tiny)
    scale = torch.where(keep, sig.clamp_min(tiny).rsqrt(), torch.zeros_like(sig))
    return us @ (q * scale.unsqueeze(-2)), keep


def _thin(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a @ c`` for a tall ``a`` ``[.., n, p]`` and a small ``c`` ``[.., p, k]``, computed as
    ``(cᵀaᵀ)ᵀ``: the same products, but MKL runs a GEMM whose result is thin markedly slower than
    one whose result is wide (measurements: benchmarks/README.md, 'Measurements behind the
    library's constants')."""
    return (c.mT @ a.mT).mT


def _project_out(w: torch.Tensor, *bases: torch.Tensor) -> torch.Tensor:
    for basis in bases:
        w = w - ((w.mT @ basis) @ basis.mT).mT  # basis (basisᵀ w), with wide results (see _thin)
    return w


def _masked_rr_matrix(h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Symmetrise the projected matrix and push masked directions above every valid Ritz value.

    Masked basis columns are zero, so their rows and columns of ``h`` are zero; giving them a
    diagonal above the Gershgorin bound of ``h`` keeps them out of the ``m`` smallest Ritz pairs
    as long as ``m`` valid directions exist (``X`` alone always provides them).
    """
    h = 0.5 * (h + h.mT)
    pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    h = torch.where(pair, h, torch.zeros_like(h))
    big = 2.0 * h.abs().sum(-1).amax(-1, keepdim=True) + 1.0
    return h + torch.diag_embed(torch.where(valid, torch.zeros_like(h[..., 0]), big))


# --------------------------------------------------------------------------------------------
# operators


def _as_operator(op, batch: int | None, n: int | None, dtype: torch.dtype, device):
    if isinstance(op, torch.Tensor):
        if op.dim() != 3 or op.shape[-1] != op.shape[-2]:
            raise ValueError(f"a dense operator must be [batch, n, n], got {tuple(op.shape)}")
        if batch is not None and op.shape[0] != batch or n is not None and op.shape[-1] != n:
            raise ValueError(f"operator shape {tuple(op.shape)} does not match batch={batch}, n={n}")
        mat = op.to(dtype=dtype, device=device)
        mat = 0.5 * (mat + mat.mT)
        return (lambda x: mat @ x), mat
    if not callable(op):
        raise TypeError(f"op must be a [batch, n, n] tensor or a callable, got {type(op).__name__}")
    if batch is None or n is None:
        raise ValueError("batch and n are required when op is a callable")
    return op, None


def _materialise(apply: Operator, batch: int, n: int, dtype, device, layers: torch.Tensor,
                 chunk: int = 256) -> torch.Tensor:
    """Dense ``[len(layers), n, n]`` of a batched callable by applying it to identity columns.

    The callable acts on the whole batch, so the columns are produced for every layer and only
    the wanted layers are kept; chunking bounds the memory to ``batch·n·chunk``.
    """
    out = torch.empty(len(layers), n, n, dtype=dtype, device=device)
    for j0 in range(0, n, chunk):
        j1 = min(n, j0 + chunk)
        eye = torch.zeros(batch, n, j1 - j0, dtype=dtype, device=device)
        eye[:, torch.arange(j0, j1, device=device), torch.arange(j1 - j0, device=device)] = 1.0
        out[:, :, j0:j1] = apply(eye)[layers].to(dtype)
    return out


def _dense_solve(mat: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """r smallest eigenpairs of dense symmetric ``mat`` in float64; residuals and exact ‖mat‖₂."""
    mat = mat.to(torch.float64)
    mat = 0.5 * (mat + mat.mT)
    values, vectors = torch.linalg.eigh(mat)
    norm = values.abs().amax(-1).clamp_min(torch.finfo(torch.float64).tiny)
    values, vectors = values[..., :r], canonicalize_signs(vectors[..., :r])
    resid = torch.linalg.matrix_norm(mat @ vectors - vectors * values.unsqueeze(-2)) / norm
    return values, vectors, resid, norm


def omega_preconditioner(z_lambda: torch.Tensor, c: torch.Tensor | float, alpha: float = 1.0, *,
                         shift: float = 1.1, dtype: torch.dtype = torch.float64) -> Operator:
    """Preconditioner for batches of ``Ω = c·Zλ⁻¹ − α·Δ̂ᵀΔ̂`` with ``‖Δ̂‖₂ = 1`` (LoRA-DA).

    Returns ``X ↦ M⁻¹X`` with ``M = c·Zλ⁻¹ + s·I`` and ``s = shift·α``, applied as
    ``Zλ (s·Zλ + c·I)⁻¹ X`` (one extra batched Cholesky factorisation, then a solve and a matmul
    per iteration).  Why this ``M``: ``0 ≤ α·Δ̂ᵀΔ̂ ≤ α·I ≤ (α/s)·M``, so
    ``(1 − 1/shift)·M ≤ Ω + sI ≤ M``: ``M`` is spectrally equivalent to the positive operator
    ``Ω + sI`` with condition number at most ``shift/(shift − 1)``, whatever the spread of ``Zλ``.
    The cluster ``c/λ`` from the null space of a rank-deficient ``Z`` (what stalls
    unpreconditioned LOBPCG) is mapped to 1.  A ``shift`` close to 1 puts ``−s`` near the most
    negative eigenvalue ``≥ −α``, which acts like shift-and-invert towards the wanted end;
    1.1 converged fastest of the shifts tried (measurements: benchmarks/README.md, 'Measurements
    behind the library's constants').
    (``M = c·Zλ⁻¹`` alone, i.e. ``s = 0``, is cheaper but fails when ``c/λ`` is small: then
    ``Zλ/c`` amplifies everything.)

    ``z_lambda``: ``Zλ = Z + λI`` ``[batch, n, n]``; ``c``: scalar or ``[batch]``.
    """
    z = z_lambda.to(dtype)
    c = torch.as_tensor(c, dtype=dtype, device=z.device).reshape(-1, 1, 1)
    s = float(shift) * float(alpha)
    eye = torch.eye(z.shape[-1], dtype=dtype, device=z.device)
    # cholesky_ex: no host synchronisation; a failed factorisation (only with c = s = 0, i.e.
    # Ω = 0) yields non-finite directions, which the solver masks and the fallback then handles.
    chol, _ = torch.linalg.cholesky_ex(s * z + c * eye)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return (z @ torch.cholesky_solve(x.to(dtype), chol)).to(x.dtype)
    return apply


# --------------------------------------------------------------------------------------------
# the solver


def default_tol(dtype: torch.dtype) -> float:
    # Relative to ‖Ω‖₂.  float64: LOBPCG's attainable floor is ~1e-14 for n ≲ 10⁴, and 1e-10 gives a
    # subspace error of ~1e-10·‖Ω‖/gap, which for LoRA-DA (‖Ω‖ ~ c/λ, gaps ~1e-3) is what keeps
    # the sine of the subspace angle near 1e-6.  float32 can do no better than ~1e-5.
    return 1e-10 if dtype == torch.float64 else 1e-5


def smallest_eigenpairs(
    op: torch.Tensor | Operator, n: int | None = None, r: int = 8, batch: int | None = None, *,
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
    max_iter: int = 300, tol: float | torch.Tensor | None = None, oversample: int | None = None, seed: int = 0,
    dense: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None, precond: Operator | None = None,
    x0: torch.Tensor | None = None, check_every: int = 10, op_norm: torch.Tensor | float | None = None,
    norm_iters: int = 3, fallback: bool = True, dense_below: int | None = None,
    krylov_columns: int = 0, krylov_block: int | None = None, subspace_sine: float | None = None,
) -> EigenResult:
    """The ``r`` smallest eigenpairs of each of ``batch`` symmetric ``n × n`` operators.

    ``op``: a symmetric ``[batch, n, n]`` tensor, or a callable mapping ``X [batch, n, k]`` to
    ``Ω X [batch, n, k]`` (any ``k``; it receives ``dtype`` tensors on ``device``).
    ``precond``: optional symmetric positive definite callable of the same form approximating
    ``(Ω − σI)⁻¹`` for a σ at or below the wanted eigenvalues (for LoRA-DA:
    :func:`omega_preconditioner`).  Without it, operators whose spectrum spans many orders of
    magnitude around tiny gaps will not converge in ``max_iter`` and fall back to dense ``eigh``.
    ``oversample``: extra block columns beyond ``r`` (default ``max(r, 8)``, block ``m = r + oversample``).
    ``tol``: on ``EigenResult.residuals`` (default 1e-10 in float64, 1e-5 in float32), scalar or ``[batch]``.
    ``dense``: the dense operators for the fallback, ``[batch, n, n]`` or a callable taking a
    ``LongTensor`` of layer indices and returning their ``[k, n, n]`` matrices; by default a
    callable ``op`` is applied to identity columns.
    ``check_every``: iterations between early-exit tests (each is one host synchronisation; the
    small eigendecompositions add four per iteration where they run on ``torch.linalg.eigh``, see
    the module docstring).
    ``op_norm``: a known ``‖Ω‖₂`` (scalar or ``[batch]``) to use instead of the estimate.
    ``dense_below``: solve the whole batch densely when ``n`` is at most this (default ``4m``:
    the ``3m``-column LOBPCG basis would be most of the space).
    ``fallback=False`` returns LOBPCG's answer even for layers that miss ``tol``.
    ``krylov_columns``, ``krylov_block``: without ``precond``, block Lanczos first (module docstring).
    ``subspace_sine``: also accept a layer once Davis–Kahan bounds its subspace's sine by this
    (``residual·‖Ω‖₂/gap``, the gap ``θ_{r+1} − θ_r`` of the current Ritz values); the tolerance
    each layer was tested against is ``EigenResult.tol``.
    """
    batch, n, device = _operator_sizes(op, batch, n, device)
    apply, mat = _as_operator(op, batch, n, dtype, device)
    if not isinstance(r, int) or r < 1 or r > n:
        raise ValueError(f"need 1 ≤ r ≤ n, got r={r}, n={n}")
    tol = default_tol(dtype) if tol is None else tol
    if isinstance(tol, torch.Tensor):  # per operator, e.g. each one's attainable residual
        tol = tol.to(device=device, dtype=torch.float64)
    m = min(n, r + (max(r, 8) if oversample is None else int(oversample)))
    dense_below = 4 * m if dense_below is None else dense_below

    if n <= dense_below or batch == 0:
        full = op if mat is not None else _dense_matrices(dense, apply, batch, n, dtype, device,
                                                          torch.arange(batch, device=device))
        return _dense_eigenpairs(full, r, dtype, tol, batch, device)

    run = _Lobpcg(apply, precond, n, r, m, batch, dtype, device, max_iter, tol, check_every, norm_iters, subspace_sine)
    method, (x, values, resid, norm, iters, conv, used_tol) = _iterate(run, x0, seed, op_norm, krylov_columns,
                                                                       krylov_block)
    result = EigenResult(values, x, resid, norm, iters, conv, torch.zeros_like(conv), method,
                         _per_layer(used_tol, batch, device))
    if fallback and bool((~conv).any()):  # the one unavoidable synchronisation: which layers failed
        layers = (~conv).nonzero().flatten()
        _replace_by_dense(result, layers, _fallback_matrices(op, mat, dense, apply, batch, n, dtype, device, layers), r)
    return result


def _operator_sizes(op, batch: int | None, n: int | None, device) -> tuple[int | None, int | None, torch.device]:
    """``batch``, ``n`` and ``device``, each read from a tensor ``op`` where not given; the device
    as a ``torch.device`` (the CPU by default)."""
    if isinstance(op, torch.Tensor):
        batch = op.shape[0] if batch is None else batch
        n = op.shape[-1] if n is None else n
        device = op.device if device is None else device
    return batch, n, torch.device("cpu") if device is None else torch.device(device)


def _dense_eigenpairs(full: torch.Tensor, r: int, dtype: torch.dtype, tol, batch: int, device) -> EigenResult:
    """Every operator solved by dense ``eigh`` of ``full`` (small ``n``, or an empty batch); each
    layer's ``converged`` says whether it met ``tol``, and none falls back."""
    values, vectors, resid, norm = _dense_solve(full, r)
    return EigenResult(values.to(dtype), vectors.to(dtype), resid, norm, 0, resid <= tol,
                       torch.zeros_like(resid, dtype=torch.bool), "dense", _per_layer(tol, batch, device))


def _fallback_matrices(op, mat, dense, apply, batch, n, dtype, device, layers):
    # A dense op is re-solved from the caller's tensor, in its own (possibly higher) precision.
    if mat is not None:
        return op[layers.to(op.device)]
    return _dense_matrices(dense, apply, batch, n, dtype, device, layers)


def _replace_by_dense(result: EigenResult, layers: torch.Tensor, full: torch.Tensor, r: int) -> None:
    """The fallback: the given layers' pairs re-solved by dense float64 ``eigh`` of ``full``."""
    values, vectors, resid, norm = _dense_solve(full, r)
    dtype = result.eigenvalues.dtype
    result.eigenvalues = result.eigenvalues.index_copy(0, layers, values.to(dtype))
    result.eigenvectors = result.eigenvectors.index_copy(0, layers, vectors.to(dtype))
    result.residuals = result.residuals.index_copy(0, layers, resid.to(result.residuals.dtype))
    result.op_norm = result.op_norm.index_copy(0, layers, norm.to(result.op_norm.dtype))
    result.fallback[layers] = True


def _per_layer(tol, batch: int, device) -> torch.Tensor:
    return torch.as_tensor(tol, dtype=torch.float64, device=device).expand(batch).clone()


def _dense_matrices(dense, apply, batch, n, dtype, device, layers):
    if dense is None:
        return _materialise(apply, batch, n, torch.float64 if dtype == torch.float64 else dtype, device, layers)
    if isinstance(dense, torch.Tensor):
        return dense[layers.to(dense.device)].to(device)
    return dense(layers).to(device)


@dataclass
class _Lobpcg:
    """One batched LOBPCG run: the operator, the sizes and the stopping rules."""

    apply: Operator
    precond: Operator | None
    n: int
    r: int  # wanted pairs
    m: int  # block size, r + oversampling
    batch: int
    dtype: torch.dtype
    device: torch.device
    max_iter: int
    tol: float | torch.Tensor
    check_every: int
    norm_iters: int
    subspace_sine: float | None = None

    def tolerance(self, theta: torch.Tensor, norm: torch.Tensor, valid: torch.Tensor | None = None):
        """The residual test for the Ritz values ``theta`` (ascending): ``tol``, loosened per layer
        to ``subspace_sine·gap/‖Ω‖`` (Davis–Kahan: then the subspace's sine is below
        ``subspace_sine``) where that is larger.  ``valid[b, j]``: ``theta[b, j]`` belongs to a
        valid direction; without a valid ``θ_{r+1}`` there is no gap, and ``tol`` holds."""
        if self.subspace_sine is None or theta.shape[-1] <= self.r:
            return self.tol
        gap = (theta[..., self.r] - theta[..., self.r - 1]).clamp_min(0)
        if valid is not None:
            gap = torch.where(valid[..., self.r], gap, torch.zeros_like(gap))
        base = torch.as_tensor(self.tol, dtype=norm.dtype, device=norm.device)
        return torch.maximum(base, self.subspace_sine * gap / norm)

    @property
    def tau(self) -> float:
        # A direction whose Gram eigenvalue is below tau is numerically dependent; in float64 its
        # normalisation would amplify rounding by 1/√tau ≈ 10⁶, still far below anything that matters.
        return 100.0 * torch.finfo(self.dtype).eps * self.m

    def flags(self, value: bool) -> torch.Tensor:
        return torch.full((self.batch, self.m), value, dtype=torch.bool, device=self.device)


@dataclass
class _State:
    """The iterates: Ritz block X, implicit-difference block P, their images, Ritz values, masks."""

    x: torch.Tensor
    ax: torch.Tensor
    theta: torch.Tensor
    p: torch.Tensor
    ap: torch.Tensor
    p_valid: torch.Tensor
    norm: torch.Tensor  # the ‖Ω‖₂ estimate
    fixed_norm: bool  # given by the caller: not raised by the Ritz values


def _lobpcg(run: _Lobpcg, x0: torch.Tensor | None, seed: int, op_norm):
    state = _initial_state(run, _start_block(run, x0, seed), op_norm)
    conv = torch.zeros(run.batch, dtype=torch.bool, device=run.device)
    it = 0
    for it in range(1, run.max_iter + 1):
        res = state.ax - state.x * state.theta.unsqueeze(-2)
        resid = torch.linalg.matrix_norm(res[..., :run.r]) / state.norm
        tol = run.tolerance(state.theta, state.norm)
        conv = conv | (resid <= tol)
        if it % run.check_every == 0 and bool(conv.all()):
            break
        _step(run, state, res, active=~conv)
    # Honest residual: ΩX recomputed (the recurrence for ΩX drifts by rounding), Λ refreshed by the
    # Rayleigh quotients of the returned vectors.
    xr = state.x[..., :run.r]
    axr = run.apply(xr)
    values = (xr * axr).sum(-2)
    resid = torch.linalg.matrix_norm(axr - xr * values.unsqueeze(-2)) / state.norm
    tol = run.tolerance(state.theta, state.norm)
    return canonicalize_signs(xr), values, resid, state.norm, it, resid <= tol, tol


def _iterate(run: _Lobpcg, x0, seed: int, op_norm, krylov_columns: int, krylov_block: int | None):
    """LOBPCG, or block Lanczos first where there is no preconditioner and room for a basis."""
    block = max(run.r, min(run.m, krylov_block or run.m))
    blocks = min(krylov_columns, run.n // 2) // block
    if run.precond is not None or blocks < 2 or blocks * block < run.m:
        return "lobpcg", _lobpcg(run, x0, seed, op_norm)
    x_ritz, *out = _block_lanczos(run, x0, seed, op_norm, block, blocks)
    if bool(out[-2].all()):
        return "block-lanczos", out
    x, values, resid, norm, more, conv, tol = _lobpcg(run, x_ritz, seed, out[3])  # from the Ritz vectors
    return "block-lanczos+lobpcg", (x, values, resid, norm, out[4] + more, conv, tol)


def _block_lanczos(run: _Lobpcg, x0: torch.Tensor | None, seed: int, op_norm, block: int, blocks: int):
    """Rayleigh–Ritz on the block Krylov space ``[Q, ΩQ, …]`` of up to ``blocks`` blocks of
    ``block`` columns, fully reorthogonalised (twice, as in LOBPCG's search directions).

    Returns the ``m`` leading Ritz vectors (to start LOBPCG from), then, like :func:`_lobpcg`, the
    ``r`` wanted ones (canonical signs), their Rayleigh quotients, honest residuals, the norm
    estimate, the blocks used, the converged flags and the tolerance they were tested against.
    ``‖Ω‖₂`` is estimated by the largest
    ``|θ|`` seen (Krylov spaces find both ends of the spectrum first) unless given."""
    b, n, r, m = run.batch, run.n, run.r, run.m
    cols = block * blocks
    basis = torch.zeros(b, n, cols, dtype=run.dtype, device=run.device)
    image = torch.zeros_like(basis)
    proj = torch.zeros(b, cols, cols, dtype=run.dtype, device=run.device)
    valid = torch.zeros(b, cols, dtype=torch.bool, device=run.device)
    q = _start_block(run, x0, seed, block)
    ok = torch.ones(b, block, dtype=torch.bool, device=run.device)
    tiny = torch.finfo(run.dtype).tiny
    fixed = op_norm is not None
    norm = (torch.as_tensor(op_norm, dtype=run.dtype, device=run.device).expand(b).clone() if fixed
            else torch.full((b,), tiny, dtype=run.dtype, device=run.device))
    conv = torch.zeros(b, dtype=torch.bool, device=run.device)
    tol = run.tol
    check = 2  # every other block: a check is an eigh of the whole projected matrix, and a synchronisation
    used = 0
    for j in range(blocks):
        lo, hi = j * block, (j + 1) * block
        if j:
            y = _project_out(image[..., lo - block:lo], basis[..., :lo])
            y = _project_out(y, basis[..., :lo])
            q, ok = _svqb(y, run.tau)
            q = _project_out(q, basis[..., :lo])  # a second SVQB pass repairs the first's loss of orthogonality
            q, ok2 = _svqb(q * ok.unsqueeze(-2), run.tau)
            ok = ok2 & (torch.linalg.vector_norm(q, dim=-2) > 0.5)
            q = q * ok.unsqueeze(-2)
        aq = run.apply(q)
        basis[..., lo:hi], image[..., lo:hi], valid[:, lo:hi] = q, aq, ok
        proj[..., :hi, lo:hi] = (aq.mT @ basis[..., :hi]).mT
        proj[..., lo:hi, :lo] = proj[..., :lo, lo:hi].mT
        used = j + 1
        if hi < m or (used % check and used < blocks):
            continue
        theta, c = batched_eigh(_masked_rr_matrix(proj[..., :hi, :hi], valid[:, :hi]))
        finite = torch.arange(hi, device=run.device) < valid[:, :hi].sum(-1, keepdim=True)
        if not fixed:
            norm = torch.maximum(norm, torch.where(finite, theta.abs(), torch.zeros_like(theta)).amax(-1))
        x = _thin(basis[..., :hi], c[..., :r])
        ax = _thin(image[..., :hi], c[..., :r])
        resid = torch.linalg.matrix_norm(ax - x * theta[..., None, :r]) / norm
        tol = run.tolerance(theta, norm, finite)
        conv = resid <= tol
        if bool(conv.all()):
            break
    x_ritz = _thin(basis[..., :hi], c[..., :m])
    xr = x_ritz[..., :r]
    axr = run.apply(xr)  # honest residual, as in _lobpcg
    values = (xr * axr).sum(-2)
    resid = torch.linalg.matrix_norm(axr - xr * values.unsqueeze(-2)) / norm
    return x_ritz, canonicalize_signs(xr), values, resid, norm, used, resid <= tol, tol


def _start_block(run: _Lobpcg, x0: torch.Tensor | None, seed: int, width: int | None = None) -> torch.Tensor:
    """An orthonormal ``[batch, n, width]`` start (default ``m`` columns) spanning ``x0``'s leading
    columns and, beyond them, random ones.

    Where ``x0`` is numerically rank-deficient (e.g. power steps on an operator of low rank), its
    dependent columns are replaced by random ones: a zero column would otherwise pass for a
    valid direction."""
    shape = (run.batch, run.n, run.m if width is None else width)
    gen = torch.Generator(device=run.device).manual_seed(seed)
    random = torch.randn(*shape, dtype=run.dtype, device=run.device, generator=gen)
    if x0 is None:
        x, _ = _svqb(random, run.tau)
    else:
        x = x0.to(dtype=run.dtype, device=run.device)[..., :shape[-1]]  # a wider start block keeps its leading columns
        x = torch.cat([x, random[..., x.shape[-1]:]], dim=-1)  # fill the oversampled columns at random
        x, keep = _svqb(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), run.tau)
        x, _ = _svqb(torch.where(keep.unsqueeze(-2), x, random), run.tau)
    x, _ = _svqb(x, run.tau)  # twice: orthonormal to working precision
    return x


def _initial_state(run: _Lobpcg, x: torch.Tensor, op_norm) -> _State:
    ax = run.apply(x)
    # ‖Ω‖₂ estimate: block power steps from the start block.  Each max column norm ‖Ωv‖ of a unit
    # v is a lower bound; the Ritz values seen later only raise it.
    tiny = torch.finfo(run.dtype).tiny
    if op_norm is not None:
        norm = torch.as_tensor(op_norm, dtype=run.dtype, device=run.device).expand(run.batch).clone()
    else:
        norm = torch.linalg.vector_norm(ax, dim=-2).amax(-1)
        v = ax
        for _ in range(run.norm_iters):
            v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(tiny)
            v = run.apply(v)
            norm = torch.maximum(norm, torch.linalg.vector_norm(v, dim=-2).amax(-1))
    norm = norm.clamp_min(tiny)
    theta, c = batched_eigh(_masked_rr_matrix(x.mT @ ax, run.flags(True)))
    x, ax = x @ c, ax @ c
    return _State(x, ax, theta, torch.zeros_like(x), torch.zeros_like(x), run.flags(False), norm,
                  op_norm is not None)


def _search_directions(run: _Lobpcg, state: _State, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The preconditioned residuals, orthonormal to X and P (masked where dependent)."""
    x, p, tau = state.x, state.p, run.tau
    w = run.precond(res) if run.precond is not None else res
    # A broken preconditioner or operator must not take down the other layers (or make the
    # small eigh raise): non-finite directions become zero columns, which are masked.
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
    w = _project_out(w, x, p)
    w = _project_out(w, x, p)
    w, w_valid = _svqb(w, tau)
    w = _project_out(w, x, p)  # second SVQB pass repairs the loss of orthogonality of the first
    w, w_valid2 = _svqb(w * w_valid.unsqueeze(-2), tau)
    return w, w_valid2 & (torch.linalg.vector_norm(w, dim=-2) > 0.5)


def _step(run: _Lobpcg, state: _State, res: torch.Tensor, active: torch.Tensor) -> None:
    """One LOBPCG iteration on the layers still ``active``: Rayleigh–Ritz on [X, W, P]."""
    m = run.m
    w, w_valid = _search_directions(run, state, res)
    aw = run.apply(w)
    s = torch.cat([state.x, w, state.p], dim=-1)
    a_s = torch.cat([state.ax, aw, state.ap], dim=-1)
    valid = torch.cat([run.flags(True), w_valid, state.p_valid], dim=-1)
    h = torch.nan_to_num(_masked_rr_matrix(s.mT @ a_s, valid), nan=0.0, posinf=0.0, neginf=0.0)
    all_theta, v = batched_eigh(h)
    if not state.fixed_norm:  # the valid Ritz values come first: masked ones sit above them
        finite = torch.arange(3 * m, device=run.device) < valid.sum(-1, keepdim=True)
        state.norm = torch.maximum(state.norm,
                                   torch.where(finite, all_theta.abs(), torch.zeros_like(all_theta)).amax(-1))
    v = v * valid.unsqueeze(-1)  # coefficients on masked (zero) columns are rounding noise
    cx = v[..., :m]

    # P spans the new Ritz vectors' components outside the old X, orthonormalised within the
    # (orthonormal) basis [X, W, P] - in coefficient space, so it costs no products with n.
    y = cx.clone()
    y[..., :m, :] = 0
    y = y - cx @ (cx.mT @ y)
    y = y - cx @ (cx.mT @ y)
    y, p_new_valid = _svqb(y, run.tau)

    keep = active.reshape(-1, 1, 1)
    state.x = torch.where(keep, _thin(s, cx), state.x)
    state.ax = torch.where(keep, _thin(a_s, cx), state.ax)
    state.p = torch.where(keep, _thin(s, y), state.p)
    state.ap = torch.where(keep, _thin(a_s, y), state.ap)
    state.theta = torch.where(active.unsqueeze(-1), all_theta[..., :m], state.theta)
    state.p_valid = torch.where(active.unsqueeze(-1), p_new_valid, state.p_valid)
