"""The checks of the options against the data source and the model, run before any forward pass:
a mistake costs seconds, not a pass over the data."""
from __future__ import annotations

import difflib
from pathlib import Path

from .argument_types import pattern_matches
from .arguments import target_modules_of


def check_data_source(source: str) -> None:
    """``--data`` exists, or reads as a Hub dataset name: a mistyped path fails before the model loads."""
    from ..data import is_hub_dataset_name

    if not Path(source).exists() and not is_hub_dataset_name(source):
        raise FileNotFoundError(f"--data {source}: no such file or directory; give a .jsonl, .json or text file, a "
                                "save_to_disk directory, or a Hugging Face dataset name (owner/name)")


def check_layer_selection(model, args, patterns: dict) -> None:
    """Every ``--target-modules`` entry names a layer, ``--target-regex`` matches one, and every
    ``--rank-pattern``/``--alpha-pattern`` key selects a target layer: PEFT would silently ignore a typo."""
    from ..targets import find_targets

    linear = [t.name for t in find_targets(model, None, allow_quantized=True)]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    example = (linear or ["model.layers.0.self_attn.q_proj"])[0]
    selection = target_modules_of(args)
    if isinstance(selection, str) and selection != "all-linear":
        if not find_targets(model, selection, allow_quantized=True):
            raise ValueError(f"--target-regex {selection!r} matches no linear layer; it must match a layer's whole "
                             f"path, such as {example!r} (e.g. '.*\\.(q_proj|v_proj)')")
    for entry in selection if isinstance(selection, list) else []:
        if not find_targets(model, [entry], allow_quantized=True):
            raise ValueError(f"--target-modules: {entry!r} names no linear layer{did_you_mean(entry, leaves)}; "
                             f"a name matches a layer's path or its end: {', '.join(leaves)}")
    targets = [t.name for t in find_targets(model, selection, allow_quantized=True)]
    for flag, pattern in patterns.items():
        for key in pattern:
            if not any(pattern_matches(key, name) for name in targets):
                raise ValueError(f"{flag}: {key!r} selects no target layer{did_you_mean(key, leaves)}; a key is a "
                                 f"regex for the end of a layer's path, such as {example!r}")


def did_you_mean(key: str, names) -> str:
    """``" (did you mean 'NAME'?)"`` for the name of ``names`` closest to ``key``; "" if none is close."""
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_ranks(peft_model, record) -> None:
    """Every target layer takes its rank (and a quantized one, the method): what the pass would
    otherwise find out only at the solve."""
    from ..pipeline import check_weights_readable
    from ..options import check_rank
    from ..targets import find_targets

    targets = find_targets(peft_model, allow_quantized=True)
    for t in targets:
        try:
            check_rank(t.name, t.rank, t.in_features, t.out_features, record)
        except ValueError as exc:
            fits = min(min(u.in_features, u.out_features) for u in targets) // record.rank_factor
            raise ValueError(f"{exc}. Every target layer takes --rank {fits} or less; --rank-pattern sets single "
                             "layers, --target-modules or --target-regex leaves layers out") from None
    check_weights_readable(targets, record)
