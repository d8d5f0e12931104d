"""``loradafast solve``: statistics file → adapter directory, without running the model."""
from __future__ import annotations

import logging
from pathlib import Path

from .argument_types import pattern_matches
from .arguments import merged_patterns
from .checks import did_you_mean
from .loading import from_pretrained, resolve_device
from .method_options import method_config
from .output import check_out_directory, save_adapter

logger = logging.getLogger("loradafast.cli")


def run_solve(args) -> Path:
    """``loradafast solve``: statistics file → adapter directory."""
    from .. import solve
    from ..methods.registry import get_method
    from ..statistics import Statistics

    record = get_method(args.method)
    config = method_config(record, args)
    check_out_directory(Path(args.out), args.overwrite)
    if record.needs_weights and not args.model:
        raise ValueError(f"method {args.method!r} reads the base weights: give the model directory with --model")
    stats = Statistics.load(args.stats)
    logger.info("loaded %r", stats)
    ranks = per_layer(merged_patterns(args.rank_pattern), stats.layers, "--rank-pattern")
    alphas = per_layer(merged_patterns(args.alpha_pattern), stats.layers, "--alpha-pattern")
    weights = kinds = None
    if record.needs_weights:
        from transformers import AutoModelForCausalLM

        model = from_pretrained(AutoModelForCausalLM, args.model, "--model", args)
        weights, kinds = _weights(model, stats.meta.get("target_modules"))
    result = solve(stats, args.rank, method=args.method, config=config, weights=weights, kinds=kinds, ranks=ranks,
                   lora_alpha=args.lora_alpha, alphas=alphas, use_rslora=args.use_rslora,
                   device=resolve_device(args.device), progress=not (args.no_progress or args.quiet))
    result.lora_dropout = args.lora_dropout  # written into adapter_config.json by result.save
    return save_adapter(result, args, stats)


def per_layer(pattern: dict, names, flag: str) -> dict:
    """A PEFT ``rank_pattern``/``alpha_pattern`` as per-layer values of the layers ``names``: each
    takes the value of the first key that selects it (PEFT's order); a key that selects none raises."""
    names = list(names)
    for key in pattern:
        if not any(pattern_matches(key, name) for name in names):
            leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
            raise ValueError(f"{flag}: {key!r} selects no layer of the statistics{did_you_mean(key, leaves)}; a "
                             f"key is a regex for the end of a layer's path, such as {names[0]!r}")
    chosen = {name: next((key for key in pattern if pattern_matches(key, name)), None) for name in names}
    return {name: pattern[key] for name, key in chosen.items() if key is not None}


def _weights(model, target_modules):
    from ..targets import find_targets

    targets = find_targets(model, target_modules)
    return {t.name: t.weight_out_in().detach() for t in targets}, {t.name: t.kind for t in targets}
