"""Triton twin of :func:`.reference.gradient_accumulate`: ``acc[out, in] += gᵀ diag(keep) x`` in
fp32, the full rectangle of tiles.

On CUDA, dispatch's ``"auto"`` prefers cuBLAS with fp32 output (see :mod:`.dispatch`); this kernel
runs with ``impl="triton"`` and where that overload is missing. The tile routine, autotuning and
host helpers are in :mod:`.triton_common`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common

@triton.autotune(configs=common.configs(), key=["M", "N", "BLOCK", "ATOMIC", "HAS_MASK"], restore_value=["acc_ptr"],
                 **common.autotune_options())
@triton.jit
def _gradient_kernel(g_ptr, x_ptr, keep_ptr, acc_ptr, T, M, N,
                     stride_gt, stride_gm, stride_xt, stride_xn, stride_am, stride_an,
                     HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr = 8):
    # Grouped ordering: consecutive programs share row tiles of g, so its token stream is
    # read from L2 rather than HBM by most of them.
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK)
    n_n = tl.cdiv(N, BLOCK)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(n_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_size
    tile_n = (pid % per_group) // group_size
    t_begin, t_end = common.token_range(T, BLOCK_K)
    common.atb_tile(g_ptr, x_ptr, keep_ptr, acc_ptr, M, N, stride_gt, stride_gm, stride_xt, stride_xn,
                    stride_am, stride_an, tile_m, tile_n, t_begin, t_end,
                    HAS_MASK, ATOMIC, UPCAST, DOT_PRECISION, BLOCK, BLOCK, BLOCK_K)


def gradient_accumulate(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                        mask: torch.Tensor | None = None, *, split_k: int | None = None) -> torch.Tensor:
    """Triton twin of :func:`.reference.gradient_accumulate`: ``acc[out, in] += gᵀ diag(mask) x``."""
    tokens, m = g.shape
    n = x.shape[1]
    if tokens == 0 or m == 0 or n == 0:
        return acc
    assert x.dtype == g.dtype, "one launch compiles one dtype; cast before calling"
    upcast, precision = common.dot_flags(x.dtype)
    block = common.block_for(min(m, n), precision)
    n_tiles = triton.cdiv(m, block) * triton.cdiv(n, block)
    split = split_k or common.split_for(n_tiles, tokens, x.device)
    keep = common.keep_mask(mask)
    with common.on_device(x):
        _gradient_kernel[(n_tiles, split)](
            g, x, keep if keep is not None else x, acc, tokens, m, n,
            g.stride(0), g.stride(1), x.stride(0), x.stride(1), acc.stride(0), acc.stride(1),
            HAS_MASK=keep is not None, ATOMIC=split > 1, UPCAST=upcast, DOT_PRECISION=precision,
            BLOCK=block)
    return acc
