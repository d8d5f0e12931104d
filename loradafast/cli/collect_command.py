"""``loradafast collect``: model + data → statistics file."""
from __future__ import annotations

import logging
from pathlib import Path

from . import loading
from .arguments import target_modules_of
from .checks import check_data_source, check_layer_selection
from .output import check_new_file, save_statistics

logger = logging.getLogger("loradafast.cli")


def run_collect(args) -> Path:
    """``loradafast collect``: model + data → statistics file."""
    from ..statistics import collect

    out = Path(args.out)
    check_new_file(out, "--out", args.overwrite)
    check_data_source(args.data)
    model, tokenizer = loading.load_model(args)
    check_layer_selection(model, args, {})
    batches = loading.load_batches(args, tokenizer, model)
    stats = collect(model, batches, target_modules=target_modules_of(args), y_factor=args.y_factor,
                    max_samples=args.max_samples, progress=not args.quiet,
                    split_halves=False if args.no_split_halves else None)
    save_statistics(stats, out)
    logger.info("statistics written to %s; make adapters from them with: loradafast solve --stats %s --rank 8 "
                "--out DIR", out, out)
    return out
