"""Triton kernels for the statistics pass: masked ``Aᵀ B`` accumulated in fp32.

One tile routine serves three operations, all of the form ``C += Aᵀ diag(keep) B`` where the
reduction runs over tokens (the long axis) and the output is a small ``[M, N]`` fp32 matrix:

* :func:`kfac_accumulate` (``A = B = x``): only tiles on or below the diagonal are launched, so
  a symmetric update costs about half of ``xᵀx``;
* :func:`kfac_accumulate_pair`: the K-FAC factors of a layer's input and of its output gradient in
  a single launch (same tokens, same mask);
* :func:`gradient_accumulate` (``A = g``, ``B = x``): the full rectangle.

The references with identical semantics are in :mod:`.reference`; dispatch is in
:mod:`loradafast.kernels`.

Why a kernel at all: bf16 ``xᵀx`` rounded to bf16 cannot be summed over hundreds of batches, and
upcasting x to fp32 first costs a copy and an fp32 GEMM. Reading bf16 tiles and accumulating in
fp32 registers, then read-modify-writing the fp32 accumulator once per tile, has the cost of one
bf16 GEMM (half of one for the symmetric case) and no temporaries.

``TRITON_INTERPRET=1`` must be set before this module is imported for the interpreter to be used.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# The interpreter computes bf16/fp16 tl.dot wrongly, so tiles are upcast there; it also runs each
# program instance in Python, so it gets one config and small blocks.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Candidates on a GPU. The output tile (BLOCK_M x BLOCK_N) is fixed on the host (it decides the
# grid and the split over tokens); only the token depth and the pipeline are tuned, and
# :func:`_prune` drops, before any is compiled, the configs that spill for the call's tile and dtype.
TUNED_CONFIGS = [
    triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=4),  # the one fp32 `ieee` fit at BLOCK 128
]

# Register model, consistent with the sm_90 compiles of these kernels reported in the project's
# large-model issue (Triton 3.6 and 3.9, ptxas; no GPU run): per thread, the fp32 accumulator tile
# (BLOCK²/threads), plus, for the fp32 `ieee` dot, which runs on the FMA units and so holds both
# operand tiles in registers (wgmma reads 16-bit and tf32 tiles from shared memory),
# 2·BLOCK·BLOCK_K/threads; about 120 more go to addresses, masks and the pipeline. Compiled:
# 16-bit BLOCK 128 at 8 warps 186 registers, no spill (64 by the model); at 4 warps 88–96 B of
# spills (128); the fp32 `ieee` paths 255 registers and up to ~40 KB of spills at BLOCK 128
# (≥ 128 but for BLOCK_K 32 at 8 warps). A config fits when the model gives at most 96.
REGISTER_BUDGET = 96
SHARED_MEMORY_BUDGET = 200 * 1024  # bytes of pipelined operand tiles; sm_90 allows 227 KB a block


def tile_registers(block_m: int, block_n: int, block_k: int, num_warps: int, fma_dot: bool) -> int:
    """Model registers per thread of one ``[block_m, block_n] += [block_k, block_m]ᵀ[block_k, block_n]``
    accumulation (see :data:`REGISTER_BUDGET`)."""
    threads = 32 * num_warps
    return (block_m * block_n + ((block_m + block_n) * block_k if fma_dot else 0)) // threads


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return TUNED_CONFIGS


def config_fits(block: int, block_k: int, num_warps: int, num_stages: int, operand_bytes: int,
                fma_dot: bool) -> bool:
    """Whether a tile config stays within the register and shared-memory budgets above."""
    shared = num_stages * block_k * 2 * block * operand_bytes
    return (tile_registers(block, block, block_k, num_warps, fma_dot) <= REGISTER_BUDGET
            and shared <= SHARED_MEMORY_BUDGET)


def _prune(configs, named_args, **kwargs):
    """``early_config_prune``: the configs that fit this call's tile and operand dtype (at least
    the one with the fewest registers, so the autotuner always has a candidate)."""
    block = kwargs["BLOCK"]
    fp32 = kwargs.get("DOT_PRECISION") is not None  # None for 16-bit operands (see _dot_flags)
    fma = kwargs.get("DOT_PRECISION") == "ieee"
    operand_bytes = 4 if fp32 else 2

    def fits(c):
        return config_fits(block, c.kwargs["BLOCK_K"], c.num_warps, c.num_stages, operand_bytes, fma)

    kept = [c for c in configs if fits(c)]
    if kept:
        return kept
    return [min(configs, key=lambda c: (tile_registers(block, block, c.kwargs["BLOCK_K"], c.num_warps, fma),
                                        c.num_stages))]


# Autotuning results are kept in Triton's on-disk cache (``cache_results``): a new process (each
# benchmark child, each training job) reuses the timings instead of re-timing every config.
_AUTOTUNE = {"prune_configs_by": {"early_config_prune": _prune}, "cache_results": True}


@triton.jit
def _lower_tile_coords(pid):
    """Row-major enumeration of the lower-triangle tile pairs: pid -> (i, j), j <= i."""
    i = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    # fp32 rounding overshoots by one just below triangular numbers from pid ~ 1e7 on (tested);
    # exact integer checks in both directions fix it (i < 46341 keeps them within int32).
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    j = pid - i * (i + 1) // 2
    return i, j


@triton.jit
def _token_range(T, BLOCK_K: tl.constexpr):
    """The token slice of this program along grid axis 1 (split-K over tokens)."""
    n_split = tl.num_programs(1)
    chunk = tl.cdiv(tl.cdiv(T, BLOCK_K), n_split) * BLOCK_K
    t_begin = tl.program_id(1) * chunk
    t_end = tl.minimum(T, t_begin + chunk)
    return t_begin, t_end


@triton.jit
def _atb_tile(a_ptr, b_ptr, keep_ptr, c_ptr, M, N,
              stride_at, stride_am, stride_bt, stride_bn, stride_cm, stride_cn,
              tile_m, tile_n, t_begin, t_end,
              HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
              DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``C[tile_m, tile_n] += A[t_begin:t_end, tile_m]ᵀ diag(keep) B[t_begin:t_end, tile_n]``."""
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_K):
        t = t0 + tl.arange(0, BLOCK_K)
        rows = t < t_end
        if HAS_MASK:
            # Masked tokens are never loaded (they read as 0), so padding that holds inf/NaN
            # cannot leak into the sum; both operands see the same row mask.
            rows = rows & (tl.load(keep_ptr + t, mask=rows, other=0) != 0)
        t64 = t.to(tl.int64)  # tokens x stride exceeds int32 for long batches of wide layers
        a = tl.load(a_ptr + t64[:, None] * stride_at + offs_m[None, :] * stride_am,
                    mask=rows[:, None] & m_ok[None, :], other=0.0)
        b = tl.load(b_ptr + t64[:, None] * stride_bt + offs_n[None, :] * stride_bn,
                    mask=rows[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        # Several token slices add into the same tile (split-K); fp32 atomics make the sum
        # order, and so the last bits, vary from run to run.
        tl.atomic_add(c_ptrs, acc, mask=c_mask)
    else:
        prev = tl.load(c_ptrs, mask=c_mask, other=0.0)
        tl.store(c_ptrs, prev + acc, mask=c_mask)


@triton.autotune(configs=_configs(), key=["D", "BLOCK", "ATOMIC", "HAS_MASK"], restore_value=["acc_ptr"], **_AUTOTUNE)
@triton.jit
def _kfac_kernel(x_ptr, keep_ptr, acc_ptr, T, D, stride_xt, stride_xd, stride_am, stride_an,
                 HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    i, j = _lower_tile_coords(tl.program_id(0))
    t_begin, t_end = _token_range(T, BLOCK_K)
    _atb_tile(x_ptr, x_ptr, keep_ptr, acc_ptr, D, D, stride_xt, stride_xd, stride_xt, stride_xd,
              stride_am, stride_an, i, j, t_begin, t_end,
              HAS_MASK, ATOMIC, UPCAST, DOT_PRECISION, BLOCK, BLOCK, BLOCK_K)


@triton.autotune(configs=_configs(), key=["DX", "DG", "BLOCK", "ATOMIC", "HAS_MASK"],
                 restore_value=["accx_ptr", "accg_ptr"], **_AUTOTUNE)
@triton.jit
def _kfac_pair_kernel(x_ptr, accx_ptr, DX, stride_xt, stride_xd, stride_xam, stride_xan,
                      g_ptr, accg_ptr, DG, stride_gt, stride_gd, stride_gam, stride_gan,
                      keep_ptr, T, n_pairs_x,
                      HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    t_begin, t_end = _token_range(T, BLOCK_K)
    if pid < n_pairs_x:
        i, j = _lower_tile_coords(pid)
        _atb_tile(x_ptr, x_ptr, keep_ptr, accx_ptr, DX, DX, stride_xt, stride_xd, stride_xt, stride_xd,
                  stride_xam, stride_xan, i, j, t_begin, t_end,
                  HAS_MASK, ATOMIC, UPCAST, DOT_PRECISION, BLOCK, BLOCK, BLOCK_K)
    else:
        i, j = _lower_tile_coords(pid - n_pairs_x)
        _atb_tile(g_ptr, g_ptr, keep_ptr, accg_ptr, DG, DG, stride_gt, stride_gd, stride_gt, stride_gd,
                  stride_gam, stride_gan, i, j, t_begin, t_end,
                  HAS_MASK, ATOMIC, UPCAST, DOT_PRECISION, BLOCK, BLOCK, BLOCK_K)


@triton.autotune(configs=_configs(), key=["M", "N", "BLOCK", "ATOMIC", "HAS_MASK"], restore_value=["acc_ptr"],
                 **_AUTOTUNE)
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
    t_begin, t_end = _token_range(T, BLOCK_K)
    _atb_tile(g_ptr, x_ptr, keep_ptr, acc_ptr, M, N, stride_gt, stride_gm, stride_xt, stride_xn,
              stride_am, stride_an, tile_m, tile_n, t_begin, t_end,
              HAS_MASK, ATOMIC, UPCAST, DOT_PRECISION, BLOCK, BLOCK, BLOCK_K)


# ---------------------------------------------------------------------------------------------
# Host side


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_for(size: int) -> int:
    if INTERPRET:
        return 32  # smallest tile tl.dot accepts comfortably; keeps several tiles in tests
    # 128x128 tiles reach the tensor-core roofline; 64 keeps enough tiles alive for narrow layers.
    return 128 if size >= 1024 else 64


def _split_for(n_tiles: int, tokens: int, device: torch.device) -> int:
    """How many token slices to run concurrently per output tile.

    The output (d x d) is small next to the reduction (tokens): d = 576 gives 15 lower tiles of
    64, far fewer than an H100's 132 SMs. Splitting the tokens fills the machine at the price of
    fp32 atomics (non-deterministic low bits), so deterministic mode turns it off.
    """
    if INTERPRET or device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        return 1
    want = triton.cdiv(2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()),
                 n_tiles)
    # Each slice should stream enough tokens to amortise the pipeline prologue and the atomics.
    return max(1, min(want, tokens // 512))


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PRECISION) for an input dtype."""
    if dtype == torch.float32:
        # Follow PyTorch's own fp32 matmul policy: exact fp32 unless the user opted into TF32.
        return False, ("ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32")
    # 16-bit operands: tensor-core products are exact in the fp32 accumulator, no precision knob.
    return INTERPRET, None


def _keep(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = mask.reshape(-1)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # i1 pointers are awkward in Triton; same bytes
    return mask.contiguous()


def kfac_accumulate(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                    split_k: int | None = None) -> torch.Tensor:
    """Triton twin of :func:`.reference.kfac_accumulate` (``x`` 2-D, shapes already checked).

    ``split_k`` overrides the token split (tests use it to exercise the atomic path).
    """
    tokens, d = x.shape
    if tokens == 0 or d == 0:
        return acc
    block = _block_for(d)
    n_tiles = triton.cdiv(d, block)
    n_pairs = n_tiles * (n_tiles + 1) // 2
    assert n_tiles < 46341, "tile enumeration is int32"
    split = split_k or _split_for(n_pairs, tokens, x.device)
    keep = _keep(mask)
    upcast, precision = _dot_flags(x.dtype)
    _kfac_kernel[(n_pairs, split)](
        x, keep if keep is not None else x, acc, tokens, d,
        x.stride(0), x.stride(1), acc.stride(0), acc.stride(1),
        HAS_MASK=keep is not None, ATOMIC=split > 1, UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK=block)
    return acc


def kfac_accumulate_pair(acc_x: torch.Tensor, x: torch.Tensor, acc_g: torch.Tensor, g: torch.Tensor,
                         mask: torch.Tensor | None = None, *, split_k: int | None = None):
    """Both K-FAC factors of one layer (input ``x`` and output gradient ``g``) in one launch."""
    tokens, dx = x.shape
    dg = g.shape[1]
    if tokens == 0:
        return acc_x, acc_g
    assert x.dtype == g.dtype, "one launch compiles one dtype; cast before calling"
    block = _block_for(max(dx, dg))
    nx, ng = triton.cdiv(dx, block), triton.cdiv(dg, block)
    n_pairs_x, n_pairs_g = nx * (nx + 1) // 2, ng * (ng + 1) // 2
    split = split_k or _split_for(n_pairs_x + n_pairs_g, tokens, x.device)
    keep = _keep(mask)
    upcast, precision = _dot_flags(x.dtype)
    _kfac_pair_kernel[(n_pairs_x + n_pairs_g, split)](
        x, acc_x, dx, x.stride(0), x.stride(1), acc_x.stride(0), acc_x.stride(1),
        g, acc_g, dg, g.stride(0), g.stride(1), acc_g.stride(0), acc_g.stride(1),
        keep if keep is not None else x, tokens, n_pairs_x,
        HAS_MASK=keep is not None, ATOMIC=split > 1, UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK=block)
    return acc_x, acc_g


def gradient_accumulate(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                        mask: torch.Tensor | None = None, *, split_k: int | None = None) -> torch.Tensor:
    """Triton twin of :func:`.reference.gradient_accumulate`: ``acc[out, in] += gᵀ diag(mask) x``."""
    tokens, m = g.shape
    n = x.shape[1]
    if tokens == 0 or m == 0 or n == 0:
        return acc
    assert x.dtype == g.dtype, "one launch compiles one dtype; cast before calling"
    block = _block_for(min(m, n))
    n_tiles = triton.cdiv(m, block) * triton.cdiv(n, block)
    split = split_k or _split_for(n_tiles, tokens, x.device)
    keep = _keep(mask)
    upcast, precision = _dot_flags(x.dtype)
    _gradient_kernel[(n_tiles, split)](
        g, x, keep if keep is not None else x, acc, tokens, m, n,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), acc.stride(0), acc.stride(1),
        HAS_MASK=keep is not None, ATOMIC=split > 1, UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK=block)
    return acc
