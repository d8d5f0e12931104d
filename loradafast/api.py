"""The public entry points: ``initialize`` and ``get_peft_model``."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from torch import nn

from . import distributed, passes
from .integrations import peft as peft_integration
from .integrations.peft import AdapterLayout
from .methods.registry import WEIGHT_ONLY_METHODS, build_config, get_method, method_keywords
from .planner import parse_bytes
from .options import MethodConfig, check_pass_options, check_rank, check_ranks
from .result import InitResult
from .statistics.collector import is_causal_lm
from .targets import base_model_of, find_targets, is_peft_model, model_meta


def initialize(model: nn.Module, loader: Iterable | None, rank: int | None = None, *, method: str = "lora-da",
               config: MethodConfig | None = None, target_modules=None, lora_alpha: float | None = None,
               use_rslora: bool = False, ranks: dict[str, int] | None = None, freeze_a: bool = False,
               max_samples: int | None = 256, loss_fn: Callable | None = None, adapter_name: str | None = None,
               progress: bool = True, memory_budget: int | float | str | None = None, **options) -> InitResult:
    """LoRA initialisation by ``method``, data-aware ones in one streaming pass over ``loader``.

    A plain model is left unchanged and the result carries the adapter (``result.state_dict()``,
    ``result.lora_config``, ``result.save(dir)``).  A ``PeftModel`` has its LoRA layers filled in
    place (and, for methods that move the base weight, its base weights updated), its ranks,
    alphas and targets taken from its layers; the statistics pass sees its base model only (every
    adapter off), and ``result.save`` writes its own LoraConfig, changed only where the method
    requires it.  Options a method cannot honour (DoRA with a base-moving method, merged
    adapters, LoRA variants other than DoRA) are refused before the pass.
    ``rank`` defaults to 8 (or the PEFT model's rank); ``ranks`` maps layer names to other ranks.
    ``max_samples`` caps the sequences of the pass, ``loss_fn`` replaces the causal-LM loss.

    ``memory_budget`` (bytes, or a string such as ``"40GB"``; default: the device's free memory
    less a 10 % margin; ``math.inf`` for no limit) bounds the statistics and the solve
    (docs/design.md §6.4): when they do not fit it at once, the layers are split into several
    passes over the loader, each solved and freed before the next; the result is the same.  Then
    ``loader`` must be re-iterable and yield the same batches each time.  The plan is printed
    (with ``progress``), logged, and kept as ``result.plan``.

    ``method`` (docs/design.md §5; formulas and sources in :mod:`loradafast.methods`) takes its
    options as one validated object, ``config=`` (:mod:`loradafast.options`), or as the keywords
    that build it (``options``; None means the default, and a keyword that is not an option of
    the method raises):

    * ``"lora-da"`` (default, docs/design.md §4; :class:`~loradafast.LoraDAConfig`): ablations
      ``beta=0`` (no variance term) and ``gradient="raw"`` (Δ = −G, no Fisher preconditioning);
      ``y_factor`` "diag" or "full"; ``num_train_samples``, ``alpha_b``, ``damping``,
      ``damping_mode``, ``gamma`` (1024); ``eigensolver`` ("auto": batched LOBPCG on CUDA, dense
      ``eigh`` on CPU up to a measured width; "lobpcg"; "dense"), ``residual_tol``.
    * ``"lora-ga"`` (``gamma`` 16, ``loraga_variant`` "paper" or "peft"), ``"lora-one"``
      (``gamma`` 128), ``"fisher-subspace"`` (``y_factor``): data-aware, from the same pass.
    * ``"lora"`` (PEFT's default; ``seed``), ``"pissa"`` (``pissa_niter``: None for the exact
      SVD, n for ``svd_lowrank`` with n iterations), ``"milora"``: weight-only; no statistics
      pass, ``loader`` may be None.
    * every method: ``solve_dtype`` (float64), the precision of the dense solves.

    ``pissa``, ``milora``, ``lora-ga`` and ``fisher-subspace`` move the base weight to
    ``W − s·B·A`` so the output is unchanged at initialisation: see :meth:`InitResult.save` for the
    two ways to save them.  ``freeze_a=True`` gives LoRA-FA (``lora_A`` frozen when applied).
    """
    started = time.perf_counter()
    model = distributed.unwrap(model)  # DistributedDataParallel: its module
    record = get_method(method)
    config = build_config(record, config, method_keywords("initialize", options, "solve_dtype"))
    check_pass_options(max_samples)
    if memory_budget is not None:
        parse_bytes(memory_budget)  # a malformed budget fails here, also for methods without a pass
    if record.data_aware and loader is None:
        raise ValueError(
            f"method {method!r} is data-aware and needs a loader of training samples; the weight-only methods "
            f"{', '.join(WEIGHT_ONLY_METHODS)} run without one"
        )
    targets, layout = _targets_and_layout(model, record, rank=rank, ranks=ranks, target_modules=target_modules,
                                          adapter_name=adapter_name, lora_alpha=lora_alpha, use_rslora=use_rslora)
    if record.data_aware:
        weights = {t.name: t.weight_out_in().detach() for t in targets} if record.needs_weights else None
        result, pass_s = passes.collect_and_solve(
            model, loader, targets, record, config, layout, memory_budget=memory_budget, max_samples=max_samples,
            loss_fn=loss_fn, progress=progress, adapter_name=adapter_name, freeze_a=freeze_a, weights=weights)
    else:
        pass_s = time.perf_counter() - started
        # Weight-only methods read the layer shapes from the weights too; .detach() views, no copies.
        result = passes.solve_weights(record, config, targets, layout, freeze_a=freeze_a, progress=progress)
    if not record.data_aware:  # collect() records these in the statistics otherwise
        _record_model(result, model, targets, causal=loss_fn is None and is_causal_lm(model),
                      adapter_name=adapter_name)
    apply_started = time.perf_counter()
    if is_peft_model(model):
        peft_integration.attach(result, model, targets, layout, adapter_name)
    result.timings = {"pass_s": pass_s, "solve_s": result.timings["solve_s"],
                      "apply_s": time.perf_counter() - apply_started, "total_s": time.perf_counter() - started}
    return result


def _record_model(result: InitResult, model: nn.Module, targets, *, causal: bool, adapter_name) -> None:
    meta = model_meta(model, targets, causal=causal, adapter_name=adapter_name)
    result.target_modules = meta["target_modules"]
    result.base_model_name_or_path = meta["base_model_name_or_path"]
    result.task_type = meta["task_type"]


def _targets_and_layout(model, record, *, rank, ranks, target_modules, adapter_name, lora_alpha, use_rslora):
    """The target layers and their layout, every rank checked: all before the pass."""
    targets = find_targets(model, target_modules, adapter_name=adapter_name)
    if not targets:
        raise ValueError(
            f"target_modules={target_modules!r} matches no nn.Linear or Conv1D layer of "
            f"{type(base_model_of(model)).__name__}; check the names with model.named_modules()"
        )
    if is_peft_model(model):
        layout = peft_integration.peft_layout(model, targets, adapter_name=adapter_name, method=record, rank=rank,
                                              ranks=ranks)
    else:
        ranks = dict(ranks or {})
        check_ranks(ranks, [t.name for t in targets])
        layout = AdapterLayout(8 if rank is None else rank, ranks, lora_alpha, use_rslora)
    for t in targets:  # fail before the pass, not after it
        check_rank(t.name, layout.ranks.get(t.name, layout.rank), t.in_features, t.out_features, record)
    return targets, layout


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
    def fill(peft_model):
        return initialize(peft_model, loader, adapter_name=adapter_name, **options)

    return peft_integration.wrap(model, lora_config, adapter_name, options, fill)
