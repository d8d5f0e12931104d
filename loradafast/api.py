"""The public entry point ``initialize``: a face over :class:`~loradafast.pipeline.Pipeline`.  The
PEFT-shaped entry points are :mod:`loradafast.integrations.peft_entry`'s."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from torch import nn

from . import distributed
from .methods.registry import DEFAULT_METHOD
from .options import MethodConfig
from .pipeline import Pipeline, RunOptions, check_data_source, method_and_options
from .result import InitResult


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
    validated object, ``config=`` (its ``*Config`` class, in the method's module and at the package's
    top, whose fields are documented there: ``loradafast.LoraDAConfig``, ``LoraGAConfig``, ...), or
    as the keywords that build it
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
    record, config = method_and_options(method, config, options, "initialize")
    run_options = RunOptions(max_samples=max_samples, loss_fn=loss_fn, progress=progress, memory_budget=memory_budget,
                             adapter_name=adapter_name, freeze_a=freeze_a, split_halves=split_halves)
    check_data_source(record, loader, stats)
    pipeline = Pipeline.for_model(model, record, config, run_options, rank=rank, ranks=ranks,
                                  target_modules=target_modules, lora_alpha=lora_alpha, use_rslora=use_rslora,
                                  started=started)
    return pipeline.run(loader, stats, apply=apply)
