"""Build, load and dispatch the native batched symmetric eigensolver of csrc/.

The extension is compiled on first use with ninja through ``torch.utils.cpp_extension.load`` and
cached under torch's per-user extension directory (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), which rebuilds it when the sources change.  Where no compiler is
available or the build fails, a warning says why once and everything falls back to
``torch.linalg.eigh``.  ``LORADAFAST_NO_NATIVE=1`` disables the extension.

Dispatch (:func:`prefer_native`) follows the measurements of ``benchmarks/bench_eigen.py``
(``benchmarks/results/eigen_cpu.json``):

* CPU: the native solver up to :data:`CPU_NATIVE_MAX_N` rows, ``torch.linalg.eigh`` above.
  ``torch.linalg.eigh`` calls LAPACK once per matrix; the native solver (tridiagonal QL, one matrix
  per task over the thread pool) wins only where per-call overhead dominates.  Measured on the
  2-core development machine (torch 2.13 CPU, float64, batch 32, 2 threads: at n = 24 1.4 ms
  against 1.9 ms, at 48 even, at 72 19 ms against 12 ms; the full table is in that file).
* CUDA: ``torch.linalg.eigh`` until the Jacobi kernel has been timed on a GPU (it has only been
  compiled, never run, so it is opt-in: ``LORADAFAST_NATIVE_CUDA=1``).
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

# Shipped inside the package (package data), so that an installed wheel finds it too.
_CSRC = Path(__file__).resolve().parents[1] / "csrc"

# Largest matrix the CPU native path takes; beyond it LAPACK's blocked algorithms win.
CPU_NATIVE_MAX_N = 40

_lock = threading.Lock()
_module = None
_tried = False
_error: str | None = None


def _disabled() -> bool:
    return os.environ.get("LORADAFAST_NO_NATIVE", "") not in ("", "0")


def load(verbose: bool = False):
    """The compiled extension module, building it on first call; ``None`` if unavailable."""
    global _module, _tried, _error
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _tried = True
        if _disabled():
            _error = "disabled by LORADAFAST_NO_NATIVE"
            return None
        try:
            from torch.utils import cpp_extension

            sources = [str(_CSRC / "eigh.cpp")]
            cflags = ["-O3"]
            with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
            if with_cuda:
                sources.append(str(_CSRC / "eigh_cuda.cu"))
                cflags.append("-DLORADAFAST_WITH_CUDA")
            _module = cpp_extension.load(
                name=("loradafast_native_cuda" if with_cuda else "loradafast_native") + _build_key(),
                sources=sources,
                extra_cflags=cflags,
                extra_cuda_cflags=["-O3", "-DLORADAFAST_WITH_CUDA"] if with_cuda else None,
                with_cuda=with_cuda,
                verbose=verbose,
            )
        except Exception as exc:  # compiler missing, build error, incompatible toolchain, ...
            _error = f"{type(exc).__name__}: {exc}".strip()
            warnings.warn(
                "loradafast: the native eigensolver (csrc/) could not be built, using torch.linalg.eigh "
                f"instead (slower for batched small matrices on CPU). Reason: {_error[:2000]}",
                RuntimeWarning,
                stacklevel=2,
            )
            _module = None
    return _module


def _build_key() -> str:
    """A suffix naming this copy of the sources: torch caches an extension by name and rebuilds it
    whenever the sources' paths change, so two installs (venvs, checkouts) sharing one name would
    rebuild each other's on every alternate run."""
    import hashlib

    return "_" + hashlib.sha1(str(_CSRC).encode()).hexdigest()[:10]


def available() -> bool:
    return load() is not None


def build_error() -> str | None:
    """Why the extension is unavailable (after :func:`load` has been tried), else ``None``."""
    return _error


def eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` semantics (lower triangle read, ascending) for ``[..., n, n]``."""
    module = load()
    if module is None:
        raise RuntimeError(f"the native extension is unavailable: {_error}")
    shape = a.shape
    values, vectors, _info = module.eigh(a.reshape(-1, shape[-1], shape[-1]))
    # Non-convergence (info != 0) only follows non-finite input, which then shows in the output
    # as it would with torch; checking info here would cost a synchronisation per call.
    return values.reshape(shape[:-1]), vectors.reshape(shape)


def prefer_native(a: torch.Tensor) -> bool:
    """Whether the native solver is the faster choice for the batch ``a`` ``[..., n, n]``."""
    if a.dtype not in (torch.float32, torch.float64) or a.requires_grad or _disabled():
        return False
    n = a.shape[-1]
    if a.device.type == "cpu":
        return 1 <= n <= CPU_NATIVE_MAX_N and available()
    if a.device.type == "cuda":
        return os.environ.get("LORADAFAST_NATIVE_CUDA", "") not in ("", "0") and available() and load().has_cuda()
    return False
