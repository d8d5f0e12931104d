"""The public entry points: ``initialize`` and ``get_peft_model``."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .methods.registry import WEIGHT_ONLY_METHODS, build_config, check_rank, check_ranks, get_method
from .methods.solver import solve_with
from .options import MethodConfig, check_pass_options
from .result import InitResult, dora_refusal, peft_extra_state
from .statistics.collector import collect, is_causal_lm
from .targets import (_active_adapter, base_model_of, check_not_merged, find_targets, is_peft_model, model_meta,
                      peft_config_of, undone_on_failure)

# PEFT initialisations that are not plain LoRA's: they ran when the PEFT model was created, and
# pissa, olora, corda, loftq and lora_ga moved its base weight then.
_PEFT_OWN_INIT = "init_lora_weights={init!r} asks PEFT to initialise the adapter; loradafast does that"


def initialize(
    model: nn.Module,
    loader: Iterable | None,
    rank: int | None = None,
    *,
    method: str = "lora-da",
    config: MethodConfig | None = None,
    target_modules=None,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    max_samples: int | None = 256,
    freeze_a: bool = False,
    loss_fn: Callable | None = None,
    adapter_name: str | None = None,
    ranks: dict[str, int] | None = None,
    progress: bool = True,
    num_train_samples: int | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    y_factor: str | None = None,
    damping: float | None = None,
    damping_mode: str | None = None,
    alpha_b: float | None = None,
    gradient: str | None = None,
    loraga_variant: str | None = None,
    pissa_niter: int | None = None,
    seed: int | None = None,
    solve_dtype: torch.dtype | None = None,
    eigensolver: str | None = None,
    residual_tol: float | None = None,
) -> InitResult:
    """LoRA initialisation by ``method``, data-aware ones in one streaming pass over ``loader``.

    A plain model is left unchanged and the result carries the adapter (``result.state_dict()``,
    ``result.lora_config``, ``result.save(dir)``).  A ``PeftModel`` has its LoRA layers filled in
    place (and, for methods that move the base weight, its base weights updated), its ranks,
    alphas and targets taken from its layers; the statistics pass sees its base model only (every
    adapter off), and ``result.save`` writes its own LoraConfig, changed only where the method
    requires it.  Options a method cannot honour (DoRA with a base-moving method, merged
    adapters, LoRA variants other than DoRA) are refused before the pass.
    ``rank`` defaults to 8 (or the PEFT model's rank); ``ranks`` maps layer names to other ranks.

    ``method`` (docs/design.md §5; formulas and sources in :mod:`loradafast.methods`), and its
    options, given either as one validated object, ``config=`` (:mod:`loradafast.options`), or as
    the keywords that build it (None: the default; a keyword that is not an option of the method
    raises):

    * ``"lora-da"`` (default, docs/design.md §4; :class:`~loradafast.LoraDAConfig`): ablations
      ``beta=0`` (no variance term) and ``gradient="raw"`` (Δ = −G, no Fisher preconditioning);
      ``y_factor`` "diag" or "full"; ``num_train_samples``, ``alpha_b``, ``damping``,
      ``damping_mode``, ``gamma`` (1024), ``eigensolver``, ``residual_tol``.
    * ``"lora-ga"`` (``gamma`` 16, ``loraga_variant`` "paper" or "peft"), ``"lora-one"``
      (``gamma`` 128), ``"fisher-subspace"`` (``y_factor``): data-aware, from the same statistics
      pass.
    * ``"lora"`` (PEFT's default; ``seed``), ``"pissa"`` (``pissa_niter``: None for the exact
      SVD, n for ``svd_lowrank`` with n iterations), ``"milora"``: weight-only; no statistics
      pass, ``loader`` may be None.
    * every method: ``solve_dtype`` (float64), the precision of the dense solves.

    ``pissa``, ``milora``, ``lora-ga`` and ``fisher-subspace`` move the base weight to
    ``W − s·B·A`` so the output is unchanged at initialisation: see :meth:`InitResult.save` for the
    two ways to save them.  ``freeze_a=True`` gives LoRA-FA (``lora_A`` frozen when applied).
    ``max_samples`` caps the sequences of the pass, ``loss_fn`` replaces the causal-LM loss.

    ``eigensolver``: "auto" (batched LOBPCG on CUDA, dense ``eigh`` on CPU up to a measured
    width), "lobpcg" or "dense"; every layer's residual is checked either way.
    """
    started = time.perf_counter()
    record = get_method(method)
    config = build_config(record, config, dict(
        num_train_samples=num_train_samples, beta=beta, gamma=gamma, y_factor=y_factor, damping=damping,
        damping_mode=damping_mode, alpha_b=alpha_b, gradient=gradient, loraga_variant=loraga_variant,
        pissa_niter=pissa_niter, seed=seed, solve_dtype=solve_dtype, eigensolver=eigensolver,
        residual_tol=residual_tol))
    check_pass_options(max_samples)
    if record.data_aware and loader is None:
        raise ValueError(
            f"method {method!r} is data-aware and needs a loader of training samples; the weight-only methods "
            f"{', '.join(WEIGHT_ONLY_METHODS)} run without one"
        )
    targets, layout = _targets_and_layout(model, record, rank=rank, ranks=ranks, target_modules=target_modules,
                                          adapter_name=adapter_name, lora_alpha=lora_alpha, use_rslora=use_rslora)
    stats = None
    if record.data_aware:
        stats = collect(model, loader, y_factor=getattr(config, "y_factor", None) or "diag",
                        max_samples=max_samples, loss_fn=loss_fn, progress=progress, adapter_name=adapter_name,
                        targets=targets)
    pass_s = time.perf_counter() - started
    # Weight-only methods read the layer shapes from the weights too; .detach() views, no copies.
    needs_weights = stats is None or record.needs_weights
    weights = {t.name: t.weight_out_in().detach() for t in targets} if needs_weights else None
    result = solve_with(record, config, stats, layout.rank, weights=weights, kinds={t.name: t.kind for t in targets},
                        ranks=layout.ranks, lora_alpha=layout.lora_alpha, use_rslora=layout.use_rslora,
                        alphas=layout.alphas, freeze_a=freeze_a)
    if stats is None:  # collect() records these in the statistics otherwise
        meta = model_meta(model, targets, causal=loss_fn is None and is_causal_lm(model), adapter_name=adapter_name)
        result.target_modules = meta["target_modules"]
        result.base_model_name_or_path = meta["base_model_name_or_path"]
        result.task_type = meta["task_type"]
    apply_started = time.perf_counter()
    if is_peft_model(model):
        result.apply_to(model, adapter_name)
        result.peft_config = copy.deepcopy(layout.peft_config)
        adapter = adapter_name or _active_adapter(targets[0].lora_layer)
        result.extra_state = peft_extra_state(model, adapter, result.layers)
    result.timings = {
        "pass_s": pass_s,
        "solve_s": result.timings["solve_s"],
        "apply_s": time.perf_counter() - apply_started,
        "total_s": time.perf_counter() - started,
    }
    return result


@dataclass
class _Layout:
    """The adapter's ranks and scalings, from the arguments or from a PEFT model's layers."""

    rank: int
    ranks: dict
    lora_alpha: float | None
    use_rslora: bool
    alphas: dict | None = None
    peft_config: object | None = None


def _targets_and_layout(model, record, *, rank, ranks, target_modules, adapter_name, lora_alpha, use_rslora):
    """The target layers and their layout, every rank checked: all before the pass."""
    targets = find_targets(model, target_modules, adapter_name=adapter_name)
    if not targets:
        raise ValueError(
            f"target_modules={target_modules!r} matches no nn.Linear or Conv1D layer of "
            f"{type(base_model_of(model)).__name__}; check the names with model.named_modules()"
        )
    if is_peft_model(model):
        layout = _peft_layout(model, targets, adapter_name=adapter_name, method=record, rank=rank, ranks=ranks)
    else:
        ranks = dict(ranks or {})
        check_ranks(ranks, [t.name for t in targets])
        layout = _Layout(8 if rank is None else rank, ranks, lora_alpha, use_rslora)
    for t in targets:  # fail before the pass, not after it
        check_rank(t.name, layout.ranks.get(t.name, layout.rank), t.in_features, t.out_features, record)
    return targets, layout


def _peft_layout(model: nn.Module, targets, *, adapter_name: str | None, method, rank: int | None,
                 ranks: dict | None) -> _Layout:
    """A PEFT model's adapter as its layers define it: rank, per-layer ranks that differ,
    lora_alpha, per-layer alphas that differ, use_rslora and its LoraConfig.  ``rank`` and ``ranks``, if
    given, must agree with the layers."""
    peft_config = peft_config_of(model, adapter_name)
    _check_peft_adapter(model, targets, peft_config, adapter_name=adapter_name, method=method)
    first = targets[0]
    default_rank = peft_config.r if peft_config is not None else first.rank
    default_alpha = peft_config.lora_alpha if peft_config is not None else first.alpha
    use_rslora = peft_config.use_rslora if peft_config is not None else first.use_rslora
    if rank is not None and rank != default_rank:
        raise ValueError(
            f"rank={rank} was requested but the PEFT model's LoRA layers have rank {default_rank}; "
            "pass rank=None (or the same rank), or wrap the base model with a new LoraConfig"
        )
    layer_ranks = {t.name: t.rank for t in targets}
    check_ranks(ranks, layer_ranks)
    differing = {name: r for name, r in (ranks or {}).items() if layer_ranks[name] != r}
    if differing:
        name, r = next(iter(differing.items()))
        raise ValueError(
            f"ranks asks rank {r} for {name!r}, whose LoRA layer has rank {layer_ranks[name]}: a PEFT model's ranks "
            "come from its LoraConfig (r, rank_pattern); pass ranks=None, or wrap the base model with a new LoraConfig"
        )
    ranks = {name: r for name, r in layer_ranks.items() if r != default_rank}
    alphas = {t.name: t.alpha for t in targets if t.alpha != default_alpha}
    return _Layout(default_rank, ranks, default_alpha, use_rslora, alphas, peft_config)


def _check_peft_adapter(model: nn.Module, targets, peft_config, *, adapter_name: str | None, method) -> None:
    """Refuse, before the pass, a PEFT adapter that this initialisation cannot honour."""
    check_not_merged(model)
    init = getattr(peft_config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower() != "gaussian":
        raise ValueError(
            _PEFT_OWN_INIT.format(init=init) + ", and PEFT already did it when it created this model (pissa, olora, "
            "corda, loftq and lora_ga also moved the base weights, which the statistics would see); create the "
            "PeftModel with init_lora_weights=True and choose the method with method=..."
        )
    for t in targets:
        adapter = adapter_name or _active_adapter(t.lora_layer)
        dora = bool(getattr(t.lora_layer, "use_dora", {}).get(adapter, False))
        variant = getattr(t.lora_layer, "lora_variant", {}).get(adapter)
        if variant is not None and not dora:
            raise ValueError(
                f"layer {t.name!r} uses the LoRA variant {type(variant).__name__}, which changes how lora_A and "
                "lora_B act; loradafast initialises plain LoRA and DoRA adapters: remove that option from the "
                "LoraConfig"
            )
        if dora and method.moves_base:
            raise ValueError(dora_refusal(method.name))


# initialize's options that the LoraConfig holds when get_peft_model builds the adapter.
_CONFIG_OPTIONS = {"rank": "r", "ranks": "rank_pattern", "target_modules": "target_modules",
                   "lora_alpha": "lora_alpha", "use_rslora": "use_rslora"}


def get_peft_model(model: nn.Module, loader: Iterable | None, lora_config, *, adapter_name: str = "default",
                   **options):
    """``peft.get_peft_model`` with the LoRA layers initialised by loradafast.

    PEFT wraps ``model`` first, so the layers initialised are exactly those PEFT chooses from
    ``lora_config`` (its per-architecture default targets, ``layers_to_transform``,
    ``exclude_modules``, ``rank_pattern``, ``alpha_pattern``, ...).  The PEFT model is then
    filled as by ``initialize(peft_model, loader, **options)``, whose statistics pass sees the
    base model only (and, for methods that move the base weight, its base weights are updated, as
    PEFT's own PiSSA does).  On any failure the wrapping is undone: ``model`` is left exactly as
    it was (modules, parameters, flags, modes, hooks, attributes).  ``options`` go to
    :func:`initialize` (``method=...``; ``loader`` may be None for weight-only methods).
    The :class:`InitResult` is attached as ``peft_model.loradafast_result``.
    """
    import peft

    if is_peft_model(model):
        raise ValueError("the model already carries LoRA layers; call loradafast.initialize(peft_model, loader)")
    owned = [name for name in options if name in _CONFIG_OPTIONS]
    if owned:
        fields = ", ".join(f"{name} → lora_config.{_CONFIG_OPTIONS[name]}" for name in owned)
        raise ValueError(f"{', '.join(owned)} belong to lora_config here; set them there ({fields})")
    init = lora_config.init_lora_weights
    if isinstance(init, str) and init.lower() != "gaussian":
        # PEFT would run its own init first, and pissa/olora/corda/lora_ga would move the base
        # weights before ours is applied on top.
        raise ValueError(_PEFT_OWN_INIT.format(init=init) + ": leave init_lora_weights=True and choose the method "
                         "with method=...")
    with undone_on_failure(model):
        peft_model = peft.get_peft_model(model, copy.deepcopy(lora_config), adapter_name=adapter_name)
        result = initialize(peft_model, loader, adapter_name=adapter_name, **options)
    peft_model.loradafast_result = result
    return peft_model
