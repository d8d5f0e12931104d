"""From statistics (and, for some methods, the base weights) to factors, with no model pass
(docs/design.md §1 "solve", §5 "methods").

Layers are solved independently; nothing here touches a model.  One :class:`Statistics` serves
every data-aware method, so ``solve(stats, method=...)`` can be called repeatedly on the same
statistics; weight-only methods need no statistics at all.  What each method needs and does is in
its record (:mod:`.registry`), its options class in its own module.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict

import torch

from .. import distributed, user_warnings
from ..layout import DEFAULT_RANK, PEFT_DEFAULT_ALPHA, AdapterLayout
from ..options import MethodConfig, check_rank, check_ranks
from ..progress import solve_progress
from ..result import InitResult, LayerInit
from ..statistics import provenance
from ..statistics.sums import Statistics
from . import checks, stability
from .factors import lora_scaling
from .method import Method
from .problem import Problem
from .registry import DEFAULT_METHOD, REGISTRY, build_config, generator_for, get_method, method_keywords

logger = logging.getLogger(__name__)
logger.addFilter(distributed.MAIN_RANK_ONLY)


def solve(
    stats: Statistics | None,
    rank: int | None = None,
    *,
    method: str = DEFAULT_METHOD,
    config: MethodConfig | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    kinds: dict[str, str] | None = None,
    ranks: dict[str, int] | None = None,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    alphas: dict[str, float] | None = None,
    freeze_a: bool = False,
    device=None,
    progress: bool = True,
    **options,
) -> InitResult:
    """Factors for every layer, by ``method`` (docs/design.md §4-5; formulas: see :mod:`loradafast.methods`).

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
    * ``freeze_a``: LoRA-FA; recorded in the result, honoured by ``apply_to``.
    * ``progress``: a progress bar over the layers (LoRA-DA: over the input groups), on by default
      as in :func:`~loradafast.initialize` and :func:`~loradafast.collect`.
    * the method's options: ``config=`` (a :class:`~loradafast.LoraDAConfig`,
      :class:`~loradafast.LoraGAConfig`, ... as the method's registry record names), or
      the keywords that build it (``options``: the fields' names, or their keywords such as
      ``loraga_variant``; ``registry.known_keywords()`` lists them all; None means the
      default).  A keyword that is not an option of ``method`` raises.

    The dense solves run in ``dtype`` (float64 by default: Zλ⁻¹ with the official absolute
    damping of 1e-6 spans many orders of magnitude, and its smallest eigenvectors are what we
    keep); the factors are returned in float32.
    """
    record = get_method(method)
    config = build_config(record, config, method_keywords("solve", options, "dtype"))
    if stats is not None:
        provenance.check_whole(stats, "solve()")
    layout = AdapterLayout(DEFAULT_RANK if rank is None else rank, dict(ranks or {}), lora_alpha, use_rslora,
                           dict(alphas or {}))
    return solve_with(record, config, stats, layout, weights=weights, kinds=kinds, freeze_a=freeze_a, device=device,
                      progress=progress)


def solve_with(record: Method, config: MethodConfig, stats: Statistics | None, layout: AdapterLayout, *,
               weights=None, kinds=None, freeze_a=False, device=None, progress: bool = False,
               workspace_budget: int | None = None) -> InitResult:
    """:func:`solve` with the method's record, its validated options and the adapter's layout
    already in hand (what :class:`loradafast.pipeline.Pipeline` calls: the options are checked
    once, where they are built).  ``workspace_budget``: the bytes the memory plan leaves the
    solve's workspace (None: free memory)."""
    _check_inputs(record, config, stats, weights)
    shapes = _layer_shapes(stats, weights, kinds)
    rank, use_rslora = layout.rank, layout.use_rslora
    ranks, alphas = dict(layout.ranks or {}), dict(layout.alphas or {})
    check_ranks(ranks, shapes)
    check_ranks(alphas, shapes, "alphas")
    for name, (fin, fout, _) in shapes.items():
        check_rank(name, ranks.get(name, rank), fin, fout, record)
    checks.check_inputs(record.name, record.statistics, stats, weights if record.needs_weights else None,
                        list(shapes))
    lora_alpha = PEFT_DEFAULT_ALPHA if layout.lora_alpha is None else layout.lora_alpha
    full_ranks = {name: ranks.get(name, rank) for name in shapes}
    scalings = {name: lora_scaling(alphas.get(name, lora_alpha), r, use_rslora) for name, r in full_ranks.items()}
    problem = Problem(stats, weights, shapes, full_ranks, scalings, device, generator_for(config), workspace_budget)

    started = time.perf_counter()
    with solve_progress(progress):
        layers = _layer_inits(record, config, problem)
    solve_s = time.perf_counter() - started
    halves = stats.halves() if stats is not None and record.data_aware else None
    if halves is not None:
        with solve_progress(progress):
            layers = _with_split_half(record, config, problem, layers, halves)
    _log_solve(record, layers, solve_s)
    meta = stats.meta if stats is not None else {}
    return InitResult(
        layers=layers,
        method=record.name,
        rank=rank,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        alphas={name: a for name, a in alphas.items() if a != lora_alpha},
        target_modules=meta.get("target_modules"),
        base_model_name_or_path=meta.get("base_model_name_or_path"),
        task_type=meta.get("task_type"),
        timings={"solve_s": solve_s, **({} if halves is None else
                                         {"split_half_s": time.perf_counter() - started - solve_s})},
        options=_recorded_options(config, stats),
        freeze_a=freeze_a,
        config=config,
    )


