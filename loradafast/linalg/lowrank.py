"""The top singular triplets of a layer's gradient, as LoRA-GA and LoRA-One need them: a
randomized block Krylov method with an a-posteriori accuracy check, and the exact SVD where the
check fails (docs/design.md §5, §6).

The randomized path (Musco & Musco 2015, "Randomized block Krylov methods for stronger and faster
approximate singular value decomposition"; Halko, Martinsson & Tropp 2011, §4.5) builds an
orthonormal basis ``Q`` of the block Krylov space ``[AΩ, (AAᵀ)AΩ, …, (AAᵀ)^d AΩ]`` of a Gaussian
block ``Ω`` of ``k`` columns, then takes the exact SVD of the small ``QᵀA``.  By construction
``Aᵀu_i = σ_i v_i`` holds exactly for its triplets; what remains is the residual
``R = AV − US = (I − QQᵀ)AV``.  Subspace iteration (PEFT's ``svd_lowrank``) keeps only the last
block of that space; keeping all of it reaches the same accuracy with several times fewer
products on gradients, whose leading singular values are clustered: on SmolLM2-135M, blocks of k
columns and depth 5 (k = 16) or 6 (k = 8) gave every layer a backward error ≤ 3.3e-4 with a
third of the products of subspace iteration with 4k columns and 4 steps (which reached 1.5e-4,
but 1.1e-3 on one layer at k = 8), in 1.0–1.2× the time of ``svd_lowrank(q=2k, niter=4)``,
whose errors reach 1e-2 (numbers by the constants below).

**The check (backward error).**  The k triplets returned are exact singular triplets of
``A + E`` with ``E = −R_k V_kᵀ``, ``‖E‖_F = ‖R_k‖_F``.  The randomized result is accepted when
``‖R_k‖_F ≤ tol·σ̃₁``: it is then the exact answer for a gradient that differs from ours by at most
``tol`` of its norm (0.1 % by default), far below the sampling noise of a gradient estimated from
a few hundred sequences.  That they are the *top* k triplets of ``A + E`` assumes the Krylov
space has found every singular value above σ̃_k, which a Gaussian start makes overwhelmingly
likely.  Where the check fails, the space grows by one block at a time (up to
``MAX_DEPTH``) before the exact SVD is taken.

**Why not a tolerance on the subspace itself.**  The distance to the exact SVD's subspace is also
estimated and reported: by Wedin's theorem the sine of the largest angle between the top-j
subspaces is about ``‖R_{:j}‖ / (σ̃_j − σ_{j+1})``, with ``σ̃_{j+1} + ‖r_{j+1}‖`` standing for the
unknown σ_{j+1} (infinite where there is no gap).  On real gradients that gap is tiny: on
SmolLM2-135M (16 × 128 tokens) the median gap σ_2r − σ_2r+1 is 0.3 % of σ₁ and the smallest
0.03 %, so the exact subspace is itself ill-conditioned and no cheap method reproduces it to 1e-4
(PEFT's ``svd_lowrank(q=4r, niter=4)`` is off by sin θ = 0.12 at worst there).  Matching it is
what ``mode="exact"`` is for.

The randomized path runs in float32 whatever the dtype of ``A`` (a gradient is an fp32 sum): the
check's own rounding, about ``√n·eps₃₂·σ₁ ≈ 1e-6·σ₁``, sits far below its tolerance.  The small
Rayleigh–Ritz problem is solved through the Gram matrix of ``QᵀA`` in float64 (its eigenvalues
are the σ², to float64 accuracy relative to σ₁²: ample for the singular values kept, which the
check bounds anyway), three times faster than an SVD of ``QᵀA``; where the kept singular values
fall below ``GRAM_MIN_RATIO·σ₁`` (a gradient of lower rank than the block), the SVD of ``QᵀA``
is taken instead.  The products are written with wide results (``(QᵀA)Aᵀ``): MKL runs a GEMM with
a thin result several times slower (see ``lora_da_operator._g_times``).  The exact path keeps
the dtype of ``A``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Measured against the exact float64 SVD on the gradients of SmolLM2-135M (all 210 layers: 576×576,
# 192×576, 1536×576, 576×1536; float32, 1 thread), backward error ‖R_k‖_F/σ₁, median / max, and
# layers above 1e-3:
#   k = 16 (LoRA-GA, r = 8): block k, depth 4: 1.5e-4 / 3.8e-3, 32 layers;  depth 5: 6.0e-6 /
#   3.3e-4, none (2.3 s);  depth 6: 1.5e-6 / 2.2e-5 (3.3 s).  Subspace iteration with 4k columns
#   and 4 steps (the previous default): 4.4e-6 / 1.5e-4 (4.4 s); svd_lowrank(q=2k, niter=4):
#   1.2e-4 / 6.3e-3, 70 layers (2.6 s).
#   k = 8 (LoRA-One): depth 5: 2.4e-5 / 2.1e-3, 5 layers (3 with the Gram Rayleigh–Ritz step below);
#   depth 6: 1.3e-6 / 2.0e-4, none (1.6 s);
#   subspace iteration 4k × 4: 2.0e-5 / 1.1e-3, 1 layer (2.1 s).
# So a block of k columns, 5 steps, and one more step wherever the check fails (k = 8: 3 layers).
BLOCK_FACTOR = 1  # block = BLOCK_FACTOR·k columns
DEPTH = 5  # products with AAᵀ before the first check
MAX_DEPTH = 10  # the space grows one block per failed check up to this depth, then the exact SVD
BACKWARD_TOL = 1e-3  # ‖R_k‖_F ≤ BACKWARD_TOL·σ̃₁
GRAM_MIN_RATIO = 1e-5  # below σ̃₁ times this, the Gram matrix's σ² would carry float64 rounding
# Below min(out, in) = 2q (q: the Krylov space's columns at DEPTH), or 64, the exact SVD is as
# fast (measured, float64, 1 thread), and exact.
MIN_SIZE_RATIO = 2
MIN_SIZE = 64
# A new Krylov direction whose norm after orthogonalisation fell below this fraction of its norm
# before lies in the space already found, to float32 accuracy (A's rank is exhausted): dropped.
DEPENDENT = 1e-4
WEAK = 1e-2  # below this fraction, a kept direction is orthogonalised once more (float32: leakage ≤ 1e-5)


@dataclass
class TopSingular:
    """``u`` ``[m, k]``, ``s`` ``[k]`` (descending), ``vh`` ``[k, n]``, and how they were computed."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    path: str  # "exact", "randomized", or "exact-fallback" (the randomized result failed the check)
    backward_error: float | None = None  # ‖R_k‖_F / σ̃₁ of the randomized triplets (None: not run)
    sine_estimate: float | None = None  # Wedin estimate of sin θ to the exact SVD, summed over the boundaries
    sketch_size: int | None = None  # columns of the Krylov space (block · (depth + 1))
    iterations: int | None = None  # its depth: products with AAᵀ


