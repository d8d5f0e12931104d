"""docs/design.md §4's identities, each checked against an explicit dense Fisher built from per-token
gradients of a tiny layer (float64 model, float64 algebra)."""
import math

import pytest
import torch

import loradafast
from loradafast.methods import lora_da
from tiny import ToyTokenModel, toy_sequence_losses

D_IN, D_OUT = 5, 4
BETA, N_TRAIN, LAM = 0.5, 1000, 1e-3


def _loader():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 11, (6, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padded tokens must not count
    mask[4, 3:] = 0
    return [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3]} for i in (0, 3)], ids, mask


def _per_token(model, ids, mask):
    """x_t and g_t = ∂ℓ_n/∂y_t for every valid token, computed independently of the hooks."""
    xs, gs = [], []
    for n in range(ids.shape[0]):
        keep = mask[n].bool()
        x = model.embed(ids[n:n + 1]).detach()
        y = model.proj(x).detach().requires_grad_(True)
        logits = model.head(torch.tanh(y))
        labels = ids[n:n + 1].masked_fill(mask[n:n + 1] == 0, -100)
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        loss = tok.sum() / keep.sum()
        (g,) = torch.autograd.grad(loss, y)
        xs.append(x[0][keep])
        gs.append(g[0][keep])
    return torch.cat(xs), torch.cat(gs), len(xs)


@pytest.fixture(scope="module")
def setup():
    model = ToyTokenModel(d_in=D_IN, d_out=D_OUT)
    loader, ids, mask = _loader()
    stats = {
        yf: loradafast.collect(model, loader, target_modules=["proj"], y_factor=yf, loss_fn=toy_sequence_losses,
                               progress=False)
        for yf in ("full", "diag")
    }
    x, g, n_seq = _per_token(model, ids, mask)
    return model, stats, x, g, n_seq


def assert_close_scaled(actual, expected, rel):
    """Max-norm error relative to the largest entry: sums with cancellation have small entries
    whose own relative error is not meaningful."""
    err = float((actual - expected).abs().max() / expected.abs().max())
    assert err <= rel, f"relative max-norm error {err:.2e} > {rel:.0e}"


def test_kfac_factors_match_per_token_definitions(setup):
    _, stats, x, g, n_seq = setup
    T = x.shape[0]
    s = stats["full"]
    assert s.num_tokens == T and s.num_sequences == n_seq
    # The sums are accumulated in fp32 from float64 inputs: T terms, each rounded to fp32
    # (2^-24 ≈ 6e-8 relative), so the error stays below T·6e-8 ≈ 2e-6 of the largest term.
    rel = T * 6e-8
    assert_close_scaled(s.Z("proj"), x.T @ x / T, rel)
    assert_close_scaled(s.Y("proj"), g.T @ g / T, rel)
    assert_close_scaled(stats["diag"].Y("proj"), (g * g).sum(0) / T, rel)
    # G = (1/n) Σ_n Σ_t g_t x_tᵀ, the mean over sequences of ∇ℓ_n.
    assert_close_scaled(s.G("proj"), g.T @ x / n_seq, rel)


def test_kronecker_convention_against_dense_fisher(setup):
    """Per-token Fisher F = (1/T) Σ_t vec(g_t x_tᵀ) vec(g_t x_tᵀ)ᵀ (row-major vec of [out, in]).
    K-FAC "expand" replaces the joint average by the product of averages: Y ⊗ Z; with one token
    the two are equal, which pins down the Kronecker order."""
    _, stats, x, g, _ = setup
    per_token = torch.stack([torch.outer(gt, xt).reshape(-1) for gt, xt in zip(g, x)])
    one = per_token[:1]
    F1 = one.T @ one
    torch.testing.assert_close(F1, torch.kron(torch.outer(g[0], g[0]), torch.outer(x[0], x[0])))
    T = x.shape[0]
    kfac_from_tokens = sum(torch.kron(torch.outer(gt, gt), x.T @ x / T) for gt in g) / T
    s = stats["full"]
    assert_close_scaled(torch.kron(s.Y("proj"), s.Z("proj")), kfac_from_tokens, 2 * T * 6e-8)


def _dense_terms(stats):
    Z, Y, G = stats.Z("proj"), stats.Y("proj"), stats.G("proj")
    Zl = Z + LAM * torch.eye(D_IN, dtype=Z.dtype)
    Yl = (Y + LAM * torch.eye(D_OUT, dtype=Y.dtype)) if Y.dim() == 2 else torch.diag(Y + LAM)
    J = torch.kron(Yl, Zl)
    return Z, Y, G, J, torch.linalg.inv(J)


