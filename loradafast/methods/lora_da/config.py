"""LoRA-DA's options (docs/design.md §4), and every list of values they allow."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from ...options import (Y_FACTORS, MethodConfig, check_choice, check_finite, check_non_negative, check_positive,
                        option)

DAMPING_MODES = ("absolute", "relative")
GRADIENTS = ("fisher", "raw")  # Δ: natural gradient, or −G (ablation)
EIGENSOLVERS = ("auto", "lobpcg", "dense")
# The residual tolerance of the split-half solves (‖ΩX − XΛ‖/‖Ω‖): Davis–Kahan then bounds each
# half's subspace error by about 1e-6·‖Ω‖/gap, far below the split-half sines measured
# (measurements: benchmarks/README.md, 'Measurements behind the library's constants').
HALF_RESIDUAL_TOL = 1e-6


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
        check_non_negative("beta", self.beta)
        check_positive("gamma", self.gamma)
        check_non_negative("damping", self.damping)
        check_finite("alpha_b", self.alpha_b)
        if self.y_factor is not None:
            check_choice("y_factor", self.y_factor, Y_FACTORS)
        check_choice("damping_mode", self.damping_mode, DAMPING_MODES)
        check_choice("gradient", self.gradient, GRADIENTS)
        check_choice("eigensolver", self.eigensolver, EIGENSOLVERS)
        if self.residual_tol is not None:
            check_positive("residual_tol", self.residual_tol)
        if self.subspace_sine is not None:
            check_positive("subspace_sine", self.subspace_sine)

    def for_halves(self) -> LoraDAConfig:
        """A looser eigen-residual (:data:`HALF_RESIDUAL_TOL`) where the user set none: a copy, not
        a rebuilt config (the options were checked once, where they were built)."""
        if self.residual_tol is not None:
            return self
        loose = copy.copy(self)
        object.__setattr__(loose, "residual_tol", HALF_RESIDUAL_TOL)
        return loose
