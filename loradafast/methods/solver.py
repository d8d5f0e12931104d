"""From statistics (and, for some methods, the base weights) to factors, with no model pass
(DESIGN §1 "solve", §5 "methods").

Layers are solved independently; nothing here touches a model.  One :class:`Statistics` serves
every data-aware method, so ``solve(stats, method=...)`` can be called repeatedly on the same
statistics; weight-only methods need no statistics at all.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from . import baselines as methods
from .lora_da_solve import EIGENSOLVERS, solve_lora_da
from ..result import InitResult, LayerInit
from ..statistics.store import Statistics

METHODS = ("lora-da", "lora", "pissa", "milora", "lora-ga", "lora-one", "fisher-subspace")
WEIGHT_ONLY_METHODS = ("lora", "pissa", "milora")  # no statistics pass
NEEDS_WEIGHTS = ("pissa", "milora", "fisher-subspace")
MOVES_BASE = ("pissa", "milora", "lora-ga", "fisher-subspace")  # the base weight becomes W − s·B·A
DEFAULT_GAMMA = {"lora-da": 1024.0, "lora-ga": 16.0, "lora-one": 128.0}
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's own default


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


DAMPING_MODES = ("absolute", "relative")
GRADIENTS = ("fisher", "raw")


def check_options(*, method: str, num_train_samples: int, beta: float, alpha_b: float, gamma: float | None,
                  damping: float, damping_mode: str, gradient: str, loraga_variant: str,
                  pissa_niter: int | None, eigensolver: str = "auto") -> float | None:
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
    if eigensolver not in EIGENSOLVERS:
        raise ValueError(f"eigensolver must be one of {EIGENSOLVERS}, got {eigensolver!r}")
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


def check_ranks(ranks: dict | None, names, label: str = "ranks") -> None:
    """Every key of a per-layer ``ranks`` (or ``alphas``) dict must name a target layer: a typo
    would silently leave that layer at the default."""
    import difflib

    names = list(names)
    unknown = [key for key in (ranks or {}) if key not in names]
    if not unknown:
        return
    hints = []
    for key in unknown[:3]:
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    shown = ", ".join(repr(n) for n in names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    raise ValueError(
        f"{label} has {len(unknown)} key(s) that name no target layer: {', '.join(hints)}; the keys are layer paths "
        f"relative to the base model, one of: {shown}"
    )


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
    alphas: dict[str, float] | None = None,
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
    residual_tol: float | None = None,
    eigensolver: str = "auto",
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
      ``use_rslora`` give PEFT's scaling ``s`` used by the methods that move the base weight,
      ``alphas`` overrides ``lora_alpha`` per layer (PEFT's ``alpha_pattern``).
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
    gamma = check_options(method=method, num_train_samples=num_train_samples, beta=beta, alpha_b=alpha_b,
                          gamma=gamma, damping=damping, damping_mode=damping_mode, gradient=gradient,
                          loraga_variant=loraga_variant, pissa_niter=pissa_niter, eigensolver=eigensolver)
    if method not in WEIGHT_ONLY_METHODS and stats is None:
        raise ValueError(f"method {method!r} is data-aware and needs the statistics of a collect pass")
    if method in NEEDS_WEIGHTS and weights is None:
        raise ValueError(f"method {method!r} needs the base weights: pass weights={{name: W [out, in]}}")
    if stats is None and weights is None:
        raise ValueError(f"method {method!r} needs the layers: pass weights={{name: W [out, in]}} (or statistics)")

    shapes = _layer_shapes(stats, weights, kinds)
    rank = 8 if rank is None else rank
    ranks = ranks or {}
    alphas = alphas or {}
    check_ranks(ranks, shapes)
    check_ranks(alphas, shapes, "alphas")
    for name, (fin, fout, _) in shapes.items():
        check_rank(name, ranks.get(name, rank), fin, fout, method)
    lora_alpha = PEFT_DEFAULT_ALPHA if lora_alpha is None else lora_alpha
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    started = time.perf_counter()
    layers: dict[str, LayerInit] = {}
    if method == "lora-da":
        # All layers together: shared inputs factorised once, one eigensolve per width group.
        solved = solve_lora_da(stats, {name: ranks.get(name, rank) for name in shapes}, dtype=dtype, device=device,
                               beta=beta, num_train_samples=num_train_samples, alpha_b=alpha_b, gamma=gamma,
                               damping=damping, damping_mode=damping_mode, gradient=gradient,
                               residual_tol=residual_tol, eigensolver=eigensolver)
        for name, (fin, fout, kind) in shapes.items():
            a, b, diagnostics = solved[name]
            layers[name] = LayerInit(name, a.float(), b.float(), kind=kind, diagnostics=diagnostics)
        _warn_if_degraded(layers, dtype)
    else:
        for name, (fin, fout, kind) in shapes.items():
            r = ranks.get(name, rank)
            scaling = methods.lora_scaling(alphas.get(name, lora_alpha), r, use_rslora)
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
        alphas={name: a for name, a in alphas.items() if a != lora_alpha},
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


# Above this lower bound on cond(Zλ) or cond(Yλ) the factor is close to singular in the working
# precision: the solve still runs, but more damping (damping_mode="relative") is advisable.
CONDITION_WARNING = {torch.float64: 1e12, torch.float32: 1e5}


def _warn_if_degraded(layers: dict[str, LayerInit], dtype: torch.dtype) -> None:
    """One warning summarising every layer whose solve took a fallback or looks fragile."""
    import warnings

    limit = CONDITION_WARNING.get(dtype, 1e12)
    notes = defaultdict(list)
    for name, layer in layers.items():
        d = layer.diagnostics
        if d.get("eigensolver_fallback"):
            notes["re-solved with dense eigh after the iterative solver missed the tolerance"].append(name)
        if not d.get("eigensolver_converged", True):
            notes["eigen-residual above the tolerance"].append(name)
        if d.get("damping_raised"):
            notes["damping raised above the requested value to make a rank-deficient factor positive definite "
                  "(see damping_z / damping_y)"].append(name)
        if d.get("cholesky_dtype") == "float64" and dtype != torch.float64:
            notes["Cholesky retried in float64"].append(name)
        if max(d.get("z_condition_estimate", 0.0), d.get("y_condition_estimate", 0.0)) > limit:
            notes[f"damped factor condition number above {limit:.0e} (consider damping_mode='relative')"].append(name)
    if notes:
        lines = [f"- {what}: {len(names)} layer(s), e.g. {', '.join(names[:3])}" for what, names in notes.items()]
        warnings.warn("loradafast: the solve degraded on some layers (details in result.layers[name].diagnostics)\n"
                      + "\n".join(lines), RuntimeWarning, stacklevel=3)
