"""Pure-PyTorch references for the hot loops.

Each function has exactly the signature and the semantics of its fast twin in this package
(Triton on CUDA, native code in csrc/), and is what runs on every other device.  Keep them
obviously correct: tests compare the fast paths against these.
"""
from __future__ import annotations

import torch


def _masked_fp32(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    xf = x.float()
    if mask is not None:
        # Zeroing masked rows instead of boolean indexing keeps shapes static and avoids a host
        # synchronisation (nonzero) per call. masked_fill rather than a multiply so that padding
        # holding inf/NaN cannot leak in (0·NaN = NaN), as in the Triton kernels, which never
        # load masked rows; any nonzero mask value counts as 1.
        xf = xf.masked_fill(mask.reshape(-1, 1) == 0, 0.0)
    return xf


def kfac_accumulate(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``acc += tril(xᵀ diag(mask) x)`` in fp32.

    ``acc``: ``[d, d]`` float32, updated in place.  Only the lower triangle (with the diagonal) is
    defined after the call, as in the Triton kernel, which computes lower-triangle tiles only;
    read the result through :func:`symmetric_from_lower`.
    ``x``: ``[tokens, d]`` in any float dtype; ``mask``: ``[tokens]`` of 0/1 (bool or float) or None.
    """
    xf = _masked_fp32(x, mask)
    acc.add_(torch.tril(xf.T @ xf))  # mask is 0/1, so masking both sides is masking once
    return acc


def gradient_accumulate(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """``acc += gᵀ diag(mask) x`` in fp32: ``acc`` ``[out, in]``, ``g`` ``[tokens, out]``, ``x`` ``[tokens, in]``."""
    acc.addmm_(_masked_fp32(g, mask).T, _masked_fp32(x, mask))  # in place: no [out, in] temporary
    return acc


def diag_accumulate(acc: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``acc += diag(gᵀ diag(mask) g)`` in fp32: ``acc`` ``[out]``."""
    gf = _masked_fp32(g, mask)
    acc.add_((gf * gf).sum(0))
    return acc


def symmetric_from_lower(acc: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix whose lower triangle (with diagonal) is that of ``acc``."""
    lower = torch.tril(acc)
    return lower + torch.tril(acc, -1).T


def symmetrize_lower_(acc: torch.Tensor, block: int = 256) -> torch.Tensor:
    """:func:`symmetric_from_lower` in place: the lower triangle (with diagonal) of ``acc`` is
    mirrored into its upper triangle; returns ``acc``.

    Each block of rows copies its strictly-upper part from the (disjoint) lower block of columns,
    and only the diagonal ``block × block`` tiles go through a temporary, so turning every
    accumulator of a 7B model into full matrices needs ``block²`` extra elements instead of a
    second copy of all of them.
    """
    n = acc.shape[-1]
    if acc.shape != (n, n):
        raise ValueError(f"acc must be square [n, n], got {tuple(acc.shape)}")
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        diag = acc[r0:r1, r0:r1]
        diag.copy_(symmetric_from_lower(diag))
        if r1 < n:
            acc[r0:r1, r1:].copy_(acc[r1:, r0:r1].T)
    return acc


def kfac_accumulate_pair(acc_x: torch.Tensor, x: torch.Tensor, acc_g: torch.Tensor, g: torch.Tensor,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both K-FAC factors of one layer over the same tokens: ``kfac_accumulate`` on (acc_x, x) and
    on (acc_g, g). The Triton twin does both in one launch."""
    return kfac_accumulate(acc_x, x, mask), kfac_accumulate(acc_g, g, mask)


def _scale(c: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return c.to(ref.dtype).reshape(-1, 1, 1)


def omega_apply(X: torch.Tensor, z_factor: torch.Tensor, c: torch.Tensor, delta_hat: torch.Tensor,
                alpha: float = 1.0, *, z_is_inverse: bool = False) -> torch.Tensor:
    """``Ω X = c·Zλ⁻¹ X − α·Δ̂ᵀ(Δ̂ X)`` for a batch of layers, without forming ``Ω`` (docs/design.md §4).

    ``X`` ``[b, n, k]``; ``z_factor`` ``[b, n, n]``: the lower Cholesky factor ``L`` of ``Zλ`` (``Zλ =
    L Lᵀ``), or ``Zλ⁻¹`` itself when ``z_is_inverse``; ``c`` ``[b]``; ``delta_hat`` ``[b, m, n]`` (layers
    with fewer output rows zero-padded to m: zero rows add nothing to ``Δ̂ᵀΔ̂``). Returns ``[b, n, k]``.
    """
    zx = torch.bmm(z_factor, X) if z_is_inverse else torch.cholesky_solve(X, z_factor, upper=False)
    return torch.baddbmm(zx * _scale(c, zx), delta_hat.mT, torch.bmm(delta_hat, X), alpha=-alpha)


def omega_dense(z_factor: torch.Tensor, c: torch.Tensor, delta_hat: torch.Tensor, alpha: float = 1.0, *,
                z_is_inverse: bool = False) -> torch.Tensor:
    """The matrix ``Ω = c·Zλ⁻¹ − α·Δ̂ᵀΔ̂`` ``[b, n, n]`` that :func:`omega_apply` applies (same arguments)."""
    zinv = z_factor if z_is_inverse else torch.cholesky_inverse(z_factor, upper=False)
    return torch.baddbmm(zinv * _scale(c, zinv), delta_hat.mT, delta_hat, alpha=-alpha)
