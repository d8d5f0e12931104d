"""Batched LOBPCG (loradafast.linalg.eigen) against dense float64 eigh.

Every subspace test first checks that the wanted eigenspace is well defined: the r-th and
(r+1)-th eigenvalues must be separated (``_assert_gap``), otherwise "the r smallest
eigenvectors" has no unique span and no subspace error can be asked for.
"""
from __future__ import annotations

import pytest
import torch

from loradafast.linalg import eigen

F64 = torch.float64


def _assert_gap(values: torch.Tensor, r: int, rel: float = 1e-9) -> None:
    scale = values.abs().amax(-1)
    gap = values[..., r] - values[..., r - 1]
    assert bool((gap > rel * scale).all()), f"test matrix has no gap at r={r}: {gap.tolist()}"


def _reference(mat: torch.Tensor, r: int):
    values, vectors = torch.linalg.eigh(mat.to(F64))
    _assert_gap(values, r)
    return values, vectors[..., :r]


def _lora_da_problem(batch=3, n=320, out=160, tokens=240, x_scale=1000.0, seed=0, lam=1e-6, beta=0.03, num=100_000):
    """Ω built as docs/design.md §4 from synthetic statistics with a rank-deficient Z (tokens < n).

    Per-token activations have a decaying, anisotropic scale and one shared outlier direction;
    G is the mean outer product of random per-token output gradients with the activations (so
    it lies in the row space of Z, as a real gradient does); Y is diagonal positive.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, n, generator=gen, dtype=F64) * (x_scale * torch.logspace(0, -1, n, dtype=F64))
    x = x + 3 * x_scale * torch.randn(batch, tokens, 1, generator=gen, dtype=F64) * torch.randn(
        batch, 1, n, generator=gen, dtype=F64)
    z = x.mT @ x / tokens
    g = torch.randn(batch, tokens, out, generator=gen, dtype=F64) * torch.logspace(0, -1, out, dtype=F64)
    grad = g.mT @ x / tokens
    y_lambda = (g * g).mean(1) + lam
    z_lambda = z + lam * torch.eye(n, dtype=F64)
    chol = torch.linalg.cholesky(z_lambda)
    delta = -torch.cholesky_solve(grad.mT, chol).mT / y_lambda[..., None]
    sigma = torch.linalg.matrix_norm(delta, ord=2)
    delta_hat = delta / sigma[:, None, None]
    c = beta * (1.0 / y_lambda).sum(-1) / (num * sigma**2)
    omega = c[:, None, None] * torch.cholesky_inverse(chol) - delta_hat.mT @ delta_hat
    omega = 0.5 * (omega + omega.mT)

    def apply(v):  # the structured operator, as the solve stage applies it (never materialised)
        return c[:, None, None] * torch.cholesky_solve(v, chol) - delta_hat.mT @ (delta_hat @ v)

    return omega, apply, z_lambda, c


@pytest.fixture(scope="module")
def lora_da():
    return _lora_da_problem()


def _check_result(res: eigen.EigenResult, mat: torch.Tensor, r: int, max_sine: float = 1e-4):
    values, vectors = _reference(mat, r)
    batch, n = mat.shape[0], mat.shape[-1]
    assert res.eigenvalues.shape == (batch, r) and res.eigenvectors.shape == (batch, n, r)
    sine = eigen.subspace_sine(res.eigenvectors, vectors)
    assert float(sine.max()) <= max_sine, sine.tolist()
    torch.testing.assert_close(res.eigenvalues, values[..., :r], atol=1e-8 * float(values.abs().max()), rtol=0)
    gram = res.eigenvectors.mT @ res.eigenvectors
    torch.testing.assert_close(gram, torch.eye(r, dtype=F64).expand_as(gram), atol=1e-10, rtol=0)
    # The reported residual is the one defined in EigenResult, recomputed here from scratch.
    x, lam = res.eigenvectors, res.eigenvalues
    resid = torch.linalg.matrix_norm(mat @ x - x * lam.unsqueeze(-2)) / res.op_norm
    torch.testing.assert_close(res.residuals, resid, atol=1e-12, rtol=1e-3)
    return sine


@pytest.mark.parametrize("r", [8, 16])
def test_lora_da_omega_structured_operator(lora_da, r):
    omega, apply, z_lambda, c = lora_da
    values = torch.linalg.eigvalsh(omega)
    # The case the solver exists for: indefinite, most-negative wanted eigenvalues, and a spread
    # ‖Ω‖/gap of about 10⁶ (the null space of Z sits at c/λ).
    assert bool((values[:, 0] < 0).all()) and bool((values[:, -1] > 0).all())
    assert float((values[:, -1] / (values[:, r] - values[:, r - 1])).min()) > 1e5
    n, batch = omega.shape[-1], omega.shape[0]
    res = eigen.smallest_eigenpairs(apply, n, r, batch, precond=eigen.omega_preconditioner(z_lambda, c))
    assert not bool(res.fallback.any()) and bool(res.converged.all())
    assert res.iterations <= 60
    assert bool((res.residuals <= 1e-10).all())
    _check_result(res, omega, r)


def test_lora_da_omega_without_preconditioner_still_accurate(lora_da):
    # Without the preconditioner LOBPCG cannot reach the tolerance on this spread within a few
    # iterations; the contract is that the answer is still right: failing layers are re-solved
    # densely (from the callable, applied to the identity) and flagged.
    omega, apply, _, _ = lora_da
    res = eigen.smallest_eigenpairs(apply, omega.shape[-1], 8, omega.shape[0], max_iter=20)
    assert bool(res.fallback.all()) and not bool(res.converged.any())
    _check_result(res, omega, 8, max_sine=1e-9)


def _spectrum_matrix(values: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(values.shape[0], values.shape[1], values.shape[1], generator=gen, dtype=F64))
    return (q * values.unsqueeze(-2)) @ q.mT


def _synthetic(kind: str, batch: int = 3, n: int = 200, r: int = 8) -> torch.Tensor:
    rows = []
    for b in range(batch):
        if kind == "clustered":
            # The wanted eigenvalues form a cluster 1e-7 wide (they are not individually
            # resolvable, but their span is: the cluster is separated from the rest by 0.5).
            wanted = -1.0 - 1e-7 * torch.arange(r, dtype=F64)
            rest = torch.cat([torch.full((20,), -0.5, dtype=F64), torch.linspace(0, 10, n - r - 20, dtype=F64)])
        elif kind == "spread":
            # Wanted eigenvalues log-spaced over three decades, the rest over four; the gap at r
            # is 5e-4 of the spread.
            wanted = -torch.logspace(1, -2, r, dtype=F64)
            rest = torch.logspace(-0.3, 3, n - r, dtype=F64) * (1 + 0.1 * b)
        elif kind == "interior_tiny_gap":
            # A tiny gap (1e-4 of the spread) at exactly r: only oversampling makes it cheap.
            wanted = torch.linspace(-2.0, -1.0, r, dtype=F64)
            rest = torch.cat([torch.tensor([-1.0 + 1e-3], dtype=F64), torch.linspace(-0.9, 8.0, n - r - 1, dtype=F64)])
        else:
            raise ValueError(kind)
        rows.append(torch.cat([wanted, rest]))
    return _spectrum_matrix(torch.stack(rows), seed=len(kind))


@pytest.mark.parametrize("kind", ["clustered", "spread", "interior_tiny_gap"])
def test_synthetic_spectra_dense_operator(kind):
    mat = _synthetic(kind)
    res = eigen.smallest_eigenpairs(mat, r=8, max_iter=400)
    assert not bool(res.fallback.any()), res.residuals.tolist()
    _check_result(res, mat, 8)


def _gapped(batch: int = 3, n: int = 401, r: int = 8) -> torch.Tensor:
    """Wanted eigenvalues in [−2, −1] (different per layer), the rest in [0, 1], bunched at 0."""
    rows = [torch.cat([torch.linspace(-2.0, -1.0, r, dtype=F64) * (1 + 0.1 * b),
                       torch.linspace(0.0, 1.0, n - r, dtype=F64) ** 2]) for b in range(batch)]
    return _spectrum_matrix(torch.stack(rows), seed=5)


@pytest.mark.parametrize("block", [8, 12])
def test_block_lanczos_matches_dense(block):
    """Block Lanczos (no preconditioner, a basis of up to 200 columns), odd width."""
    mat = _gapped()
    res = eigen.smallest_eigenpairs(mat, r=8, krylov_columns=200, krylov_block=block)
    assert res.method == "block-lanczos" and bool(res.converged.all()) and not bool(res.fallback.any())
    assert res.iterations <= 200 // block  # blocks used
    _check_result(res, mat, 8)


def test_block_lanczos_hands_unconverged_layers_to_lobpcg():
    """A basis too small to converge (3 blocks of 8): LOBPCG continues from its Ritz vectors."""
    mat = _gapped()
    res = eigen.smallest_eigenpairs(mat, r=8, krylov_columns=24, krylov_block=8)
    assert res.method == "block-lanczos+lobpcg" and bool(res.converged.all()) and not bool(res.fallback.any())
    _check_result(res, mat, 8)


def test_block_lanczos_float32_and_a_basis_limited_by_n():
    """float32 (its own tolerance) and a width where n // 2 caps the basis just above the block m:
    block Lanczos runs, hands over where it must, and the answer is right."""
    mat = _gapped(batch=2, n=67, r=4)
    res = eigen.smallest_eigenpairs(mat, r=4, dtype=torch.float32, krylov_columns=1000, krylov_block=8)
    assert res.method.startswith("block-lanczos") and not bool(res.fallback.any())
    values, vectors = _reference(mat, 4)
    assert float(eigen.subspace_sine(res.eigenvectors, vectors).max()) < 1e-3
    # A block that cannot make two blocks of at least m columns within n // 2: LOBPCG alone.
    res = eigen.smallest_eigenpairs(mat, r=4, krylov_columns=1000, krylov_block=5, oversample=28, dense_below=0)
    assert res.method == "lobpcg"


def test_block_lanczos_on_a_low_rank_operator():
    """Ω of rank 10 (as −ΔᵀΔ of a gradient with few tokens): the Krylov space holds the whole
    range after two blocks, later blocks are rounding noise made orthonormal (harmless to
    Rayleigh–Ritz), and the answer is exact."""
    n, r = 121, 4
    values = torch.zeros(2, n, dtype=F64)
    values[:, :10] = -torch.linspace(10.0, 1.0, 10, dtype=F64)
    mat = _spectrum_matrix(values, seed=3)
    res = eigen.smallest_eigenpairs(mat, r=r, krylov_columns=60, krylov_block=12)
    assert res.method == "block-lanczos" and bool(res.converged.all()) and res.iterations == 2
    _check_result(res, mat, r, max_sine=1e-8)


def test_block_lanczos_starts_from_the_span_of_x0(lora_da):
    """``x0`` holding the exact eigenvectors: the first Krylov block spans them (and random columns
    beyond them), so block Lanczos is converged at its first check on an operator whose spread
    would otherwise take it far more blocks without a preconditioner."""
    omega, apply, _, _ = lora_da
    _, vectors = _reference(omega, 8)
    res = eigen.smallest_eigenpairs(apply, omega.shape[-1], 8, omega.shape[0], x0=vectors, krylov_columns=96,
                                    krylov_block=12)
    assert res.method == "block-lanczos" and res.iterations == 2 and bool(res.converged.all())
    _check_result(res, omega, 8, max_sine=1e-8)


@pytest.mark.parametrize("krylov_columns", [0, 200])
def test_rank_deficient_start_is_completed_at_random(krylov_columns):
    """A start block with one direction three times and zero columns (as power steps on an
    operator of low rank leave it): its dependent columns are replaced by random ones, so no zero
    column passes for a direction.  Shifted so that the wanted eigenvalues are positive: a zero
    column taken as valid would add a spurious Ritz value 0 below them."""
    mat = _gapped() + 3.0 * torch.eye(401, dtype=F64)
    x0 = torch.zeros(3, 401, 16, dtype=F64)
    x0[..., :3] = torch.randn(3, 401, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    run = eigen._Lobpcg(None, None, 401, 8, 16, 3, F64, torch.device("cpu"), 10, 1e-10, 1, 1)
    start = eigen._start_block(run, x0, seed=0)
    torch.testing.assert_close(start.mT @ start, torch.eye(16, dtype=F64).expand(3, 16, 16), atol=1e-12, rtol=0)
    assert float(eigen.subspace_sine(start, torch.linalg.qr(x0[..., :1]).Q).max()) < 1e-12  # x0's direction kept
    res = eigen.smallest_eigenpairs(mat, r=8, x0=x0, krylov_columns=krylov_columns, krylov_block=12)
    assert bool(res.converged.all()) and not bool(res.fallback.any())
    _check_result(res, mat, 8)


@pytest.mark.parametrize("krylov_columns", [0, 200])
def test_subspace_sine_stops_by_davis_kahan(krylov_columns):
    """With ``subspace_sine``, a layer whose ``residual·‖Ω‖/gap`` is below it stops before the
    residual reaches ``tol``; the subspace is then within that sine of the exact one, and the
    tolerance each layer met is reported."""
    mat = _gapped()
    kw = dict(r=8, check_every=1, krylov_columns=krylov_columns, krylov_block=8)
    tight = eigen.smallest_eigenpairs(mat, **kw)
    loose = eigen.smallest_eigenpairs(mat, subspace_sine=1e-6, **kw)
    assert bool((tight.tol == 1e-10).all()) and bool((loose.tol > 1e-8).all())
    assert loose.iterations < tight.iterations
    assert bool(loose.converged.all()) and not bool(loose.fallback.any())
    assert bool((loose.residuals <= loose.tol).all()) and bool((loose.residuals > 1e-10).any())
    values, vectors = _reference(mat, 8)
    sine = eigen.subspace_sine(loose.eigenvectors, vectors)
    assert bool((sine <= 1e-6).all()), sine.tolist()
    gap = values[..., 8] - values[..., 7]
    assert bool((loose.tol <= 1e-6 * gap / loose.op_norm * 1.01).all())  # the gap seen was the true one


def test_huge_spread_without_preconditioner_falls_back_and_is_right():
    # Spectrum over 10 decades with a 1e-3 gap: LOBPCG without a preconditioner cannot converge
    # in max_iter, and must say so.
    n, r = 160, 4
    values = torch.cat([torch.linspace(-1.0, -0.9, r, dtype=F64), torch.logspace(-4, 6, n - r, dtype=F64) - 0.899])
    mat = _spectrum_matrix(values.expand(2, n), seed=1)
    res = eigen.smallest_eigenpairs(mat, r=r, max_iter=30)
    assert bool(res.fallback.all())
    # Both sides are dense float64 eigh of the same matrix: they agree to eps·‖A‖/gap ≈ 2e-7.
    _check_result(res, mat, r, max_sine=1e-6)


def _torch_lobpcg_sine(mat: torch.Tensor, r: int, vectors: torch.Tensor) -> float:
    worst = 0.0
    for b in range(mat.shape[0]):
        try:
            torch.manual_seed(0)
            _, x = torch.lobpcg(mat[b], k=r, largest=False, niter=10)
        except Exception:  # torch.lobpcg raises on some of these inputs: counts as a failure
            return 1.0
        q, _ = torch.linalg.qr(x)
        worst = max(worst, float(eigen.subspace_sine(q, vectors[b])))
    return worst


def test_official_torch_lobpcg_fails_where_we_do_not(lora_da):
    # docs/design.md §4: the official code's torch.lobpcg(..., niter=10) does not converge in general.
    omega, apply, z_lambda, c = lora_da
    r = 8
    _, vectors = _reference(omega, r)
    assert _torch_lobpcg_sine(omega, r, vectors) > 1e-2
    res = eigen.smallest_eigenpairs(apply, omega.shape[-1], r, omega.shape[0],
                                    precond=eigen.omega_preconditioner(z_lambda, c))
    assert not bool(res.fallback.any())
    assert float(_check_result(res, omega, r).max()) < 1e-6


def test_official_torch_lobpcg_fails_on_spread_spectrum():
    mat = _synthetic("spread")
    _, vectors = _reference(mat, 8)
    assert _torch_lobpcg_sine(mat, 8, vectors) > 1e-2
    res = eigen.smallest_eigenpairs(mat, r=8, max_iter=400)
    assert not bool(res.fallback.any())
    _check_result(res, mat, 8)


def test_deterministic_and_canonical_signs(lora_da):
    omega, apply, z_lambda, c = lora_da
    kw = dict(precond=eigen.omega_preconditioner(z_lambda, c))
    a = eigen.smallest_eigenpairs(apply, omega.shape[-1], 8, omega.shape[0], **kw)
    b = eigen.smallest_eigenpairs(apply, omega.shape[-1], 8, omega.shape[0], **kw)
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    # A different random start gives the same vectors up to convergence error: signs are fixed.
    d = eigen.smallest_eigenpairs(apply, omega.shape[-1], 8, omega.shape[0], seed=123, **kw)
    torch.testing.assert_close(a.eigenvectors, d.eigenvectors, atol=1e-6, rtol=0)
    top = a.eigenvectors.gather(-2, a.eigenvectors.abs().argmax(-2, keepdim=True))
    assert bool((top > 0).all())


def test_fallback_uses_given_dense_matrices(lora_da):
    omega, apply, _, _ = lora_da
    calls = []

    def dense(layers):
        calls.append(layers.tolist())
        return omega[layers]

    res = eigen.smallest_eigenpairs(apply, omega.shape[-1], 8, omega.shape[0], max_iter=2, dense=dense)
    assert calls == [[0, 1, 2]] and bool(res.fallback.all())
    _check_result(res, omega, 8, max_sine=1e-9)


def test_fallback_disabled_reports_unconverged(lora_da):
    omega, apply, _, _ = lora_da
    res = eigen.smallest_eigenpairs(apply, omega.shape[-1], 8, omega.shape[0], max_iter=3, fallback=False)
    assert not bool(res.fallback.any()) and not bool(res.converged.any())
    assert bool((res.residuals > 1e-10).all())


def test_warm_start_converges_immediately(lora_da):
    omega, apply, z_lambda, c = lora_da
    _, vectors = _reference(omega, 8)
    res = eigen.smallest_eigenpairs(apply, omega.shape[-1], 8, omega.shape[0], x0=vectors,
                                    precond=eigen.omega_preconditioner(z_lambda, c), check_every=1)
    assert res.iterations <= 3 and not bool(res.fallback.any())
    _check_result(res, omega, 8, max_sine=1e-8)


def test_small_width_solved_densely():
    mat = _synthetic("clustered", batch=2, n=40, r=4)
    res = eigen.smallest_eigenpairs(mat, r=4)
    assert res.method == "dense" and res.iterations == 0
    _check_result(res, mat, 4, max_sine=1e-10)


def test_converged_layers_are_frozen_and_mixed_batches_work():
    # One easy and one hard layer in one batch: the easy one converges early and must stay put
    # (fixed shapes, masked updates) while the hard one keeps iterating.
    easy = _synthetic("clustered", batch=1)
    hard = _synthetic("interior_tiny_gap", batch=1)
    mat = torch.cat([easy, hard])
    res = eigen.smallest_eigenpairs(mat, r=8, max_iter=400)
    assert not bool(res.fallback.any())
    _check_result(res, mat, 8)


def test_two_widths_one_after_the_other(lora_da):
    # What the solve does per input group: a preconditioned callable batch, then a small dense one.
    omega, apply, z_lambda, c = lora_da
    small = _synthetic("spread", batch=2)
    wide = eigen.smallest_eigenpairs(apply, omega.shape[-1], 8, omega.shape[0],
                                     precond=eigen.omega_preconditioner(z_lambda, c), max_iter=400)
    _check_result(wide, omega, 8)
    _check_result(eigen.smallest_eigenpairs(small, r=4, max_iter=400), small, 4)


def test_non_finite_layer_does_not_poison_the_batch():
    mat = _synthetic("clustered", batch=2)

    def apply(x):
        y = mat @ x
        return torch.cat([y[:1], torch.full_like(y[1:], float("nan"))])

    res = eigen.smallest_eigenpairs(apply, 200, 8, 2, fallback=False)
    assert bool(res.converged[0]) and not bool(res.converged[1])
    _, vectors = _reference(mat[:1], 8)
    assert float(eigen.subspace_sine(res.eigenvectors[:1], vectors)) < 1e-4


def test_invalid_arguments():
    with pytest.raises(ValueError):
        eigen.smallest_eigenpairs(torch.zeros(2, 3, 4), r=1)
    with pytest.raises(ValueError):
        eigen.smallest_eigenpairs(lambda x: x, None, 2, 1)
    with pytest.raises(ValueError):
        eigen.smallest_eigenpairs(torch.eye(5).expand(1, 5, 5), r=6)


# ------------------------------------------------------------------------------------------
# Host synchronisations (counted on any device by tests/syncs.py)


def _count_syncs(apply, z_lambda, c, iters, check_every):
    from syncs import SyncCounter

    precond = eigen.omega_preconditioner(z_lambda, c)
    with SyncCounter() as counter:
        eigen.smallest_eigenpairs(apply, n=z_lambda.shape[-1], r=2, batch=z_lambda.shape[0], oversample=4,
                                  precond=precond, max_iter=iters, check_every=check_every, tol=0.0,
                                  fallback=False)
    return counter


@pytest.mark.parametrize("native_small", [True, False])
def test_lobpcg_synchronises_only_at_check_points(monkeypatch, native_small):
    # tol = 0 never converges, so every run does max_iter iterations: the difference between two
    # lengths is the iterations' own count. With a synchronisation-free small eigensolver
    # (the native one; block m = 6, Rayleigh-Ritz size 18) none happens inside an iteration, and
    # the check points add exactly one each. torch.linalg.eigh checks its error codes on the
    # host: four per iteration, and nothing else (a new .item(), nonzero or checked
    # factorisation in the loop fails this test).
    from loradafast.linalg import native

    if native_small and not native.available():
        pytest.skip("the native eigensolver could not be built here")
    monkeypatch.setattr(native, "prefer_native", lambda a: native_small)
    _, apply, z_lambda, c = _lora_da_problem(batch=2, n=48, out=24, tokens=40)
    short, long = (_count_syncs(apply, z_lambda, c, iters, check_every=1000) for iters in (4, 9))
    per_iteration = (long.total - short.total) / 5
    if native_small:
        assert per_iteration == 0, long.by_op
    else:
        assert per_iteration == 4 and set(long.by_op) == {"_linalg_eigh"}, long.by_op
    checked = _count_syncs(apply, z_lambda, c, 9, check_every=3)
    assert checked.total - long.total == 3, (checked.by_op, long.by_op)  # iterations 3, 6, 9
