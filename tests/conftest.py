import os

import pytest
import torch
from devices import triton_devices

# Triton kernels run in the interpreter on machines without a GPU; the variable must be set
# before any kernel module is imported (Triton decides between compiling and interpreting when a
# kernel is decorated, and loradafast.kernels.kfac_triton reads it at import), which is why it
# lives here and not in a test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_generate_tests(metafunc):
    # Every test that takes ``triton_device`` runs once per device the Triton path can use here,
    # so the same tests pass on a CPU-only machine (interpreter) and on a CUDA one (compiled).
    if "triton_device" in metafunc.fixturenames:
        devices = triton_devices(torch.cuda.is_available(), os.environ.get("TRITON_INTERPRET", "0") == "1")
        params = devices or [pytest.param("none", marks=pytest.mark.skip(reason="no Triton device"))]
        metafunc.parametrize("triton_device", params)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
