"""Build, load and dispatch the native batched symmetric eigensolver of csrc/.

The extension is compiled on first use with ninja through ``torch.utils.cpp_extension.load`` and
cached under torch's per-user extension directory (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), which rebuilds it when the sources change.  A build prints one
line to stderr (once per process), so that a first solve that seems to hang is explained.  Where
no compiler is available or the build fails, a warning says why once and everything falls back to
``torch.linalg.eigh``.  ``LORADAFAST_NO_NATIVE=1`` disables the extension.

torch serialises builds with a ``lock`` file in the build directory and waits on it without a
limit; a build that was killed leaves the file behind.  :func:`load` therefore waits at most
``LORADAFAST_NATIVE_LOCK_TIMEOUT`` seconds (default :data:`LOCK_TIMEOUT_S`, counted from the lock
file's creation, so a lock left by an old run is given up at once), then falls back and names the
directory to delete.

The sources are ``csrc/`` at the top of a source checkout; a wheel carries a copy inside the
package (``loradafast/csrc/``, copied there by setup.py's build step).

Dispatch (:func:`prefer_native`) follows the measurements of ``benchmarks/bench_eigen.py``
(``benchmarks/results/eigen_cpu.json``):

* CPU: the native solver up to :data:`CPU_NATIVE_MAX_N` rows, ``torch.linalg.eigh`` above.
  ``torch.linalg.eigh`` calls LAPACK once per matrix; the native solver (tridiagonal QL, one matrix
  per task over the thread pool) wins only where per-call overhead dominates (the crossover is in
  that file).
* CUDA: ``torch.linalg.eigh`` until the Jacobi kernel has been timed on a GPU (it has only been
  compiled, never run, so it is opt-in: ``LORADAFAST_NATIVE_CUDA=1``).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

_SOURCES = ("eigh.cpp", "eigh_cuda.cu")


def _find_csrc() -> Path:
    """``loradafast/csrc`` in an installed wheel, else ``csrc/`` beside the package in a checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCES):
            return candidate
    return package.parent / "csrc"  # missing: the build fails and says which path it tried


_CSRC = _find_csrc()

# Largest matrix the CPU native path takes; beyond it LAPACK's blocked algorithms win.
CPU_NATIVE_MAX_N = 40

# A build with nvcc takes minutes at most; a lock older than this was left by a killed build.
LOCK_TIMEOUT_S = 300.0

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
            _module = _build(verbose)
        except Exception as exc:  # compiler missing, build error, incompatible toolchain, stale lock, ...
            _error = f"{type(exc).__name__}: {exc}".strip()
            warnings.warn(
                "loradafast: the native eigensolver (csrc/) could not be built, using torch.linalg.eigh "
                f"instead (slower for batched small matrices on CPU). Reason: {_error[:2000]}",
                RuntimeWarning,
                stacklevel=2,
            )
            _module = None
    return _module


class StaleLockError(RuntimeError):
    """The build directory's lock file outlived :func:`lock_timeout`."""


def lock_timeout() -> float:
    """Seconds a lock file may exist before :func:`load` gives up (``LORADAFAST_NATIVE_LOCK_TIMEOUT``)."""
    value = os.environ.get("LORADAFAST_NATIVE_LOCK_TIMEOUT", "")
    return float(value) if value.strip() else LOCK_TIMEOUT_S


def _build(verbose: bool):
    from torch.utils import cpp_extension

    sources = [str(_CSRC / "eigh.cpp")]
    cflags = ["-O3"]
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources.append(str(_CSRC / "eigh_cuda.cu"))
        cflags.append("-DLORADAFAST_WITH_CUDA")
    name = extension_name(with_cuda)
    build_dir = build_directory(name)
    _wait_for_lock(build_dir, lock_timeout())
    if _needs_build(build_dir, name, sources):
        print(f"loradafast: compiling the native eigensolver once for this machine into {build_dir} "
              "(later runs reuse it; LORADAFAST_NO_NATIVE=1 skips it)", file=sys.stderr, flush=True)
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "-DLORADAFAST_WITH_CUDA"] if with_cuda else None,
        with_cuda=with_cuda,
        build_directory=str(build_dir),
        verbose=verbose,
    )


def extension_name(with_cuda: bool) -> str:
    return ("loradafast_native_cuda" if with_cuda else "loradafast_native") + _build_key()


def build_directory(name: str) -> Path:
    """Where torch builds and caches the extension ``name`` (created if missing)."""
    from torch.utils import cpp_extension

    get = getattr(cpp_extension, "_get_build_directory", None)  # torch's own rule, private
    if get is not None:
        return Path(get(name, False))
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wait_for_lock(build_dir: Path, timeout: float, poll: float = 0.25) -> None:
    """Wait while another build holds ``build_dir/lock``, until the lock is ``timeout`` seconds old.

    Counting from the file's modification time rather than from now means a lock left by a build
    killed long ago is recognised at once instead of after a fresh wait."""
    lock = build_dir / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= timeout:
            raise StaleLockError(
                f"{lock} has existed for {age:.0f} s (limit {timeout:.0f} s, LORADAFAST_NATIVE_LOCK_TIMEOUT): a build "
                f"of the native eigensolver was probably killed and left it behind. If no other process is building "
                f"it, delete the directory {build_dir} and run again")
        time.sleep(min(poll, timeout - age))


def _needs_build(build_dir: Path, name: str, sources: list[str]) -> bool:
    """Whether the cached library is missing or older than a source (ninja's own test, roughly)."""
    library = build_dir / f"{name}.so"
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any(Path(s).stat().st_mtime > built for s in sources if Path(s).exists())


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
