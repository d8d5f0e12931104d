"""The PEFT-shaped entry points, in the form of PEFT's own data-aware initialisations (docs/peft_backend.md).

* :func:`get_peft_model`: ``peft.get_peft_model`` with the LoRA layers initialised by loradafast;
* :func:`preprocess_lora_da` (``peft.tuners.lora.loraga.preprocess_loraga``'s shape): the
  statistics pass and the solve on the plain model, for the layers that a ``LoraConfig`` will
  target; the factors are left on the model, and :func:`loradafast.get_peft_model` (or a PEFT
  ``init_lora_weights="lora_da"`` calling :func:`loradafast.integrations.peft_model.init_lora_layer`)
  writes them into the adapter.  ``cache_file=`` saves the statistics and loads them next time.
* :func:`get_lora_da_state_dict` (``get_eva_state_dict``'s shape): the adapter's state dict, for
  ``peft.set_peft_model_state_dict``; the model is not changed.

Every method of :data:`loradafast.METHODS` runs here (``method=``); "lora_da" in the names is the
default method's.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .. import api, distributed, user_warnings
from ..layout import AdapterLayout
from ..methods.registry import DEFAULT_METHOD, get_method
from ..options import MethodConfig, check_rank
from ..pipeline import Pipeline, RunOptions, check_data_source, method_and_options
from ..result import InitResult
from ..statistics import provenance
from ..statistics.collector import data_fingerprint
from ..statistics.sums import Statistics
from ..targets import Target, base_model_of, find_targets, is_peft_model, layer_kind
from . import peft_model as peft_writes

logger = logging.getLogger("loradafast")


def preprocess_lora_da(model: nn.Module, lora_config, loader: Iterable | None = None, *, method: str = DEFAULT_METHOD,
                       stats=None, cache_file: str | os.PathLike | None = None, config: MethodConfig | None = None,
                       max_samples: int | None = 256, loss_fn: Callable | None = None, freeze_a: bool = False,
                       progress: bool = True, memory_budget=None, **options) -> InitResult:
    """Initialise, from data, the LoRA layers that ``lora_config`` will create on ``model``; then
    ``loradafast.get_peft_model(model, lora_config)`` builds the adapter from them.

    As PEFT's ``preprocess_loraga(model, lora_config, train_step, cache_file=...)``: ``model`` is
    the plain (transformers) model, before any wrapping; the targets, ranks and scalings are those
    of ``lora_config`` (``target_modules``, None meaning PEFT's default for the architecture, which
    is then written into ``lora_config`` as PEFT does; ``exclude_modules``, ``layers_to_transform``,
    ``r``, ``rank_pattern``, ``lora_alpha``, ``alpha_pattern``, ``use_rslora``).  The data: a pass over
    ``loader``, or ``stats=`` (a :class:`~loradafast.Statistics` or its path), or ``cache_file``: a
    statistics file loaded if it exists, else written after the pass (then one pass, whatever the
    memory budget).  No weight changes here; each target layer carries its factors (attribute
    ``_loradafast_init``) until get_peft_model writes them.  ``method`` and the other keywords are
    :func:`loradafast.initialize`'s.  Returns the :class:`~loradafast.InitResult`.
    """
    if is_peft_model(model):
        raise ValueError("preprocess_lora_da runs on the plain model, before get_peft_model; a PeftModel is "
                         "initialised with loradafast.initialize(peft_model, loader)")
    result, targets = _solve_for_config(model, lora_config, loader, method=method, stats=stats, cache_file=cache_file,
                                        config=config, max_samples=max_samples, loss_fn=loss_fn, freeze_a=freeze_a,
                                        progress=progress, memory_budget=memory_budget, options=options)
    peft_writes.mark_preprocessed(model, result, targets)
    return result


def get_lora_da_state_dict(model: nn.Module, loader: Iterable | None = None, peft_config=None, *,
                           method: str = DEFAULT_METHOD, stats=None, adapter_name: str = "default",
                           convert_to_lora: bool | None = None, **options) -> dict[str, torch.Tensor]:
    """The initialised adapter as a state dict, the model unchanged (PEFT's ``get_eva_state_dict`` shape).

    ``model`` is a ``PeftModel`` (its LoRA layers of ``adapter_name`` are the targets) or a plain
    model with ``peft_config``; the data are ``loader`` or ``stats=``.  The keys and values are those
    of ``peft.get_peft_model_state_dict`` (no adapter name) of the PEFT model initialised by
    :func:`loradafast.get_peft_model` (or ``initialize``): the factors, and DoRA magnitudes computed
    from them, modules_to_save copies, LoRA biases; load them with
    ``peft.set_peft_model_state_dict(peft_model, state_dict, adapter_name)``.  A plain model is wrapped
    by PEFT for the reading, and the wrapping undone: no weight is copied but the modules_to_save
    ones the state dict holds.  For a method that moves the base weight, ``convert_to_lora``
    chooses as :meth:`InitResult.save` does (True: the rank-2r adapter for the unmodified base,
    whose LoraConfig is ``result.lora_config`` of :func:`loradafast.initialize`; False: the rank-r
    adapter for the residual base); DoRA is refused with such a method.
    """
    if is_peft_model(model):
        if peft_config is not None:
            raise ValueError("the PeftModel's own LoraConfig holds; pass peft_config=None")
        result = api.initialize(model, loader, method=method, stats=stats, adapter_name=adapter_name, apply=False,
                                **options)
        result.extra_state = peft_writes.extra_state_for(result, model, adapter_name)
    else:
        if peft_config is None:
            raise ValueError("peft_config (a LoraConfig) is required when model is not a PeftModel")
        if getattr(peft_config, "use_dora", False) and get_method(method).moves_base:  # before the pass
            raise ValueError(peft_writes.dora_refusal(method))
        lora_config = copy.deepcopy(peft_config)  # its target_modules None becomes PEFT's default here
        result, _ = _solve_for_config(model, lora_config, loader, method=method, stats=stats,
                                      cache_file=None, options=options, **_pop_pass_options(options))
        result.extra_state = peft_writes.config_extra_state(result, model, lora_config, adapter_name)
    if result.moves_base and convert_to_lora is None:
        raise ValueError(f"method {result.method!r} moves the base weights; choose convert_to_lora=True (a rank-2r "
                         "adapter for the unmodified base) or convert_to_lora=False (rank r, for the residual base)")
    state = result.converted_state_dict() if convert_to_lora else result.state_dict()
    return {k: v.detach() for k, v in state.items()}


def _pop_pass_options(options: dict) -> dict:
    """``preprocess_lora_da``'s own keywords out of ``options``, with their defaults (RunOptions')."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunOptions)}
    names = ("max_samples", "loss_fn", "freeze_a", "progress", "memory_budget")
    return {"config": options.pop("config", None), **{k: options.pop(k, defaults[k]) for k in names}}


