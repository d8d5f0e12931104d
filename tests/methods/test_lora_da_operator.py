"""The implicit Ω products of a shared-input group against the dense per-layer reference
(lora_da.omega_terms), on awkward shapes: widths that are not powers of two, layers with more
and fewer outputs than inputs, a rank-deficient Z, full and diagonal Y, the raw-gradient ablation."""
import pytest
import torch

import loradafast
from loradafast.methods import lora_da
from loradafast.methods.lora_da import operator as lora_da_operator
from loradafast.methods.lora_da import solve as lora_da_solve
from loradafast.linalg.eigen import span_sine
from loradafast.planner import MemoryModel
from loradafast.statistics.sums import LayerStats, Statistics

N_IN, OUTS, TOKENS = 37, (53, 11, 37), 29  # T < n: Z singular, as with few samples


def _stats(y_factor: str, seed: int = 0) -> Statistics:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, N_IN, generator=g, dtype=torch.float64) * torch.logspace(0, -3, N_IN, dtype=torch.float64)
    layers = {}
    for i, out in enumerate(OUTS):
        grads = torch.randn(TOKENS, out, generator=g, dtype=torch.float64)
        y = grads.T @ grads if y_factor == "full" else (grads * grads).sum(0)
        layers[f"l{i}"] = LayerStats(f"l{i}", N_IN, out, (grads.T @ x).float(), y.float(), "shared")
    return Statistics(layers, {"shared": (x.T @ x).float()}, TOKENS, 4, y_factor, {})


def _group(stats, gradient="fisher", beta=0.03):
    names = sorted(stats.layers)
    config = loradafast.LoraDAConfig(beta=beta, num_train_samples=1000, alpha_b=1.0, damping=1e-6,
                                     damping_mode="absolute", gradient=gradient, dtype=torch.float64)
    group = lora_da_solve._stack_operator(stats, [("shared", names)], config, torch.device("cpu"), times={})
    terms = [lora_da.omega_terms(stats.G(k), lora_da.damped_factors(stats.Z(k), stats.Y(k), 1e-6), beta=beta,
                                 num_train_samples=1000, gradient=gradient) for k in names]
    return group, terms


