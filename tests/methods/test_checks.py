"""What a solve reads and returns is finite, or the solve says which layer and what to do
(loradafast/methods/checks.py), and the float32 paths that overflowed no longer do.

The cases come from a numerical fuzz of ``solve`` (one layer, n = 96, out = 48, 200 tokens)."""
import pytest
import torch

import loradafast
from loradafast.linalg.eigen import span_sine
from loradafast.statistics.sums import LayerStats, Statistics


def _stats(n=96, out=48, tokens=200, g_scale=1.0, seed=0) -> Statistics:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    grads = torch.randn(tokens, out, generator=g, dtype=torch.float64)
    layer = LayerStats("l0", n, out, (grads.T @ x * g_scale).float(), (grads * grads).sum(0).float(), "x")
    return Statistics({"l0": layer}, {"x": (x.T @ x).float()}, tokens, 8, "diag", {})


@pytest.mark.parametrize("where, method", [("Z", "lora-da"), ("G", "lora-da"), ("Y", "lora-da"), ("G", "lora-ga")])
def test_non_finite_statistics_are_named(where, method):
    stats = _stats()
    layer = stats.layers["l0"]
    target = {"Z": stats.z_sums["x"], "G": layer.g_sum, "Y": layer.y_sum}[where]
    target.view(-1)[3] = float("inf") if where != "G" else float("nan")
    with pytest.raises(FloatingPointError, match=rf"statistics hold non-finite.*\['l0 \({where}\)'\]|\['x \(Z\)'\]"):
        loradafast.solve(stats, 4, method=method)


def test_statistics_a_method_does_not_read_are_not_checked():
    stats = _stats()
    stats.z_sums["x"][0, 0] = float("inf")  # LoRA-GA reads G only
    assert torch.isfinite(loradafast.solve(stats, 4, method="lora-ga").layers["l0"].lora_B).all()


def test_statistics_of_no_data():
    stats = _stats()
    stats.num_sequences = 0
    with pytest.raises(ValueError, match="collected from no data"):
        loradafast.solve(stats, 4)


@pytest.mark.parametrize("method", ["pissa", "fisher-subspace"])
def test_non_finite_weights_are_named(method):
    weight = torch.randn(48, 96)
    weight[5, 7] = float("nan")
    stats = _stats() if method == "fisher-subspace" else None
    with pytest.raises(FloatingPointError, match=r"base weights hold non-finite values for 1 layer.*\['l0'\]"):
        loradafast.solve(stats, 4, method=method, weights={"l0": weight})


@pytest.mark.parametrize("eigensolver, n, out, tokens, r", [("lobpcg", 96, 48, 200, 4), ("auto", 512, 128, 2000, 8)])
def test_float32_operator_norm_overflow_is_refused_not_returned(eigensolver, n, out, tokens, r):
    """‖Ω‖₂ ≈ 7e20 (a tiny gradient, so a huge variance coefficient): float32 norms of ΩX overflowed,
    residuals became 0 and a subspace 0.97 (sin θ) from the right one came back "converged"."""
    stats = _stats(n=n, out=out, tokens=tokens, g_scale=1e-14)
    reference = loradafast.solve(stats, r, eigensolver="dense").layers["l0"]
    assert reference.diagnostics.omega_norm > 1.8e19  # its square passes float32's max
    with pytest.raises(FloatingPointError, match="in float32 .* solve in float64"):
        loradafast.solve(stats, r, dtype=torch.float32, eigensolver=eigensolver)


def test_float32_rough_sigma_above_float32_square_root_of_max():
    """σ ≈ 7e19: the power steps formed ΔᵀΔx (σ² > float32's max) and LAPACK raised on the NaN."""
    stats = _stats(g_scale=1e17)
    f64 = loradafast.solve(stats, 4).layers["l0"]
    f32 = loradafast.solve(stats, 4, dtype=torch.float32, eigensolver="dense").layers["l0"]
    assert f64.diagnostics.sigma > 1.8e19
    assert f32.diagnostics.sigma == pytest.approx(f64.diagnostics.sigma, rel=1e-3)
    assert span_sine(f32.lora_A.T, f64.lora_A.T) < 1e-2


def test_fisher_energies_keep_their_order_in_float32():
    """W·1e19: σ²(uᵀYu)(vᵀZv) overflowed float32, every energy was inf and the kept triplets were
    arbitrary (sin θ = 1 against float64)."""
    stats = _stats(out=64)
    weights = {"l0": torch.randn(64, 96, generator=torch.Generator().manual_seed(5)) * 1e19}
    f64 = loradafast.solve(stats, 4, method="fisher-subspace", weights=weights).layers["l0"]
    f32 = loradafast.solve(stats, 4, method="fisher-subspace", weights=weights, dtype=torch.float32).layers["l0"]
    assert f32.diagnostics.singular_indices.tolist() == f64.diagnostics.singular_indices.tolist()
    assert span_sine(f32.lora_A.T, f64.lora_A.T) < 1e-3
