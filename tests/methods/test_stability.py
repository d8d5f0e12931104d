"""Split-half stability (loradafast.methods.stability): the pass keeps every second batch's sums, the
solve compares the subspaces of the two halves, and warns when the data do not determine them."""
from __future__ import annotations

import warnings

import pytest
import torch

import loradafast
from loradafast.methods.stability import subspace_overlap
from loradafast.statistics.sums import LayerStats, Statistics
from tiny import padded_batches, random_sequences, tiny_llama

IN, OUT, RANK = 64, 48, 4
TOKENS, SEQUENCES = 1000, 10  # per half


def _half(gradients: dict[str, torch.Tensor]) -> Statistics:
    """Statistics of one half whose mean gradients are ``gradients``; Z = I and Y = 1 (so that Δ ∝ G)."""
    layers = {n: LayerStats(n, IN, OUT, (g * SEQUENCES).float(), torch.full((OUT,), float(TOKENS)), n)
              for n, g in gradients.items()}
    return Statistics(layers, {n: torch.eye(IN) * TOKENS for n in gradients}, TOKENS, SEQUENCES, "diag")


def _total(even: Statistics, odd: Statistics) -> Statistics:
    layers = {n: LayerStats(n, IN, OUT, s.g_sum + odd.layers[n].g_sum, s.y_sum + odd.layers[n].y_sum, n)
              for n, s in even.layers.items()}
    z = {k: v + odd.z_sums[k] for k, v in even.z_sums.items()}
    return Statistics(layers, z, 2 * TOKENS, 2 * SEQUENCES, "diag", half=odd)


def _statistics(planted: int, noise: int, seed: int = 0) -> Statistics:
    """``planted`` layers whose gradient has RANK strong directions shared by both halves, and
    ``noise`` layers whose halves' gradients are independent noise."""
    g = torch.Generator().manual_seed(seed)
    halves = [{}, {}]
    for i in range(planted):
        u, _ = torch.linalg.qr(torch.randn(OUT, RANK, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(IN, RANK, generator=g, dtype=torch.float64))
        signal = u @ torch.diag(torch.linspace(10, 5, RANK, dtype=torch.float64)) @ v.T
        for h in halves:
            h[f"planted.{i}"] = signal + 0.02 * torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    for i in range(noise):
        for h in halves:
            h[f"noise.{i}"] = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    return _total(_half(halves[0]), _half(halves[1]))


def test_subspace_overlap_of_known_subspaces():
    q, _ = torch.linalg.qr(torch.randn(50, 6, dtype=torch.float64))
    a, b = q[:, :3].T, q[:, 3:].T
    assert subspace_overlap(a, 7 * a)[0] == pytest.approx(1.0)
    assert subspace_overlap(a, 7 * a)[1] == pytest.approx(0.0, abs=1e-6)
    assert subspace_overlap(a, b) == pytest.approx((0.0, 1.0), abs=1e-12)
    mixed = (q[:, :3] @ torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))).T + b * torch.tensor(
        [0.0, 0.0, 1.0], dtype=torch.float64)[:, None]  # two shared directions, one orthogonal
    assert subspace_overlap(a, mixed) == pytest.approx((2 / 3, 1.0), abs=1e-12)


@pytest.mark.parametrize("method", ["lora-da", "lora-one"])
def test_noise_is_flagged_and_a_planted_direction_is_not(method):
    stats = _statistics(planted=3, noise=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # most layers are supported: no warning
        result = loradafast.solve(stats, RANK, method=method)
    d = {name: layer.diagnostics for name, layer in result.layers.items()}
    for i in range(3):
        assert d[f"planted.{i}"].split_half_overlap > 0.99
        assert d[f"planted.{i}"].split_half_sine < 0.1
    assert d["noise.0"].split_half_overlap < 0.5
    assert d["noise.0"].random_overlap == pytest.approx(RANK / IN)
    assert "split_half_s" in result.timings
    # The totals' factors are those of a solve without halves.
    alone = loradafast.solve(Statistics(stats.layers, stats.z_sums, stats.num_tokens, stats.num_sequences, "diag"),
                             RANK, method=method)
    for name, layer in result.layers.items():
        assert torch.equal(layer.lora_A, alone.layers[name].lora_A)
        assert alone.layers[name].diagnostics.split_half_overlap is None


def test_mostly_noise_warns_with_the_figure_and_what_to_do():
    stats = _statistics(planted=1, noise=3)
    with pytest.warns(UserWarning, match=r"barely determine.*median .*%.*1 of 4 layers.*damping=10.*lora-one"):
        loradafast.solve(stats, RANK)


def test_collect_keeps_the_odd_batches_and_the_totals_are_unchanged(tmp_path):
    model, loader = tiny_llama(), padded_batches(random_sequences(10), 2)  # 5 batches: 3 even, 2 odd
    stats = loradafast.collect(model, loader, progress=False, split_halves=True)
    plain = loradafast.collect(model, loader, progress=False, split_halves=False)
    assert plain.half is None and stats.half is not None
    assert stats.half.num_sequences == 4
    for name, s in stats.layers.items():
        for t, u in ((s.g_sum, plain.layers[name].g_sum), (s.y_sum, plain.layers[name].y_sum)):
            torch.testing.assert_close(t, u, rtol=1e-5, atol=1e-6 * u.abs().max().item())
    # The odd half is exactly a pass over the odd batches alone.
    odd = loradafast.collect(model, loader[1::2], progress=False, split_halves=False)
    assert (stats.half.num_tokens, stats.half.num_sequences) == (odd.num_tokens, odd.num_sequences)
    for name, s in odd.layers.items():
        torch.testing.assert_close(stats.half.layers[name].g_sum, s.g_sum, rtol=1e-5, atol=1e-6 * s.g_sum.abs().max())
    for key, z in odd.z_sums.items():
        torch.testing.assert_close(stats.half.z_sums[key], z, rtol=1e-5, atol=1e-6 * z.abs().max())
    even, odd_half = stats.halves()
    assert even.num_sequences == 6 and odd_half.num_sequences == 4
    stats.save(tmp_path / "s.safetensors")
    loaded = loradafast.Statistics.load(tmp_path / "s.safetensors")
    assert loaded.half.num_tokens == stats.half.num_tokens
    for name, s in stats.half.layers.items():
        assert torch.equal(loaded.half.layers[name].g_sum, s.g_sum)
    # One batch has no second half: nothing kept, no diagnostic.
    single = loradafast.collect(model, loader[:1], progress=False, split_halves=True)
    assert single.half is None


def test_initialize_reports_the_overlap_in_the_diagnostics_table_and_report(tmp_path):
    model, loader = tiny_llama(), padded_batches(random_sequences(8), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a tiny random model: its subspaces are noise
        result = loradafast.initialize(model, loader, 2, progress=False)
    overlaps = [layer.diagnostics.split_half_overlap for layer in result.layers.values()]
    assert all(0.0 <= o <= 1.0 for o in overlaps)
    assert "½-overlap" in result.summary().splitlines()[0]
    report = result.report(tmp_path / "report", plots=True).read_text()
    assert "split_half_overlap" in report
    assert (tmp_path / "report" / "split_half.png").exists() or "matplotlib is not installed" in report
