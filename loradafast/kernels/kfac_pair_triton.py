"""Triton twin of :func:`.reference.kfac_accumulate_pair`: the K-FAC factors of a layer's input
``x`` and of its output gradient ``g`` (same tokens, same mask) in a single launch, programs
``[0, n_pairs_x)`` on ``x``'s lower tiles and the rest on ``g``'s.

Dispatch is in :mod:`loradafast.kernels`; the tile routine, autotuning and host helpers are in
:mod:`.triton_common`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common

# The x and g programs are two branches of one kernel, and each allocates its own pipeline
# buffers in shared memory.
BRANCHES = 2


@triton.autotune(configs=common.configs(), key=["DX", "DG", "BLOCK", "ATOMIC", "HAS_MASK"],
                 restore_value=["accx_ptr", "accg_ptr"], **common.autotune_options(BRANCHES))
@triton.jit
def _kfac_pair_kernel(x_ptr, accx_ptr, DX, stride_xt, stride_xd, stride_xam, stride_xan,
                      g_ptr, accg_ptr, DG, stride_gt, stride_gd, stride_gam, stride_gan,
                      keep_ptr, T, n_pairs_x,
                      HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    t_begin, t_end = common.token_range(T, BLOCK_K)
    if pid < n_pairs_x:
        i, j = common.lower_tile_coords(pid)
        common.atb_tile(x_ptr, x_ptr, keep_ptr, accx_ptr, DX, DX, stride_xt, stride_xd, stride_xt, stride_xd,
                        stride_xam, stride_xan, i, j, t_begin, t_end,
                        HAS_MASK, ATOMIC, UPCAST, DOT_PRECISION, BLOCK, BLOCK, BLOCK_K)
    else:
        i, j = common.lower_tile_coords(pid - n_pairs_x)
        common.atb_tile(g_ptr, g_ptr, keep_ptr, accg_ptr, DG, DG, stride_gt, stride_gd, stride_gt, stride_gd,
                        stride_gam, stride_gan, i, j, t_begin, t_end,
                        HAS_MASK, ATOMIC, UPCAST, DOT_PRECISION, BLOCK, BLOCK, BLOCK_K)


def kfac_accumulate_pair(acc_x: torch.Tensor, x: torch.Tensor, acc_g: torch.Tensor, g: torch.Tensor,
                         mask: torch.Tensor | None = None, *, split_k: int | None = None):
    """Both K-FAC factors of one layer (input ``x`` and output gradient ``g``) in one launch."""
    tokens, dx = x.shape
    dg = g.shape[1]
    if tokens == 0:
        return acc_x, acc_g
    assert x.dtype == g.dtype, "one launch compiles one dtype; cast before calling"
    upcast, precision = common.dot_flags(x.dtype)
    block = common.block_for(max(dx, dg), precision, BRANCHES)
    nx, ng = triton.cdiv(dx, block), triton.cdiv(dg, block)
    n_pairs_x, n_pairs_g = nx * (nx + 1) // 2, ng * (ng + 1) // 2
    split = split_k or common.split_for(n_pairs_x + n_pairs_g, tokens, x.device)
    keep = common.keep_mask(mask)
    with common.on_device(x):
        _kfac_pair_kernel[(n_pairs_x + n_pairs_g, split)](
            x, acc_x, dx, x.stride(0), x.stride(1), acc_x.stride(0), acc_x.stride(1),
            g, acc_g, dg, g.stride(0), g.stride(1), acc_g.stride(0), acc_g.stride(1),
            keep if keep is not None else x, tokens, n_pairs_x,
            HAS_MASK=keep is not None, ATOMIC=split > 1, UPCAST=upcast, DOT_PRECISION=precision,
            BLOCK=block)
    return acc_x, acc_g
