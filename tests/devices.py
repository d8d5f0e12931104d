"""Which devices the Triton-path tests run on (used by conftest.py and tested in kernels/test_kernels.py)."""


def triton_devices(cuda: bool, interpreting: bool) -> list[str]:
    """Where the Triton-path tests run: ``"cpu"`` only in the interpreter (a compiled kernel
    cannot read CPU tensors), ``"cuda"`` wherever there is a GPU (compiled, or interpreted with
    host copies when ``TRITON_INTERPRET=1`` was set by hand)."""
    return (["cpu"] if interpreting else []) + (["cuda"] if cuda else [])
