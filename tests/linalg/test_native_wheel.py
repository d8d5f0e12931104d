"""The native sources live in csrc/ at the top of the repository; a wheel carries them inside the
package (setup.py's build step), and an sdist carries csrc/ for the wheels built from it."""
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ("eigh.cpp", "eigh_cuda.cu")


def _copy_sources(dest: Path) -> Path:
    # A copy: setuptools writes build/ and *.egg-info beside the sources.
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "loradafast", "csrc"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    return dest


def test_native_sources_live_at_the_top_only():
    assert all((ROOT / "csrc" / name).is_file() for name in NATIVE)
    assert not (ROOT / "loradafast" / "csrc").exists()


def test_wheel_and_sdist_carry_the_native_sources(tmp_path):
    src = _copy_sources(tmp_path / "src")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("loradafast-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in NATIVE:
            assert z.read(f"loradafast/csrc/{name}") == (ROOT / "csrc" / name).read_bytes()
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "sdist")], cwd=src,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    (sdist,) = (tmp_path / "sdist").glob("loradafast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {f"csrc/{name}" for name in NATIVE} <= names


def test_a_wheel_build_without_the_sources_fails_loudly(tmp_path):
    src = _copy_sources(tmp_path / "src")
    shutil.rmtree(src / "csrc")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "no native sources" in out.stdout + out.stderr