@pytest.mark.parametrize("y_factor", ["full", "diag"])
def test_variance_term_is_sum_of_inverse_diagonal_blocks(setup, y_factor):
    stats = setup[1][y_factor]
    Z, Y, G, J, Jinv = _dense_terms(stats)
    blocks = sum(Jinv[i * D_IN:(i + 1) * D_IN, i * D_IN:(i + 1) * D_IN] for i in range(D_OUT))
    f = lora_da.damped_factors(Z, Y, LAM)
    torch.testing.assert_close(f.trace_y_inverse() * f.z_inverse(), blocks, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("y_factor", ["full", "diag"])
def test_natural_gradient_is_fisher_solve(setup, y_factor):
    stats = setup[1][y_factor]
    Z, Y, G, J, Jinv = _dense_terms(stats)
    dense = -(Jinv @ G.reshape(-1)).reshape(D_OUT, D_IN)
    f = lora_da.damped_factors(Z, Y, LAM)
    torch.testing.assert_close(lora_da.natural_gradient(G, f), dense, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("y_factor", ["full", "diag"])
def test_omega_closed_form(setup, y_factor):
    stats = setup[1][y_factor]
    Z, Y, G, J, Jinv = _dense_terms(stats)
    delta = -(Jinv @ G.reshape(-1)).reshape(D_OUT, D_IN)
    sigma = torch.linalg.matrix_norm(delta, ord=2)
    blocks = sum(Jinv[i * D_IN:(i + 1) * D_IN, i * D_IN:(i + 1) * D_IN] for i in range(D_OUT))
    dense_omega = BETA * blocks / (N_TRAIN * sigma**2) - (delta.T @ delta) / sigma**2
    terms = lora_da.omega_terms(G, lora_da.damped_factors(Z, Y, LAM), beta=BETA, num_train_samples=N_TRAIN)
    torch.testing.assert_close(terms.dense(), dense_omega, rtol=1e-9, atol=1e-9)
    x = torch.randn(D_IN, 3, dtype=torch.float64)
    torch.testing.assert_close(terms.apply(x), dense_omega @ x, rtol=1e-9, atol=1e-9)


def _stiefel_minimum(omega, r, starts=64, steps=400):
    """Brute force: projected gradient descent on tr(AᵀΩA) over orthonormal A from many starts."""
    g = torch.Generator().manual_seed(0)
    best = math.inf
    lr = 0.5 / float(torch.linalg.matrix_norm(omega, ord=2))
    for _ in range(starts):
        a, _ = torch.linalg.qr(torch.randn(omega.shape[0], r, generator=g, dtype=torch.float64))
        for _ in range(steps):
            a, _ = torch.linalg.qr(a - lr * 2 * omega @ a)
        best = min(best, float(torch.trace(a.T @ omega @ a)))
    return best


@pytest.mark.parametrize("r", [1, 2, 4])
def test_a0_minimises_trace_objective(setup, r):
    stats = setup[1]["full"]
    result = loradafast.solve(stats, r, beta=BETA, num_train_samples=N_TRAIN, damping=LAM, gamma=1.0)
    layer = result.layers["proj"]
    a0 = layer.lora_A.double().T  # γ = 1: lora_A = A0ᵀ
    torch.testing.assert_close(a0.T @ a0, torch.eye(r, dtype=torch.float64), atol=1e-6, rtol=0)
    Z, Y, G = stats.Z("proj"), stats.Y("proj"), stats.G("proj")
    omega = lora_da.omega_terms(G, lora_da.damped_factors(Z, Y, LAM), beta=BETA, num_train_samples=N_TRAIN).dense()
    ours = float(torch.trace(a0.T @ omega @ a0))
    brute = _stiefel_minimum(omega, r)
    scale = float(torch.linalg.matrix_norm(omega, ord=2))
    # lora_A is stored in fp32, hence the 1e-6 relative slack.
    assert ours <= brute + 1e-6 * scale
    assert ours == pytest.approx(float(torch.linalg.eigvalsh(omega)[:r].sum()), abs=1e-6 * scale)
    delta = lora_da.natural_gradient(G, lora_da.damped_factors(Z, Y, LAM))
    torch.testing.assert_close(layer.lora_B.double(), delta / torch.linalg.matrix_norm(delta, ord=2) @ a0,
                               rtol=1e-5, atol=1e-6)
