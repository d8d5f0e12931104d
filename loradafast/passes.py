"""Statistics and solve under a memory budget: one pass, or several over groups of layers
(docs/design.md §6.4).

The plan (:mod:`.planner`) splits the target layers into passes of whole input groups.  Each pass
runs the loader through the model with hooks on its layers only, solves them, and drops their
statistics before the next pass; the model is touched only after the last pass, as always.  Every
layer's statistics are those of the one-pass run: the hooks of a layer see the same batches
whichever other layers are hooked, so the adapters equal the one-pass adapters (bitwise on CPU, for
the same ``split_halves``: keeping the halves sums the even and the odd batches apart, another order).
A run of several passes iterates the loader once per pass, so the loader must be re-iterable and
yield the same batches each time; both are checked.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import torch

from . import distributed, planner
from .methods.registry import memory_model
from .methods.solver import solve_with
from .result import InitResult
from .statistics.collector import collect
from .statistics.batches import END
from .statistics.probe import first_batch, probe
from .targets import Target

logger = logging.getLogger("loradafast")
logger.addFilter(distributed.MAIN_RANK_ONLY)


class Planned(NamedTuple):
    """A pipeline's memory plan, and what its passes need from the planning."""

    plan: planner.MemoryPlan
    memory: planner.MemoryModel
    shapes: list[planner.LayerShape]
    loader: Iterable  # the loader to run: the probe may have taken its first batch from a one-shot one
    split_halves: bool  # whether the passes keep the halves' sums
    started: float  # perf_counter() when the planning began: the pass's seconds count from it


def collect_and_solve(pipeline, planned: Planned) -> tuple[InitResult, float]:
    """The factors of every target of ``pipeline`` (a :class:`~loradafast.pipeline.Pipeline`) by
    the passes of ``planned``, and the seconds spent before the solves (probe and passes)."""
    started, progress = planned.started, pipeline.run_options.progress
    plan, memory, shapes, loader, split_halves, _ = planned
    kw = _collect_options(pipeline, split_halves)
    if plan.num_passes == 1:
        stats = collect(pipeline.model, loader, targets=pipeline.targets, **kw)
        pass_s = time.perf_counter() - started
        if plan.budget_bytes is None:  # the plan's groups were guesses: remake it with the pass's own
            plan = _replanned(plan, shapes, stats, memory)
        _announce(plan, progress)
        result = _solve(pipeline, stats, pipeline.targets, _workspace_budget(plan, plan.passes[0], split_halves))
    else:
        _announce(plan, progress)
        result = _passes(pipeline, loader, plan, kw)
        pass_s = time.perf_counter() - started - result.timings["solve_s"] - result.timings.get("split_half_s", 0.0)
    if distributed.is_distributed():
        _shared(result, pipeline)
    result.plan = plan
    return result, pass_s


def plan_for(pipeline, loader: Iterable) -> Planned:
    """The memory plan of ``pipeline``'s targets (after a probe of the first batch where a budget
    applies), its memory model and layer shapes, the loader to use afterwards, and whether the pass
    keeps split halves.  A plan of several passes refuses a one-shot loader, on every rank."""
    started = time.perf_counter()
    targets, config = pipeline.targets, pipeline.config
    budget, source = _budget(pipeline.run_options.memory_budget, targets, pipeline.device)
    memory = memory_model(pipeline.method, config, y_factor=pipeline.y_factor, solve_dtype=config.dtype,
                          device_type=pipeline.device.type, world_size=distributed.world_size())
    groups, notes = {t.name: t.name for t in targets}, []
    if budget is not None:  # only a limit needs the groups and the activations before the pass
        found, loader, error = _probe(pipeline.model, loader, targets, pipeline.run_options.loss_fn, memory)
        groups, memory, note = _agreed_probe(found, error, groups, memory)
        notes += [note] if note else []
    else:
        notes.append("no limit: one pass; input groups as the pass found them")
    shapes = [planner.LayerShape(t.name, t.in_features, t.out_features, groups[t.name],
                                 pipeline.layout.rank_of(t.name)) for t in targets]
    plan, memory, split_halves = _plan_with_halves(shapes, memory, budget, source, notes,
                                                   pipeline.run_options.split_halves)
    if plan.num_passes > 1:  # the same plan on every rank, but whether the loader is one-shot is the rank's own
        error = None
        if isinstance(loader, Iterator):
            error = ValueError(
                f"the memory budget ({planner.format_bytes(budget)}, {source}) needs {plan.num_passes} statistics "
                "passes, and the loader is a one-shot iterator (a generator?) that can be iterated only once; pass a "
                "re-iterable loader that yields the same batches each time (a list, a DataLoader without shuffling or "
                "with a seeded sampler), or raise memory_budget"
            )
        distributed.agree_on_failure(error, "the memory plan")
    return Planned(plan, memory, shapes, loader, split_halves, started)


