"""The native batched symmetric eigensolver (csrc/) against float64 torch.linalg.eigh."""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from loradafast.linalg import eigen
from loradafast.linalg import native as _native

F64 = torch.float64


@pytest.fixture(scope="module")
def native():
    if not _native.available():
        pytest.skip(f"native extension unavailable (no compiler or the build failed): {_native.build_error()}")
    return _native


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request, native):
    """Each test runs on the CPU kernel and, where there is a GPU, on the CUDA one (csrc/eigh_cuda.cu)."""
    if request.param == "cuda" and not native.load().has_cuda():
        pytest.skip("the native extension was built without CUDA (no nvcc / CUDA_HOME)")
    return request.param


def _eigh(native, a: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = native.eigh(a.to(device))
    assert values.device.type == device and vectors.device.type == device
    return values.cpu(), vectors.cpu()


def _random_symmetric(batch, n, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, n, generator=gen, dtype=F64)
    return (a + a.mT).to(dtype)


def _with_spectrum(values: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(values.shape[0], values.shape[1], values.shape[1], generator=gen, dtype=F64))
    a = (q * values.unsqueeze(-2)) @ q.mT
    return 0.5 * (a + a.mT)


def _check(a: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor, rtol: float):
    a64 = a.to(F64)
    scale = float(torch.linalg.matrix_norm(a64, ord=2).max().clamp_min(1e-300))
    ref = torch.linalg.eigvalsh(a64)
    n = a.shape[-1]
    assert values.shape == a.shape[:-1] and vectors.shape == a.shape
    assert bool((values[..., 1:] >= values[..., :-1]).all()), "eigenvalues not ascending"
    assert float((values.to(F64) - ref).abs().max()) <= rtol * scale
    v = vectors.to(F64)
    recon = (v * values.to(F64).unsqueeze(-2)) @ v.mT
    assert float((recon - a64).abs().max()) <= rtol * scale
    eye = torch.eye(n, dtype=F64)
    assert float((v.mT @ v - eye).abs().max()) <= rtol * max(n, 1)


@pytest.mark.parametrize("n", [1, 2, 17, 100, 384])
def test_random_symmetric_float64(native, device, n):
    a = _random_symmetric(3 if n < 384 else 2, n, seed=n)
    values, vectors = _eigh(native, a, device)
    _check(a, values, vectors, rtol=1e-13 * max(n, 10))


@pytest.mark.parametrize("n", [17, 100])
def test_random_symmetric_float32(native, device, n):
    a = _random_symmetric(4, n, seed=n, dtype=torch.float32)
    values, vectors = _eigh(native, a, device)
    assert values.dtype == torch.float32
    _check(a, values, vectors, rtol=1e-5 * n ** 0.5)


@pytest.mark.parametrize("n", [2, 17, 100])
def test_repeated_eigenvalues(native, device, n):
    # Eigenvalues of multiplicity up to n/2 (and an exact zero block): the eigenvectors within a
    # multiple eigenvalue are not unique, so only the eigenvalues, A = VΛVᵀ and VᵀV = I are checked.
    base = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=F64)
    values = torch.stack([base.repeat_interleave((n + 3) // 4)[:n], torch.ones(n, dtype=F64),
                          torch.cat([torch.zeros(n // 2, dtype=F64), torch.full((n - n // 2,), 5.0, dtype=F64)])])
    a = _with_spectrum(values, seed=n)
    got, vectors = _eigh(native, a, device)
    _check(a, got, vectors, rtol=1e-13 * max(n, 10))
    torch.testing.assert_close(got, values.sort(-1).values, atol=1e-12 * n, rtol=0)


def test_diagonal_zero_and_graded(native, device):
    n = 50
    graded = torch.diag_embed(torch.logspace(-12, 12, n, dtype=F64)).unsqueeze(0)
    zero = torch.zeros(1, n, n, dtype=F64)
    for a in (graded, zero):
        values, vectors = _eigh(native, a, device)
        _check(a, values, vectors, rtol=1e-14)


def test_reads_lower_triangle_only(native, device):
    a = _random_symmetric(3, 33, seed=0)
    garbage = a.clone()
    garbage.triu_(1).add_(torch.randn_like(a).triu(1) * 1e3)
    garbage = torch.tril(a) + garbage
    v1, x1 = _eigh(native, a, device)
    v2, x2 = _eigh(native, garbage, device)
    assert torch.equal(v1, v2) and torch.equal(x1, x2)


def test_leading_batch_dims_and_empty(native, device):
    a = _random_symmetric(6, 9, seed=1).reshape(2, 3, 9, 9)
    values, vectors = _eigh(native, a, device)
    assert values.shape == (2, 3, 9) and vectors.shape == (2, 3, 9, 9)
    values, vectors = _eigh(native, torch.zeros(0, 5, 5, dtype=F64), device)
    assert values.shape == (0, 5)


def test_dispatch_matches_torch(native):
    a = _random_symmetric(8, 24, seed=2)
    assert native.prefer_native(a)
    values, vectors = eigen.batched_eigh(a)
    ref_values, ref_vectors = torch.linalg.eigh(a)
    torch.testing.assert_close(values, ref_values, atol=1e-12, rtol=0)
    torch.testing.assert_close(eigen.canonicalize_signs(vectors), eigen.canonicalize_signs(ref_vectors),
                               atol=1e-10, rtol=0)


@pytest.mark.skipif(os.environ.get("LORADAFAST_TEST_NVCC", "") in ("", "0"),
                    reason="compiles the CUDA kernel with nvcc (about a minute); set LORADAFAST_TEST_NVCC=1")
def test_cuda_source_compiles(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    include = Path(torch.__file__).parent / "include"
    # CPU builds of torch ship c10/cuda headers without their generated config header; an empty
    # one is enough to compile (it only defines the shared-library export macro).
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not (include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    src = _native._CSRC / "eigh_cuda.cu"
    cmd = [nvcc, "-c", "-std=c++20", "-O3", f"-I{tmp_path / 'stub'}", f"-I{include}",
           f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{sysconfig.get_paths()['include']}",
           "-o", str(tmp_path / "eigh_cuda.o"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ---- the build: one line when it compiles, and a lock file left by a killed build -------------------

@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """``load()`` as in a new process, building into ``tmp_path`` with torch's build replaced by a
    stub that records its calls (the real build is exercised by the tests above)."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_error", None)
    monkeypatch.delenv("LORADAFAST_NO_NATIVE", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or "module")
    return calls


def _build_dir():
    return _native.build_directory(_native.extension_name(torch.cuda.is_available()))


def test_a_build_says_so_once(fresh_load, capsys):
    assert _native.load() == "module"
    assert _native.load() == "module"
    err = capsys.readouterr().err
    assert err.count("compiling the native eigensolver") == 1 and str(_build_dir()) in err
    assert len(fresh_load) == 1 and fresh_load[0]["build_directory"] == str(_build_dir())


def test_an_up_to_date_build_is_loaded_silently(fresh_load, capsys):
    library = _build_dir() / f"{_native.extension_name(torch.cuda.is_available())}.so"
    library.write_bytes(b"")
    newer = max((_native._CSRC / name).stat().st_mtime for name in _native._SOURCES) + 10
    os.utime(library, (newer, newer))
    assert _native.load() == "module"
    assert "compiling" not in capsys.readouterr().err


@pytest.mark.parametrize("age_s", [0.0, 3600.0])
def test_a_stale_lock_gives_up_and_names_the_directory(fresh_load, monkeypatch, age_s):
    # A fresh lock is waited on until it is as old as the timeout; one left by an old run at once.
    import time

    monkeypatch.setenv("LORADAFAST_NATIVE_LOCK_TIMEOUT", "1.0")
    lock = _build_dir() / "lock"
    lock.write_text("")
    then = time.time() - age_s
    os.utime(lock, (then, then))
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="delete the directory") as record:
        assert _native.load() is None
    waited = time.monotonic() - start
    assert (0.5 <= waited < 10) if age_s == 0 else waited < 0.5
    assert str(_build_dir()) in str(record[0].message) and "StaleLockError" in _native.build_error()
    assert fresh_load == []  # torch's build, which would wait forever, was never reached


def test_a_lock_released_in_time_lets_the_build_proceed(fresh_load, monkeypatch):
    import threading

    monkeypatch.setenv("LORADAFAST_NATIVE_LOCK_TIMEOUT", "30")
    lock = _build_dir() / "lock"
    lock.write_text("")
    threading.Timer(0.5, lock.unlink).start()  # another process finishing its build
    assert _native.load() == "module" and len(fresh_load) == 1


def test_sources_found_in_a_checkout_and_in_a_wheel(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[2]
    assert _native._CSRC == root / "csrc" and all((root / "csrc" / n).is_file() for n in _native._SOURCES)
    # An installed package carries its own copy, which wins over anything beside it.
    package = tmp_path / "site" / "loradafast"
    (package / "linalg").mkdir(parents=True)
    (package / "csrc").mkdir()
    for name in _native._SOURCES:
        (package / "csrc" / name).write_text("")
    monkeypatch.setattr(_native, "__file__", str(package / "linalg" / "native.py"))
    assert _native._find_csrc() == package / "csrc"


@pytest.mark.parametrize("path", eigen.EIGH_PATHS)
def test_every_small_eigh_path_agrees(native, path, monkeypatch):
    """Each path batched_eigh can take on a GPU, run here on the CPU (the host round trip is then a
    no-op copy, its logic the same), and the environment override."""
    a = _random_symmetric(5, 48, seed=3)
    ref_values, ref_vectors = torch.linalg.eigh(a)
    values, vectors = eigen.batched_eigh(a, path)
    torch.testing.assert_close(values, ref_values, atol=1e-11, rtol=0)
    torch.testing.assert_close(eigen.canonicalize_signs(vectors), eigen.canonicalize_signs(ref_vectors),
                               atol=1e-9, rtol=0)
    monkeypatch.setenv("LORADAFAST_EIGH_PATH", path)
    torch.testing.assert_close(eigen.batched_eigh(a)[0], ref_values, atol=1e-11, rtol=0)
    with pytest.raises(ValueError, match="path must be one of"):
        eigen.batched_eigh(a, "gpu")
