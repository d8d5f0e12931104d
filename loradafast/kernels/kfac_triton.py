"""Triton twin of :func:`.reference.kfac_accumulate`: ``acc += tril(xᵀ diag(keep) x)`` in fp32.

Only tiles on or below the diagonal are launched, so a symmetric update costs about half of
``xᵀx``. Why a kernel at all: bf16 ``xᵀx`` rounded to bf16 cannot be summed over hundreds of
batches, and upcasting x to fp32 first costs a copy and an fp32 GEMM. Reading bf16 tiles and
accumulating in fp32 registers, then read-modify-writing the fp32 accumulator once per tile, has the
cost of one bf16 GEMM (half of one for the symmetric case) and no temporaries.

Dispatch is in :mod:`loradafast.kernels`; the tile routine, autotuning and host helpers are in
:mod:`.triton_common`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common

@triton.autotune(configs=common.configs(), key=["D", "BLOCK", "ATOMIC", "HAS_MASK"], restore_value=["acc_ptr"],
                 **common.autotune_options())
@triton.jit
def _kfac_kernel(x_ptr, keep_ptr, acc_ptr, T, D, stride_xt, stride_xd, stride_am, stride_an,
                 HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    i, j = common.lower_tile_coords(tl.program_id(0))
    t_begin, t_end = common.token_range(T, BLOCK_K)
    common.atb_tile(x_ptr, x_ptr, keep_ptr, acc_ptr, D, D, stride_xt, stride_xd, stride_xt, stride_xd,
                    stride_am, stride_an, i, j, t_begin, t_end,
                    HAS_MASK, ATOMIC, UPCAST, DOT_PRECISION, BLOCK, BLOCK, BLOCK_K)


def kfac_accumulate(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                    split_k: int | None = None) -> torch.Tensor:
    """Triton twin of :func:`.reference.kfac_accumulate` (``x`` 2-D, shapes already checked).

    ``split_k`` overrides the token split (tests use it to exercise the atomic path).
    """
    tokens, d = x.shape
    if tokens == 0 or d == 0:
        return acc
    upcast, precision = common.dot_flags(x.dtype)
    block = common.block_for(d, precision)
    n_tiles = triton.cdiv(d, block)
    n_pairs = n_tiles * (n_tiles + 1) // 2
    assert n_tiles < 46341, "tile enumeration is int32"
    split = split_k or common.split_for(n_pairs, tokens, x.device)
    keep = common.keep_mask(mask)
    with common.on_device(x):
        _kfac_kernel[(n_pairs, split)](
            x, keep if keep is not None else x, acc, tokens, d,
            x.stride(0), x.stride(1), acc.stride(0), acc.stride(1),
            HAS_MASK=keep is not None, ATOMIC=split > 1, UPCAST=upcast, DOT_PRECISION=precision,
            BLOCK=block)
    return acc
