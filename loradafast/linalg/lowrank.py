"""The top singular triplets of a layer's gradient, as LoRA-GA and LoRA-One need them: randomized
subspace iteration with an a-posteriori accuracy check, and the exact SVD where the check fails
(docs/design.md §5, §6).

The randomized path (Halko, Martinsson & Tropp 2011, algorithm 4.4) builds an orthonormal basis
``Q`` of ``q`` columns of the range of ``A`` by ``niter`` power iterations, then takes the exact
SVD of the small ``QᵀA``.  By construction ``Aᵀu_i = σ_i v_i`` holds exactly for its triplets; what
remains is the residual ``R = AV − US = (I − QQᵀ)AV``.

**The check (backward error).**  The k triplets returned are exact singular triplets of
``A + E`` with ``E = −R_k V_kᵀ``, ``‖E‖_F = ‖R_k‖_F``.  The randomized result is accepted when
``‖R_k‖_F ≤ tol·σ̃₁``: it is then the exact answer for a gradient that differs from ours by at most
``tol`` of its norm (0.1 % by default), far below the sampling noise of a gradient estimated from
a few hundred sequences.  That they are the *top* k triplets of ``A + E`` assumes the sketch has
found every singular value above σ̃_k, which the Gaussian start with 3k extra columns ensures with
overwhelming probability.

**Why not a tolerance on the subspace itself.**  The distance to the exact SVD's subspace is also
estimated and reported: by Wedin's theorem the sine of the largest angle between the top-j
subspaces is about ``‖R_{:j}‖ / (σ̃_j − σ_{j+1})``, with ``σ̃_{j+1} + ‖r_{j+1}‖`` standing for the
unknown σ_{j+1} (infinite where there is no gap).  On real gradients that gap is tiny: on
SmolLM2-135M (16 × 128 tokens) the median gap σ_2r − σ_2r+1 is 0.3 % of σ₁ and the smallest
0.03 %, so the exact subspace is itself ill-conditioned and no cheap method reproduces it to 1e-4
(PEFT's ``svd_lowrank(q=4r, niter=4)`` is off by sin θ = 0.12 at worst there).  Matching it is
what ``mode="exact"`` is for.

The randomized path runs in float32 whatever the dtype of ``A`` (a gradient is an fp32 sum):
the check's own rounding, about ``√n·eps₃₂·σ₁ ≈ 1e-6·σ₁``, sits far below its tolerance, and on
SmolLM2's gradients float32 gave the same backward errors as a float64 Rayleigh–Ritz step in half
the time.  The basis is orthonormalised once per power step (after the product with ``A``), not
after the product with ``Aᵀ`` too: the same errors on SmolLM2 in 30 % less time; what a skipped
orthonormalisation could lose in float32 lies below ``σ₁·3e-4``, and the check sees it.  The
exact path keeps the dtype of ``A``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Measured against the exact float64 SVD on the gradients of SmolLM2-135M (70 of its 210 layers:
# 576×576, 192×576, 1536×576, 576×1536; rank 8, k = 16 for LoRA-GA), backward error ‖R_k‖_F/σ₁,
# median / max:  q = 2k, 4 iterations (PEFT's setting) 5.1e-4 / 8.6e-3;  q = 2k, 6 it. 5.2e-5 /
# 1.7e-3;  q = 3k, 4 it. 3.7e-5 / 7.4e-4;  q = 4k, 4 it. 3.3e-6 / 1.5e-4 (sin θ of the LoRA-GA
# blocks against the exact SVD: median 3.8e-5, max 6.7e-4).  So q = 4k and 4 iterations: every
# layer passes 1e-3 with a margin of ~7.  Over all 210 layers, in float32: q = 4k, 4 it. 4.1e-6 /
# 1.5e-4 in 4.3-4.9 s (1 thread); q = 3k, 4 it. fails one layer (1.3e-3); q = 4k, 3 it. 9.9e-4 at
# worst; PEFT's svd_lowrank(q=2k, niter=4) 1.2e-4 / 1e-2 in 2.9-3.1 s, 68 layers above 1e-3.
SKETCH_FACTOR = 4  # q = SKETCH_FACTOR·k
NITER = 4
BACKWARD_TOL = 1e-3  # ‖R_k‖_F ≤ BACKWARD_TOL·σ̃₁
# Below min(out, in) = 2q, or 64, the exact SVD is as fast (measured, float64, 1 thread), and exact.
MIN_SIZE_RATIO = 2
MIN_SIZE = 64


@dataclass
class TopSingular:
    """``u`` ``[m, k]``, ``s`` ``[k]`` (descending), ``vh`` ``[k, n]``, and how they were computed."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    path: str  # "exact", "randomized", or "exact-fallback" (the randomized result failed the check)
    backward_error: float | None = None  # ‖R_k‖_F / σ̃₁ of the randomized triplets (None: not run)
    sine_estimate: float | None = None  # Wedin estimate of sin θ to the exact SVD, summed over the boundaries
    sketch_size: int | None = None  # q
    iterations: int | None = None


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y)[0]


