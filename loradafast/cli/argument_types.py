"""The types of the command line's options: a bad value ends in argparse's usage message, before
anything loads."""
from __future__ import annotations

import argparse
import json
import re


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def positive_number(text) -> int | float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number greater than 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {text!r}")
    return int(value) if value.is_integer() else value  # PEFT writes an integer alpha as one


def dropout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and less than 1, got {text!r}")
    return value


def memory_budget(text: str) -> str:
    from ..planner import parse_bytes

    try:
        parse_bytes(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text  # initialize() parses it again, as it does every budget


def regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression ({exc})") from None
    return text


def pattern_matches(key: str, name: str) -> bool:
    """Whether a ``rank_pattern``/``alpha_pattern`` key selects layer ``name``: PEFT's rule
    (``peft.utils.other.get_pattern_key``), the key a regex for the end of the path."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def layer_pattern(kind: str):
    """The type of ``--rank-pattern`` (``kind`` "rank") or ``--alpha-pattern`` ("alpha"): ``KEY=VALUE``
    or a JSON object of them, as a dict."""
    def parse(text: str) -> dict:
        entries = _pattern_entries(text)
        for key in entries:
            regex(rf"(.*\.)?({key})$")
        number = positive_int if kind == "rank" else positive_number
        try:
            return {key: number(str(value)) for key, value in entries.items()}
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{kind}s {exc}") from None
    return parse


def _pattern_entries(text: str) -> dict:
    text = text.strip()
    if text.startswith("{"):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}); write KEY=VALUE, or an object such as "
                                             "'{\"v_proj\": 16}'") from None
        if not entries or not all(isinstance(v, (int, float, str)) and not isinstance(v, bool)
                                  for v in entries.values()):
            raise argparse.ArgumentTypeError(f"expected a JSON object of layer keys and numbers, got {text!r}")
        return entries
    key, sep, value = text.rpartition("=")  # the value is a number: a key's regex may hold '='
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (KEY: a layer name or regex), got {text!r}")
    return {key.strip(): value.strip()}
