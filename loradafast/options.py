"""What every method's options share, validated once, where they are built (docs/design.md §4, §5).

Each method's options class lives in the method's own module (``LoraDAConfig`` in
:mod:`loradafast.methods.lora_da`, ...), in PEFT's style (``EvaConfig``, ``LoraGAConfig``): a
dataclass built on :class:`MethodConfig` whose ``__post_init__`` checks every value, so that an
object that exists is valid and nothing downstream checks it again.  :func:`loradafast.initialize`,
:func:`loradafast.solve` and :func:`loradafast.get_peft_model` take one as ``config=``, or build it
from their keyword arguments (``beta=0.1`` ...): a field's keyword is its name, or the
``keyword`` its :func:`option` gives (``loraga_variant`` for LoRA-GA's ``variant``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

Y_FACTORS = ("diag", "full")  # Y kept as its diagonal or as the full [out, out] matrix (the pass's choice)
SOLVE_DTYPES = (torch.float32, torch.float64)
# The keyword of the solve dtype: initialize names it solve_dtype, solve and the CLI dtype.
DTYPE_KEYWORDS = ("solve_dtype", "dtype")


def option(default, help: str, *, keyword: str | None = None):
    """A field of an options class with its one line of help (``option_help``; the CLI prints it)
    and, where the entry points name it otherwise than the field, its ``keyword``."""
    metadata = {"help": help} if keyword is None else {"help": help, "keyword": keyword}
    return dataclasses.field(default=default, metadata=metadata)


def keyword_of(field: dataclasses.Field) -> str:
    """The keyword argument of the entry points that sets ``field`` (``dtype`` for the solve dtype)."""
    return field.metadata.get("keyword", field.name)


def option_keywords(config: type) -> dict[str, str]:
    """keyword → field name, for every field of the options class ``config``."""
    return {keyword_of(f): f.name for f in dataclasses.fields(config)}


def option_help(config: type) -> dict[str, tuple[object, str]]:
    """The keyword arguments that set ``config``'s fields (``dtype`` for the solve precision) →
    (default, help)."""
    return {keyword_of(f): (f.default, f.metadata.get("help", "")) for f in dataclasses.fields(config)}


def check_choice(label: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{label} must be one of {allowed}, got {value!r}")


def check_finite(label: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {value!r}")


def check_positive(label: str, value) -> None:
    check_finite(label, value)
    if value <= 0:
        raise ValueError(f"{label} must be > 0, got {value!r}")


def check_non_negative(label: str, value) -> None:
    check_finite(label, value)
    if value < 0:
        raise ValueError(f"{label} must be ≥ 0, got {value!r}")


@dataclass(kw_only=True)
class MethodConfig:
    """Options every method takes.  ``dtype``: the working precision of the dense solves
    (float64 by default; the factors are returned in float32)."""

    dtype: torch.dtype = option(torch.float64, "float64 or float32: the precision of the dense solves")

    def __post_init__(self):
        if self.dtype not in SOLVE_DTYPES:
            raise ValueError(f"the solve dtype must be one of {SOLVE_DTYPES}, got {self.dtype!r}")

    def for_halves(self) -> MethodConfig:
        """The options of the split-half solves (:mod:`loradafast.methods.stability`), which need
        two digits, not the full solve's accuracy: these same options unless a method loosens them."""
        return self

    def options(self) -> dict:
        """The options as the result records them, under the keyword names of ``initialize``."""
        out = {keyword_of(f): getattr(self, f.name) for f in dataclasses.fields(self)}
        out["dtype"] = str(self.dtype).replace("torch.", "")
        return out


def check_pass_options(max_samples) -> None:
    """The statistics pass's own options (not a method's)."""
    if max_samples is not None and (not isinstance(max_samples, int) or isinstance(max_samples, bool)
                                    or max_samples <= 0):
        raise ValueError(f"max_samples must be a positive number of sequences or None, got {max_samples!r}")


def check_rank(name: str, rank: int, in_features: int, out_features: int, method=None) -> None:
    """``rank`` fits layer ``name``; ``method`` (a registry record) may take several singular
    triplets per rank."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank > min(in_features, out_features):
        raise ValueError(
            f"rank {rank} exceeds min(in, out) = {min(in_features, out_features)} of layer {name!r} "
            f"({in_features}→{out_features}); lower the rank or exclude the layer with target_modules"
        )
    k = method.rank_factor if method is not None else 1
    if k > 1 and k * rank > min(in_features, out_features):
        raise ValueError(
            f"{method.title} uses {k}r = {k * rank} singular triplets of the gradient but layer {name!r} "
            f"({in_features}→{out_features}) has only {min(in_features, out_features)}; lower the rank or "
            "exclude the layer with target_modules"
        )


def check_ranks(ranks: dict | None, names, label: str = "ranks") -> None:
    """Every key of a per-layer ``ranks`` (or ``alphas``) dict must name a target layer: a typo
    would silently leave that layer at the default."""
    import difflib

    names = list(names)
    unknown = [key for key in (ranks or {}) if key not in names]
    if not unknown:
        return
    hints = []
    for key in unknown[:3]:
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    shown = ", ".join(repr(n) for n in names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    raise ValueError(
        f"{label} has {len(unknown)} key(s) that name no target layer: {', '.join(hints)}; the keys are layer paths "
        f"relative to the base model, one of: {shown}"
    )
