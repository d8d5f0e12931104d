"""LoRA-DA for many layers at once: factor once per shared input, then one batched eigensolve
per group of layers with the same width and rank (DESIGN §4, §6).

Per layer the Ω operator is ``c·Zλ⁻¹X − α_b·Δ̂ᵀ(Δ̂X)``.  To batch layers of one width whose
output sizes differ (q: 576 rows, k/v: 192 in SmolLM2; gate/up: 1536), Δ̂ is replaced by an
``[n, n]`` factor with the same Gram matrix: the R of a QR when it has more rows than columns, Δ̂
zero-padded otherwise (zero rows add nothing to Δ̂ᵀΔ̂).  Memory per layer is then ``O(n²)``
whatever its output size.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from . import eigen, kernels, lora_da
from .stats import Statistics

EIGENSOLVERS = ("auto", "lobpcg", "dense")
# On CPU, dense eigh of the materialised Ω beat the preconditioned LOBPCG at the widths we
# measured (SmolLM2's 576 and 1536, r = 8: 50 s vs 86 s for 210 layers on 2 cores,
# benchmarks/results/solve_cpu.json).  Above 2048 nothing was measured on CPU and "auto" takes
# LOBPCG, whose cost grows as n² per iteration instead of n³.  On CUDA "auto" is LOBPCG (no n³
# work, no host synchronisation); not yet measured on a GPU.
CPU_DENSE_MAX_N = 2048
# Bytes of float64 work space per group chunk: ~5 [n, n] matrices per layer.
DEFAULT_MEMORY_BUDGET = 2 << 30


def _gram_factor(delta_hat: torch.Tensor, n: int) -> torch.Tensor:
    """An ``[n, n]`` matrix F with FᵀF = Δ̂ᵀΔ̂."""
    if delta_hat.shape[0] > n:
        return torch.linalg.qr(delta_hat, mode="r").R
    return torch.nn.functional.pad(delta_hat, (0, 0, 0, n - delta_hat.shape[0]))


def _chunks(items: list, per_item_bytes: int, budget: int) -> list[list]:
    size = max(1, budget // max(per_item_bytes, 1))
    return [items[i:i + size] for i in range(0, len(items), size)]


def solve_lora_da(
    stats: Statistics,
    ranks: dict[str, int],
    *,
    dtype: torch.dtype,
    device,
    beta: float,
    num_train_samples: int,
    alpha_b: float,
    gamma: float,
    damping: float,
    damping_mode: str,
    gradient: str,
    residual_tol: float | None,
    eigensolver: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict]]:
    """``{name: (lora_A [r, in], lora_B [out, r], diagnostics)}`` for the layers in ``ranks``."""
    if eigensolver not in EIGENSOLVERS:
        raise ValueError(f"eigensolver must be one of {EIGENSOLVERS}, got {eigensolver!r}")
    z_cache: dict[str, lora_da.DampedZ] = {}
    terms: dict[str, lora_da.OmegaTerms] = {}
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, r in ranks.items():
        s = stats.layers[name]
        dev = torch.device(device) if device is not None else s.g_sum.device
        z = z_cache.get(s.z_key)
        if z is None:
            z = z_cache[s.z_key] = lora_da.damped_z(stats.Z(name, dtype).to(dev), damping, damping_mode)
        factors = lora_da.damped_factors(z, stats.Y(name, dtype).to(dev), damping, damping_mode)
        terms[name] = lora_da.omega_terms(stats.G(name, dtype).to(dev), factors, beta=beta,
                                          num_train_samples=num_train_samples, alpha_b=alpha_b, gradient=gradient)
        groups[(s.in_features, r, dev, factors.cholesky_dtype)].append(name)

    out: dict[str, tuple[torch.Tensor, torch.Tensor, dict]] = {}
    for (n, r, dev, work_dtype), names in groups.items():
        solver = eigensolver
        if solver == "auto":
            solver = "lobpcg" if dev.type == "cuda" or n > CPU_DENSE_MAX_N else "dense"
        per_layer = 5 * n * n * torch.finfo(work_dtype).bits // 8
        for chunk in _chunks(names, per_layer, memory_budget):
            result = _solve_group([terms[k] for k in chunk], n, r, solver, work_dtype, dev, residual_tol)
            for i, name in enumerate(chunk):
                t = terms[name]
                a, b = lora_da.lora_da_factors(t, result.eigenvectors[i], gamma)
                z_cond, y_cond = lora_da.condition_estimate(t.factors)
                out[name] = (a, b, {
                    "eigenvalues": result.eigenvalues[i].cpu(),
                    "residual": float(result.residuals[i]),
                    "omega_norm": float(result.op_norm[i]),
                    "eigensolver": result.method,
                    "eigensolver_iterations": result.iterations,
                    "eigensolver_converged": bool(result.converged[i]),
                    "eigensolver_fallback": bool(result.fallback[i]),
                    "damping_z": t.factors.damping_z,
                    "damping_y": t.factors.damping_y,
                    "damping_raised": t.factors.damping_raised,
                    "z_condition_estimate": z_cond,
                    "y_condition_estimate": y_cond,
                    "cholesky_dtype": str(t.factors.cholesky_dtype).replace("torch.", ""),
                    "sigma": float(t.sigma),
                    "variance_coef": float(t.variance_coef),
                    "num_tokens": stats.num_tokens,
                    "num_sequences": stats.num_sequences,
                })
    return out


def _solve_group(terms: list[lora_da.OmegaTerms], n: int, r: int, solver: str, dtype: torch.dtype, device,
                 residual_tol: float | None) -> eigen.EigenResult:
    chol = torch.stack([t.factors.z_chol.to(dtype) for t in terms])
    coef = torch.stack([t.variance_coef.to(dtype) for t in terms])
    gram = torch.stack([_gram_factor(t.delta_hat.to(dtype), n) for t in terms])
    alpha_b = terms[0].alpha_b
    if solver == "dense":
        omega = kernels.omega_dense(chol, coef, gram, alpha_b)
        omega = 0.5 * (omega + omega.mT)
        return eigen.smallest_eigenpairs(omega, n, r, len(terms), dtype=dtype, device=device, tol=residual_tol,
                                         dense_below=n)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return kernels.omega_apply(x, chol, coef, gram, alpha_b)

    def dense(layers: torch.Tensor) -> torch.Tensor:
        return kernels.omega_dense(chol[layers], coef[layers], gram[layers], alpha_b)

    precond = eigen.omega_preconditioner(chol @ chol.mT, coef, alpha_b, dtype=dtype)
    return eigen.smallest_eigenpairs(apply, n, r, len(terms), dtype=dtype, device=device, tol=residual_tol,
                                     precond=precond, dense=dense)
