"""One initialisation as one object (:class:`Pipeline`): the method and its options, the target
layers and their layout, the model's description and the run's options, each worked out once and
checked before any pass; and its stages, plan → collect → solve → apply.

The stages live where their work is: the plan and the passes in :mod:`.passes`, the solve in
:mod:`.methods.solver`, the writes into a PEFT model in :mod:`.integrations.peft_model`.  Every
entry point is a face over a pipeline: :func:`loradafast.initialize` (and through it
``get_peft_model`` and the Trainer callback), ``preprocess_lora_da`` and the CLI's ``init``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import distributed, passes
from .integrations import peft_model as peft_writes
from .layout import DEFAULT_RANK, AdapterLayout
from .methods.method import Method
from .methods.registry import REGISTRY, WEIGHT_ONLY_METHODS, build_config, get_method, method_keywords
from .methods.solver import solve_with
from .options import MethodConfig, check_pass_options, check_rank, check_ranks
from .planner import parse_bytes
from .result import InitResult
from .statistics import collect, provenance
from .statistics.collector import is_causal_lm
from .statistics.sums import Statistics
from .targets import Target, base_model_of, find_targets, is_peft_model, model_device, model_meta


@dataclass(frozen=True)
class RunOptions:
    """How the pass and the solve run: the entry points' keywords of the same names, checked when built."""

    max_samples: int | None = 256
    loss_fn: Callable | None = None
    progress: bool = True
    memory_budget: int | float | str | None = None
    adapter_name: str | None = None
    freeze_a: bool = False
    split_halves: bool | None = None

    def __post_init__(self):
        check_pass_options(self.max_samples)
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)  # a malformed budget fails here, also for methods without a pass


@dataclass(frozen=True)
class ModelMeta:
    """What an adapter's config records about the model (:func:`~loradafast.targets.model_meta`)."""

    base_model_name_or_path: str | None
    task_type: str | None
    target_modules: list | str | None


@dataclass
class Pipeline:
    """One initialisation of ``targets`` of ``model`` by ``method``; :meth:`run` gives the adapter."""

    model: nn.Module
    method: Method
    config: MethodConfig
    targets: list[Target]
    layout: AdapterLayout
    run_options: RunOptions
    meta: ModelMeta
    device: torch.device
    started: float  # perf_counter() when the entry point was called: the result's total_s counts from it

    @classmethod
    def create(cls, model: nn.Module, method: Method, config: MethodConfig, targets: list[Target],
               layout: AdapterLayout, run_options: RunOptions, started: float | None = None) -> Pipeline:
        """The pipeline of targets and a layout already found (``preprocess_lora_da`` reads them
        from a ``LoraConfig``); refuses a method that reads or moves a quantized base weight."""
        check_weights_readable(targets, method)
        causal = run_options.loss_fn is None and is_causal_lm(model)
        meta = ModelMeta(**model_meta(model, targets, causal=causal, adapter_name=run_options.adapter_name))
        return cls(model, method, config, targets, layout, run_options, meta, model_device(model),
                   time.perf_counter() if started is None else started)

    @classmethod
    def for_model(cls, model: nn.Module, record: Method, config: MethodConfig, run_options: RunOptions, *,
                  rank: int | None, ranks: dict | None, target_modules, lora_alpha: float | None, use_rslora: bool,
                  started: float | None = None) -> Pipeline:
        """The pipeline of ``model``'s layers that ``target_modules`` names (a ``PeftModel``: its LoRA
        layers, their ranks and alphas), every rank checked: all before the pass."""
        targets, layout = targets_and_layout(model, record, rank=rank, ranks=ranks, target_modules=target_modules,
                                             adapter_name=run_options.adapter_name, lora_alpha=lora_alpha,
                                             use_rslora=use_rslora)
        return cls.create(model, record, config, targets, layout, run_options, started)

    # ---- what the stages read ---------------------------------------------------------------------

    @property
    def y_factor(self) -> str:
        return getattr(self.config, "y_factor", None) or "diag"

    def weights(self) -> dict[str, torch.Tensor]:
        """The base weights as ``[out, in]`` (.detach() views, no copies); for a quantized layer, whose
        weight a method here never reads, an empty ``meta`` tensor of its shape."""
        return {t.name: (torch.empty(t.out_features, t.in_features, device="meta") if t.quantized
                         else t.weight_out_in().detach()) for t in self.targets}

    def method_weights(self) -> dict[str, torch.Tensor] | None:
        """The weights where the method reads them, else None."""
        return self.weights() if self.method.needs_weights else None

    def kinds(self) -> dict[str, str]:
        return {t.name: t.kind for t in self.targets}

    # ---- the stages -------------------------------------------------------------------------------

    def run(self, loader=None, stats=None, *, apply: bool = True) -> InitResult:
        """The adapter: :meth:`solve` (which plans and collects), then :meth:`apply` (unless ``apply=False``)."""
        result, pass_s = self.solve(loader, stats)
        self.apply(result, pass_s=pass_s, apply=apply)
        return result

    def plan(self, loader) -> passes.Planned:
        """The memory plan of the statistics passes over ``loader`` (docs/design.md §6.4), after a
        probe of its first batch where a memory budget applies."""
        return passes.plan_for(self, loader)

    def collect(self, loader) -> Statistics:
        """One statistics pass over ``loader`` for every target, whatever the memory budget."""
        return collect(self.model, loader, targets=self.targets, y_factor=self.y_factor,
                       max_samples=self.run_options.max_samples, loss_fn=self.run_options.loss_fn,
                       progress=self.run_options.progress, factors=self.method.statistics,
                       split_halves=self.run_options.split_halves)

    def solve(self, loader=None, stats=None) -> tuple[InitResult, float]:
        """The factors of the targets: from ``stats``, from passes over ``loader`` planned under the
        memory budget, or from the weights alone (weight-only methods); and the seconds spent before
        the solve.  Touches no weight."""
        if stats is not None:
            stats = statistics_for(load_statistics(stats), self.targets)
            pass_s = time.perf_counter() - self.started  # loading and checking the file: what replaces the pass
            result = solve_with(self.method, self.config, stats, self.layout, weights=self.method_weights(),
                                freeze_a=self.run_options.freeze_a, progress=self.run_options.progress)
        elif self.method.data_aware:
            result, pass_s = passes.collect_and_solve(self, self.plan(loader))
        elif distributed.is_distributed():  # each rank solves the layers the cost model gives it
            pass_s = time.perf_counter() - self.started
            result = passes.solve_weights(self)
        else:
            pass_s = time.perf_counter() - self.started
            result = solve_with(self.method, self.config, None, self.layout, weights=self.weights(),
                                kinds=self.kinds(), freeze_a=self.run_options.freeze_a,
                                progress=self.run_options.progress)
        self.describe(result)
        return result, pass_s

    def describe(self, result: InitResult) -> None:
        """``result`` records the model's name, task and targets: all of them, whichever pass solved what."""
        result.target_modules = self.meta.target_modules
        result.base_model_name_or_path = self.meta.base_model_name_or_path
        result.task_type = self.meta.task_type

    def apply(self, result: InitResult, *, pass_s: float, apply: bool = True) -> None:
        """Fill a ``PeftModel``'s layers with ``result`` (unless ``apply=False``), then record in
        ``result.timings`` the pass, the solve's own phases, the write into the model and the total."""
        apply_started = time.perf_counter()
        if is_peft_model(self.model) and apply:
            peft_writes.attach(result, self.model, self.targets, self.layout, self.run_options.adapter_name)
        result.timings = {"pass_s": pass_s, **result.timings, "apply_s": time.perf_counter() - apply_started,
                          "total_s": time.perf_counter() - self.started}


