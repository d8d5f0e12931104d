"""The public entry point ``initialize``, and the steps every entry point shares (the method's
options, the targets and their layout, the solve of the targets).  The PEFT-shaped entry points
are :mod:`loradafast.integrations.peft_entry`'s."""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from . import distributed, passes
from .integrations import peft_model as peft_writes
from .integrations.peft_model import AdapterLayout
from .methods.registry import (DEFAULT_METHOD, REGISTRY, WEIGHT_ONLY_METHODS, Method, build_config, get_method,
                               method_keywords)
from .methods.solver import solve_with
from .planner import parse_bytes
from .options import MethodConfig, check_pass_options, check_rank, check_ranks
from .result import InitResult
from .statistics.collector import is_causal_lm
from .statistics import provenance
from .statistics.store import Statistics
from .targets import base_model_of, find_targets, is_peft_model, model_meta


def initialize(model: nn.Module, loader: Iterable | None = None, rank: int | None = None, *,
               method: str = DEFAULT_METHOD, config: MethodConfig | None = None, target_modules=None,
               lora_alpha: float | None = None, use_rslora: bool = False, ranks: dict[str, int] | None = None,
               freeze_a: bool = False, max_samples: int | None = 256, loss_fn: Callable | None = None,
               adapter_name: str | None = None, progress: bool = True, memory_budget: int | float | str | None = None,
               stats=None, apply: bool = True, split_halves: bool | None = None, **options) -> InitResult:
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

    ``method`` (docs/design.md §4-5; the README's methods table) takes its options as one
    validated object, ``config=`` (its ``*Config`` class in :mod:`loradafast.options`, whose fields
    are documented there: ``LoraDAConfig``, ``LoraGAConfig``, ...), or as the keywords that build it
    (``options``; None means the default, and a keyword that is not an option of the method
    raises).  Weight-only methods (``lora``, ``pissa``, ``milora``) run no pass: ``loader`` may be None.

    ``pissa``, ``milora``, ``lora-ga`` and ``fisher-subspace`` move the base weight to
    ``W − s·B·A`` so the output is unchanged at initialisation: see :meth:`InitResult.save` for the
    two ways to save them.  ``freeze_a=True`` gives LoRA-FA (``lora_A`` frozen when applied).

    ``split_halves`` (None: wherever the memory plan fits them in one pass; never in a distributed
    run): the pass also keeps every second batch's sums, and each layer's diagnostics report how
    far the subspaces solved from the two halves of the data agree (``split_half_overlap``,
    :mod:`loradafast.methods.stability`); a warning says what to do when most layers' subspaces
    are not supported by the data.  It costs memory (up to three times the statistics) and two
    more solves, to a looser tolerance.

    ``stats`` (a :class:`Statistics`, or the path of a file saved with ``Statistics.save``) replaces
    ``loader``: no pass runs, the solve reads the saved statistics of the target layers.
    ``apply=False`` leaves a ``PeftModel`` untouched (the result only).  A quantized base
    (bitsandbytes ``Linear4bit``/``Linear8bitLt``) works with the methods that never read or move
    the base weight (``lora-da``, ``lora-one``, ``lora``); the others refuse it before the pass.
    """
    started = time.perf_counter()
    model = distributed.unwrap(model)  # DistributedDataParallel: its module
    record, config = _method_and_options(method, config, options, loader=loader, stats=stats,
                                         max_samples=max_samples, memory_budget=memory_budget)
    targets, layout = _targets_and_layout(model, record, rank=rank, ranks=ranks, target_modules=target_modules,
                                          adapter_name=adapter_name, lora_alpha=lora_alpha, use_rslora=use_rslora)
    result, pass_s = solve_targets(model, loader, targets, record, config, layout, stats=stats,
                                   memory_budget=memory_budget, max_samples=max_samples, loss_fn=loss_fn,
                                   progress=progress, adapter_name=adapter_name, freeze_a=freeze_a, started=started,
                                   split_halves=split_halves)
    _apply_and_time(result, model, targets, layout, adapter_name, apply=apply, pass_s=pass_s, started=started)
    return result


def _method_and_options(method: str, config: MethodConfig | None, options: dict, *, loader, stats, max_samples,
                        memory_budget) -> tuple[Method, MethodConfig]:
    """The method's registry record and its validated options, after every check that needs no
    model: a wrong argument fails before any layer is looked at."""
    record = get_method(method)
    config = build_config(record, config, method_keywords("initialize", options, "solve_dtype"))
    check_pass_options(max_samples)
    if memory_budget is not None:
        parse_bytes(memory_budget)  # a malformed budget fails here, also for methods without a pass
    check_data_source(record, loader, stats)
    return record, config


def _apply_and_time(result: InitResult, model: nn.Module, targets, layout, adapter_name, *, apply: bool,
                    pass_s: float, started: float) -> None:
    """Fill a ``PeftModel``'s layers with ``result`` (unless ``apply=False``), then record in
    ``result.timings`` the pass, the solve's own phases, the write into the model and the total."""
    apply_started = time.perf_counter()
    if is_peft_model(model) and apply:
        peft_writes.attach(result, model, targets, layout, adapter_name)
    result.timings = {"pass_s": pass_s, **result.timings, "apply_s": time.perf_counter() - apply_started,
                      "total_s": time.perf_counter() - started}


def check_data_source(record, loader, stats) -> None:
    """A data-aware method needs exactly one of a loader and saved statistics."""
    if loader is not None and stats is not None:
        raise ValueError("pass either a loader (to run the statistics pass) or stats= (saved statistics), not both")
    if record.data_aware and loader is None and stats is None:
        raise ValueError(
            f"method {record.name!r} is data-aware and needs a loader of training samples, or stats= (a Statistics "
            f"object or the path of one saved with Statistics.save); the weight-only methods "
            f"{', '.join(WEIGHT_ONLY_METHODS)} run without either"
        )


def solve_targets(model, loader, targets, record, config, layout, *, stats, memory_budget, max_samples, loss_fn,
                  progress, adapter_name, freeze_a, started, split_halves=None) -> tuple[InitResult, float]:
    """The factors of ``targets``: from ``stats``, from a pass over ``loader``, or from the weights
    alone (weight-only methods); and the seconds spent before the solve.  Touches no weight."""
    check_weights_readable(targets, record)
    weights = _weights(targets, record)
    if stats is not None:
        stats = statistics_for(load_statistics(stats), targets)
        pass_s = time.perf_counter() - started  # loading and checking the file: what replaces the pass
        result = solve_with(record, config, stats, layout.rank, ranks=layout.ranks, lora_alpha=layout.lora_alpha,
                            use_rslora=layout.use_rslora, alphas=layout.alphas, freeze_a=freeze_a, progress=progress,
                            weights=weights if record.needs_weights else None)
    elif record.data_aware:
        result, pass_s = passes.collect_and_solve(
            model, loader, targets, record, config, layout, memory_budget=memory_budget, max_samples=max_samples,
            loss_fn=loss_fn, progress=progress, adapter_name=adapter_name, freeze_a=freeze_a,
            weights=weights if record.needs_weights else None, split_halves=split_halves)
        return result, pass_s  # collect() recorded the model in the statistics
    elif distributed.is_distributed():  # each rank solves the layers the cost model gives it
        pass_s = time.perf_counter() - started
        result = passes.solve_weights(record, config, targets, layout, freeze_a=freeze_a, progress=progress)
    else:
        pass_s = time.perf_counter() - started
        result = solve_with(record, config, None, layout.rank, weights=weights,
                            kinds={t.name: t.kind for t in targets}, ranks=layout.ranks,
                            lora_alpha=layout.lora_alpha, use_rslora=layout.use_rslora, alphas=layout.alphas,
                            freeze_a=freeze_a, progress=progress)
    _record_model(result, model, targets, causal=loss_fn is None and is_causal_lm(model), adapter_name=adapter_name)
    return result, pass_s


def _weights(targets, record) -> dict:
    """The base weights as ``[out, in]`` (.detach() views, no copies); for a quantized layer, whose
    weight a method here never reads, an empty ``meta`` tensor of its shape."""
    return {t.name: (torch.empty(t.out_features, t.in_features, device="meta") if t.quantized
                     else t.weight_out_in().detach()) for t in targets}


def check_weights_readable(targets, record) -> None:
    """Methods that read or move the base weight refuse quantized layers (docs/design.md §5)."""
    quantized = [t for t in targets if t.quantized]
    if quantized and (record.needs_weights or record.moves_base):
        t = quantized[0]
        fine = ", ".join(name for name, m in REGISTRY.items() if not (m.needs_weights or m.moves_base))
        raise ValueError(
            f"method {record.name!r} ({record.title}) {'reads' if record.needs_weights else 'moves'} the base weight, "
            f"and {len(quantized)} target layer(s) are quantized (e.g. {t.name!r}, a {type(t.module).__name__}); "
            f"on a quantized base use a method that never touches the weight ({fine}), or load the model unquantized"
        )


def load_statistics(stats) -> Statistics:
    """``stats`` as a :class:`Statistics`: the object itself, or loaded from its path."""
    if isinstance(stats, Statistics):
        return stats
    if isinstance(stats, (str, os.PathLike)):
        return Statistics.load(stats)
    raise TypeError(f"stats must be a loradafast.Statistics or the path of one saved with Statistics.save, got "
                    f"{type(stats).__name__}")


def statistics_for(stats: Statistics, targets) -> Statistics:
    """``stats`` restricted to ``targets``, each of which it must hold with the same shape and, where
    the statistics recorded them, the same weights (:mod:`loradafast.statistics.provenance`)."""
    provenance.check_whole(stats, "stats=")
    missing = [t.name for t in targets if t.name not in stats.layers]
    if missing:
        raise ValueError(f"the statistics hold no entry for {len(missing)} target layer(s), e.g. {missing[:3]} (they "
                         f"hold {len(stats.layers)} layers); collect them with the same target_modules")
    for t in targets:
        s = stats.layers[t.name]
        if (s.in_features, s.out_features) != (t.in_features, t.out_features):
            raise ValueError(f"layer {t.name!r}: the statistics are for a {s.in_features}→{s.out_features} layer, the "
                             f"model's is {t.in_features}→{t.out_features}; they come from another model")
    provenance.check_same_model(stats.meta.get("weight_samples"), provenance.weight_samples(targets),
                                stats.meta.get("base_model_name_or_path"))
    layers = {t.name: stats.layers[t.name] for t in targets}
    groups = {s.input_group for s in layers.values()}
    return dataclasses.replace(stats, layers=layers, z_sums={k: v for k, v in stats.z_sums.items() if k in groups})


def _record_model(result: InitResult, model: nn.Module, targets, *, causal: bool, adapter_name) -> None:
    meta = model_meta(model, targets, causal=causal, adapter_name=adapter_name)
    result.target_modules = meta["target_modules"]
    result.base_model_name_or_path = meta["base_model_name_or_path"]
    result.task_type = meta["task_type"]


def _targets_and_layout(model, record, *, rank, ranks, target_modules, adapter_name, lora_alpha, use_rslora):
    """The target layers and their layout, every rank checked: all before the pass."""
    targets = find_targets(model, target_modules, adapter_name=adapter_name, allow_quantized=True)
    if not targets:
        raise ValueError(
            f"target_modules={target_modules!r} matches no nn.Linear or Conv1D layer of "
            f"{type(base_model_of(model)).__name__}; check the names with model.named_modules()"
        )
    if is_peft_model(model):
        layout = peft_writes.peft_layout(model, targets, adapter_name=adapter_name, method=record, rank=rank,
                                              ranks=ranks)
    else:
        ranks = dict(ranks or {})
        check_ranks(ranks, [t.name for t in targets])
        layout = AdapterLayout(8 if rank is None else rank, ranks, lora_alpha, use_rslora)
    for t in targets:  # fail before the pass, not after it
        check_rank(t.name, layout.ranks.get(t.name, layout.rank), t.in_features, t.out_features, record)
    return targets, layout


# PEFT's get_peft_model(model, peft_config, adapter_name, mixed, autocast_adapter_dtype, revision,
# low_cpu_mem_usage): its arguments after peft_config, in its order, with its defaults.
