"""The micro-benchmark suite (pytest-benchmark): kernels, eigensolver, solve stages.

Not part of ``make test``: that collects ``tests/`` only (``testpaths`` in pyproject.toml), and
these files are named ``bench_*.py``, which pytest collects only when asked to (``make bench``
passes ``-o python_files=bench_*.py``).  Run it with::

    make bench                                  # writes benchmarks/results/micro_<device>.json
    make bench BENCH_ARGS="-k kfac"             # a subset

Sizes are small on CPU (a few minutes in all) and model-sized on CUDA.  This conftest does not
import pytest-benchmark (its hook below is optional), so it loads without the plugin.
"""
from __future__ import annotations

import os

import pytest
import torch
from _micro import DEVICE, ON_CUDA, THREADS, environment, sync


@pytest.hookimpl(optionalhook=True)  # pytest-benchmark's hook; absent without the plugin
def pytest_benchmark_update_machine_info(config, machine_info):
    """The harness's device and versions in the JSON's ``machine_info``, as every results file has."""
    machine_info["loradafast_environment"] = environment(DEVICE)
    if hasattr(os, "getloadavg"):  # other work on the machine shows here (the runs are not isolated)
        machine_info["load_avg_1min_at_end"] = os.getloadavg()[0]


@pytest.fixture(scope="session", autouse=True)
def native_built():
    """CPU threads fixed, and the native eigensolver built (or loaded) before the first timing: a
    build can take a minute."""
    from loradafast.linalg import native as _native

    if not ON_CUDA:
        torch.set_num_threads(THREADS)
    _native.load()


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def run(benchmark, device):
    """``run(fn, group=..., **extra)``: time ``fn`` (synchronised on CUDA) and record ``extra``
    (sizes, provider) in the JSON's ``extra_info``."""
    def go(fn, *, group: str, **extra):
        benchmark.group = group
        benchmark.extra_info.update(extra)

        def call():
            out = fn()
            sync(device)
            return out
        return benchmark(call)
    return go