def _collect_options(pipeline, split_halves: bool) -> dict:
    """The keywords of every :func:`collect` of ``pipeline``'s passes."""
    run = pipeline.run_options
    kw = dict(y_factor=pipeline.y_factor, max_samples=run.max_samples, loss_fn=run.loss_fn, progress=run.progress,
              adapter_name=run.adapter_name, factors=pipeline.method.statistics, split_halves=split_halves)
    if distributed.is_distributed():  # owner computes (docs/design.md §6.5)
        kw.update(reduce="owner", ranks={t.name: pipeline.layout.rank_of(t.name) for t in pipeline.targets},
                  solve_cost=pipeline.method.solve_cost)
    return kw


def _plan_with_halves(shapes, memory, budget, source, notes, split_halves):
    """The plan, its memory model and whether the pass keeps split halves (``split_halves`` None:
    where they fit one pass; never in a distributed run, which does not support them yet)."""
    if split_halves and distributed.is_distributed():
        raise ValueError("split_halves=True is not supported in a distributed run yet; pass split_halves=False")
    if split_halves is not False and not distributed.is_distributed():
        with_halves = dataclasses.replace(memory, halves=True)
        try:
            plan = planner.plan_passes(shapes, with_halves, budget, source, notes)
        except planner.MemoryBudgetError:
            if split_halves:
                raise
            plan = None
        if plan is not None and (split_halves or plan.num_passes == 1):
            return plan, with_halves, True
        notes = [*notes, "split-half stability off: keeping the halves would need more passes (split_halves=True "
                         "keeps them anyway)"]
    return planner.plan_passes(shapes, memory, budget, source, notes), memory, False


def _probe(model, loader, targets, loss_fn, memory: planner.MemoryModel):
    """The :class:`~.statistics.probe.Probe` of one sequence of this rank's first batch (None for
    an empty shard), the loader to use afterwards, and the error instead of raising it: the loader,
    the pass's checks or the forward may fail on this rank alone, and the others wait in the gather."""
    try:
        batch, loader = first_batch(loader)
        if batch is END:
            return None, loader, None
        return probe(model, batch, targets, loss_fn=loss_fn, factors=memory.statistics,
                     y_factor=memory.y_factor), loader, None
    except Exception as e:  # noqa: BLE001 - every rank learns of it in _agreed_probe, then it is raised
        return None, loader, e


def _agreed_probe(found, error, fallback: dict, memory: planner.MemoryModel):
    """The same input groups and activations on every rank, so that all make the same plan: the
    groups of the first rank that had a batch to probe (a rank with an empty shard probes
    nothing), the largest activations; every rank raises if a probe failed.  Returns (groups,
    memory model with the activations, a note for the plan)."""
    everyone = [p for p in distributed.agree_on_failure(error, "the probe of the first batch", share=found) if p]
    if not everyone:
        return fallback, memory, None
    largest = max(everyone, key=lambda p: p.activation_bytes)
    sequences, length = largest.batch_shape
    note = (f"a batch in flight: {planner.format_bytes(largest.activation_bytes)} of activations, as measured on "
            f"the first batch ({sequences} × {length} tokens); longer batches hold more")
    memory = dataclasses.replace(memory, activation_bytes=largest.activation_bytes)
    return everyone[0].input_groups, memory, note


