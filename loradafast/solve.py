"""From statistics (and, for some methods, the base weights) to factors, with no model pass
(DESIGN §1 "solve", §5 "methods").

Layers are solved independently; nothing here touches a model.  One :class:`Statistics` serves
every data-aware method, so ``solve(stats, method=...)`` can be called repeatedly on the same
statistics; weight-only methods need no statistics at all.
"""
from __future__ import annotations

import time

import torch

from . import lora_da, methods
from .linalg import canonical_signs
from .result import InitResult, LayerInit
from .stats import Statistics

METHODS = ("lora-da", "lora", "pissa", "milora", "lora-ga", "lora-one", "fisher-subspace")
WEIGHT_ONLY_METHODS = ("lora", "pissa", "milora")  # no statistics pass
NEEDS_WEIGHTS = ("pissa", "milora", "fisher-subspace")
DEFAULT_GAMMA = {"lora-da": 1024.0, "lora-ga": 16.0, "lora-one": 128.0}
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's own default


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


DAMPING_MODES = ("absolute", "relative")
GRADIENTS = ("fisher", "raw")


def check_options(*, method: str, num_train_samples: int, beta: float, alpha_b: float, gamma: float | None,
                  damping: float, damping_mode: str, gradient: str, loraga_variant: str,
                  pissa_niter: int | None) -> float | None:
    """Validate every scalar option; called before the statistics pass so that a typo costs no
    pass.  Returns ``gamma`` with the method's default filled in."""
    import math

    check_method(method)
    if not isinstance(num_train_samples, int) or num_train_samples <= 0:
        raise ValueError(f"num_train_samples must be a positive integer (the fine-tuning set size), got "
                         f"{num_train_samples!r}")
    gamma = DEFAULT_GAMMA.get(method) if gamma is None else gamma
    for label, value in (("beta", beta), ("alpha_b", alpha_b), ("damping", damping), ("gamma", gamma)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{label} must be finite, got {value!r}")
    if beta < 0 or (gamma is not None and gamma <= 0) or damping < 0:
        raise ValueError(f"need beta ≥ 0, gamma > 0 and damping ≥ 0; got beta={beta}, gamma={gamma}, damping={damping}")
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    if loraga_variant not in methods.LORAGA_VARIANTS:
        raise ValueError(f"loraga_variant must be one of {methods.LORAGA_VARIANTS}, got {loraga_variant!r}")
    if pissa_niter is not None and (not isinstance(pissa_niter, int) or pissa_niter < 0):
        raise ValueError(f"pissa_niter must be None (exact SVD) or a non-negative integer, got {pissa_niter!r}")
    return gamma


def check_rank(name: str, rank: int, in_features: int, out_features: int, method: str | None = None) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank > min(in_features, out_features):
        raise ValueError(
            f"rank {rank} exceeds min(in, out) = {min(in_features, out_features)} of layer {name!r} "
            f"({in_features}→{out_features}); lower the rank or exclude the layer with target_modules"
        )
    if method == "lora-ga" and 2 * rank > min(in_features, out_features):
        raise ValueError(
            f"LoRA-GA uses 2r = {2 * rank} singular triplets of the gradient but layer {name!r} "
            f"({in_features}→{out_features}) has only {min(in_features, out_features)}; lower the rank or "
            "exclude the layer with target_modules"
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


def lora_da_eigenpairs(terms: lora_da.OmegaTerms, r: int, residual_tol: float):
    """THE LoRA-DA eigen step: the r smallest eigenpairs of one layer's Ω (DESIGN §4).

    Kept as the single place where Ω meets an eigensolver, so that a batched solver (all layers
    of one width at once) can replace this dense per-layer ``eigh`` without touching the rest.
    Returns (values [r], vectors [in, r], residual, fallback).
    """
    return dense_smallest_eigenpairs(terms.dense(), r, residual_tol)


def solve(
    stats: Statistics | None,
    rank: int | None = None,
    *,
    method: str = "lora-da",
    weights: dict[str, torch.Tensor] | None = None,
    kinds: dict[str, str] | None = None,
    ranks: dict[str, int] | None = None,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    num_train_samples: int = 100_000,
    beta: float = 0.03,
    alpha_b: float = 1.0,
    gamma: float | None = None,
    damping: float = 1e-6,
    damping_mode: str = "absolute",
    gradient: str = "fisher",
    loraga_variant: str = "paper",
    pissa_niter: int | None = None,
    seed: int | None = None,
    freeze_a: bool = False,
    dtype: torch.dtype = torch.float64,
    device=None,
    residual_tol: float = 1e-6,
) -> InitResult:
    """Factors for every layer, by ``method`` (DESIGN §4-5; formulas in :mod:`.methods`).

    * ``stats``: the statistics of one :func:`~loradafast.collect` pass; they serve every
      data-aware method (``lora-da``, ``lora-ga``, ``lora-one``, ``fisher-subspace``).  None for
      the weight-only methods (``lora``, ``pissa``, ``milora``).
    * ``weights``: layer name → base weight as ``[out, in]`` (``Target.weight_out_in()``;
      transposed for ``Conv1D``), needed by ``pissa``, ``milora`` and ``fisher-subspace``, and
      giving the layers and their shapes when there are no statistics.  ``kinds`` gives the
      storage of each layer ("linear" or "conv1d") in that case.
    * ``rank`` is the default rank (8), ``ranks`` overrides it per layer; ``lora_alpha`` and
      ``use_rslora`` give PEFT's scaling ``s`` used by the methods that move the base weight.
    * LoRA-DA: ``num_train_samples``, ``beta`` (0: no variance term), ``alpha_b``, ``damping``,
      ``damping_mode``, ``gradient`` ("fisher", or "raw": Δ = −G, no preconditioning).
    * ``gamma``: the scale denominator of ``lora-da`` (1024), ``lora-ga`` (16), ``lora-one``
      (128); None takes the method's default.
    * ``loraga_variant``: "paper" (the LoRA-GA authors' code) or "peft" (PEFT's implementation).
    * ``pissa_niter``: None for the exact SVD, an integer for ``torch.svd_lowrank`` with that many
      subspace iterations (PEFT's ``"pissa_niter_<n>"``).
    * ``seed``: the generator seed of ``lora``'s random A (None: the global RNG, as PEFT).
    * ``freeze_a``: LoRA-FA; recorded in the result, honoured by ``apply_to``.

    The dense solves run in ``dtype`` (float64 by default: Zλ⁻¹ with the official absolute
    damping of 1e-6 spans many orders of magnitude, and its smallest eigenvectors are what we
    keep); the factors are returned in float32.
    """
    check_method(method)
    if method not in WEIGHT_ONLY_METHODS and stats is None:
        raise ValueError(f"method {method!r} is data-aware and needs the statistics of a collect pass")
    if method in NEEDS_WEIGHTS and weights is None:
        raise ValueError(f"method {method!r} needs the base weights: pass weights={{name: W [out, in]}}")
    if stats is None and weights is None:
        raise ValueError(f"method {method!r} needs the layers: pass weights={{name: W [out, in]}} (or statistics)")
    gamma = check_options(method=method, num_train_samples=num_train_samples, beta=beta, alpha_b=alpha_b,
                          gamma=gamma, damping=damping, damping_mode=damping_mode, gradient=gradient,
                          loraga_variant=loraga_variant, pissa_niter=pissa_niter)

    shapes = _layer_shapes(stats, weights, kinds)
    rank = 8 if rank is None else rank
    ranks = ranks or {}
    for name, (fin, fout, _) in shapes.items():
        check_rank(name, ranks.get(name, rank), fin, fout, method)
    lora_alpha = PEFT_DEFAULT_ALPHA if lora_alpha is None else lora_alpha
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    started = time.perf_counter()
    layers: dict[str, LayerInit] = {}
    for name, (fin, fout, kind) in shapes.items():
        r = ranks.get(name, rank)
        scaling = methods.lora_scaling(lora_alpha, r, use_rslora)
        if method == "lora-da":
            a, b, diagnostics = _lora_da_layer(stats, name, r, dtype=dtype, device=device, beta=beta,
                                               num_train_samples=num_train_samples, alpha_b=alpha_b, gamma=gamma,
                                               damping=damping, damping_mode=damping_mode, gradient=gradient,
                                               residual_tol=residual_tol)
            layers[name] = LayerInit(name, a.float(), b.float(), kind=kind, diagnostics=diagnostics)
            continue
        if method == "lora":
            f = methods.lora(fout, fin, r, generator=generator)
        else:
            dev = device if device is not None else (weights[name].device if weights is not None and name in weights
                                                     else stats.layers[name].g_sum.device)
            if method == "pissa":
                f = methods.pissa(weights[name].to(dev, dtype), r, scaling, niter=pissa_niter)
            elif method == "milora":
                f = methods.milora(weights[name].to(dev, dtype), r, scaling)
            elif method == "lora-ga":
                f = methods.lora_ga(stats.G(name, dtype).to(dev), r, gamma=gamma, variant=loraga_variant)
            elif method == "lora-one":
                f = methods.lora_one(stats.G(name, dtype).to(dev), r, gamma=gamma)
            else:  # fisher-subspace
                f = methods.fisher_subspace(weights[name].to(dev, dtype), stats.Y(name, dtype).to(dev),
                                            stats.Z(name, dtype).to(dev), r, scaling)
        diagnostics = dict(f.diagnostics)
        if stats is not None:
            diagnostics.update(num_tokens=stats.num_tokens, num_sequences=stats.num_sequences)
        layers[name] = LayerInit(name, f.lora_A.float(), f.lora_B.float(), kind=kind,
                                 subtract_scaling=scaling if f.moves_base else None, diagnostics=diagnostics)

    options = {"dtype": str(dtype).replace("torch.", "")}
    if method == "lora-da":
        options.update(num_train_samples=num_train_samples, beta=beta, alpha_b=alpha_b, gamma=gamma,
                       damping=damping, damping_mode=damping_mode, gradient=gradient)
    elif method == "lora-ga":
        options.update(gamma=gamma, loraga_variant=loraga_variant)
    elif method == "lora-one":
        options.update(gamma=gamma)
    elif method == "pissa":
        options.update(pissa_niter=pissa_niter)
    elif method == "lora":
        options.update(seed=seed)
    if stats is not None:
        options["y_factor"] = stats.y_factor
    meta = stats.meta if stats is not None else {}
    return InitResult(
        layers=layers,
        method=method,
        rank=rank,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        target_modules=meta.get("target_modules"),
        base_model_name_or_path=meta.get("base_model_name_or_path"),
        task_type=meta.get("task_type"),
        timings={"solve_s": time.perf_counter() - started},
        options=options,
        freeze_a=freeze_a,
    )


def _layer_shapes(stats: Statistics | None, weights: dict | None,
                  kinds: dict | None) -> dict[str, tuple[int, int, str]]:
    """name → (in, out, kind); statistics and weights, when both are given, must agree."""
    if stats is not None:
        shapes = {n: (s.in_features, s.out_features, s.kind) for n, s in stats.layers.items()}
        if weights is not None:
            missing = sorted(set(shapes) - set(weights))
            if missing:
                raise ValueError(f"no weight given for {len(missing)} layer(s) of the statistics, e.g. {missing[:3]}")
            for n, (fin, fout, _) in shapes.items():
                if tuple(weights[n].shape) != (fout, fin):
                    raise ValueError(
                        f"layer {n!r}: the statistics are for a {fin}→{fout} layer, the weight has shape "
                        f"{tuple(weights[n].shape)}; weights must be [out, in] (transpose Conv1D weights)"
                    )
        return shapes
    kinds = kinds or {}
    return {n: (w.shape[1], w.shape[0], kinds.get(n, "linear")) for n, w in weights.items()}


def _lora_da_layer(stats: Statistics, name: str, r: int, *, dtype, device, beta, num_train_samples, alpha_b,
                   gamma, damping, damping_mode, gradient, residual_tol):
    s = stats.layers[name]
    dev = device if device is not None else s.g_sum.device
    Z = stats.Z(name, dtype).to(dev)
    Y = stats.Y(name, dtype).to(dev)
    G = stats.G(name, dtype).to(dev)
    factors = lora_da.damped_factors(Z, Y, damping, damping_mode)
    terms = lora_da.omega_terms(G, factors, beta=beta, num_train_samples=num_train_samples,
                                alpha_b=alpha_b, gradient=gradient)
    values, vectors, residual, fallback = lora_da_eigenpairs(terms, r, residual_tol)
    a, b = lora_da.lora_da_factors(terms, vectors, gamma)
    return a, b, {
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
    }
