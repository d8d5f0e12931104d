"""What the Triton kernels share: the interpreter switch, the autotune candidates and the model that
prunes them, the masked ``Aᵀ diag(keep) B`` tile routine, and the host helpers (device guard,
token split, dot precision, mask).

One op per module beside this one (:mod:`.kfac_triton`, :mod:`.kfac_pair_triton`,
:mod:`.gradient_triton`), each the twin of the function of the same name in :mod:`.reference`.

``TRITON_INTERPRET=1`` must be set before this module is imported for the interpreter to be used.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# The interpreter computes bf16/fp16 tl.dot wrongly, so tiles are upcast there; it also runs each
# program instance in Python, so it gets one config and small blocks.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- autotune candidates and what fits sm_90 --------------------------------------------------------

# Candidates on a GPU. The output tile (BLOCK x BLOCK) is fixed on the host (it decides the grid and
# the split over tokens); only the token depth and the pipeline are tuned, and the pruner of each
# kernel (:func:`pruner`) drops, before any is compiled, the configs that would spill or overflow
# shared memory for the call's tile and dtype.
TUNED_CONFIGS = [
    triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=5),
    triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=4),
]

# sm_90's opt-in shared memory per block (227 KB). A config above it fails to launch
# (OutOfResources); one that fits sm_90 but not a smaller GPU is skipped by the autotuner there.
SHARED_MEMORY_LIMIT = 232448
STATIC_SHARED = 1024  # what the compiled kernels reserve beside their pipeline buffers

# The register model, from sm_90 compiles of every candidate of these kernels (ptxas through
# Triton's compile API; tests/kernels/test_kernels_sm90.py repeats them for every config kept): the fp32
# accumulator tile (BLOCK² over the threads), plus, for the fp32 `ieee` dot, which runs on the FMA
# units and so holds its operands in registers, one operand slab (BLOCK·BLOCK_K over the threads).
# Every candidate at which this is at most 64 registers a thread compiled without a spill; the
# ones that spilled (BLOCK 128 at 4 warps, `ieee` at BLOCK 128) are all above it. The rest of the
# 255 goes to addresses, masks and the pipeline, which the model does not try to count.
REGISTER_BUDGET = 64


def tile_registers(block: int, block_k: int, num_warps: int, fma_dot: bool) -> int:
    """Modelled registers per thread of a ``[block, block]`` accumulation over ``block_k``-token slabs."""
    threads = 32 * num_warps
    return (block * block + (block * block_k if fma_dot else 0)) // threads


def tile_shared_bytes(block: int, block_k: int, num_stages: int, operand_bytes: int, branches: int = 1) -> int:
    """Shared memory of one program: each branch of a kernel (the pair kernel has two) allocates its
    own pipeline buffers, both operands ``num_stages`` deep (one fewer for the `ieee` dot: an
    over-estimate there)."""
    return branches * num_stages * block_k * 2 * block * operand_bytes + STATIC_SHARED


def config_fits(block: int, block_k: int, num_warps: int, num_stages: int, operand_bytes: int,
                fma_dot: bool, branches: int = 1) -> bool:
    """Whether a tile config stays within the register model and sm_90's shared memory."""
    return (tile_registers(block, block_k, num_warps, fma_dot) <= REGISTER_BUDGET
            and tile_shared_bytes(block, block_k, num_stages, operand_bytes, branches) <= SHARED_MEMORY_LIMIT)


def configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return TUNED_CONFIGS


def kept_configs(configs, block: int, precision: str | None, branches: int = 1) -> list:
    """The configs that fit (at least the one with the fewest registers, so that the autotuner
    always has a candidate; :func:`block_for` picks tiles where that fallback is never needed)."""
    operand_bytes = 2 if precision is None else 4  # None: 16-bit operands (see dot_flags)
    fma = precision == "ieee"

    def fits(c):
        return config_fits(block, c.kwargs["BLOCK_K"], c.num_warps, c.num_stages, operand_bytes, fma, branches)

    kept = [c for c in configs if fits(c)]
    if kept:
        return kept
    return [min(configs, key=lambda c: (tile_registers(block, c.kwargs["BLOCK_K"], c.num_warps, fma),
                                        c.num_stages))]


