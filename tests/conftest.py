import os

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU; the variable must be set
# before any kernel module is imported, which is why it lives here and not in a test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