def _with_split_half(record: Method, config: MethodConfig, problem: Problem, layers: dict[str, LayerInit],
                     halves) -> dict[str, LayerInit]:
    """``layers`` with their split-half stability: the method solved again on each half of the data."""
    loose = config.for_halves()
    solved = [record.solve(dataclasses.replace(problem, stats=half), loose) for half in halves]
    layers = stability.split_half_diagnostics(layers, *solved)
    stability.warn_if_unsupported(layers, record.name, problem.stats.num_sequences, record.noise_advice)
    return layers


def _log_solve(record: Method, layers: dict[str, LayerInit], seconds: float) -> None:
    """The solve's one summary line: method, layers, time, what the method's diagnostics add (the
    layers that took a fallback, ...) and the split-half summary."""
    details = record.diagnostics.solve_summary([layer.diagnostics for layer in layers.values()])
    halves = stability.summary(layers)
    logger.info("solve: method=%s, %d layers, %.1f s%s%s", record.name, len(layers), seconds, details,
                "" if halves is None else f", split-half overlap median {halves['median_overlap']:.1%} (random "
                f"{halves['median_random']:.1%}; {halves['supported']} of {halves['layers']} layers supported)")


def _check_inputs(record: Method, config: MethodConfig, stats, weights) -> None:
    if record.data_aware and stats is None:
        raise ValueError(f"method {record.name!r} is data-aware and needs the statistics of a collect pass")
    if record.needs_weights and weights is None:
        raise ValueError(f"method {record.name!r} needs the base weights: pass weights={{name: W [out, in]}}")
    if stats is None and weights is None:
        raise ValueError(f"method {record.name!r} needs the layers: pass weights={{name: W [out, in]}} (or statistics)")
    if stats is not None:
        served = [m.name for m in REGISTRY.values() if m.data_aware and m.statistics <= stats.factors]
        stats.require(record.statistics, f"method {record.name!r} ({record.title})",
                      f", and initialize(..., method={record.name!r}) collects what it needs"
                      + (f"; these statistics serve {', '.join(served)}" if served else ""))
    wanted = getattr(config, "y_factor", None)
    if stats is not None and wanted is not None and wanted != stats.y_factor:
        raise ValueError(f"the options ask y_factor={wanted!r} but the statistics hold y_factor={stats.y_factor!r}; "
                         "collect them again with that y_factor, or leave y_factor unset")


def _layer_inits(record: Method, config: MethodConfig, problem: Problem) -> dict[str, LayerInit]:
    """The record's solve, as float32 :class:`LayerInit` with the statistics' counts recorded."""
    solved = record.solve(problem, config)
    stats = problem.stats
    layers = {}
    for name, (_, _, kind) in problem.shapes.items():
        f = solved[name]
        diagnostics = f.diagnostics
        if stats is not None:
            diagnostics = dataclasses.replace(diagnostics, num_tokens=stats.num_tokens,
                                              num_sequences=stats.num_sequences)
        layers[name] = LayerInit(name, f.lora_A.float(), f.lora_B.float(), kind=kind,
                                 subtract_scaling=problem.scalings[name] if record.moves_base else None,
                                 diagnostics=diagnostics)
    checks.check_outputs(layers, record.name, config.dtype, record.data_aware)
    _warn_if_degraded(layers, config.dtype)
    return layers


def _recorded_options(config: MethodConfig, stats: Statistics | None) -> dict:
    options = config.options()
    if stats is not None and stats.y_factor is not None:
        options["y_factor"] = stats.y_factor
    else:
        options.pop("y_factor", None)
    return options


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


def _warn_if_degraded(layers: dict[str, LayerInit], dtype: torch.dtype) -> None:
    """One warning summarising every layer whose solve took a fallback or looks fragile (what
    each layer's diagnostics say, :meth:`~loradafast.LayerDiagnostics.degradations`)."""
    notes = defaultdict(list)
    for name, layer in layers.items():
        for note in layer.diagnostics.degradations(dtype):
            notes[note].append(name)
    if notes:
        lines = [f"- {what}: {len(names)} layer(s), e.g. {', '.join(names[:3])}" for what, names in notes.items()]
        user_warnings.warn("loradafast: the solve degraded on some layers (details in "
                           "result.layers[name].diagnostics)\n" + "\n".join(lines), RuntimeWarning)
