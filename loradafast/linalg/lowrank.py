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
products on gradients, whose leading singular values are clustered; in about the time of
``svd_lowrank(q=2k, niter=4)`` it reaches far smaller backward errors (measurements:
benchmarks/README.md, 'Measurements behind the library's constants').

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
unknown σ_{j+1} (infinite where there is no gap).  On real gradients that gap is a tiny fraction
of σ₁, so the exact subspace is itself ill-conditioned and no cheap method, PEFT's
``svd_lowrank(q=4r, niter=4)`` included, reproduces it to 1e-4 (measurements:
benchmarks/README.md, 'Measurements behind the library's constants').  Matching it is what
``mode="exact"`` is for.

The randomized path runs in float32 whatever the dtype of ``A`` (a gradient is an fp32 sum): the
check's own rounding, about ``√n·eps₃₂·σ₁ ≈ 1e-6·σ₁``, sits far below its tolerance.  The small
Rayleigh–Ritz problem is solved through the Gram matrix of ``QᵀA`` in float64 (its eigenvalues
are the σ², to float64 accuracy relative to σ₁²: ample for the singular values kept, which the
check bounds anyway), which is faster than an SVD of ``QᵀA``; where the kept singular values
fall below ``GRAM_MIN_RATIO·σ₁`` (a gradient of lower rank than the block), the SVD of ``QᵀA``
is taken instead.  The products are written with wide results (``(QᵀA)Aᵀ``): MKL runs a GEMM with
a thin result markedly slower.  The exact path keeps the dtype of ``A``.

**Stacks.**  :func:`top_singular_triplets_batched` runs all of this on a stack ``[B, m, n]`` of
same-shaped matrices (the layers of one shape across a model's blocks), so that a GPU pays its
launches and host synchronisations per stack, not per layer: batched products, one batched
Rayleigh–Ritz ``eigh`` and one check per depth for the whole stack.  Each matrix is still
accepted or refused on its own; the refused ones grow their spaces together as a sub-stack (the
accepted ones cost no more products), and those still refused at ``MAX_DEPTH`` take one batched
exact SVD.  Every matrix starts from the same Ω, and a direction found dependent is a zero row
of its basis rather than a dropped one, so a matrix gets the same triplets in a stack as alone (up
to the rounding of batched products); :func:`top_singular_triplets` is a stack of one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Why a block of k columns and DEPTH = 5: against the exact SVD on a real model's gradients, this
# passes the check (BACKWARD_TOL) on every layer at k = 16 and on all but a few at k = 8, which the
# growth up to MAX_DEPTH then takes one block further; depth 4 fails on many layers; depth 6
# everywhere, or subspace iteration with 4k columns (the previous default), costs more time for the
# same outcome; svd_lowrank(q=2k, niter=4) fails on many layers (measurements: benchmarks/README.md,
# 'Measurements behind the library's constants').
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


@dataclass
class TopSingularStack:
    """The triplets of a stack of matrices ``[B, m, n]``: ``u`` ``[B, m, k]``, ``s`` ``[B, k]``,
    ``vh`` ``[B, k, n]``, and per matrix what :class:`TopSingular` reports (lists of B, read to
    the host once per stack)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    paths: list[str]
    backward_errors: list[float | None]
    sine_estimates: list[float | None]
    sketch_sizes: list[int | None]
    iterations: list[int | None]

    def __len__(self) -> int:
        return len(self.paths)

    def layer(self, i: int) -> TopSingular:
        """Matrix ``i``'s triplets (views into the stack) and diagnostics."""
        return TopSingular(self.u[i], self.s[i], self.vh[i], self.paths[i], self.backward_errors[i],
                           self.sine_estimates[i], self.sketch_sizes[i], self.iterations[i])


def _kept_first(flags: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``flags`` ``[B, b]`` and ``rows`` ``[B, b, m]`` reordered so that each matrix's flagged rows
    come first (in their order), with the permutation: a Householder QR's column j depends only
    on the columns before it, so dropped directions, zeroed and moved last, change nothing."""
    order = torch.argsort((~flags).to(torch.uint8), dim=-1, stable=True)
    return flags.gather(-1, order), rows.gather(-2, order[..., None].expand_as(rows)), order


class _BlockKrylov:
    """Orthonormal bases of the block Krylov spaces of a stack ``a`` ``[B, m, n]``, kept as rows
    ``[B, q, m]`` with their products ``rows @ a`` ``[B, q, n]``: those are ``QᵀA`` for the
    Rayleigh–Ritz step and the input of the next block, so each block costs two products with ``a``.

    Every matrix's basis has the same number of rows; a direction found dependent (``a``'s rank is
    exhausted) is a zero row, not a dropped one, so the stack stays rectangular and no per-matrix
    size is read to the host.  ``count``: the nonzero rows per matrix; ``depth``: its blocks after
    the first; ``alive``: whether its last block found a new direction (else the space stopped
    growing)."""

    def __init__(self, a: torch.Tensor, block: int, seed: int):
        self.a = a
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same start on every device
        # One Ω for the whole stack, so that a matrix's triplets do not depend on its neighbours.
        omega = torch.randn(block, a.shape[-1], generator=gen, dtype=torch.float32).to(device=a.device, dtype=a.dtype)
        batch = a.shape[0]
        self.rows = a.new_empty(batch, 0, a.shape[1])
        self.projected = a.new_empty(batch, 0, a.shape[2])
        self.count = torch.zeros(batch, dtype=torch.int64, device=a.device)
        self.depth = torch.zeros(batch, dtype=torch.int64, device=a.device)
        self.alive = torch.ones(batch, dtype=torch.bool, device=a.device)
        self._append(torch.bmm(omega.expand(batch, -1, -1), a.mT))

    def __len__(self) -> int:
        return self.a.shape[0]

    def extend(self) -> None:
        """One more block, ``(AAᵀ)`` times the last, for the matrices whose space still grows."""
        self.depth = self.depth + self.alive
        self._append(torch.bmm(self._last_projected, self.a.mT))

    def select(self, index: torch.Tensor) -> _BlockKrylov:
        """The spaces of the matrices ``index`` only (those that grow further)."""
        sub = object.__new__(_BlockKrylov)
        for name in ("a", "rows", "projected", "count", "depth", "alive", "_last", "_last_projected"):
            setattr(sub, name, getattr(self, name).index_select(0, index))
        return sub

    def _project_out(self, y: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(y, torch.bmm(y, self.rows.mT), self.rows, alpha=-1) if self.rows.shape[1] else y

    def _append(self, y: torch.Tensor) -> None:
        before = torch.linalg.vector_norm(y, dim=-1)
        # Twice is enough (Giraud et al. 2005): orthogonal to float32 accuracy.
        y = self._project_out(self._project_out(y))
        keep = torch.linalg.vector_norm(y, dim=-1) > DEPENDENT * before
        q, r = torch.linalg.qr(y.mT)
        kept = self._kept(r, before)
        good = kept > DEPENDENT
        # A column that lost most of its norm to the projections carries up to eps₃₂/kept of the old
        # rows after the QR (1e-3 at DEPENDENT): once more through both for the blocks with one.
        weak = (kept < WEAK).any(-1)
        # Every direction new and none weak: the common case, read as one flag for the stack.
        if bool((keep.all() & good.all()) & (~weak.any() if self.rows.shape[1] else True)):
            q = q.mT
        else:
            q, good = self._irregular(y, before, keep)
        self._last, self._last_projected = q, torch.bmm(q, self.a)
        self.rows = torch.cat([self.rows, q], dim=1)
        self.projected = torch.cat([self.projected, self._last_projected], dim=1)
        self.count = self.count + good.sum(-1)
        self.alive = good.any(-1)

    @staticmethod
    def _kept(r: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        return r.diagonal(dim1=-2, dim2=-1).abs() / before.clamp_min(torch.finfo(before.dtype).tiny)

    def _irregular(self, y: torch.Tensor, before: torch.Tensor,
                   keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The new block where some matrix has a dependent or a weak direction: the dependent ones
        (projections, then the QR's diagonal) zeroed and moved last, the weak blocks orthogonalised
        once more.  (For the other matrices of the stack the result is the common case's.)"""
        keep, y, order = _kept_first(keep, y)
        q, r = torch.linalg.qr((y * keep[..., None]).mT)
        kept = self._kept(r, before.gather(-1, order))
        weak = ((kept < WEAK) & keep).any(-1)
        good, q, _ = _kept_first(kept > DEPENDENT, q.mT)  # a zeroed column has r_jj = 0: not good
        q = q * good[..., None]
        if self.rows.shape[1]:
            again = torch.linalg.qr(self._project_out(q).mT)[0].mT * good[..., None]
            q = torch.where(weak[:, None, None], again, q)
        return q, good

    def triplets(self, last: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The leading ``last`` singular triplets of each ``QᵀA``, lifted: ``u [B, m, last]``, ``s``,
        ``vh``, and whether the space holds fewer than ``last`` directions (its triplets are then
        not meaningful: the caller takes the exact SVD)."""
        b = self.projected.double()
        values, vectors = torch.linalg.eigh(torch.bmm(b, b.mT))
        values, vectors = values.flip(-1)[..., :last], vectors.flip(-1)[..., :last]
        s = values.clamp_min(0).sqrt()
        short = self.count < last
        vh = (torch.bmm(vectors.mT, b) / s[..., None]).to(self.a.dtype)
        u = torch.bmm(vectors.mT.to(self.a.dtype), self.rows).mT  # the wide product, transposed (module docstring)
        s = s.to(self.a.dtype)
        redo = (~short & ~(s[:, -1] > GRAM_MIN_RATIO * s[:, 0])).nonzero().squeeze(1)
        if redo.numel():
            uq, sv, vhq = torch.linalg.svd(self.projected.index_select(0, redo), full_matrices=False)
            u.index_copy_(0, redo, torch.bmm(uq[..., :last].mT, self.rows.index_select(0, redo)).mT)
            s.index_copy_(0, redo, sv[..., :last])
            vh.index_copy_(0, redo, vhq[..., :last, :])
        return u, s, vh, short


def _accuracy(a, u, s, vh, k: int, boundaries) -> tuple[torch.Tensor, torch.Tensor]:
    """Per matrix, (backward error of the first k triplets, summed Wedin sine estimates at
    ``boundaries``), float64 ``[B]`` on the device."""
    norms = torch.linalg.vector_norm(torch.baddbmm((u * s[:, None, :]).mT, vh, a.mT, beta=-1), dim=-1).double()
    sv = s.double()
    partial = norms.square().cumsum(-1).sqrt()  # partial[:, j - 1] = ‖R_{:j}‖_F
    inf = torch.full_like(sv[:, 0], float("inf"))
    backward = torch.where(sv[:, 0] > 0, partial[:, k - 1] / sv[:, 0], inf)
    sine = torch.zeros_like(backward)
    for j in boundaries:
        gap = sv[:, j - 1] - sv[:, j] - norms[:, j]
        sine = sine + torch.where(gap > 0, partial[:, j - 1] / gap, inf)
    return backward, sine


def _check(space: _BlockKrylov, last: int, k: int, boundaries):
    u, s, vh, short = space.triplets(last)
    backward, sine = _accuracy(space.a, u, s, vh, k, boundaries)
    return u, s, vh, backward.masked_fill(short, float("inf")), sine.masked_fill(short, float("inf"))


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

    A stack of one for :func:`top_singular_triplets_batched`: a matrix gets the same triplets
    alone as within a stack (up to the rounding of batched products).
    """
    return top_singular_triplets_batched(a[None], k, boundaries=boundaries, mode=mode, tol=tol, block=block,
                                         depth=depth, max_depth=max_depth, seed=seed, dtype=dtype).layer(0)


def top_singular_triplets_batched(a: torch.Tensor, k: int, *, boundaries=None, mode: str = "auto",
                                  tol: float = BACKWARD_TOL, block: int | None = None, depth: int = DEPTH,
                                  max_depth: int = MAX_DEPTH, seed: int = 0,
                                  dtype: torch.dtype | None = None) -> TopSingularStack:
    """:func:`top_singular_triplets` of every matrix of a stack ``a`` ``[B, m, n]`` at once.

    The products, the Rayleigh–Ritz step and the check run on the whole stack; the matrices whose
    check fails grow their spaces together (a sub-stack: the others cost no more products), and
    those that still fail at ``max_depth`` take one batched exact SVD.  Each matrix meets the check
    on its own, exactly as alone.  The host synchronisations per call do not depend on B: a few
    per check (the batched ``eigh``, which matrices grow), so at most about four per depth.

    Memory: beside the Krylov bases (``(block·(max_depth + 1))·(m + n)`` per matrix), a float32
    copy of ``a`` where ``a`` is not float32 or a matrix needs rescaling, a copy of the matrices
    that grow past ``depth`` (where not all of them grow), and the exact SVD of those that fail.
    """
    if a.dim() != 3:
        raise ValueError(f"top_singular_triplets_batched takes a stack [B, m, n], got shape {tuple(a.shape)}")
    dtype = a.dtype if dtype is None else dtype
    boundaries = tuple(boundaries or (k,))
    last = max(k, *boundaries) + 1  # the check needs one triplet beyond the kept ones
    block = max(1, block or BLOCK_FACTOR * k)
    q = block * (depth + 1)
    batch, m, n = a.shape
    too_small = min(q, m, n) < last
    if batch == 0 or mode == "exact" or too_small or (mode == "auto" and min(m, n) < max(MIN_SIZE, MIN_SIZE_RATIO * q)):
        return _exact(a.to(dtype), k, ["exact"] * batch)
    scale, work = _scaled(a)
    u, s, vh, backward, sine, count, depths = _grown_until_accepted(
        _BlockKrylov(work, block, seed), k, last, boundaries, mode=mode, tol=tol, depth=depth, max_depth=max_depth)
    # A matrix of lower rank than k + 1 (a gradient of few tokens) ends its space early: the exact
    # SVD then, in any mode.
    failed = count < last
    if mode == "auto":
        failed = failed | ~(backward <= tol)
    flags, backward, sine, count, depths = torch.stack(
        [failed.double(), backward, sine, count.double(), depths.double()]).cpu().tolist()
    u = u[..., :k].to(dtype)
    s = (s[:, :k].double() * scale[:, None]).to(dtype)
    vh = vh[:, :k].to(dtype)
    u, s, vh = _exact_where_failed(flags, a, k, dtype, u, s, vh)
    return TopSingularStack(u, s, vh, ["exact-fallback" if f else "randomized" for f in flags], backward, sine,
                            [int(c) for c in count], [int(d) for d in depths])


def _grown_until_accepted(space: _BlockKrylov, k: int, last: int, boundaries, *, mode: str, tol: float, depth: int,
                          max_depth: int) -> tuple[torch.Tensor, ...]:
    """The Ritz triplets ``u, s, vh`` of every matrix's Krylov space after ``depth`` blocks, with
    their backward errors and sine estimates, the directions and the depth of each space; in mode
    "auto" the spaces whose check fails grow one block at a time, as a sub-stack, up to
    ``max_depth`` (or until they stop growing).  All on the device, none read to the host."""
    for _ in range(depth):
        space.extend()
    u, s, vh, backward, sine = _check(space, last, k, boundaries)
    count, depths = space.count, space.depth
    positions = None  # where the matrices of `space` sit in the stack (None: all of them, in order)
    while mode == "auto":
        grow = (~(backward <= tol) if positions is None else ~(backward.index_select(0, positions) <= tol))
        grow = (grow & (space.depth < max_depth) & space.alive).nonzero().squeeze(1)
        if not grow.numel():
            break
        if grow.numel() < len(space):
            space = space.select(grow)
            positions = grow if positions is None else positions.index_select(0, grow)
        space.extend()
        checked = _check(space, last, k, boundaries)
        if positions is None:
            u, s, vh, backward, sine = checked
            count, depths = space.count, space.depth
        else:
            for whole, part in zip((u, s, vh, backward, sine, count, depths), (*checked, space.count, space.depth)):
                whole.index_copy_(0, positions, part)
    return u, s, vh, backward, sine, count, depths


def _exact_where_failed(flags: list[float], a: torch.Tensor, k: int, dtype: torch.dtype, u: torch.Tensor,
                        s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``u, s, vh`` with the triplets of the matrices ``flags`` marks (those that failed) replaced by
    the exact SVD's of ``a``, taken in one batch."""
    fallback = [i for i, f in enumerate(flags) if f]
    if fallback:
        index = torch.tensor(fallback, device=a.device)
        exact = _exact(a.index_select(0, index).to(dtype), k, [])
        u, s, vh = u.contiguous(), s.contiguous(), vh.contiguous()  # (views of the wider Ritz triplets)
        for whole, part in zip((u, s, vh), (exact.u, exact.s, exact.vh)):
            whole.index_copy_(0, index, part)
    return u, s, vh


def _scaled(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-matrix scale, float32 ``a / scale``).  The Krylov blocks carry σ₁², whose squares (in
    the norms) leave float32's range for σ₁ beyond ~4e10 or below ~4e-13, where every check
    failed.  max |aᵢⱼ| ≤ σ₁ ≤ √(mn)·max |aᵢⱼ|: a matrix whose largest entry lies outside
    [1e-6, 1e6] is divided by the power of two at or below that entry (exact: the triplets and
    the singular values scaled back lose nothing), the others by 1.  (The max, not the
    Frobenius norm: a float64 norm of every gradient cost several times as much; measurements:
    benchmarks/README.md, 'Measurements behind the library's constants'.)"""
    dims = (1, 2)  # (aminmax along a dim reads several times slower than amax and amin)
    largest = torch.maximum(a.amax(dim=dims).abs(), a.amin(dim=dims).abs()).double()
    rescale = torch.isfinite(largest) & (largest > 0) & ((largest < 1e-6) | (largest > 1e6))
    power = torch.ldexp(torch.ones_like(largest), torch.frexp(largest).exponent - 1)
    scale = torch.where(rescale, power, torch.ones_like(largest))
    if bool(rescale.any()):  # else no copy of a float32 stack
        return scale, (a / scale.to(a.dtype)[:, None, None]).to(torch.float32)
    return scale, a.to(torch.float32)


def _exact(a: torch.Tensor, k: int, paths: list[str]) -> TopSingularStack:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    none = [None] * len(paths)
    return TopSingularStack(u[..., :k], s[..., :k], vh[..., :k, :], paths, none, none, none, none)
