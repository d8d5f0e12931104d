"""The batched eigensolver on LoRA-DA operators (``Ω = c·Zλ⁻¹ − Δ̂ᵀΔ̂``, rank-deficient Z), side by
side with looped dense ``eigh`` and the official code's ``torch.lobpcg(niter=10)``; and the
Rayleigh–Ritz step's small batched eigensolver, native against ``torch.linalg.eigh``.

The operators come from ``benchmarks/bench_eigen.py`` (one definition of the synthetic set-up)."""
from __future__ import annotations

import pytest
import torch
from _micro import ON_CUDA
from bench_eigen import dense_omega, make_group

from loradafast.linalg import eigen
from loradafast.linalg import native as _native

# (layers, n, out, tokens < n), rank
GROUPS = [((8, 4096, 4096, 2048), 8)] if ON_CUDA else [((8, 128, 128, 96), 8), ((4, 256, 256, 192), 8)]
RR_SIZES = [(224, 48), (224, 192)] if ON_CUDA else [(32, 48), (32, 96)]


@pytest.fixture(scope="module", params=GROUPS, ids=lambda g: f"b{g[0][0]}-n{g[0][1]}-r{g[1]}")
def group(request):
    (batch, n, out, tokens), r = request.param
    device = torch.device("cuda" if ON_CUDA else "cpu")
    z_lambda, chol, c, delta_hat = make_group(batch, n, out, tokens, device, seed=0)
    return z_lambda, chol, c, delta_hat, dense_omega(chol, c, delta_hat), r


def _providers(z_lambda, chol, c, delta_hat, omega, r):
    batch, n = z_lambda.shape[0], z_lambda.shape[-1]

    def ours():
        def apply(x):
            return c[:, None, None] * torch.cholesky_solve(x, chol) - delta_hat.mT @ (delta_hat @ x)
        pre = eigen.omega_preconditioner(z_lambda, c)
        return eigen.smallest_eigenpairs(apply, n, r, batch, device=z_lambda.device, precond=pre, dense=omega)

    def eigh_loop():
        return [torch.linalg.eigh(omega[b]) for b in range(batch)]

    def torch_lobpcg_niter10():
        torch.manual_seed(0)
        return [torch.lobpcg(omega[b], k=r, largest=False, niter=10) for b in range(batch)]

    return {"ours_lobpcg_precond": ours, "eigh_loop": eigh_loop, "torch_lobpcg_niter10": torch_lobpcg_niter10}


@pytest.mark.parametrize("provider", ["ours_lobpcg_precond", "eigh_loop", "torch_lobpcg_niter10"])
def test_smallest_eigenpairs(run, group, provider):
    z_lambda, chol, c, delta_hat, omega, r = group
    batch, n = z_lambda.shape[0], z_lambda.shape[-1]
    run(_providers(*group)[provider], group=f"eigen b={batch} n={n} r={r}", provider=provider, batch=batch,
        n=n, r=r)


@pytest.mark.parametrize("provider", ["torch_linalg_eigh", "native"])
@pytest.mark.parametrize("batch,m", RR_SIZES)
def test_rayleigh_ritz_eigh(run, device, provider, batch, m):
    a = torch.randn(batch, m, m, dtype=torch.float64, device=device)
    a = a + a.mT
    providers = {"torch_linalg_eigh": torch.linalg.eigh}
    if _native.available() and (device.type == "cpu" or _native.load().has_cuda()):
        providers["native"] = _native.eigh
    if provider not in providers:
        pytest.skip("the native eigensolver is not built here")
    fn = providers[provider]
    run(lambda: fn(a), group=f"rayleigh-ritz b={batch} m={m}", provider=provider)