def _solve(pipeline, stats, targets: list[Target], workspace_budget: int | None) -> InitResult:
    """Solve the layers ``stats`` holds (of ``targets``): all of them, or, with owners, this rank's
    share (each layer's diagnostics then name the rank); every rank learns whether any rank's solve
    failed.  ``workspace_budget``: what the plan leaves the solve."""
    owners = stats.meta.get("owners")
    names = set(stats.layers)
    weights = _only(pipeline.method_weights(), names)
    if owners is None:
        return _solve_layers(pipeline, stats, weights, names, workspace_budget)
    if weights is not None:  # sharded weights are gathered one layer at a time, to their owners only
        weights = distributed.weights_to_owners([t for t in targets if t.name in owners], owners)
    return _solve_owned(pipeline, stats, weights, names, owners, workspace_budget)


def _solve_owned(pipeline, stats, weights, names, owners: dict, workspace_budget: int | None = None) -> InitResult:
    """This rank's share (``names``) solved, each layer's diagnostics naming the rank; every rank
    learns whether any rank's solve failed."""
    result, error = None, None
    try:
        result = _solve_layers(pipeline, stats, weights, names, workspace_budget)
        for layer in result.layers.values():
            layer.diagnostics.solved_by_rank = distributed.rank()
    except Exception as e:  # noqa: BLE001 - every rank learns of it, then it is raised
        error = e
    distributed.agree_on_failure(error, "the solve")
    result.owners = dict(owners)
    return result


def _solve_layers(pipeline, stats, weights, names, workspace_budget: int | None = None) -> InitResult:
    """:func:`solve_with` of the layers ``names`` (the statistics', else the weights')."""
    return solve_with(pipeline.method, pipeline.config, stats, pipeline.layout.within(names), weights=weights,
                      kinds=pipeline.kinds(), freeze_a=pipeline.run_options.freeze_a,
                      progress=pipeline.run_options.progress and distributed.is_main(),
                      workspace_budget=workspace_budget)


def _shared(result: InitResult, pipeline) -> None:
    """Every rank's layers on every rank, in model order: the same adapter everywhere."""
    names = [t.name for t in pipeline.targets]
    layers = distributed.broadcast_layers(result.layers, names, result.owners)
    result.layers = {n: layers[n] for n in names}
    result.alphas = {n: a for n, a in (pipeline.layout.alphas or {}).items() if a != result.lora_alpha}


def _budget(memory_budget, targets: list[Target], device: torch.device) -> tuple[int | None, str]:
    """The memory budget and its source, read on every device the targets' weights live on."""
    devices = _target_devices(targets) or [device]
    if memory_budget is not None or len(devices) == 1:
        return planner.resolve_budget(memory_budget, devices[0])
    # A model spread over devices (device_map): each layer's statistics and solve live on its own
    # device, but the plan is one byte count for a whole pass, which does not say how the layers
    # of a pass spread over the devices. Only the smallest device budget holds wherever the
    # layers land; a device without a known limit (meta, mps) constrains nothing.
    known = [(b, d) for d in devices if (b := planner.default_budget(d)[0]) is not None]
    if not known:
        return planner.resolve_budget(None, devices[0])
    tightest = min(known, key=lambda bd: bd[0])[1]
    budget, source = planner.resolve_budget(None, tightest)  # one call: one collective per rank
    return budget, f"{source} of {tightest}, the smallest of {len(devices)} devices"


def _workspace_budget(plan: planner.MemoryPlan, p: planner.PassPlan, halves: bool) -> int | None:
    """What the budget leaves the solve of pass ``p`` once its statistics (with their halves) are
    held: the solve stacks input groups up to it.  None without a budget."""
    if plan.budget_bytes is None:
        return None
    return max(0, plan.budget_bytes - p.statistics_bytes * (3 if halves else 1))


def _target_devices(targets: list[Target]) -> list[torch.device]:
    """The devices of the targets' weights, in model order, each once."""
    weights = (getattr(t.module, "weight", None) for t in targets)
    return list(dict.fromkeys(w.device for w in weights if isinstance(w, torch.Tensor)))


def _replanned(plan, shapes, stats, memory) -> planner.MemoryPlan:
    # With owners a rank's statistics hold its own layers only; the meta knows every layer's group.
    groups = stats.meta.get("input_groups") or {n: s.input_group for n, s in stats.layers.items()}
    shapes = [planner.LayerShape(s.name, s.in_features, s.out_features, groups[s.name], s.rank) for s in shapes]
    return planner.plan_passes(shapes, memory, plan.budget_bytes, plan.budget_source, plan.notes)