# ---- the checks and the pieces a pipeline is built from ----------------------------------------------

def method_and_options(method: str, config: MethodConfig | None, options: dict, entry: str) -> tuple[Method,
                                                                                                     MethodConfig]:
    """The method's registry record and its validated options (built once, here), for the entry
    point ``entry``; a wrong option fails before any layer is looked at."""
    record = get_method(method)
    return record, build_config(record, config, method_keywords(entry, options, "solve_dtype"))


def check_data_source(record: Method, loader, stats) -> None:
    """A data-aware method needs exactly one of a loader and saved statistics."""
    if loader is not None and stats is not None:
        raise ValueError("pass either a loader (to run the statistics pass) or stats= (saved statistics), not both")
    if record.data_aware and loader is None and stats is None:
        raise ValueError(
            f"method {record.name!r} is data-aware and needs a loader of training samples, or stats= (a Statistics "
            f"object or the path of one saved with Statistics.save); the weight-only methods "
            f"{', '.join(WEIGHT_ONLY_METHODS)} run without either"
        )


def check_weights_readable(targets: list[Target], record: Method) -> None:
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


def targets_and_layout(model: nn.Module, record: Method, *, rank, ranks, target_modules, adapter_name, lora_alpha,
                       use_rslora) -> tuple[list[Target], AdapterLayout]:
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
        layout = AdapterLayout(DEFAULT_RANK if rank is None else rank, ranks, lora_alpha, use_rslora)
    for t in targets:  # fail before the pass, not after it
        check_rank(t.name, layout.rank_of(t.name), t.in_features, t.out_features, record)
    return targets, layout


def load_statistics(stats) -> Statistics:
    """``stats`` as a :class:`Statistics`: the object itself, or loaded from its path."""
    if isinstance(stats, Statistics):
        return stats
    if isinstance(stats, (str, os.PathLike)):
        return Statistics.load(stats)
    raise TypeError(f"stats must be a loradafast.Statistics or the path of one saved with Statistics.save, got "
                    f"{type(stats).__name__}")


def statistics_for(stats: Statistics, targets: list[Target]) -> Statistics:
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
    return replace(stats, layers=layers, z_sums={k: v for k, v in stats.z_sums.items() if k in groups})
