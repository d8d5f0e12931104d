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


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its entry of largest magnitude is positive (deterministic output)."""
    idx = vectors.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(vectors, -2, idx))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return vectors * signs