def _announce(plan: planner.MemoryPlan, progress: bool) -> None:
    """The plan, once: printed beside the progress bars, else logged (INFO)."""
    if progress and distributed.is_main():
        print(plan, file=sys.stderr)
    else:
        logger.info("%s", plan)


def _passes(pipeline, loader, plan: planner.MemoryPlan, kw: dict) -> InitResult:
    """Pass after pass: collect the pass's layers, check the loader gave the same samples, solve,
    drop the statistics; then one result in model order."""
    by_name = {t.name: t for t in pipeline.targets}
    results, reference = [], None
    for i, p in enumerate(plan.passes, 1):
        subset = [by_name[name] for name in p.layers]
        seen = _Fingerprint(loader)
        stats = collect(pipeline.model, seen, targets=subset, **kw)
        fingerprint = (stats.num_sequences, stats.num_tokens, seen.value())
        reference = fingerprint if reference is None else reference
        error = None
        if fingerprint != reference:  # this rank's loader; every rank learns of it below
            error = ValueError(
                f"the loader yielded other samples in statistics pass {i} of {plan.num_passes} than in pass 1 "
                f"(sequences, tokens: {reference[:2]} then {fingerprint[:2]}, or other token ids); the memory plan "
                "iterates the loader once per pass, so it must yield the same batches each time: turn shuffling "
                "off or seed the sampler, or raise memory_budget so that one pass suffices"
            )
        distributed.agree_on_failure(error, f"statistics pass {i}")
        results.append(_solve(pipeline, stats, subset, _workspace_budget(plan, p, bool(kw["split_halves"]))))
        del stats  # freed before the next pass: the plan counts one pass's statistics at a time
    return _merged(results, pipeline.targets)


def _only(weights, names):
    return None if weights is None else {k: w for k, w in weights.items() if k in names}


def _merged(results: list[InitResult], targets: list[Target]) -> InitResult:
    """One result in model order (the pipeline records the targets and the task of all layers)."""
    first = results[0]
    layers = {}
    for r in results:
        layers.update(r.layers)
    first.layers = {t.name: layers[t.name] for t in targets if t.name in layers}  # a rank's own, with owners
    if getattr(first, "owners", None) is not None:
        first.owners = {k: v for r in results for k, v in r.owners.items()}
    for r in results[1:]:
        first.alphas.update(r.alphas)
    first.timings = {key: sum(r.timings.get(key, 0.0) for r in results) for key in first.timings}
    return first


class _Fingerprint:
    """The loader, iterated once, with a checksum of the integer tensors of every batch it gave
    (token ids, masks, labels): enough to tell that a second pass saw other samples, in another
    order, or none.  The checksum stays on the batches' device until :meth:`value`."""

    def __init__(self, loader: Iterable):
        self.loader, self.sums = loader, []

    def __iter__(self):
        for index, raw in enumerate(self.loader):
            for t in _tensors(raw):
                if not (t.is_floating_point() or t.is_complex()) and t.numel():
                    flat = t.reshape(-1).long()
                    weights = torch.arange(1, flat.numel() + 1, device=flat.device) % 8191 + index + 1
                    self.sums.append((flat * weights).sum())
            yield raw

    def value(self) -> tuple:
        return tuple(int(s) for s in self.sums)


def _tensors(raw) -> list[torch.Tensor]:
    if torch.is_tensor(raw):
        return [raw]
    if isinstance(raw, Mapping):
        return [t for key in sorted(raw, key=str) for t in _tensors(raw[key])]
    if isinstance(raw, (list, tuple)):
        return [t for item in raw for t in _tensors(item)]
    return []


def solve_weights(pipeline) -> InitResult:
    """A weight-only method in a distributed run (no statistics pass): each rank solves the layers
    the cost model gives it, from their weights (gathered one layer at a time where sharded), and
    the factors are then shared, as for the data-aware methods."""
    targets, layout = pipeline.targets, pipeline.layout
    shapes = [planner.LayerShape(t.name, t.in_features, t.out_features, t.name, layout.rank_of(t.name))
              for t in targets]
    owners = planner.assign_owners(shapes, distributed.world_size(), pipeline.method.solve_cost)
    weights = distributed.weights_to_owners(targets, owners)
    result = _solve_owned(pipeline, None, weights, set(weights), owners)
    _shared(result, pipeline)
    return result
