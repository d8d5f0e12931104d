"""From statistics to factors, with no model pass (DESIGN §1 "solve").

Layers are solved independently; nothing here touches a model.
"""
from __future__ import annotations

import time

import torch

from . import lora_da
from .linalg import canonical_signs
from .result import InitResult, LayerInit
from .stats import Statistics

METHODS = ("lora-da",)
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's own default


def check_rank(name: str, rank: int, in_features: int, out_features: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank > min(in_features, out_features):
        raise ValueError(
            f"rank {rank} exceeds min(in, out) = {min(in_features, out_features)} of layer {name!r} "
            f"({in_features}→{out_features}); lower the rank or exclude the layer with target_modules"
        )


def dense_smallest_eigenpairs(omega: torch.Tensor, r: int, residual_tol: float):
    """The r smallest eigenpairs of symmetric ``omega`` with dense ``eigh``.

    The residual ``max_j ‖Ωx_j − λ_j x_j‖ / ‖Ω‖₂`` is checked; a working dtype that misses the
    tolerance is retried in float64.  Returns (values [r], vectors [n, r], residual, fallback).
    """
    def attempt(m):
        values, vectors = torch.linalg.eigh(m)
        values, vectors = values[:r], canonical_signs(vectors[:, :r])
        scale = m.diagonal().abs().max().clamp_min(torch.finfo(m.dtype).tiny)
        scale = torch.maximum(scale, values.abs().max())
        res = torch.linalg.vector_norm(m @ vectors - vectors * values, dim=0).max() / scale
        return values, vectors, float(res)

    values, vectors, res = attempt(omega)
    fallback = False
    if res > residual_tol and omega.dtype != torch.float64:
        values, vectors, res = attempt(omega.double())
        fallback = True
    return values, vectors, res, fallback


def solve(
    stats: Statistics,
    rank: int | None = None,
    *,
    method: str = "lora-da",
    ranks: dict[str, int] | None = None,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    num_train_samples: int = 100_000,
    beta: float = 0.03,
    alpha_b: float = 1.0,
    gamma: float = 1024.0,
    damping: float = 1e-6,
    damping_mode: str = "absolute",
    gradient: str = "fisher",
    dtype: torch.dtype = torch.float64,
    device=None,
    residual_tol: float = 1e-6,
) -> InitResult:
    """Factors for every layer of ``stats`` (DESIGN §4).

    ``rank`` is the default rank (8), ``ranks`` overrides it per layer.  The dense solve runs in
    ``dtype`` (float64 by default: Zλ⁻¹ with the official absolute damping of 1e-6 spans many
    orders of magnitude, and its smallest eigenvectors are what we keep).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if num_train_samples <= 0:
        raise ValueError(f"num_train_samples must be positive (the fine-tuning set size), got {num_train_samples}")
    if beta < 0 or gamma <= 0 or damping < 0:
        raise ValueError(f"need beta ≥ 0, gamma > 0 and damping ≥ 0; got beta={beta}, gamma={gamma}, damping={damping}")
    rank = 8 if rank is None else rank
    ranks = ranks or {}
    for name, s in stats.layers.items():
        check_rank(name, ranks.get(name, rank), s.in_features, s.out_features)

    started = time.perf_counter()
    layers: dict[str, LayerInit] = {}
    for name, s in stats.layers.items():
        r = ranks.get(name, rank)
        dev = device if device is not None else s.g_sum.device
        Z = stats.Z(name, dtype).to(dev)
        Y = stats.Y(name, dtype).to(dev)
        G = stats.G(name, dtype).to(dev)
        factors = lora_da.damped_factors(Z, Y, damping, damping_mode)
        terms = lora_da.omega_terms(G, factors, beta=beta, num_train_samples=num_train_samples,
                                    alpha_b=alpha_b, gradient=gradient)
        values, vectors, residual, fallback = dense_smallest_eigenpairs(terms.dense(), r, residual_tol)
        a, b = lora_da.lora_da_factors(terms, vectors, gamma)
        layers[name] = LayerInit(
            name, a.float(), b.float(), kind=s.kind,
            diagnostics={
                "eigenvalues": values.cpu(),
                "residual": residual,
                "eigensolver_fallback": fallback,
                "damping_z": factors.damping_z,
                "damping_y": factors.damping_y,
                "cholesky_dtype": str(factors.cholesky_dtype).replace("torch.", ""),
                "sigma": float(terms.sigma),
                "variance_coef": float(terms.variance_coef),
                "num_tokens": stats.num_tokens,
                "num_sequences": stats.num_sequences,
            },
        )
    meta = stats.meta
    return InitResult(
        layers=layers,
        method=method,
        rank=rank,
        lora_alpha=PEFT_DEFAULT_ALPHA if lora_alpha is None else lora_alpha,
        use_rslora=use_rslora,
        target_modules=meta.get("target_modules"),
        base_model_name_or_path=meta.get("base_model_name_or_path"),
        task_type=meta.get("task_type"),
        timings={"solve_s": time.perf_counter() - started},
        options={"num_train_samples": num_train_samples, "beta": beta, "alpha_b": alpha_b, "gamma": gamma,
                 "damping": damping, "damping_mode": damping_mode, "gradient": gradient,
                 "y_factor": stats.y_factor, "dtype": str(dtype).replace("torch.", "")},
    )