def pruner(branches: int = 1):
    """``early_config_prune`` of a kernel with ``branches`` tile branches: :func:`kept_configs` for
    the call's tile and dtype."""
    def prune(configs, named_args, **kwargs):
        return kept_configs(configs, kwargs["BLOCK"], kwargs.get("DOT_PRECISION"), branches)
    prune.branches = branches
    return prune


def autotune_options(branches: int = 1) -> dict:
    # Autotuning results are kept in Triton's on-disk cache (``cache_results``): a new process (each
    # benchmark child, each training job) reuses the timings instead of re-timing every config.
    return {"prune_configs_by": {"early_config_prune": pruner(branches)}, "cache_results": True}


def block_for(size: int, precision: str | None, branches: int = 1) -> int:
    """The output tile edge for a matrix dimension ``size``: 128 reaches the tensor-core roofline,
    64 keeps enough tiles alive for narrow layers; 64 too where no candidate fits at 128 (the FMA
    `ieee` dot; TF32 in the pair kernel, whose two branches' buffers overflow shared memory)."""
    if INTERPRET:
        return 32  # smallest tile tl.dot accepts comfortably; keeps several tiles in tests
    operand_bytes = 2 if precision is None else 4
    if size >= 1024 and any(config_fits(128, c.kwargs["BLOCK_K"], c.num_warps, c.num_stages, operand_bytes,
                                        precision == "ieee", branches) for c in TUNED_CONFIGS):
        return 128
    return 64


# ---- the tile routine ------------------------------------------------------------------------------

@triton.jit
def lower_tile_coords(pid):
    """Row-major enumeration of the lower-triangle tile pairs: pid -> (i, j), j <= i."""
    i = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    # fp32 rounding overshoots by one just below triangular numbers from pid ~ 1e7 on (tested);
    # exact integer checks in both directions fix it (i < 46341 keeps them within int32).
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    j = pid - i * (i + 1) // 2
    return i, j


@triton.jit
def token_range(T, BLOCK_K: tl.constexpr):
    """The token slice of this program along grid axis 1 (split-K over tokens)."""
    n_split = tl.num_programs(1)
    chunk = tl.cdiv(tl.cdiv(T, BLOCK_K), n_split) * BLOCK_K
    t_begin = tl.program_id(1) * chunk
    t_end = tl.minimum(T, t_begin + chunk)
    return t_begin, t_end


@triton.jit
def atb_tile(a_ptr, b_ptr, keep_ptr, c_ptr, M, N,
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


# ---- host side ---------------------------------------------------------------------------------------

def on_device(t: torch.Tensor):
    """The context a launch runs in: Triton launches on the *current* CUDA device, so a tensor on
    another GPU (a model spread with ``device_map``) needs it made current; a no-op elsewhere, so
    CPU tensors (the interpreter) never initialise CUDA."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_for(n_tiles: int, tokens: int, device: torch.device) -> int:
    """How many token slices to run concurrently per output tile.

    The output (d x d) is small next to the reduction (tokens): d = 576 gives 15 lower tiles of
    64, far fewer than an H100's 132 SMs. Splitting the tokens fills the machine at the price of
    fp32 atomics (non-deterministic low bits), so deterministic mode turns it off.
    """
    if INTERPRET or device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        return 1
    want = triton.cdiv(2 * sm_count(device.index if device.index is not None else torch.cuda.current_device()),
                       n_tiles)
    # Each slice should stream enough tokens to amortise the pipeline prologue and the atomics.
    return max(1, min(want, tokens // 512))


def dot_flags(dtype: torch.dtype) -> tuple[bool, str | None]:
    """(UPCAST, DOT_PRECISION) for an input dtype."""
    if dtype == torch.float32:
        # Follow PyTorch's own fp32 matmul policy: exact fp32 unless the user opted into TF32.
        return False, ("ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32")
    # 16-bit operands: tensor-core products are exact in the fp32 accumulator, no precision knob.
    return INTERPRET, None


def keep_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The token mask as the kernels read it (bytes, contiguous), or None."""
    if mask is None:
        return None
    mask = mask.reshape(-1)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # i1 pointers are awkward in Triton; same bytes
    return mask.contiguous()
