"""Pick an implementation per call: Triton on CUDA tensors, the PyTorch references elsewhere.

Every public op takes ``impl``:

* ``"auto"`` (default): the fast path for the tensors' device (below), unless the environment
  variable ``LORADAFAST_FORCE_REFERENCE`` is set to anything but ``""``/``"0"``;
* ``"reference"``: the PyTorch reference in :mod:`.reference`, on any device;
* ``"triton"``: the Triton kernel, on CUDA, or on CPU tensors when ``TRITON_INTERPRET=1`` was set
  before the first Triton call (how the CPU test-suite exercises the kernels). An explicit
  ``impl`` wins over the environment variable, which only steers ``"auto"``.

What ``"auto"`` runs on CUDA, and why:

* ``kfac_accumulate`` / ``kfac_accumulate_pair``: Triton. Only lower-triangle tiles are computed
  (half the FLOPs of ``xᵀx``), with fp32 accumulation and the token mask applied in the kernel;
  cuBLAS has no bf16-in / fp32-out symmetric rank-k update (``syrk``) to compare with.
* ``gradient_accumulate``: cuBLAS through ``torch.addmm(..., out_dtype=torch.float32)`` (bf16/fp16
  in, fp32 accumulate and output, added in place into the accumulator). ``Gᵀx`` is a plain
  rectangular GEMM with nothing to skip, where cuBLAS is at the roofline and a Triton GEMM at best
  matches it; the Triton kernel remains available (``impl="triton"``) and used when the
  ``out_dtype`` overloads are missing (torch < 2.8). benchmarks/bench_kernels.py times both.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Literal

import torch

from . import reference

Impl = Literal["auto", "reference", "triton"]
_IMPLS = ("auto", "reference", "triton")


def force_reference() -> bool:
    """Whether ``LORADAFAST_FORCE_REFERENCE`` asks for the references (read on every call)."""
    return os.environ.get("LORADAFAST_FORCE_REFERENCE", "") not in ("", "0")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' but triton is not installed")
        if not on_cuda and not _interpreting():
            raise RuntimeError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                               "the first Triton call to run the kernels in the interpreter")
        return True
    return on_cuda and not force_reference() and triton_available()


# Imported on first use: importing triton costs about a second, and the interpreter mode is fixed
# when a kernel module is imported, so tests must be able to set TRITON_INTERPRET first.
def _triton_op(module: str):
    """The Triton module of one op (``kfac_triton``, ``kfac_pair_triton``, ``gradient_triton``),
    imported on first use."""
    return importlib.import_module(f".{module}", __package__)


def _flatten_tokens(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _check_mask(mask: torch.Tensor | None, tokens: int) -> None:
    if mask is not None and mask.numel() != tokens:
        raise ValueError(f"mask has {mask.numel()} entries for {tokens} tokens")


def _check_acc(acc: torch.Tensor, shape: tuple[int, int], name: str = "acc") -> None:
    if acc.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {acc.dtype}")
    if tuple(acc.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(acc.shape)}, expected {shape}")


def kfac_accumulate(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                    impl: Impl = "auto") -> torch.Tensor:
    """``acc += tril(xᵀ diag(mask) x)`` in fp32, in place; returns ``acc``.

    ``acc`` ``[d, d]`` float32; only its lower triangle (with the diagonal) is defined afterwards:
    read it with :func:`symmetric_from_lower`. ``x`` ``[tokens, d]`` (leading dims are flattened)
    in bf16/fp16/fp32; ``mask`` ``[tokens]`` of 0/1 (bool or float; nonzero counts as 1) or None.
    """
    x = _flatten_tokens(x)
    _check_acc(acc, (x.shape[1], x.shape[1]))
    _check_mask(mask, x.shape[0])
    if _use_triton(impl, acc, x):
        return _triton_op("kfac_triton").kfac_accumulate(acc, x, mask)
    return reference.kfac_accumulate(acc, x, mask)


def kfac_accumulate_pair(acc_x: torch.Tensor, x: torch.Tensor, acc_g: torch.Tensor, g: torch.Tensor,
                         mask: torch.Tensor | None = None, *, impl: Impl = "auto"):
    """:func:`kfac_accumulate` of a layer input ``x`` and of its output gradient ``g`` over the same
    tokens and mask; one kernel launch on the Triton path. Returns ``(acc_x, acc_g)``."""
    x, g = _flatten_tokens(x), _flatten_tokens(g)
    if x.shape[0] != g.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens, g has {g.shape[0]}")
    _check_acc(acc_x, (x.shape[1], x.shape[1]), "acc_x")
    _check_acc(acc_g, (g.shape[1], g.shape[1]), "acc_g")
    _check_mask(mask, x.shape[0])
    if _use_triton(impl, acc_x, x, acc_g, g):
        if g.dtype != x.dtype:  # one launch compiles one operand dtype
            dtype = torch.promote_types(x.dtype, g.dtype)
            x, g = x.to(dtype), g.to(dtype)
        return _triton_op("kfac_pair_triton").kfac_accumulate_pair(acc_x, x, acc_g, g, mask)
    return reference.kfac_accumulate_pair(acc_x, x, acc_g, g, mask)


def _gradient_accumulate_cublas(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                                mask: torch.Tensor | None) -> torch.Tensor:
    """``acc += gᵀ diag(mask) x`` through cuBLAS with fp32 output from bf16/fp16 operands."""
    if mask is not None:
        # Zero both operands' padded rows: the GEMM cannot skip rows, and 0·NaN would leak.
        drop = mask.reshape(-1, 1) == 0
        g, x = g.masked_fill(drop, 0), x.masked_fill(drop, 0)
    if g.dtype == torch.float32 or not _has_out_dtype(acc.device):
        acc.addmm_(g.T.float(), x.float())
    elif _addmm_in_place_ok.get(acc.device, True):
        try:
            # In place (beta = 1 into the fp32 accumulator): no [out, in] temporary.
            torch.addmm(acc, g.T, x, out_dtype=torch.float32, out=acc)
            _addmm_in_place_ok[acc.device] = True
        except (RuntimeError, TypeError):
            # Some releases accept out_dtype only with a `self` of the operands' dtype; the
            # shape/dtype checks raise before anything is written, so acc is intact.
            _addmm_in_place_ok[acc.device] = False
            acc.add_(torch.mm(g.T, x, out_dtype=torch.float32))
    else:
        acc.add_(torch.mm(g.T, x, out_dtype=torch.float32))
    return acc


_addmm_in_place_ok: dict[torch.device, bool] = {}


@functools.lru_cache(maxsize=None)
def _has_out_dtype(device: torch.device) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs for bf16 operands on ``device``."""
    try:
        a = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def gradient_accumulate(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                        mask: torch.Tensor | None = None, *, impl: Impl = "auto") -> torch.Tensor:
    """``acc += gᵀ diag(mask) x`` in fp32, in place: ``acc`` ``[out, in]`` float32, ``g``
    ``[tokens, out]``, ``x`` ``[tokens, in]`` (leading dims flattened), ``mask`` as in
    :func:`kfac_accumulate`. On CUDA, ``"auto"`` uses cuBLAS with fp32 output (module docstring)."""
    g, x = _flatten_tokens(g), _flatten_tokens(x)
    if g.shape[0] != x.shape[0]:
        raise ValueError(f"g has {g.shape[0]} tokens, x has {x.shape[0]}")
    _check_acc(acc, (g.shape[1], x.shape[1]))
    _check_mask(mask, x.shape[0])
    if impl == "auto" and acc.is_cuda and g.is_cuda and x.is_cuda and not force_reference():
        if _has_out_dtype(acc.device) or not triton_available():
            return _gradient_accumulate_cublas(acc, *_same_dtype(g, x), mask)
        impl = "triton"
    if _use_triton(impl, acc, g, x):
        return _triton_op("gradient_triton").gradient_accumulate(acc, *_same_dtype(g, x), mask)
    return reference.gradient_accumulate(acc, g, x, mask)


def _same_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands in their common dtype (one GEMM, one operand dtype); never a downcast."""
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)
