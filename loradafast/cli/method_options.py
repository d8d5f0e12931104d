"""``--option KEY=VALUE`` and ``--num-train-samples``: read, checked against the method's options,
and built into its options object before the model is loaded."""
from __future__ import annotations

import difflib

SOLVE_DTYPES = ("float64", "float32")


def parse_option(text: str):
    """``KEY=VALUE`` → (key, value), the value read as a number, bool or None where it is one."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--option takes KEY=VALUE, got {text!r}")
    value = value.strip()
    lowered = value.lower()
    if lowered in ("none", "null"):
        return key.strip(), None
    if lowered in ("true", "false"):
        return key.strip(), lowered == "true"
    for cast in (int, float):
        try:
            return key.strip(), cast(value)
        except ValueError:
            pass
    return key.strip(), value


def option_names(record) -> dict:
    """The ``--option`` keys of a method (the keywords of ``initialize``, ``dtype`` for the solve
    precision) → their defaults."""
    from ..options import option_help

    return {key: default for key, (default, _) in option_help(record.config).items()}


def options_help(record) -> str:
    """One line per option of ``record``'s method: ``KEY=DEFAULT  help`` (the help of its options class)."""
    from ..options import option_help

    rows = [(f"{key}={_shown(default)}", text) for key, (default, text) in option_help(record.config).items()]
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"  {left:<{width}}  {text}" for left, text in rows)


def _shown(value) -> str:
    if value is None:
        return "none"
    return str(value).replace("torch.", "")


def method_config(record, args):
    """The method's options object, built from ``--option`` and ``--num-train-samples``: an unknown
    key or a bad value fails here, before the model is loaded."""
    from ..methods.registry import build_config

    given, flags = {}, {}
    for text in args.option:
        key, value = parse_option(text)
        key = "dtype" if key == "solve_dtype" else key
        given[key], flags[key] = value, f"--option {key}"
    if getattr(args, "num_train_samples", None) is not None:
        given["num_train_samples"], flags["num_train_samples"] = args.num_train_samples, "--num-train-samples"
    names = option_names(record)
    for key in given:
        if key not in names:
            raise ValueError(_unknown_option(record, flags[key], key))
    if "dtype" in given:
        given["dtype"] = _solve_dtype(given["dtype"])
    try:
        return build_config(record, None, given)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{', '.join(flags.values())}: {exc}") from None


def _unknown_option(record, flag: str, key: str) -> str:
    from ..methods.registry import REGISTRY

    owners = [m.name for m in REGISTRY.values() if key in option_names(m)]
    if owners:
        why = f"is an option of {', '.join(owners)}, not of method {record.name!r} ({record.title})"
    else:
        close = difflib.get_close_matches(key, list(option_names(record)), n=1)
        why = f"is not an option of method {record.name!r} ({record.title})" + (
            f" (did you mean {close[0]!r}?)" if close else "")
    return f"{flag}: {key!r} {why}. Its options (--option KEY=VALUE):\n{options_help(record)}"


def _solve_dtype(value):
    import torch

    name = str(value).replace("torch.", "")
    if name not in SOLVE_DTYPES:
        raise ValueError(f"--option dtype: the solve runs in {' or '.join(SOLVE_DTYPES)}, got {value!r}")
    return getattr(torch, name)
