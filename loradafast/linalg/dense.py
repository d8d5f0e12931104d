"""Small dense linear-algebra helpers shared by the solvers."""
from __future__ import annotations

import torch


def damping_for(matrix_or_diag: torch.Tensor, damping: float, mode: str) -> float:
    """Absolute ``λ`` (the official code's ``1e-6``) or relative ``λ·mean(diag)``."""
    if mode == "absolute":
        return float(damping)
    if mode == "relative":
        diag = matrix_or_diag if matrix_or_diag.dim() == 1 else matrix_or_diag.diagonal()
        return float(damping * diag.mean().clamp_min(torch.finfo(diag.dtype).tiny))
    raise ValueError(f"damping_mode must be 'absolute' or 'relative', got {mode!r}")


def damping_for_each(matrices_or_diags: torch.Tensor, damping: float, mode: str) -> torch.Tensor:
    """:func:`damping_for` of every matrice ``[B, n, n]`` (or diagonal ``[B, n]``) of a stack, as a
    ``[B]`` float64 tensor on their device: no host synchronisation."""
    stack = matrices_or_diags
    if mode == "absolute":
        return torch.full(stack.shape[:1], float(damping), dtype=torch.float64, device=stack.device)
    if mode == "relative":
        diag = stack if stack.dim() == 2 else stack.diagonal(dim1=-2, dim2=-1)
        return damping * diag.mean(-1).clamp_min(torch.finfo(diag.dtype).tiny).to(torch.float64)
    raise ValueError(f"damping_mode must be 'absolute' or 'relative', got {mode!r}")


def damped_cholesky_stack(matrices: torch.Tensor, damping: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.dtype, torch.Tensor]:
    """:func:`damped_cholesky` of a stack ``[B, n, n]`` with per-matrix dampings ``[B]``: one
    batched factorisation and one host synchronisation (its error codes) where every matrix
    factorises at its requested damping, the common case; the others take
    :func:`damped_cholesky`'s raises one by one.  Returns (factors, dtype, dampings used [B])."""
    shifted = matrices.clone()
    shifted.diagonal(dim1=-2, dim2=-1).add_(damping.to(matrices.dtype).unsqueeze(-1))
    factor, info = torch.linalg.cholesky_ex(shifted)
    failed = (info != 0).nonzero().flatten().tolist()
    if not failed:
        return factor, factor.dtype, damping
    lam = damping.clone()
    redo = [damped_cholesky(matrices[i], float(damping[i])) for i in failed]
    dtype = torch.float64 if any(used == torch.float64 for _, used, _ in redo) else factor.dtype
    factor = factor.to(dtype)
    for i, (chol, _, used_lam) in zip(failed, redo):
        factor[i] = chol.to(dtype)
        lam[i] = used_lam
    return factor, dtype, lam


def cholesky_with_retry(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """Lower Cholesky factor; retried in float64 when the working dtype fails.

    Returns the factor (in float64 if the retry was needed) and the dtype that succeeded.
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if not bool((info == 0).all()) and matrix.dtype != torch.float64:
        factor, info = torch.linalg.cholesky_ex(matrix.double())
    if not bool((info == 0).all()):
        raise torch.linalg.LinAlgError(
            "a damped Kronecker factor is not positive definite even in float64; increase damping "
            "(e.g. damping_mode='relative', damping=1e-4)"
        )
    return factor, factor.dtype


def damped_cholesky(matrix: torch.Tensor, damping: float,
                    max_raises: int = 12) -> tuple[torch.Tensor, torch.dtype, float]:
    """Cholesky factor of ``matrix + λI``, raising ``λ`` only when it must.

    The statistics are fp32 sums, so a rank-deficient factor (fewer tokens than inputs, or
    inputs confined to a subspace) can carry negative eigenvalues at fp32 round-off level
    (~1e-7·max diag), larger than the official absolute damping of 1e-6.  Then ``λ`` is raised
    to that level and by factors of 10 until the factorisation succeeds; the caller reports the
    damping actually used.  ``damping=0`` is taken literally: no raise, an error instead.
    Returns (factor, dtype that succeeded, damping used).
    """
    try:
        factor, used = cholesky_with_retry(_plus_diagonal(matrix, damping))
        return factor, used, float(damping)
    except torch.linalg.LinAlgError:
        if damping <= 0:
            raise
    scale = float(matrix.diagonal().abs().max().clamp_min(torch.finfo(torch.float64).tiny))
    lam = max(10.0 * damping, torch.finfo(torch.float32).eps * scale)
    for _ in range(max_raises):
        try:
            factor, used = cholesky_with_retry(_plus_diagonal(matrix, lam))
            return factor, used, lam
        except torch.linalg.LinAlgError:
            lam *= 10.0
    raise torch.linalg.LinAlgError(
        f"a damped Kronecker factor stays indefinite up to damping {lam:.1e}; its statistics are likely "
        "corrupted (check the inputs for NaN/Inf), or pass a larger damping"
    )


def _plus_diagonal(matrix: torch.Tensor, value: float) -> torch.Tensor:
    """``matrix + value·I`` as one copy (no identity matrix: at n = 11008 each extra float64
    ``n × n`` temporary is about 1 GB, and writing it is a noticeable cost on a CPU; measurements:
    benchmarks/README.md, 'Measurements behind the library's constants')."""
    out = matrix.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(value)
    return out


def canonical_sign_factors(vectors: torch.Tensor) -> torch.Tensor:
    """``[..., 1, k]``: the sign (±1) that makes each column's entry of largest magnitude positive."""
    idx = vectors.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(vectors, -2, idx))
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its entry of largest magnitude is positive (deterministic output)."""
    return vectors * canonical_sign_factors(vectors)


def finite_flags(tensors: list[torch.Tensor], *, fused: bool | None = None) -> list[bool]:
    """Per tensor, whether every entry is finite, with one host synchronisation.  NaN and ±Inf
    reach the extremes, so no tensor of flags as large as the input is made (``isfinite(t).all()``
    and a float64 sum each took many times as long over a real model's gradients on a CPU;
    measurements: benchmarks/README.md, 'Measurements behind the library's constants').
    ``fused`` (default: where every tensor is on one CUDA device): one multi-tensor max-norm for
    the whole list, as a launch per tensor would grow with the model's depth; otherwise one
    ``aminmax`` per tensor, which on a CPU, where launches cost nothing, reads faster."""
    if not tensors:
        return []
    tensors = [t.detach() for t in tensors]
    if fused is None:
        fused = all(t.is_cuda for t in tensors) and len({t.device for t in tensors}) == 1
    if fused:
        flags = [True] * len(tensors)
        full = [i for i, t in enumerate(tensors) if t.numel()]  # the max-norm of nothing is undefined
        if full:
            norms = torch.stack(torch._foreach_norm([tensors[i] for i in full], float("inf")))
            for i, ok in zip(full, torch.isfinite(norms).tolist()):
                flags[i] = ok
        return flags
    flags = [torch.isfinite(torch.stack(torch.aminmax(t))).all() if t.numel()
             else torch.ones((), dtype=torch.bool, device=t.device) for t in tensors]
    return torch.stack([f.to(flags[0].device) for f in flags]).tolist()
