"""Memory that a 7B run would not survive, accounted for by tensor sizes on the CPU."""
from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loradafast import kernels
from loradafast.statistics import collector


class LiveBytes(TorchDispatchMode):
    """Peak bytes held by the tensors that ops allocate (outputs not sharing an input's storage)
    under this mode, each counted until it is garbage: the extra memory of the code run under
    it, as a CUDA allocator's peak would show it (CPU torch has no memory tracking)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, nbytes)
        return out


@pytest.mark.parametrize("n,block", [(1, 256), (7, 3), (300, 256), (513, 64), (40, 1)])
def test_symmetrize_in_place_matches_the_copy(n, block):
    acc = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    want = kernels.symmetric_from_lower(acc)
    ptr = acc.data_ptr()
    got = kernels.symmetrize_lower_(acc, block=block)
    assert got.data_ptr() == ptr and torch.equal(got, want)


def test_statistics_mirror_the_triangles_without_a_second_copy():
    # Three input groups and two layers with a full Y: the end of collect used to hold every
    # lower-triangle accumulator and its full copy at once (~2x Z, ~83 GB at 7B). Now the extra
    # memory at any time is a few diagonal tiles (256 x 256), less than the smallest matrix here.
    gen = torch.Generator().manual_seed(0)
    widths = {"a": 1200, "b": 1040, "c": 1400}
    acc = SimpleNamespace(
        z_sum={k: torch.randn(d, d, generator=gen) for k, d in widths.items()},
        g_sum={"l1": torch.randn(600, 1200, generator=gen), "l2": torch.randn(1040, 1040, generator=gen)},
        y_sum={"l1": torch.randn(600, 600, generator=gen), "l2": torch.randn(1040, 1040, generator=gen)},
        input_group={"l1": "a", "l2": "b"},
        got_grad={"l1", "l2"},
    )
    targets = [SimpleNamespace(name="l1", in_features=1200, out_features=600, kind="linear"),
               SimpleNamespace(name="l2", in_features=1040, out_features=1040, kind="linear")]
    want_z = {k: kernels.symmetric_from_lower(v) for k, v in acc.z_sum.items()}
    want_y = {k: kernels.symmetric_from_lower(v) for k, v in acc.y_sum.items()}
    counts = torch.tensor([4, 4])
    with LiveBytes() as mem:
        stats = collector._statistics(acc, targets, counts, "full", {})
    assert mem.peak <= 3 * 4 * 256 * 256 < 4 * 600 * 600, mem.peak
    for k in widths:
        assert torch.equal(stats.z_sums[k], want_z[k])
    for name in ("l1", "l2"):
        assert torch.equal(stats.layers[name].y_sum, want_y[name])


def _bench_eigen():
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("bench_eigen", bench / "bench_eigen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_eigen_groups_fit_an_80_gb_gpu_by_a_measured_slot_count():
    # The slot model (PEAK_SLOTS float64 [batch, n, n] tensors) against the live bytes of one
    # small group run as on the GPU (same code, CPU tensors), then applied to the GPU groups.
    be = _bench_eigen()
    batch, n, out, tokens = 3, 64, 64, 48
    with LiveBytes() as mem:
        z_lambda, chol, c, delta_hat = be.make_group(batch, n, out, tokens, "cpu", seed=0)
        be.bench_group(z_lambda, chol, c, delta_hat, 4, "cpu", False)
    assert mem.peak <= be.peak_bytes(batch, n), (mem.peak / (batch * n * n * 8), be.PEAK_SLOTS)
    for batch, n, _, _ in be.GPU_GROUPS:
        assert be.peak_bytes(batch, n) <= 0.9 * 80e9
    with pytest.raises(SystemExit, match="GiB"):
        be.check_memory([(192, 4096, 4096, 2048)], 80 * 2**30)  # the whole model's 192 layers would not
