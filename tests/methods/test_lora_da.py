"""LoRA-DA solve: Remark 4.3, the factor formulas, ranks and damping options."""
import dataclasses

import pytest
import torch

import loradafast
from loradafast.linalg.eigen import span_sine as sin_largest_angle
from loradafast.methods import lora_da
from loradafast.methods.lora_da import solve as lora_da_solve
from tiny import padded_batches, random_sequences, tiny_gpt2, tiny_llama




@pytest.fixture(scope="module")
def llama_stats():
    return loradafast.collect(tiny_llama(), padded_batches(random_sequences(8), 4), progress=False)


@pytest.mark.parametrize("r", [1, 3, 8])
def test_remark_4_3_raw_gradient_without_variance_is_top_right_singular_space(llama_stats, r):
    result = loradafast.solve(llama_stats, r, beta=0.0, gradient="raw")
    for name, layer in result.layers.items():
        G = llama_stats.G(name)
        _, s, vh = torch.linalg.svd(G)
        assert s[r - 1] > 1.01 * s[r], "test needs a singular-value gap for the subspace to be defined"
        assert sin_largest_angle(layer.lora_A.T, vh[:r].T) < 1e-5, name


def test_factor_formulas(llama_stats):
    gamma = 64.0
    result = loradafast.solve(llama_stats, 4, gamma=gamma)
    for name, layer in result.layers.items():
        s = llama_stats.layers[name]
        f = lora_da.damped_factors(llama_stats.Z(name), llama_stats.Y(name), 1e-6)
        terms = lora_da.omega_terms(llama_stats.G(name), f, beta=0.03, num_train_samples=100_000)
        vals, vecs = torch.linalg.eigh(terms.dense())
        a0 = layer.lora_A.double().T * gamma**0.5
        assert layer.lora_A.shape == (4, s.in_features) and layer.lora_B.shape == (s.out_features, 4)
        torch.testing.assert_close(a0.T @ a0, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
        assert sin_largest_angle(a0, vecs[:, :4]) < 1e-5
        torch.testing.assert_close(layer.lora_B.double(), terms.delta_hat @ a0 / gamma**0.5, rtol=1e-5, atol=1e-8)
        d = layer.diagnostics
        torch.testing.assert_close(d["eigenvalues"], vals[:4])
        assert d["residual"] < 1e-10 and not d["eigensolver_fallback"]
        assert d["damping_z"] == d["damping_y"] == 1e-6
        assert d["num_tokens"] == llama_stats.num_tokens


def test_relative_damping_and_full_y():
    stats = loradafast.collect(tiny_gpt2(), padded_batches(random_sequences(4), 4), y_factor="full", progress=False)
    result = loradafast.solve(stats, 2, damping=1e-3, damping_mode="relative")
    for name, layer in result.layers.items():
        expected = 1e-3 * float(stats.Z(name).diagonal().mean())
        assert layer.diagnostics["damping_z"] == pytest.approx(expected)
        assert torch.isfinite(layer.lora_B).all()


def test_variance_term_moves_the_subspace(llama_stats):
    """β > 0 must matter (guards against the variance term silently dropping out)."""
    plain = loradafast.solve(llama_stats, 4, beta=0.0)
    heavy = loradafast.solve(llama_stats, 4, beta=1e6)
    moved = [sin_largest_angle(plain.layers[n].lora_A.T, heavy.layers[n].lora_A.T) for n in plain.layers]
    assert max(moved) > 0.1


@pytest.mark.parametrize("bad", [0, -1, 25])
def test_rank_out_of_range(llama_stats, bad):
    with pytest.raises(ValueError, match="rank"):
        loradafast.solve(llama_stats, bad)


@pytest.fixture(scope="module")
def wide_stats():
    # Wide enough (96, 160) that the batched LOBPCG runs instead of its small-n dense shortcut.
    model = tiny_llama(hidden_size=96, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    return loradafast.collect(model, padded_batches(random_sequences(6, lengths=(8, 16)), 3), progress=False)


@pytest.mark.parametrize("r", [1, 4])
def test_batched_lobpcg_matches_dense_on_real_statistics(wide_stats, r):
    """Ω from a real (tiny) model: T ≈ 70 tokens < 96 inputs, so Z is rank-deficient and Ω spans
    c/λ; the batched iterative solve must find the same subspace as dense eigh."""
    dense = loradafast.solve(wide_stats, r, eigensolver="dense")
    lobpcg = loradafast.solve(wide_stats, r, eigensolver="lobpcg")
    for name in dense.layers:
        d, l = dense.layers[name].diagnostics, lobpcg.layers[name].diagnostics
        # Tiny statistics have a negligible variance term: block Lanczos runs first (linalg/eigen.py).
        assert d["eigensolver"] == "dense" and l["eigensolver"] in {"lobpcg", "block-lanczos", "block-lanczos+lobpcg"}
        assert not l["eigensolver_fallback"], name
        ev = torch.linalg.eigvalsh(lora_da.omega_terms(
            wide_stats.G(name), lora_da.damped_factors(wide_stats.Z(name), wide_stats.Y(name), 1e-6),
            beta=0.03, num_train_samples=100_000).dense())
        if ev[r] - ev[r - 1] < 1e-6 * ev.abs().max():
            continue  # no gap: the r-dimensional subspace is not defined
        assert sin_largest_angle(dense.layers[name].lora_A.T, lobpcg.layers[name].lora_A.T) < 1e-4, name


@pytest.mark.parametrize("spectrum", ["decay", "rank-deficient", "flat"])
def test_condition_estimate_is_a_tight_lower_bound(spectrum):
    """(max Lᵢᵢ / min Lᵢᵢ)² alone said 1e4 for a Zλ of condition 1e6, and the float32 warning stayed silent."""
    n = 97
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    eig = {"decay": torch.logspace(0, -6, n, dtype=torch.float64),
           "rank-deficient": torch.cat([torch.logspace(3, 1, 40, dtype=torch.float64), torch.zeros(n - 40)]),
           "flat": torch.full((n,), 2.0, dtype=torch.float64)}[spectrum]
    z = (q * eig) @ q.T
    exact = float(torch.linalg.cond(z + 1e-6 * torch.eye(n, dtype=torch.float64)))
    factors = lora_da.damped_factors(z, torch.ones(3, dtype=torch.float64), 1e-6)
    estimate, _ = lora_da.condition_estimate(factors, tight=True)
    assert 0.3 * exact <= estimate <= exact * (1 + 1e-6)


def test_degraded_solve_warns(llama_stats):
    with pytest.warns(RuntimeWarning, match="condition number"):
        result = loradafast.solve(llama_stats, 2, dtype=torch.float32, damping=1e-9)
    assert any(l.diagnostics["z_condition_estimate"] > 1e5 for l in result.layers.values())


def test_shared_inputs_are_factorised_once(llama_stats, monkeypatch):
    """Every input's Zλ is factorised once (in batches of same-shaped inputs), not once per layer."""
    factorised = []
    real = lora_da_solve.damped_cholesky_stack
    monkeypatch.setattr(lora_da_solve, "damped_cholesky_stack",
                        lambda m, d: factorised.append(m.shape[0]) or real(m, d))
    assert llama_stats.y_factor == "diag"  # no Y factorisations to count
    loradafast.solve(dataclasses.replace(llama_stats, half=None), 2)  # one solve (the halves would add two)
    assert sum(factorised) == len(llama_stats.z_sums) < len(llama_stats.layers)


def test_damping_raised_when_fp32_round_off_makes_Z_indefinite():
    """Fewer tokens than inputs: Z is singular, and its fp32 sum carries negative eigenvalues far
    above the official absolute damping of 1e-6 (seen on SmolLM2's down_proj with 1024 tokens)."""
    g = torch.Generator().manual_seed(0)
    x = 30 * torch.randn(10, 64, generator=g)  # T = 10 < 64 inputs
    z_sum = torch.zeros(64, 64)
    for row in x:  # summed in fp32, one token at a time, like the collect pass
        z_sum += torch.outer(row, row)
    z_sum = 0.5 * (z_sum + z_sum.T)
    Z = z_sum.double() / 10
    assert torch.linalg.eigvalsh(Z)[0] < -1e-6, "the fp32 round-off must exceed the default damping here"
    z = lora_da.damped_z(Z, 1e-6)
    assert z.raised and z.damping > 1e-6
    assert z.damping <= 1e3 * torch.finfo(torch.float32).eps * float(Z.diagonal().max())
    with pytest.raises(torch.linalg.LinAlgError):
        lora_da.damped_z(Z, 0.0)  # no damping asked: no silent damping either
    stats = loradafast.Statistics(
        {"w": loradafast.LayerStats("w", 64, 5, torch.randn(5, 64, generator=g), torch.rand(5, generator=g), "w")},
        {"w": z_sum}, num_tokens=10, num_sequences=2, y_factor="diag")
    with pytest.warns(RuntimeWarning, match="damping raised"):
        result = loradafast.solve(stats, 2)
    d = result.layers["w"].diagnostics
    assert d["damping_raised"] and d["damping_z"] == z.damping