def _solve_for_config(model, lora_config, loader, *, method, stats, cache_file, config, max_samples, loss_fn,
                      freeze_a, progress, memory_budget, options) -> tuple[InitResult, list[Target]]:
    """The factors of the layers ``lora_config`` targets in the plain ``model``."""
    started = time.perf_counter()
    record, config = method_and_options(method, config, options, "preprocess_lora_da")
    run_options = RunOptions(max_samples=max_samples, loss_fn=loss_fn, progress=progress, memory_budget=memory_budget,
                             freeze_a=freeze_a)
    cached = cache_file is not None and _cached(cache_file)
    if cached:
        if stats is not None:
            raise ValueError("pass either stats= or cache_file=, not both")
        stats = _cache_for(cache_file, loader, max_samples, loss_fn)
        loader = None
        logger.info("preprocess: statistics loaded from %s", cache_file)
    check_data_source(record, loader, stats)
    targets, layout = config_targets(model, lora_config, record)
    pipeline = Pipeline.create(model, record, config, targets, layout, run_options, started)
    if cache_file is not None and not cached and record.data_aware:
        stats = pipeline.collect(loader)
        _save_cache(stats, cache_file)
        loader = None
    result, pass_s = pipeline.solve(loader, stats)
    pipeline.apply(result, pass_s=pass_s, apply=False)  # the timings; the model is written later, by get_peft_model
    return result, targets


def _cache_for(cache_file, loader, max_samples, loss_fn):
    """The cached statistics, refused where ``loader`` yields other samples than those they were
    collected from (reading the loader costs no forward); without a loader, or in a distributed
    run (each rank holds a shard), the path as it is."""
    if loader is None or distributed.is_distributed():
        return cache_file
    stats = Statistics.load(cache_file)
    provenance.check_same_data(stats.meta.get("data_fingerprint"),
                               data_fingerprint(loader, max_samples=max_samples, loss_fn=loss_fn), cache_file)
    return stats


