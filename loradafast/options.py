"""The options of every method, validated once, where they are built (docs/design.md §4, §5).

One options class per method family, in PEFT's style (``EvaConfig``, ``LoraGAConfig``): a dataclass
whose ``__post_init__`` checks every value, so that an object that exists is valid and nothing
downstream checks it again.  :func:`loradafast.initialize`, :func:`loradafast.solve` and
:func:`loradafast.get_peft_model` take one as ``config=``, or build it from their keyword
arguments (``beta=0.1`` ...; see :data:`KEYWORDS`); which class a method takes is in
:mod:`loradafast.methods.registry`.

Every list of allowed values lives here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

Y_FACTORS = ("diag", "full")  # Y kept as its diagonal or as the full [out, out] matrix
DAMPING_MODES = ("absolute", "relative")
GRADIENTS = ("fisher", "raw")  # LoRA-DA's Δ: natural gradient, or −G (ablation)
EIGENSOLVERS = ("auto", "lobpcg", "dense")
LORAGA_VARIANTS = ("paper", "peft")
SVD_MODES = ("auto", "exact", "randomized")  # LoRA-GA, LoRA-One: the gradient's top singular triplets
SOLVE_DTYPES = (torch.float32, torch.float64)

# The keyword arguments of initialize/solve/get_peft_model that set a field of a method's options
# (keyword → field).  Any other keyword is not a method option.
KEYWORDS = {
    "num_train_samples": "num_train_samples",
    "beta": "beta",
    "gamma": "gamma",
    "y_factor": "y_factor",
    "damping": "damping",
    "damping_mode": "damping_mode",
    "alpha_b": "alpha_b",
    "gradient": "gradient",
    "eigensolver": "eigensolver",
    "residual_tol": "residual_tol",
    "subspace_sine": "subspace_sine",
    "loraga_variant": "variant",
    "pissa_niter": "niter",
    "svd": "svd",
    "seed": "seed",
    "solve_dtype": "dtype",  # initialize's name
    "dtype": "dtype",  # solve's name
}


def option(default, help: str):
    """A field of an options class with its one line of help (``option_help``; the CLI prints it)."""
    return dataclasses.field(default=default, metadata={"help": help})


def option_help(config: type) -> dict[str, tuple[object, str]]:
    """The keyword arguments that set ``config``'s fields (the names of :data:`KEYWORDS`, ``dtype``
    for the solve precision) → (default, help)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    return {key: (fields[name].default, fields[name].metadata.get("help", "")) for key, name in KEYWORDS.items()
            if name in fields and key != "solve_dtype"}


