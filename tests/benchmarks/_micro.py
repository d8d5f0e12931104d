"""Shared by the micro-benchmarks: the device, and the benchmark harness of benchmarks/ on the path."""
from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
from _common import default_device, environment, sync  # noqa: E402

DEVICE = default_device()
ON_CUDA = DEVICE.type == "cuda"

__all__ = ["BENCHMARKS", "DEVICE", "ON_CUDA", "environment", "sync"]
