"""One record per method: what it needs, what it does to the model, its options, its solve.

Adding a method is adding one :class:`Method` to :data:`REGISTRY` (and its formulas to a module
of this package).  Everything else (the API's checks, whether a statistics pass runs, whether the
base weight moves, the defaults) reads these records.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..options import (KEYWORDS, FisherSubspaceConfig, LoraDAConfig, LoraGAConfig, LoraOneConfig, MethodConfig,
                       MiloraConfig, PissaConfig, RandomLoraConfig)
from ..progress import track
from . import baselines
from .baselines import Factors
from .problem import Problem


@dataclass(frozen=True)
class Method:
    """One initialisation method: its name, options class, solve function and what it needs."""

    name: str
    title: str  # as papers write it, for messages
    config: type[MethodConfig]  # its options class
    # Every layer at once: Problem, options → {layer: Factors}.
    solve: Callable[[Problem, MethodConfig], dict[str, Factors]]
    statistics: frozenset = frozenset()  # of "G", "Y", "Z"; empty: weight-only, no statistics pass
    needs_weights: bool = False  # reads the base weights
    moves_base: bool = False  # the base weight becomes W − s·B·A
    rank_factor: int = 1  # singular triplets taken per rank (LoRA-GA: 2r)

    @property
    def data_aware(self) -> bool:
        return bool(self.statistics)

    @property
    def default_gamma(self) -> float | None:
        """The default scale denominator γ (None for methods without one)."""
        fields = {f.name: f.default for f in dataclasses.fields(self.config)}
        return fields.get("gamma")


def per_layer(formula: Callable[[Problem, str, MethodConfig], Factors]):
    """A method solved layer by layer with ``formula(problem, name, config)``."""
    def solve(problem: Problem, config: MethodConfig) -> dict[str, Factors]:
        return {name: formula(problem, name, config) for name in track(problem.shapes, desc="loradafast: solve")}
    return solve


def _lora(p: Problem, name: str, c: RandomLoraConfig) -> Factors:
    fin, fout, _ = p.shapes[name]
    return baselines.lora(fout, fin, p.ranks[name], generator=p.generator)


def _pissa(p: Problem, name: str, c: PissaConfig) -> Factors:
    return baselines.pissa(p.weight(name, c.dtype), p.ranks[name], p.scalings[name], niter=c.niter)


def _milora(p: Problem, name: str, c: MiloraConfig) -> Factors:
    return baselines.milora(p.weight(name, c.dtype), p.ranks[name], p.scalings[name])


# G is an fp32 sum: it is read in float32, and only the exact SVD works in c.dtype (the
# randomized one runs in float32; a float64 copy of every G cost 8 % of the solve on SmolLM2).
def _lora_ga(p: Problem, name: str, c: LoraGAConfig) -> Factors:
    return baselines.lora_ga(p.G(name, _gradient_dtype(c)), p.ranks[name], gamma=c.gamma, variant=c.variant,
                             svd=c.svd, dtype=c.dtype)


def _lora_one(p: Problem, name: str, c: LoraOneConfig) -> Factors:
    return baselines.lora_one(p.G(name, _gradient_dtype(c)), p.ranks[name], gamma=c.gamma, svd=c.svd, dtype=c.dtype)


def _gradient_dtype(c) -> torch.dtype:
    return c.dtype if c.svd == "exact" else torch.float32


def _fisher_subspace(p: Problem, name: str, c: FisherSubspaceConfig) -> Factors:
    return baselines.fisher_subspace(p.weight(name, c.dtype), p.Y(name, c.dtype), p.Z(name, c.dtype),
                                     p.ranks[name], p.scalings[name])


def _lora_da(p: Problem, c: LoraDAConfig) -> dict[str, Factors]:
    from .lora_da_solve import solve_lora_da  # all layers together: one factorisation per input

    return solve_lora_da(p.stats, p.ranks, c, device=p.device)


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("lora-da", "LoRA-DA", LoraDAConfig, _lora_da, statistics=frozenset("GYZ")),
    Method("lora", "LoRA", RandomLoraConfig, per_layer(_lora)),
    Method("pissa", "PiSSA", PissaConfig, per_layer(_pissa), needs_weights=True, moves_base=True),
    Method("milora", "MiLoRA", MiloraConfig, per_layer(_milora), needs_weights=True, moves_base=True),
    Method("lora-ga", "LoRA-GA", LoraGAConfig, per_layer(_lora_ga), statistics=frozenset("G"), moves_base=True,
           rank_factor=2),
    Method("lora-one", "LoRA-One", LoraOneConfig, per_layer(_lora_one), statistics=frozenset("G")),
    Method("fisher-subspace", "Fisher subspace", FisherSubspaceConfig, per_layer(_fisher_subspace),
           statistics=frozenset("YZ"), needs_weights=True, moves_base=True),
)}
METHODS = tuple(REGISTRY)
WEIGHT_ONLY_METHODS = tuple(name for name, m in REGISTRY.items() if not m.data_aware)


def get_method(method: str) -> Method:
    record = REGISTRY.get(method)
    if record is None:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return record


def method_keywords(caller: str, options: dict, dtype_keyword: str) -> dict:
    """``options`` if every keyword is a method option (the solve dtype under ``dtype_keyword``,
    the caller's name for it); else the TypeError of an unknown keyword argument."""
    for key in options:
        if key not in KEYWORDS or (KEYWORDS[key] == "dtype" and key != dtype_keyword):
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
    foreign = [k for k in given if KEYWORDS[k] not in fields]
    if foreign:
        options = sorted(k for k, f in KEYWORDS.items() if f in fields and k != "dtype")
        raise ValueError(f"{', '.join(foreign)} do(es) not apply to method {method.name!r} ({method.title}); its "
                         f"options are {', '.join(options)} ({method.config.__name__})")
    return method.config(**{KEYWORDS[k]: v for k, v in given.items()})


def generator_for(config: MethodConfig) -> torch.Generator | None:
    seed = getattr(config, "seed", None)
    return torch.Generator().manual_seed(seed) if seed is not None else None