@pytest.mark.parametrize("y_factor", ["diag", "full"])
@pytest.mark.parametrize("gradient", ["fisher", "raw"])
def test_products_match_dense_reference(y_factor, gradient):
    group, terms = _group(_stats(y_factor), gradient)
    group.refine_sigma(None, tol=1e-12)
    for i, t in enumerate(terms):
        torch.testing.assert_close(group.sigma[i], t.sigma, rtol=1e-9, atol=0)
        torch.testing.assert_close(group.variance_coef[i], t.variance_coef, rtol=1e-8, atol=0)
    x = torch.randn(len(terms), N_IN, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    omega = group.omega(x)
    dense = group.dense(torch.arange(len(terms)))
    for i, t in enumerate(terms):
        ref = t.dense() @ x[i]
        assert (omega[i] - ref).norm() <= 1e-8 * ref.norm()
        torch.testing.assert_close(dense[i], t.dense(), rtol=1e-8, atol=1e-8 * float(t.dense().abs().max()))
    for i, (b, t) in enumerate(zip(group.lora_b(x), terms)):
        ref = t.delta_hat @ x[i]  # both carry rounding of eps·cond(Zλ), so compare in norm
        assert (b - ref).norm() <= 1e-7 * ref.norm()


def test_refinement_from_a_start_block_wider_than_its_own():
    """σ is refined from the eigenvectors of the rank solve, which may have more columns (r = 16)
    than the single-vector LOBPCG's block."""
    group, terms = _group(_stats("diag"))
    x0 = torch.linalg.qr(torch.randn(group.batch, N_IN, 16, dtype=torch.float64)).Q
    group.refine_sigma(x0, tol=1e-10)
    torch.testing.assert_close(group.sigma, torch.stack([t.sigma for t in terms]), rtol=1e-10, atol=0)


def test_rough_sigma_is_a_lower_bound_and_refinement_is_exact():
    group, terms = _group(_stats("diag"))
    exact = torch.stack([t.sigma for t in terms])
    assert bool((group.sigma <= exact * (1 + 1e-12)).all()) and bool((group.sigma > 0.5 * exact).all())
    group.refine_sigma(None, tol=1e-10)
    torch.testing.assert_close(group.sigma, exact, rtol=1e-10, atol=0)


@pytest.mark.parametrize("eigensolver", ["lobpcg", "dense"])
def test_float32_solve_where_sigma_squared_overflows_float32_gram_matrices(eigensolver):
    """σ ≈ 5e11 (σ² above float32's √max ≈ 1.8e19), as the official absolute damping gives on real
    statistics: σ's refinement squared it into NaN, and every lora_B became NaN without a word."""
    stats = _stats("diag")
    for layer in stats.layers.values():
        layer.g_sum = layer.g_sum * 1e8
    f64 = loradafast.solve(stats, 4, num_train_samples=1000, eigensolver=eigensolver)
    f32 = loradafast.solve(stats, 4, num_train_samples=1000, eigensolver=eigensolver, dtype=torch.float32)
    for name, ref in f64.layers.items():
        got = f32.layers[name]
        assert ref.diagnostics.sigma ** 2 > 1e20
        assert bool(torch.isfinite(got.lora_B).all()) and bool(torch.isfinite(got.diagnostics.eigenvalues).all())
        assert got.diagnostics.sigma == pytest.approx(ref.diagnostics.sigma, rel=1e-3)


@pytest.mark.parametrize("r", [1, 5])
def test_implicit_lobpcg_matches_dense_solve(r):
    """The whole LoRA-DA solve, LOBPCG on the implicit operator vs dense eigh of the materialised Ω
    (n = 37 is above LOBPCG's dense shortcut only for r = 1, so force a larger block for r = 5)."""
    stats = _stats("diag")
    dense = loradafast.solve(stats, r, eigensolver="dense", num_train_samples=1000)
    lobpcg = loradafast.solve(stats, r, eigensolver="lobpcg", num_train_samples=1000)
    for name in dense.layers:
        d, l = dense.layers[name], lobpcg.layers[name]
        assert span_sine(d.lora_A.T, l.lora_A.T) < 1e-6, name
        torch.testing.assert_close(l.lora_B @ l.lora_A, d.lora_B @ d.lora_A, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(l.diagnostics["eigenvalues"], d.diagnostics["eigenvalues"], rtol=1e-6, atol=1e-9)
        assert l.diagnostics["sigma"] == pytest.approx(d.diagnostics["sigma"], rel=1e-9)
        assert 1e-10 <= l.diagnostics["residual_tol"] and l.diagnostics["residual"] <= l.diagnostics["residual_tol"]


def test_groups_whose_preconditioner_is_the_identity_take_block_lanczos():
    """A negligible variance term (β = 1e-12): every layer's preconditioner is the identity, so the
    solve runs block Lanczos first (then LOBPCG where its basis, here at most n/2 = 18 columns,
    does not suffice); the answer is the dense solve's."""
    stats = _stats("diag")
    dense = loradafast.solve(stats, 1, eigensolver="dense", num_train_samples=1000, beta=1e-12)
    krylov = loradafast.solve(stats, 1, eigensolver="lobpcg", num_train_samples=1000, beta=1e-12)
    for name in dense.layers:
        d, k = dense.layers[name], krylov.layers[name]
        assert k.diagnostics["eigensolver"].startswith("block-lanczos"), k.diagnostics["eigensolver"]
        assert not k.diagnostics["eigensolver_fallback"]
        assert span_sine(d.lora_A.T, k.lora_A.T) < 1e-6, name
    # β = 1e20: the variance term dominates, the preconditioner is cZλ⁻¹ (not the identity): LOBPCG alone.
    scaled = loradafast.solve(stats, 1, eigensolver="lobpcg", num_train_samples=1000, beta=1e20)
    assert {layer.diagnostics["eigensolver"] for layer in scaled.layers.values()} == {"lobpcg"}


@pytest.mark.parametrize("beta, kinds", [(0.03, None), (1e-12, {"identity"}), (1e20, {"scaled"})])
def test_preconditioner_within_its_bound_of_the_exact_one(beta, kinds):
    """Per layer the exact preconditioner is Zλ(sZλ + cᵢI)⁻¹; sharing c within a cluster may cost
    up to the cluster's ratio, the shortcuts (no factorisation) at most 0.1 %."""
    group, _ = _group(_stats("diag"), beta=beta)
    group.refine_sigma(None, tol=1e-10)
    apply, count = group.preconditioner()
    if kinds is not None:
        assert set(group.layer_preconditioner.values()) == kinds and count == 0
    x = torch.randn(group.batch, N_IN, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = apply(x)
    s, z = lora_da_operator.PRECOND_SHIFT, group.z_lambda[0]
    bound = 1.001 if kinds else lora_da_operator.PRECOND_SHARE_RATIO
    for i in range(group.batch):
        c = float(group.variance_coef[i])
        exact = z @ torch.linalg.solve(s * z + c * torch.eye(N_IN, dtype=torch.float64), x[i])
        ratio = (x[i] * got[i]).sum(0) / (x[i] * exact).sum(0)  # Rayleigh quotients of two SPD maps
        assert bool(((ratio <= bound * 1.0001) & (ratio >= 1 / bound / 1.0001)).all()), (i, ratio)


def test_rounding_floor_sees_asymmetry():
    group, _ = _group(_stats("diag"))
    floor = group.rounding_floor()
    assert bool((floor < 1e-6).all())
    broken = group.omega
    group.omega = lambda x: broken(x) + 1e-3 * x.cumsum(-2)  # a lower-triangular, asymmetric perturbation
    assert bool((group.rounding_floor() > 1e-5).all())


@pytest.mark.parametrize("r, dense", [(4, False), (40, True)])
def test_auto_eigensolver_on_cpu_by_width_and_rank(r, dense):
    """``eigensolver="auto"`` on CPU: iterative from width 512 on for ranks up to 32, dense for a
    larger rank at widths up to 2048; the planner resolves it the same way."""
    n = 520
    g = torch.Generator().manual_seed(3)
    x = torch.randn(700, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    grads = torch.randn(700, 60, generator=g, dtype=torch.float64)
    layer = LayerStats("l", n, 60, (grads.T @ x).float(), (grads * grads).sum(0).float(), "in")
    stats = Statistics({"l": layer}, {"in": (x.T @ x).float()}, 700, 8, "diag", {})
    auto = loradafast.solve(stats, r, num_train_samples=1000).layers["l"]
    assert (auto.diagnostics["eigensolver"] == "dense") == dense, auto.diagnostics["eigensolver"]
    assert lora_da_solve.auto_is_dense("cpu", n, r) == dense and not lora_da_solve.auto_is_dense("cuda", n, r)
    memory = MemoryModel(options=lora_da.LoraDAConfig(eigensolver="auto"), device_type="cpu")
    assert lora_da_solve.planned_dense(memory, n, r) == dense
    reference = loradafast.solve(stats, r, num_train_samples=1000, eigensolver="dense").layers["l"]
    assert span_sine(reference.lora_A.T, auto.lora_A.T) < 1e-6
