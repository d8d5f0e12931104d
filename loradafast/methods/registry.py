"""The methods, collected: one :class:`~.method.Method` record per method, each built by the
method's own module (its options, diagnostics, solve, workspace and cost, what the report draws).

Adding a method is writing its module and adding its record to :data:`REGISTRY`.  Everything
else (the API's checks and keyword arguments, whether a statistics pass runs, whether the base
weight moves, the defaults, the memory plan, who solves what on many ranks, the report) reads
these records: no other module names a method.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import planner
from ..layer_init import LayerDiagnostics
from ..options import DTYPE_KEYWORDS, MethodConfig, option_keywords
from ..planner import LayerShape, MemoryModel
from . import fisher, gradient_svd, lora_da, weight_svd
from .method import Method

REGISTRY: dict[str, Method] = {m.name: m for m in (
    lora_da.METHOD, weight_svd.LORA, weight_svd.PISSA, weight_svd.MILORA, gradient_svd.LORA_GA,
    gradient_svd.LORA_ONE, fisher.FISHER_SUBSPACE,
)}
METHODS = tuple(REGISTRY)
DEFAULT_METHOD = METHODS[0]
WEIGHT_ONLY_METHODS = tuple(name for name, m in REGISTRY.items() if not m.data_aware)


def diagnostics_of(method: str | None) -> type[LayerDiagnostics]:
    """The diagnostics class of ``method`` (what a report of it tabulates and draws); the base
    class for a method this version does not know (a report written by another one)."""
    record = REGISTRY.get(method)
    return LayerDiagnostics if record is None else record.diagnostics


def get_method(method: str) -> Method:
    record = REGISTRY.get(method)
    if record is None:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return record


def known_keywords() -> dict[str, str]:
    """The keyword arguments of initialize/solve/get_peft_model that set a field of some method's
    options (keyword → field): the fields' names, or the keyword their ``option()`` gives; read
    from the records, so a method's options are its module's alone.  Two methods may share a
    keyword only for a field of the same name."""
    found = dict.fromkeys(DTYPE_KEYWORDS, "dtype")
    for m in REGISTRY.values():
        for keyword, field in option_keywords(m.config).items():
            if found.setdefault(keyword, field) != field:
                raise TypeError(f"{m.config.__name__} maps the keyword {keyword!r} to the field {field!r}, another "
                                f"method's options to {found[keyword]!r}")
    return found


def method_keywords(caller: str, options: dict, dtype_keyword: str) -> dict:
    """``options`` if every keyword is a method option (the solve dtype under ``dtype_keyword``,
    the caller's name for it); else the TypeError of an unknown keyword argument."""
    known = known_keywords()
    for key in options:
        if key not in known or (known[key] == "dtype" and key != dtype_keyword):
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}")
    return options


def build_config(method: Method, config: MethodConfig | None, keywords: dict) -> MethodConfig:
    """``method``'s options: ``config`` as given, or built from the keyword arguments that are
    not None (None means "the default").  A keyword that is not an option of ``method`` raises."""
    given = {k: v for k, v in keywords.items() if v is not None}
    if config is not None:
        if given:
            raise ValueError(f"pass the options either as config= or as keywords, not both (got config= and "
                             f"{', '.join(given)})")
        if not isinstance(config, method.config):
            raise TypeError(f"method {method.name!r} takes a {method.config.__name__}, got {type(config).__name__}")
        return config
    fields = {f.name for f in dataclasses.fields(method.config)}
    known = known_keywords()
    foreign = [k for k in given if known[k] not in fields]
    if foreign:
        options = sorted(k for k, f in known.items() if f in fields and k != "dtype")
        raise ValueError(f"{', '.join(foreign)} do(es) not apply to method {method.name!r} ({method.title}); its "
                         f"options are {', '.join(options)} ({method.config.__name__})")
    return method.config(**{known[k]: v for k, v in given.items()})


def generator_for(config: MethodConfig) -> torch.Generator | None:
    seed = getattr(config, "seed", None)
    return torch.Generator().manual_seed(seed) if seed is not None else None


def memory_model(method: Method, config: MethodConfig | None = None, **fields) -> MemoryModel:
    """The planner's :class:`~loradafast.planner.MemoryModel` of ``method`` with its options
    ``config`` (None: the defaults): what its pass collects, its workspace and its cost;
    ``fields`` as the model's (y_factor, solve_dtype, ...)."""
    return MemoryModel(method.name, method.statistics, workspace=method.workspace, cost=method.solve_cost,
                       options=config if config is not None else method.config(), **fields)


def plan_for_shapes(shapes, *, memory_budget, method: str = DEFAULT_METHOD, statistics=None,
                    config: MethodConfig | None = None, **fields) -> planner.MemoryPlan:
    """The plan :func:`loradafast.initialize` would make for these layers, without a model.

    ``shapes``: :class:`~loradafast.planner.LayerShape` or ``(name, in, out, input_group[, rank])``
    tuples, in model order.  ``memory_budget`` as in ``initialize`` (bytes or e.g. ``"80GB"``),
    per rank.  ``statistics`` defaults to what ``method``'s pass collects, ``config`` (the method's
    options) to its defaults.  ``fields``: the memory model's (``y_factor``, ``solve_dtype``,
    ``device_type``, ``world_size``: the ranks of a distributed run, each solving its share;
    ``activation_bytes``: one batch's activations,
    :func:`loradafast.planner.llama_activation_bytes` for a Llama)."""
    layers = [s if isinstance(s, LayerShape) else LayerShape(*s) for s in shapes]
    model = memory_model(get_method(method), config, **fields)
    if statistics is not None:
        model = dataclasses.replace(model, statistics=frozenset(statistics))
    return planner.plan_passes(layers, model, planner.parse_bytes(memory_budget), "memory_budget")