def _range_basis(a: torch.Tensor, q: int, niter: int, seed: int) -> torch.Tensor:
    """An orthonormal ``[m, q]`` basis of the dominant range of ``a`` (power iterations)."""
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same start on every device
    omega = torch.randn(a.shape[1], q, generator=gen, dtype=torch.float32).to(device=a.device, dtype=a.dtype)
    basis = _orth(a @ omega)
    for _ in range(niter):
        basis = _orth(a @ (a.T @ basis))
    return basis


def _accuracy(a, u, s, vh, k: int, boundaries) -> tuple[float, float]:
    """(backward error of the first k triplets, summed Wedin sine estimates at ``boundaries``)."""
    last = max(k, *boundaries) + 1
    norms = torch.linalg.vector_norm(a @ vh[:last].T - u[:, :last] * s[:last], dim=0).tolist()
    sv = s[:last].tolist()
    backward = sum(x * x for x in norms[:k]) ** 0.5 / sv[0] if sv[0] > 0 else float("inf")
    sine = 0.0
    for j in boundaries:
        gap = sv[j - 1] - sv[j] - norms[j]
        sine += sum(x * x for x in norms[:j]) ** 0.5 / gap if gap > 0 else float("inf")
    return backward, sine


def top_singular_triplets(a: torch.Tensor, k: int, *, boundaries=None, mode: str = "auto",
                          tol: float = BACKWARD_TOL, sketch: int | None = None, niter: int = NITER,
                          seed: int = 0, dtype: torch.dtype | None = None) -> TopSingular:
    """The top ``k`` singular triplets of ``a`` ``[m, n]``.

    ``mode``: "exact" (``torch.linalg.svd``), "randomized" (always; the check is only reported),
    "auto" (randomized where it is faster, the exact SVD where its backward error exceeds ``tol``).
    ``boundaries`` (default ``(k,)``): the j whose top-j subspaces the caller keeps, for the sine
    estimate.  ``sketch``: q (default ``SKETCH_FACTOR·k``).  ``dtype``: that of the exact SVD and of
    the returned triplets (default ``a.dtype``), so that an fp32 gradient need not be copied to
    float64 for the randomized path, which runs in float32 anyway.
    """
    dtype = a.dtype if dtype is None else dtype
    boundaries = tuple(boundaries or (k,))
    q = min(sketch or SKETCH_FACTOR * k, min(a.shape))
    too_small = q <= max(k, *boundaries)  # the check needs one triplet beyond the kept ones
    if mode == "exact" or too_small or (mode == "auto" and min(a.shape) < max(MIN_SIZE, MIN_SIZE_RATIO * q)):
        return _exact(a.to(dtype), k, "exact")
    work = a.to(torch.float32)
    basis = _range_basis(work, q, niter, seed)
    uq, s, vh = torch.linalg.svd(basis.T @ work, full_matrices=False)
    u = basis @ uq
    backward, sine = _accuracy(work, u, s, vh, k, boundaries)
    if mode == "auto" and not backward <= tol:
        return _exact(a.to(dtype), k, "exact-fallback", backward, sine, q, niter)
    return TopSingular(u[:, :k].to(dtype), s[:k].to(dtype), vh[:k].to(dtype), "randomized", backward, sine, q, niter)


def _exact(a: torch.Tensor, k: int, path: str, *check) -> TopSingular:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return TopSingular(u[:, :k], s[:k], vh[:k], path, *check)
