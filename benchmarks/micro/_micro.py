"""Shared by the micro-benchmarks: the device, and the benchmark harness of benchmarks/ (the
parent folder: ``_common`` and the scripts whose providers the suite reuses) on the path."""
from __future__ import annotations

import os
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
from _common import default_device, environment, sync  # noqa: E402

DEVICE = default_device()
ON_CUDA = DEVICE.type == "cuda"
# CPU threads for the whole suite (BENCH_THREADS, default 1, as overhead.py and bench_scale.py):
# on a small shared machine, OpenMP teams stall at every barrier when another process takes a
# core (measured: benchmarks/README.md, "One torch thread on CPU").
THREADS = int(os.environ.get("BENCH_THREADS", "1"))

__all__ = ["BENCHMARKS", "DEVICE", "ON_CUDA", "THREADS", "environment", "sync"]