def check_choice(label: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{label} must be one of {allowed}, got {value!r}")


def _check_finite(label: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {value!r}")


def _check_positive(label: str, value) -> None:
    _check_finite(label, value)
    if value <= 0:
        raise ValueError(f"{label} must be > 0, got {value!r}")


def _check_non_negative(label: str, value) -> None:
    _check_finite(label, value)
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

    def options(self) -> dict:
        """The options as the result records them, under the keyword names of ``initialize``."""
        names = {field: keyword for keyword, field in KEYWORDS.items() if keyword != "solve_dtype"}
        out = {names.get(f.name, f.name): getattr(self, f.name) for f in dataclasses.fields(self)}
        out["dtype"] = str(self.dtype).replace("torch.", "")
        return out


@dataclass(kw_only=True)
class LoraDAConfig(MethodConfig):
    """LoRA-DA (docs/design.md §4).

    ``beta`` (0: no variance term), ``num_train_samples`` (N of the fine-tuning set), ``alpha_b``,
    ``gamma`` (the scale denominator), ``damping`` and ``damping_mode`` ("absolute" λ, or
    "relative": λ·mean(diag)), ``gradient`` ("fisher", or "raw": Δ = −G), ``y_factor`` (the Y the
    pass collects: "diag" or "full"; None: "diag", or whatever the statistics hold),
    ``eigensolver`` ("auto", "lobpcg", "dense") and its stopping rule: ``residual_tol`` (None:
    from the measured rounding of Ω; a number is taken as given, e.g. 1e-10 for a tight solve) and
    ``subspace_sine`` (where ``residual_tol`` is None, a layer also stops once Davis–Kahan bounds
    the sine between its subspace and the exact one by this; None: no such test).  The default
    1e-4 sits below what rounding the sums to fp32 moves an ill-conditioned layer's subspace by,
    and far below what separates two halves of a few hundred samples (docs/design.md §4.8).
    """

    beta: float = option(0.03, "weight of the variance term (0: none)")
    gamma: float = option(1024.0, "the scale denominator γ of the factors")
    num_train_samples: int = option(100_000,
                                  "N, the size of the fine-tuning set you will train on (weighs the variance term)")
    y_factor: str | None = option(None, "the output-gradient factor Y: diag, or full (out×out per layer); none: diag")
    damping: float = option(1e-6, "the damping λ added to the factors before they are inverted")
    damping_mode: str = option("absolute", "absolute (λ as given) or relative (λ times the mean of the diagonal)")
    alpha_b: float = option(1.0, "weight α_b of the gradient term in Ω")
    gradient: str = option("fisher", "fisher (natural gradient) or raw (Δ = −G, an ablation)")
    eigensolver: str = option("auto", "auto, lobpcg or dense")
    residual_tol: float | None = option(None,
                                      "the eigensolver's stopping residual (none: from the measured rounding of Ω)")
    subspace_sine: float | None = option(1e-4, "a layer also stops once its subspace is this close to the exact "
                                               "one (none: no such test)")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.num_train_samples, int) or isinstance(self.num_train_samples, bool) \
                or self.num_train_samples <= 0:
            raise ValueError(f"num_train_samples must be a positive integer (the fine-tuning set size), got "
                             f"{self.num_train_samples!r}")
        _check_non_negative("beta", self.beta)
        _check_positive("gamma", self.gamma)
        _check_non_negative("damping", self.damping)
        _check_finite("alpha_b", self.alpha_b)
        if self.y_factor is not None:
            check_choice("y_factor", self.y_factor, Y_FACTORS)
        check_choice("damping_mode", self.damping_mode, DAMPING_MODES)
        check_choice("gradient", self.gradient, GRADIENTS)
        check_choice("eigensolver", self.eigensolver, EIGENSOLVERS)
        if self.residual_tol is not None:
            _check_positive("residual_tol", self.residual_tol)
        if self.subspace_sine is not None:
            _check_positive("subspace_sine", self.subspace_sine)


@dataclass(kw_only=True)
class LoraGAConfig(MethodConfig):
    """LoRA-GA: ``gamma`` (16), ``variant`` ("paper": the authors' code, "peft": PEFT's) and
    ``svd``: how the gradient's top 2r singular triplets are found, "auto" (randomized subspace
    iteration, checked, the exact SVD where the check fails; :mod:`loradafast.linalg.lowrank`),
    "exact" (``torch.linalg.svd``) or "randomized" (never falls back)."""

    gamma: float = option(16.0, "the scale denominator γ of the factors")
    variant: str = option("paper", "paper (the authors' code) or peft (PEFT's LoRA-GA)")
    svd: str = option("auto", "auto, exact or randomized: how the gradient's top singular triplets are found")

    def __post_init__(self):
        super().__post_init__()
        _check_positive("gamma", self.gamma)
        check_choice("loraga_variant", self.variant, LORAGA_VARIANTS)
        check_choice("svd", self.svd, SVD_MODES)


@dataclass(kw_only=True)
class LoraOneConfig(MethodConfig):
    """LoRA-One: ``gamma`` (128) and ``svd`` as in :class:`LoraGAConfig` (top r triplets)."""

    gamma: float = option(128.0, "the scale denominator γ of the factors")
    svd: str = option("auto", "auto, exact or randomized: how the gradient's top singular triplets are found")

    def __post_init__(self):
        super().__post_init__()
        _check_positive("gamma", self.gamma)
        check_choice("svd", self.svd, SVD_MODES)


@dataclass(kw_only=True)
class PissaConfig(MethodConfig):
    """PiSSA: ``niter`` None for the exact SVD, n for ``torch.svd_lowrank`` with n iterations
    (PEFT's ``"pissa_niter_<n>"``)."""

    niter: int | None = option(None, "none: the exact SVD; n: torch.svd_lowrank with n iterations")

    def __post_init__(self):
        super().__post_init__()
        if self.niter is not None and (not isinstance(self.niter, int) or isinstance(self.niter, bool)
                                       or self.niter < 0):
            raise ValueError(f"pissa_niter must be None (exact SVD) or a non-negative integer, got {self.niter!r}")


@dataclass(kw_only=True)
class MiloraConfig(MethodConfig):
    """MiLoRA: no options beyond the working ``dtype``."""


@dataclass(kw_only=True)
class FisherSubspaceConfig(MethodConfig):
    """The Fisher subspace: ``y_factor`` as in :class:`LoraDAConfig`."""

    y_factor: str | None = option(None, "the output-gradient factor Y: diag, or full (out×out per layer); none: diag")

    def __post_init__(self):
        super().__post_init__()
        if self.y_factor is not None:
            check_choice("y_factor", self.y_factor, Y_FACTORS)


@dataclass(kw_only=True)
class RandomLoraConfig(MethodConfig):
    """PEFT's default LoRA init: ``seed`` of the generator of the random ``lora_A`` (None: the
    global RNG, as PEFT)."""

    seed: int | None = option(None, "seed of the random lora_A (none: the global RNG, as PEFT)")

    def __post_init__(self):
        super().__post_init__()
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")


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
