# Metadata lives in pyproject.toml; this file exists for tools that still call setup.py directly.
# The native extension in csrc/ is compiled on first use (torch.utils.cpp_extension.load), not here.
from setuptools import setup

setup()
