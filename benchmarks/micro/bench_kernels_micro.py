"""Statistics-pass kernels, each provider side by side (group = one size).

K-FAC accumulation ``acc += xᵀx`` (bf16 in, fp32 accumulate) and the gradient accumulation
``G += gᵀx``.  The providers are those of
``benchmarks/bench_kernels.py`` (one definition).  On CPU only the PyTorch paths run (Triton would
run in its interpreter, which times Python)."""
from __future__ import annotations

import pytest
import torch
from _micro import ON_CUDA
from bench_kernels import gradient_providers, kfac_providers

KFAC_SIZES = [(576, 2048), (1536, 8192), (4096, 8192)] if ON_CUDA else [(64, 512), (256, 2048)]
GRAD_SHAPES = [(1536, 576, 8192), (11008, 4096, 8192)] if ON_CUDA else [(256, 64, 512), (576, 256, 2048)]


def _pick(providers: dict, provider: str):
    if provider not in providers:
        pytest.skip(f"{provider} needs CUDA")
    return providers[provider]


@pytest.mark.parametrize("provider", ["fp32_upcast", "reference", "mm_out_dtype", "triton"])
@pytest.mark.parametrize("d,tokens", KFAC_SIZES)
def test_kfac_accumulate(run, device, provider, d, tokens):
    x = torch.randn(tokens, d, device=device).to(torch.bfloat16)
    mask = torch.ones(tokens, dtype=torch.bool, device=device)
    mask[-tokens // 8:] = False  # a padded tail, as the collect pass sees
    acc = torch.zeros(d, d, device=device)
    run(_pick(kfac_providers(acc, x, mask, ON_CUDA), provider), group=f"kfac d={d} T={tokens}",
        provider=provider, d=d, tokens=tokens, useful_flops=2.0 * d * d * tokens)


@pytest.mark.parametrize("provider", ["fp32_upcast", "cublas_out_dtype", "triton"])
@pytest.mark.parametrize("out,inp,tokens", GRAD_SHAPES)
def test_gradient_accumulate(run, device, provider, out, inp, tokens):
    g = torch.randn(tokens, out, device=device).to(torch.bfloat16)
    x = torch.randn(tokens, inp, device=device).to(torch.bfloat16)
    acc = torch.zeros(out, inp, device=device)
    run(_pick(gradient_providers(acc, g, x, ON_CUDA), provider), group=f"gradient {out}x{inp} T={tokens}",
        provider=provider, useful_flops=2.0 * out * inp * tokens)
