# Metadata lives in pyproject.toml; this file adds one build step.
# The native eigensolver's sources live in csrc/ at the top of the repository (beside the package,
# not inside it) and are compiled on the user's machine on first use (loradafast/linalg/native.py,
# torch.utils.cpp_extension.load), so a wheel must carry them: build_py copies them into the built
# package as loradafast/csrc/, where native.py looks first.
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"
NATIVE_SOURCES = ("*.cpp", "*.cu", "*.h", "*.cuh")


class build_py_with_csrc(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install runs from the checkout, where native.py finds csrc/ itself
        sources = sorted(p for pattern in NATIVE_SOURCES for p in CSRC.glob(pattern))
        if not sources:
            raise FileNotFoundError(f"no native sources in {CSRC}: the wheel would lack the eigensolver")
        dest = Path(self.build_lib) / "loradafast" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for path in sources:
            shutil.copyfile(path, dest / path.name)


setup(cmdclass={"build_py": build_py_with_csrc})