class _BlockKrylov:
    """An orthonormal basis of the block Krylov space of ``a`` ``[m, n]``, kept as rows ``[q, m]``
    with their products ``rows @ a`` ``[q, n]``: those are ``QᵀA`` for the Rayleigh–Ritz step and
    the input of the next block, so each block costs two products with ``a``."""

    def __init__(self, a: torch.Tensor, block: int, seed: int):
        self.a = a
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same start on every device
        omega = torch.randn(block, a.shape[1], generator=gen, dtype=torch.float32).to(device=a.device, dtype=a.dtype)
        self.rows = a.new_empty(0, a.shape[0])
        self.projected = a.new_empty(0, a.shape[1])
        self.depth = -1
        self._append(omega @ a.T)

    def extend(self) -> bool:
        """One more block, ``(AAᵀ)`` times the last; False where the space stopped growing."""
        if self._last.shape[0] == 0:
            return False
        self._append(self._last_projected @ self.a.T)
        return self._last.shape[0] > 0

    def _project_out(self, y: torch.Tensor) -> torch.Tensor:
        return y - (y @ self.rows.T) @ self.rows if self.rows.shape[0] else y

    def _append(self, y: torch.Tensor) -> None:
        before = torch.linalg.vector_norm(y, dim=1)
        y = self._project_out(self._project_out(y))  # twice is enough (Giraud et al. 2005): orthogonal to float32 accuracy
        keep = torch.linalg.vector_norm(y, dim=1) > DEPENDENT * before
        if not bool(keep.all()):
            y, before = y[keep], before[keep]
        q, r = torch.linalg.qr(y.T)
        kept = r.diagonal().abs() / before.clamp_min(torch.finfo(y.dtype).tiny)
        q = q.T if bool((kept > DEPENDENT).all()) else q.T[kept > DEPENDENT]
        # A column that lost most of its norm to the projections carries up to eps₃₂/kept of the old
        # rows after the QR (1e-3 at DEPENDENT): once more through both for such blocks.
        if self.rows.shape[0] and bool((kept < WEAK).any()):
            q = torch.linalg.qr(self._project_out(q).T)[0].T
        self._last, self._last_projected = q, q @ self.a
        self.rows = torch.cat([self.rows, q])
        self.projected = torch.cat([self.projected, self._last_projected])
        self.depth += 1

    def triplets(self, last: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The leading ``last`` singular triplets of ``QᵀA``, lifted: ``u [m, last]``, ``s``, ``vh``."""
        b = self.projected.double()
        values, vectors = torch.linalg.eigh(b @ b.T)
        values, vectors = values.flip(0)[:last], vectors.flip(1)[:, :last]
        s = values.clamp_min(0).sqrt()
        if s.shape[0] < last or not bool(s[-1] > GRAM_MIN_RATIO * s[0]):
            uq, s, vh = torch.linalg.svd(self.projected, full_matrices=False)
            return (uq[:, :last].T @ self.rows).T, s[:last], vh[:last]
        vh = (vectors.T @ b) / s[:, None]
        u = (vectors.T.to(self.a.dtype) @ self.rows).T  # the wide product, transposed (module docstring)
        return u, s.to(self.a.dtype), vh.to(self.a.dtype)


def _accuracy(a, u, s, vh, k: int, boundaries) -> tuple[float, float]:
    """(backward error of the first k triplets, summed Wedin sine estimates at ``boundaries``)."""
    last = max(k, *boundaries) + 1
    norms = torch.linalg.vector_norm((vh[:last] @ a.T).T - u[:, :last] * s[:last], dim=0).tolist()
    sv = s[:last].tolist()
    backward = sum(x * x for x in norms[:k]) ** 0.5 / sv[0] if sv[0] > 0 else float("inf")
    sine = 0.0
    for j in boundaries:
        gap = sv[j - 1] - sv[j] - norms[j]
        sine += sum(x * x for x in norms[:j]) ** 0.5 / gap if gap > 0 else float("inf")
    return backward, sine


def top_singular_triplets(a: torch.Tensor, k: int, *, boundaries=None, mode: str = "auto",
                          tol: float = BACKWARD_TOL, block: int | None = None, depth: int = DEPTH,
                          max_depth: int = MAX_DEPTH, seed: int = 0, dtype: torch.dtype | None = None) -> TopSingular:
    """The top ``k`` singular triplets of ``a`` ``[m, n]``.

    ``mode``: "exact" (``torch.linalg.svd``), "randomized" (the block Krylov space of ``depth``,
    always; the check is only reported), "auto" (randomized where it is faster; where the check
    fails the space grows by one block at a time up to ``max_depth``, then the exact SVD).
    ``boundaries`` (default ``(k,)``): the j whose top-j subspaces the caller keeps, for the sine
    estimate.  ``block``: columns per Krylov block (default ``BLOCK_FACTOR·k``).  ``dtype``: that
    of the exact SVD and of the returned triplets (default ``a.dtype``), so that an fp32 gradient
    need not be copied to float64 for the randomized path, which runs in float32 anyway.
    """
    dtype = a.dtype if dtype is None else dtype
    boundaries = tuple(boundaries or (k,))
    last = max(k, *boundaries) + 1  # the check needs one triplet beyond the kept ones
    block = max(1, block or BLOCK_FACTOR * k)
    q = block * (depth + 1)
    too_small = min(q, min(a.shape)) < last
    if mode == "exact" or too_small or (mode == "auto" and min(a.shape) < max(MIN_SIZE, MIN_SIZE_RATIO * q)):
        return _exact(a.to(dtype), k, "exact")
    # The Krylov blocks carry σ₁², whose squares (in the norms) leave float32's range for σ₁ beyond
    # ~4e10 or below ~4e-13, where every check failed.  max |aᵢⱼ| ≤ σ₁ ≤ √(mn)·max |aᵢⱼ|: a gradient
    # whose largest entry lies outside [1e-6, 1e6] is scaled to 1 (a copy, saved for the others).
    # (The max, not the Frobenius norm: a float64 norm of every gradient cost 6× as much.)
    scale = float(torch.stack(torch.aminmax(a)).abs().amax())
    scale = scale if 0.0 < scale < float("inf") and not 1e-6 <= scale <= 1e6 else 1.0
    work = (a / scale).to(torch.float32) if scale != 1.0 else a.to(torch.float32)
    space = _BlockKrylov(work, block, seed)
    while space.depth < depth and space.extend():
        pass
    while True:
        u, s, vh = space.triplets(last)
        backward, sine = _accuracy(work, u, s, vh, k, boundaries) if s.shape[0] >= last else (float("inf"),) * 2
        if mode != "auto" or backward <= tol or space.depth >= max_depth or not space.extend():
            break
    check = (backward, sine, space.rows.shape[0], space.depth)
    # A gradient of lower rank than k + 1 (few tokens) ends the space early: the exact SVD then, in any mode.
    if (mode == "auto" and not backward <= tol) or s.shape[0] < last:
        return _exact(a.to(dtype), k, "exact-fallback", *check)
    return TopSingular(u[:, :k].to(dtype), (s[:k].double() * scale).to(dtype), vh[:k].to(dtype), "randomized", *check)


def _exact(a: torch.Tensor, k: int, path: str, *check) -> TopSingular:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return TopSingular(u[:, :k], s[:k], vh[:k], path, *check)
