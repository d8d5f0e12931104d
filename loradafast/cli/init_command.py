"""``loradafast init``: everything checked, then the pass, then the adapter directory."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from . import loading
from .arguments import PEFT_DEFAULT_ALPHA, merged_patterns, target_modules_of
from .checks import check_data_source, check_layer_selection, check_ranks
from .method_options import method_config
from .output import check_new_file, check_out_directory, save_adapter, save_statistics

logger = logging.getLogger("loradafast.cli")


@dataclasses.dataclass
class InitPlan:
    """What ``init`` settled before loading the model: the method, its options object, the patterns."""

    record: object  # the method's registry record
    config: object  # its options (a MethodConfig)
    rank_pattern: dict
    alpha_pattern: dict


def run_init(args) -> Path:
    """``loradafast init``: model + data → adapter directory.  Every argument is checked before the
    statistics pass; the adapter directory is written only once the solve has succeeded."""
    plan = plan_init(args)
    model, tokenizer = loading.load_model(args)
    peft_model = wrapped(model, args, plan)
    batches = None
    if plan.record.data_aware:
        batches = loading.load_batches(args, tokenizer, model)
    elif args.data:
        logger.info("%s uses the weights only: --data is not read", args.method)
    result, stats = initialised(peft_model, batches, args, plan)
    return save_adapter(result, args, stats)


def plan_init(args) -> InitPlan:
    """The checks that need no model: method and options, output paths, option combinations."""
    from ..methods.registry import get_method

    record = get_method(args.method)
    if record.data_aware and not args.data:
        raise ValueError(f"method {args.method!r} is data-aware: give the training samples with --data")
    if args.save_stats and not record.data_aware:
        raise ValueError(f"--save-stats: method {args.method!r} uses the weights only and runs no statistics pass; "
                         "drop --save-stats, or choose a data-aware method")
    if args.save_stats and args.memory_budget is not None:
        raise ValueError("--save-stats needs every layer's statistics at once, which --memory-budget may split over "
                         "several passes; give only one of them")
    if record.data_aware:
        check_data_source(args.data)
    config = method_config(record, args)
    check_out_directory(Path(args.out), args.overwrite)
    if args.save_stats:
        check_new_file(Path(args.save_stats), "--save-stats", args.overwrite)
    return InitPlan(record, config, merged_patterns(args.rank_pattern), merged_patterns(args.alpha_pattern))


def wrapped(model, args, plan: InitPlan):
    """``model`` with PEFT's LoRA layers of the adapter asked for, every layer's rank checked: the
    LoraConfig is PEFT's own, so its target and pattern rules are PEFT's, and ``result.save``
    writes it (lora_dropout and all) into adapter_config.json."""
    import peft

    from ..statistics.collector import is_causal_lm
    from ..targets import find_targets, short_target_modules

    check_layer_selection(model, args, {"--rank-pattern": plan.rank_pattern, "--alpha-pattern": plan.alpha_pattern})
    targets = target_modules_of(args)
    if targets is None or targets == "all-linear":
        # loradafast's default (every linear layer but the output layer), not PEFT's per-model one, by
        # leaf name: PEFT's own "all-linear" would write every layer's full path into the config.
        targets = short_target_modules(model, find_targets(model, None, allow_quantized=True))
    config = peft.LoraConfig(
        r=args.rank, lora_alpha=PEFT_DEFAULT_ALPHA if args.lora_alpha is None else args.lora_alpha,
        lora_dropout=args.lora_dropout, use_rslora=args.use_rslora, target_modules=targets,
        rank_pattern=plan.rank_pattern, alpha_pattern=plan.alpha_pattern,
        task_type="CAUSAL_LM" if is_causal_lm(model) else None)
    peft_model = peft.get_peft_model(model, config)
    check_ranks(peft_model, plan.record)
    return peft_model


def initialised(peft_model, batches, args, plan: InitPlan):
    """The result (and, with ``--save-stats``, the statistics) of one pipeline over the PEFT model:
    its planned passes, or with ``--save-stats`` one pass that keeps every layer's statistics."""
    from ..pipeline import Pipeline, RunOptions

    run_options = RunOptions(max_samples=args.max_samples, progress=not (args.no_progress or args.quiet),
                             memory_budget=args.memory_budget, split_halves=False if args.no_split_halves else None)
    pipeline = Pipeline.for_model(peft_model, plan.record, plan.config, run_options, rank=None, ranks=None,
                                  target_modules=None, lora_alpha=None, use_rslora=False)
    if not args.save_stats:
        return pipeline.run(batches), None
    stats = pipeline.collect(batches)
    path = Path(args.save_stats)
    save_statistics(stats, path)
    logger.info("statistics (%s) written to %s", "".join(sorted(stats.factors)), path)
    result = pipeline.run(None, stats)
    result.timings = {**result.timings, "pass_s": stats.meta.get("pass_seconds", 0.0)}
    return result, stats
