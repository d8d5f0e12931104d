"""Statistics-pass kernels and the Ω operator, each provider side by side (group = one size).

K-FAC accumulation ``acc += xᵀx`` (bf16 in, fp32 accumulate), the gradient accumulation
``G += gᵀx`` and the Ω product ``c·Zλ⁻¹X − Δ̂ᵀ(Δ̂X)``.  On CPU only the PyTorch paths run (Triton
would run in its interpreter, which times Python)."""
from __future__ import annotations

import pytest
import torch
from _micro import ON_CUDA

from loradafast import kernels
from loradafast.kernels import dispatch

KFAC_SIZES = [(576, 2048), (1536, 8192), (4096, 8192)] if ON_CUDA else [(64, 512), (256, 2048)]
GRAD_SHAPES = [(1536, 576, 8192), (11008, 4096, 8192)] if ON_CUDA else [(256, 64, 512), (576, 256, 2048)]
OMEGA_SIZES = [(4, 1536, 48), (4, 4096, 48)] if ON_CUDA else [(4, 128, 24), (4, 256, 48)]


def kfac_providers(acc, x, mask):
    providers = {
        "fp32_upcast": lambda: acc.addmm_(x.float().T, x.float()),
        "reference": lambda: kernels.kfac_accumulate(acc, x, mask, impl="reference"),
    }
    if ON_CUDA:
        providers["mm_out_dtype"] = lambda: acc.add_(torch.mm(x.T, x, out_dtype=torch.float32))
        providers["triton"] = lambda: kernels.kfac_accumulate(acc, x, mask, impl="triton")
    return providers


@pytest.mark.parametrize("provider", ["fp32_upcast", "reference", "mm_out_dtype", "triton"])
@pytest.mark.parametrize("d,tokens", KFAC_SIZES)
def test_kfac_accumulate(run, device, provider, d, tokens):
    x = torch.randn(tokens, d, device=device).to(torch.bfloat16)
    mask = torch.ones(tokens, dtype=torch.bool, device=device)
    mask[-tokens // 8:] = False  # a padded tail, as the collect pass sees
    acc = torch.zeros(d, d, device=device)
    providers = kfac_providers(acc, x, mask)
    if provider not in providers:
        pytest.skip(f"{provider} needs CUDA")
    run(providers[provider], group=f"kfac d={d} T={tokens}", provider=provider, d=d, tokens=tokens,
        useful_flops=2.0 * d * d * tokens)


@pytest.mark.parametrize("provider", ["fp32_upcast", "cublas_out_dtype", "triton"])
@pytest.mark.parametrize("out,inp,tokens", GRAD_SHAPES)
def test_gradient_accumulate(run, device, provider, out, inp, tokens):
    g = torch.randn(tokens, out, device=device).to(torch.bfloat16)
    x = torch.randn(tokens, inp, device=device).to(torch.bfloat16)
    acc = torch.zeros(out, inp, device=device)
    providers = {"fp32_upcast": lambda: kernels.gradient_accumulate(acc, g, x, impl="reference")}
    if ON_CUDA:
        providers["cublas_out_dtype"] = lambda: dispatch._gradient_accumulate_cublas(acc, g, x, None)
        providers["triton"] = lambda: kernels.gradient_accumulate(acc, g, x, impl="triton")
    if provider not in providers:
        pytest.skip(f"{provider} needs CUDA")
    run(providers[provider], group=f"gradient {out}x{inp} T={tokens}", provider=provider,
        useful_flops=2.0 * out * inp * tokens)


@pytest.mark.parametrize("provider", ["operator_cholesky_torch", "operator_inverse_torch", "dense_apply",
                                      "operator_cholesky_triton"])
@pytest.mark.parametrize("batch,n,k", OMEGA_SIZES)
def test_omega_apply(run, device, provider, batch, n, k):
    a = torch.randn(batch, n, n, device=device) / n ** 0.5
    chol = torch.linalg.cholesky(a @ a.mT + 0.1 * torch.eye(n, device=device))
    zinv = torch.cholesky_inverse(chol)
    delta = torch.randn(batch, n, n, device=device)
    delta /= torch.linalg.matrix_norm(delta, ord=2)[:, None, None]
    c = torch.rand(batch, device=device)
    x = torch.randn(batch, n, k, device=device)
    omega = kernels.omega_dense(chol, c, delta)
    providers = {
        "operator_cholesky_torch": lambda: kernels.omega_apply(x, chol, c, delta, impl="reference"),
        "operator_inverse_torch": lambda: kernels.omega_apply(x, zinv, c, delta, z_is_inverse=True,
                                                              impl="reference"),
        "dense_apply": lambda: torch.bmm(omega, x),
    }
    if ON_CUDA:
        providers["operator_cholesky_triton"] = lambda: kernels.omega_apply(x, chol, c, delta, impl="triton")
    if provider not in providers:
        pytest.skip(f"{provider} needs CUDA")
    run(providers[provider], group=f"omega b={batch} n={n} k={k}", provider=provider)