def _cached(cache_file) -> bool:
    """Whether ``cache_file`` holds the statistics, as rank 0's disk says for every rank of a
    distributed run: all ranks run the pass, whose collectives they join together, or none does.
    Each rank then loads its own path, so the file must be where every rank reads it (a shared disk,
    or a copy on every node); a rank that lacks the file rank 0 has fails, and every rank with it."""
    here = os.path.exists(cache_file) and os.path.getsize(cache_file) > 0
    if not distributed.is_distributed():
        return here
    decision = [here]
    torch.distributed.broadcast_object_list(decision, src=0)
    error = None
    if decision[0] and not here:
        error = FileNotFoundError(
            f"cache_file {os.fspath(cache_file)!r} exists on rank 0 but not on rank {distributed.rank()}, and rank 0's "
            "disk decides for every rank (here: load the statistics, no pass); put cache_file on a disk that every "
            "rank reads, or copy the file to every node"
        )
    distributed.agree_on_failure(error, "the check of cache_file")
    return decision[0]


def _save_cache(stats, cache_file) -> None:
    """``stats`` written to ``cache_file`` by rank 0 alone (every rank holds the same reduced sums,
    and ranks writing one path of a shared disk at once would corrupt it); every rank learns
    whether the write failed."""
    error = None
    if distributed.is_main():
        try:
            os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
            stats.save(cache_file)
            logger.info("preprocess: statistics saved to %s", cache_file)
        except Exception as e:  # noqa: BLE001 - every rank learns of it, then it is raised
            error = e
    distributed.agree_on_failure(error, "the write of cache_file")


