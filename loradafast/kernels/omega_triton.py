"""Triton kernel for the LoRA-DA Initialization Guidance Matrix applied to a block of vectors.

``Ω = c·Zλ⁻¹ − α·Δ̂ᵀΔ̂`` (``[n, n]``, docs/design.md §4) is only ever needed as an operator inside the
eigensolver, so it is never formed. Per layer of a batch of same-width layers::

    Ω X = c·(Zλ⁻¹ X) − α·Δ̂ᵀ (Δ̂ X)

``Δ̂ X`` (``[m, k]``) is a reduction over n that must finish before ``Δ̂ᵀ(·)`` starts, so it stays a
separate batched GEMM. The kernel fuses the rest: the ``Zλ⁻¹ X`` product (when a cached inverse is
given) or the precomputed Cholesky solve, the ``Δ̂ᵀ P`` product, the per-layer scale ``c`` and the
subtraction, writing ``Ω X`` once. Reference: :func:`.reference.omega_apply`.

No library path calls it: the solve applies Ω with batched cuBLAS/cuSOLVER calls (see
:mod:`.dispatch`), and only ``impl="triton"`` (tests, benchmarks/bench_kernels.py) reaches this
kernel, until a GPU measurement says whether fusing the combination pays.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .triton_common import INTERPRET


# Two: at three stages the sm_90 compile of the cached-inverse path spilled at BLOCK_K 64 (8 warps),
# and no GPU measurement says the third stage would pay for itself.
NUM_STAGES = 2


@triton.jit
def _omega_kernel(out_ptr, z_ptr, x_ptr, dh_ptr, p_ptr, c_ptr, alpha, N, K, M,
                  s_zb, s_zr, s_zc, s_xb, s_xr, s_xc, s_db, s_dr, s_dc,
                  s_pb, s_pr, s_pc, s_ob, s_or, s_oc,
                  Z_IS_INVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # batch x n² elements exceeds int32 for wide layers
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < K
    z_ptr += b * s_zb
    x_ptr += b * s_xb
    dh_ptr += b * s_db
    p_ptr += b * s_pb

    if Z_IS_INVERSE:
        zx = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, N, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_ok = r < N
            z = tl.load(z_ptr + offs_n[:, None] * s_zr + r[None, :] * s_zc,
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            xx = tl.load(x_ptr + r[:, None] * s_xr + offs_k[None, :] * s_xc,
                         mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            zx = tl.dot(z, xx, zx, input_precision=DOT_PRECISION)
    else:
        # z_ptr holds S = Zλ⁻¹X from a Cholesky solve (triangular solves do not tile into a GEMM).
        zx = tl.load(z_ptr + offs_n[:, None] * s_zr + offs_k[None, :] * s_zc,
                     mask=n_ok[:, None] & k_ok[None, :], other=0.0)

    dp = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, M, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < M
        dh = tl.load(dh_ptr + r[:, None] * s_dr + offs_n[None, :] * s_dc,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        p = tl.load(p_ptr + r[:, None] * s_pr + offs_k[None, :] * s_pc,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        dp = tl.dot(tl.trans(dh), p, dp, input_precision=DOT_PRECISION)

    c = tl.load(c_ptr + b)
    out = c * zx - alpha * dp
    tl.store(out_ptr + b * s_ob + offs_n[:, None] * s_or + offs_k[None, :] * s_oc, out,
             mask=n_ok[:, None] & k_ok[None, :])


def omega_apply(X: torch.Tensor, z_factor: torch.Tensor, c: torch.Tensor, delta_hat: torch.Tensor,
                alpha: float, *, z_is_inverse: bool) -> torch.Tensor:
    """Triton twin of :func:`.reference.omega_apply` for batched fp32 inputs (shapes checked)."""
    b, n, k = X.shape
    m = delta_hat.shape[1]
    out = torch.empty_like(X)
    if out.numel() == 0:
        return out
    # The two GEMM-free parts stay in cuBLAS/cuSOLVER: Δ̂X is a separate reduction, and the
    # triangular solves of the Cholesky path do not tile.
    p = torch.bmm(delta_hat, X)
    z = z_factor if z_is_inverse else torch.cholesky_solve(X, z_factor)
    if INTERPRET:
        block_n, block_k, block_r = 32, 16, 32
    else:
        block_n, block_r = 64, 64
        block_k = min(64, max(16, triton.next_power_of_2(k)))
    # Eigenvector residuals need full fp32: TF32 (10-bit mantissa) would cap them near 1e-3.
    precision = "ieee"
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k), b)
    num_warps = omega_warps(block_n, block_k, block_r)
    with common.on_device(X):
        _omega_kernel[grid](
            out, z, X, delta_hat, p, c, float(alpha), n, k, m,
            *z.stride(), *X.stride(), *delta_hat.stride(), *p.stride(), *out.stride(),
            Z_IS_INVERSE=z_is_inverse, DOT_PRECISION=precision,
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
            num_warps=num_warps, num_stages=1 if INTERPRET else NUM_STAGES)
    return out


def omega_registers(block_n: int, block_k: int, block_r: int, num_warps: int) -> int:
    """Modelled registers per thread, as :func:`.triton_common.tile_registers` counts them: the
    ``Zλ⁻¹X`` tile stays live beside the ``Δ̂ᵀP`` accumulator, and the FMA (`ieee`) dot holds an
    operand slab."""
    return (2 * block_n * block_k + block_n * block_r) // (32 * num_warps)


def omega_warps(block_n: int, block_k: int, block_r: int) -> int:
    """Fewest warps (4 or 8) at which the kernel fits the register model."""
    for warps in (4, 8):
        if omega_registers(block_n, block_k, block_r, warps) <= common.REGISTER_BUDGET:
            return warps
    return 8
