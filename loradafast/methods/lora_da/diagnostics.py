"""What LoRA-DA's solve reports about a layer (docs/design.md §4, §7), and what the stages above
do with it: the numbers that certify its factors, the warnings of a fragile solve, the solve's log
line and the report's columns, flags and plots (:mod:`.plots`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...layer_init import LayerDiagnostics, reported
from . import plots

# Above this lower bound on cond(Zλ) or cond(Yλ) the factor is close to singular in the working
# precision: the solve still runs, but more damping (damping_mode="relative") is advisable.
CONDITION_WARNING = {torch.float64: 1e12, torch.float32: 1e5}


@dataclass
class LoraDADiagnostics(LayerDiagnostics):
    """LoRA-DA (docs/design.md §4, §7): the eigensolve, the damping and the scale of Δ."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "sigma", "lambda_1", "lambda_r", "lambda_r+1", "residual", "residual_tol", "residual_floor", "omega_norm",
        "eigensolver", "iterations", "converged", "fallback", "damping_z", "damping_y", "damping_raised",
        "z_condition", "y_condition", "cholesky_dtype", "variance_coef", "input_group")
    RENAMED: ClassVar[dict[str, str]] = {
        "eigensolver_iterations": "iterations", "eigensolver_converged": "converged",
        "eigensolver_fallback": "fallback", "z_condition_estimate": "z_condition",
        "y_condition_estimate": "y_condition"}
    FLAGS: ClassVar[tuple] = (
        ("eigensolver fell back to dense eigh", "fallback", lambda v: v is True),
        ("damping raised", "damping_raised", lambda v: v is True),
        ("eigen-residual above tolerance", "converged", lambda v: v is False),
    )
    COLUMN_NOTES: ClassVar[str] = (
        "σ = ‖Δ‖₂; λ_1, λ_r: the smallest and the r-th eigenvalue of Ω (kept); λ_r+1: the first one not kept "
        "(with the statistics); residual: ‖ΩX − XΛ‖_F / ‖Ω‖₂, residual_tol: the tolerance it was accepted against, "
        "residual_floor: its rounding floor; z/y_condition: lower bounds on cond(Zλ), cond(Yλ)")
    PLOTS: ClassVar[tuple] = (("sigma.png", plots.sigma), ("residuals.png", plots.residuals),
                              ("conditioning.png", plots.conditioning), ("spectrum.png", plots.spectrum))

    eigenvalues: torch.Tensor | None = reported()  # the r smallest of Ω, ascending
    residual: float | None = reported()  # ‖ΩX − XΛ‖_F / ‖Ω‖₂
    residual_floor: float | None = reported()  # measured rounding of the implicit Ω products
    residual_tol: float | None = reported()  # the tolerance ``residual`` was tested against
    # The stopping rule's Davis–Kahan target for the subspace's sine (None: solved to residual_tol alone)
    subspace_sine_target: float | None = None
    omega_norm: float | None = reported()
    eigensolver: str | None = reported()  # "lobpcg", "block-lanczos", "block-lanczos+lobpcg" or "dense"
    eigensolver_iterations: int | None = reported()
    eigensolver_converged: bool | None = reported()
    eigensolver_fallback: bool | None = reported()
    sigma_iterations: int | None = None
    preconditioner_factorisations: int | None = None
    damping_z: float | None = reported()
    damping_y: float | None = reported()
    damping_raised: bool | None = reported()
    z_condition_estimate: float | None = reported()
    y_condition_estimate: float | None = reported()
    cholesky_dtype: str | None = reported()
    sigma: float | None = reported()  # ‖Δ‖₂
    variance_coef: float | None = reported()
    input_group: str | None = reported()  # the layer whose input this one shares (Z's key)
    group_times_s: dict | None = None  # stage times of the whole batch of input groups solved with this one
    batch_groups: int | None = None  # how many same-shaped input groups that batch stacked

    def certifying_numbers(self) -> list[torch.Tensor]:
        """‖Ω‖₂, the residual and σ, and the kept eigenvalues: a non-finite one means the
        factors were never tested."""
        numbers = [torch.as_tensor([v for v in (self.omega_norm, self.residual, self.sigma) if v is not None],
                                   dtype=torch.float64)]
        if self.eigenvalues is not None:
            numbers.append(torch.as_tensor(self.eigenvalues))
        return numbers

    def degradations(self, dtype: torch.dtype) -> list[str]:
        notes = []
        if self.eigensolver_fallback:
            notes.append("re-solved with dense eigh after the iterative solver missed the tolerance")
        if self.eigensolver_converged is False:
            notes.append("eigen-residual above the tolerance")
        if self.damping_raised:
            notes.append("damping raised above the requested value to make a rank-deficient factor positive "
                         "definite (see damping_z / damping_y)")
        if self.cholesky_dtype == "float64" and dtype != torch.float64:
            notes.append("Cholesky retried in float64")
        limit = CONDITION_WARNING.get(dtype, 1e12)
        if max(self.z_condition_estimate or 0.0, self.y_condition_estimate or 0.0) > limit:
            advice = "consider damping_mode='relative'"
            # float32 then moves the subspace far from float64's (measurements: benchmarks/README.md,
            # 'Measurements behind the library's constants')
            if dtype != torch.float64:
                advice += ", or the default float64: rounding can move this float32 subspace by about 6e-8·cond"
            notes.append(f"damped factor condition number above {limit:.0e} ({advice})")
        return notes

    @classmethod
    def solve_summary(cls, diagnostics: list[LayerDiagnostics]) -> str:
        mine = [d for d in diagnostics if isinstance(d, cls)]
        fallbacks = sum(bool(d.eigensolver_fallback) for d in mine)
        raised = sum(bool(d.damping_raised) for d in mine)
        worst = max((d.residual for d in mine if d.residual is not None), default=None)
        return (f", {fallbacks} eigensolver fallback(s), damping raised on {raised} layer(s)"
                + ("" if worst is None else f", largest eigen-residual {worst:.1e}"))

    @classmethod
    def derived_columns(cls, entry: dict) -> dict:
        out = {}
        ev, spectrum = entry.get("eigenvalues"), entry.get("omega_spectrum")
        if ev:
            out["lambda_1"], out["lambda_r"] = ev[0], ev[-1]
        if spectrum and len(spectrum) > entry["rank"]:
            out["lambda_r+1"] = spectrum[entry["rank"]]
        return out