def config_targets(model: nn.Module, lora_config, record=None) -> tuple[list[Target], AdapterLayout]:
    """The layers of ``model`` that ``peft.get_peft_model(model, lora_config)`` will wrap, and their
    ranks and alphas; ``lora_config.target_modules`` None becomes PEFT's default for the model type."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    if lora_config.target_modules is None:  # as preprocess_loraga does, before get_peft_model would
        model_type = LoraModel.get_model_config(model).get("model_type")
        default = LoraModel.target_module_mapping.get(model_type)
        if default is None:
            raise ValueError(f"PEFT has no default target_modules for model type {model_type!r}; set "
                             "lora_config.target_modules")
        lora_config.target_modules = set(default)
    base = base_model_of(model)
    matching = copy.deepcopy(lora_config)
    if matching.target_modules == "all-linear":  # PEFT's rule: every linear layer but the output layer
        matching.target_modules = {t.name for t in find_targets(base, None, allow_quantized=True)}
    targets = [Target(name, module, layer_kind(module)) for name, module in base.named_modules()
               if name and layer_kind(module) is not None and bool(check_target_module_exists(matching, name))]
    if not targets:
        raise ValueError(f"lora_config.target_modules={lora_config.target_modules!r} matches no nn.Linear or Conv1D "
                         f"layer of {type(base).__name__}")
    quantized = {t.name for t in find_targets(base, sorted(t.name for t in targets), allow_quantized=True)
                 if t.quantized}
    for t in targets:
        t.quantized = t.name in quantized

    def pattern(table: dict, name: str, default):
        return table.get(get_pattern_key(list(table), name), default)

    ranks = {t.name: pattern(lora_config.rank_pattern or {}, t.name, lora_config.r) for t in targets}
    alphas = {t.name: pattern(lora_config.alpha_pattern or {}, t.name, lora_config.lora_alpha) for t in targets}
    for t in targets:
        check_rank(t.name, ranks[t.name], t.in_features, t.out_features, record)
    layout = AdapterLayout(lora_config.r, {n: r for n, r in ranks.items() if r != lora_config.r},
                           lora_config.lora_alpha, lora_config.use_rslora,
                           {n: a for n, a in alphas.items() if a != lora_config.lora_alpha})
    return targets, layout


# ---- get_peft_model -------------------------------------------------------------------------------

PEFT_ARGUMENTS = {"adapter_name": "default", "mixed": False, "autocast_adapter_dtype": True, "revision": None,
                  "low_cpu_mem_usage": False}


def get_peft_model(model: nn.Module, peft_config=None, *args, loader: Iterable | None = None, stats=None,
                   **kwargs):
    """``peft.get_peft_model(model, peft_config, ...)`` with the LoRA layers initialised by loradafast.

    PEFT's own arguments (``adapter_name``, ``mixed``, ``autocast_adapter_dtype``, ``revision``,
    ``low_cpu_mem_usage``), positional in PEFT's order or by keyword, go to PEFT; the data come as
    ``loader=`` (a statistics pass) or ``stats=`` (a :class:`Statistics` or its path), or from a
    :func:`~loradafast.preprocess_lora_da` run on ``model`` before (neither given); the other keywords
    go to :func:`initialize` (``method=...``, the method's options, ``max_samples``, ...).  Weight-only
    methods need no data.  ``get_peft_model(model, loader, lora_config, **options)``, the older
    argument order, still works.

    PEFT wraps ``model`` first, so the layers initialised are exactly those PEFT chooses from
    ``peft_config`` (its per-architecture default targets, ``layers_to_transform``,
    ``exclude_modules``, ``rank_pattern``, ``alpha_pattern``, ...).  The PEFT model is then
    filled as by ``initialize(peft_model, loader, **options)``, whose statistics pass sees the
    base model only (and, for methods that move the base weight, its base weights are updated, as
    PEFT's own PiSSA does).  On any failure the wrapping is undone: ``model`` is left exactly as
    it was (modules, parameters, flags, modes, hooks, attributes).
    The :class:`InitResult` is attached as ``peft_model.loradafast_result``.
    """
    peft_config, loader, peft_kwargs, options = _peft_model_arguments(peft_config, args, loader, kwargs)
    adapter_name = peft_kwargs["adapter_name"]
    preprocessed = getattr(model, peft_writes.PREPROCESSED, None)
    if preprocessed is not None and loader is None and stats is None:
        options.pop("progress", None)  # nothing left to show: the pass and the solve ran in preprocess
        if options:
            raise ValueError(f"{', '.join(options)}: the model was preprocessed (preprocess_lora_da), whose options "
                             "hold; pass them to preprocess_lora_da")

        def fill(peft_model):
            return peft_writes.fill_preprocessed(peft_model, preprocessed, adapter_name)
    else:
        def fill(peft_model):
            return api.initialize(peft_model, loader, adapter_name=adapter_name, stats=stats, **options)

    return peft_writes.wrap(model, peft_config, peft_kwargs, options, fill)


def _peft_model_arguments(peft_config, args: tuple, loader, kwargs: dict):
    """(peft_config, loader, PEFT's keyword arguments, initialize's options) from either argument order."""
    from peft import PeftConfig

    kwargs = dict(kwargs)
    if "lora_config" in kwargs:  # the older keyword name: get_peft_model(model, loader, lora_config=...)
        if isinstance(peft_config, PeftConfig) or args:
            raise TypeError("get_peft_model() got both peft_config and lora_config")
        if peft_config is not None and loader is not None:
            raise TypeError("get_peft_model() got the loader twice (positionally and as loader=)")
        loader = loader if loader is not None else peft_config
        peft_config = kwargs.pop("lora_config")
    if not isinstance(peft_config, PeftConfig) and args and isinstance(args[0], PeftConfig):
        # The older order, get_peft_model(model, loader, lora_config, **options).
        if loader is not None:
            raise TypeError("get_peft_model() got the loader twice (positionally and as loader=)")
        user_warnings.warn("loradafast.get_peft_model(model, loader, lora_config) is the older argument order; use "
                      "PEFT's: get_peft_model(model, lora_config, loader=loader)", DeprecationWarning)
        peft_config, loader, args = args[0], peft_config, args[1:]
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"get_peft_model(model, peft_config, ...) takes a peft.LoraConfig as its second argument "
                        f"(PEFT's order), got {type(peft_config).__name__}; the data go as loader=... or stats=...")
    if len(args) > len(PEFT_ARGUMENTS):
        raise TypeError(f"get_peft_model() takes at most {2 + len(PEFT_ARGUMENTS)} positional arguments (PEFT's)")
    peft_kwargs = dict(PEFT_ARGUMENTS)
    for (name, _), value in zip(PEFT_ARGUMENTS.items(), args):
        if name in kwargs:
            raise TypeError(f"get_peft_model() got multiple values for argument {name!r}")
        peft_kwargs[name] = value
    for name in PEFT_ARGUMENTS:
        if name in kwargs:
            peft_kwargs[name] = kwargs.pop(name)
    if not isinstance(peft_kwargs["adapter_name"], str):
        raise TypeError(
            f"the third positional argument of get_peft_model is adapter_name, as in PEFT, and got a "
            f"{type(peft_kwargs['adapter_name']).__name__}; pass the data by keyword: "
            "get_peft_model(model, lora_config, loader=loader) (or stats=...)")
    return peft_config, loader, peft_kwargs, kwargs
