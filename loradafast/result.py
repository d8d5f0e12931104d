"""What a solve hands on, as plain data: per-layer factors (:class:`LayerInit`) with typed
diagnostics (:class:`LayerDiagnostics` and one subclass per method family), gathered in an
:class:`InitResult`.

Nothing here changes a model.  Writing a result out (``save``, ``state_dict``, ``lora_config``)
or into a ``PeftModel`` (``apply_to``) is :mod:`loradafast.integrations.peft`'s work; the methods of
:class:`InitResult` of those names are shortcuts to it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn


class _FieldMapping(Mapping):
    """Read-only mapping view of a dataclass's fields that are set (not None), so that
    ``diagnostics["residual"]``, ``diagnostics.get(...)`` and ``"residual" in diagnostics`` keep
    working beside the attributes."""

    def _set(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __getitem__(self, key: str):
        value = getattr(self, key, None) if isinstance(key, str) and key in self._names() else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self):
        return iter(self._set())

    def __len__(self) -> int:
        return len(self._set())

    @classmethod
    def _names(cls) -> set:
        return {f.name for f in fields(cls)}


@dataclass
class LayerDiagnostics(_FieldMapping):
    """What a solve reports about one layer; the method families add their own fields."""

    num_tokens: int | None = None  # of the statistics (data-aware methods)
    num_sequences: int | None = None
    solved_by_rank: int | None = None  # the rank that solved this layer (a distributed run; else None)
    # Split-half stability (loradafast.methods.stability): the subspaces solved from the even and
    # from the odd batches share this much of their span (1: the same; random_overlap: unrelated),
    # and the sine of their largest principal angle.  None where the pass kept no half.
    split_half_overlap: float | None = None
    split_half_sine: float | None = None
    random_overlap: float | None = None


@dataclass
class SingularDiagnostics(LayerDiagnostics):
    """PiSSA, MiLoRA: the kept singular values of the weight."""

    singular_values: torch.Tensor | None = None


@dataclass
class GradientDiagnostics(LayerDiagnostics):
    """LoRA-GA, LoRA-One: the gradient's singular values they used, and how they were found
    (:mod:`loradafast.linalg.lowrank`)."""

    gradient_singular_values: torch.Tensor | None = None
    svd: str | None = None  # "exact", "randomized", or "exact-fallback" (the randomized check failed)
    svd_backward_error: float | None = None  # ‖GV − US‖_F / σ₁ of the randomized triplets (the check)
    svd_sine_estimate: float | None = None  # estimated sin θ to the exact SVD's subspaces (inf: no gap)
    svd_krylov_depth: int | None = None  # products with GGᵀ the randomized SVD used (it grows where the check fails)


@dataclass
class FisherSubspaceDiagnostics(SingularDiagnostics):
    """Fisher subspace: the Fisher energy of the kept singular triplets of the weight."""

    fisher_energy: torch.Tensor | None = None  # of the kept triplets, in decreasing order
    energy_fraction: float | None = None
    singular_indices: torch.Tensor | None = None  # positions in the σ-descending order


@dataclass
class LoraDADiagnostics(LayerDiagnostics):
    """LoRA-DA (docs/design.md §4, §7): the eigensolve, the damping and the scale of Δ."""

    eigenvalues: torch.Tensor | None = None  # the r smallest of Ω, ascending
    residual: float | None = None  # ‖ΩX − XΛ‖_F / ‖Ω‖₂
    residual_floor: float | None = None  # measured rounding of the implicit Ω products
    residual_tol: float | None = None  # the tolerance ``residual`` was tested against
    omega_norm: float | None = None
    eigensolver: str | None = None  # "lobpcg", "block-lanczos", "block-lanczos+lobpcg" or "dense"
    eigensolver_iterations: int | None = None
    eigensolver_converged: bool | None = None
    eigensolver_fallback: bool | None = None
    sigma_iterations: int | None = None
    preconditioner_factorisations: int | None = None
    damping_z: float | None = None
    damping_y: float | None = None
    damping_raised: bool | None = None
    z_condition_estimate: float | None = None
    y_condition_estimate: float | None = None
    cholesky_dtype: str | None = None
    sigma: float | None = None  # ‖Δ‖₂
    variance_coef: float | None = None
    input_group: str | None = None  # the layer whose input this one shares (Z's key)
    group_times_s: dict | None = None  # stage times of the whole input group


@dataclass
class LayerInit:
    """The initial LoRA factors of one layer, in PEFT's layout, with what the solve reports.

    ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` (float32) are ``lora_A.weight`` and
    ``lora_B.weight`` of the layer's adapter; ``kind`` is how the base layer stores its weight
    ("linear" ``[out, in]`` or "conv1d" ``[in, out]``).  ``subtract_scaling`` is set for methods that
    move the base weight (it becomes ``W − s·B·A``); ``diagnostics`` is a
    :class:`LayerDiagnostics` of the method's family (``LoraDADiagnostics`` for LoRA-DA).
    """

    name: str
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    kind: str = "linear"  # "linear" or "conv1d" (the base weight's storage)
    # For methods that move the base weight (PiSSA, LoRA-GA, ...): the base weight becomes
    # W − subtract_scaling·B·A, subtract_scaling being the layer's LoRA scaling s.  The update
    # is kept implicit: storing it would cost as much memory as the targeted weights.
    subtract_scaling: float | None = None
    diagnostics: LayerDiagnostics = field(default_factory=LayerDiagnostics)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def weight_update(self) -> torch.Tensor | None:
        """``W_new − W_old`` as ``[out, in]`` float32 (None when the base weight is unchanged)."""
        if self.subtract_scaling is None:
            return None
        return -self.subtract_scaling * (self.lora_B.float() @ self.lora_A.float())

    def __repr__(self) -> str:  # keep tensors out of the repr
        keys = ", ".join(sorted(self.diagnostics))
        return (f"LayerInit({self.name!r}, rank={self.rank}, in={self.lora_A.shape[1]}, "
                f"out={self.lora_B.shape[0]}, moves_base={self.subtract_scaling is not None}, diagnostics: {keys})")


@dataclass
class InitResult:
    """What :func:`loradafast.initialize` and :func:`loradafast.solve` return: every layer's
    :class:`LayerInit` (``layers``, by module name), the method and its options, the adapter's
    rank and scaling, the model it was made for, and the stage times (``timings``).

    Write it out with :meth:`save` (a PEFT adapter directory), :meth:`state_dict` and
    :attr:`lora_config`, or into a ``PeftModel`` with :meth:`apply_to`; look at it with
    :meth:`summary` (a text table) or :meth:`report` (a per-layer table and plots on disk).
    """

    layers: dict[str, LayerInit]
    method: str
    rank: int
    lora_alpha: float
    use_rslora: bool = False
    alphas: dict[str, float] = field(default_factory=dict)  # per-layer lora_alpha ≠ lora_alpha
    target_modules: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    timings: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    # LoRA-FA: lora_A stays at its initialisation, only lora_B trains.  apply_to (hence
    # get_peft_model) sets requires_grad=False on lora_A; a saved adapter cannot carry it.
    freeze_a: bool = False
    # The LoraConfig of the PeftModel this result was made for (initialize(peft_model)): saved as
    # it is, with only what the method changes, so that no option of the user's is lost.
    peft_config: object | None = None
    # That PeftModel's other adapter tensors after the initialisation (DoRA magnitudes,
    # modules_to_save copies, LoRA biases), in PEFT's keys: saved with the factors.
    extra_state: dict[str, torch.Tensor] = field(default_factory=dict)
    # The validated options object the solve ran with (LoraDAConfig, PissaConfig, ...).
    config: object | None = None
    # The memory plan of the statistics passes (loradafast.planner.MemoryPlan); None without a pass.
    plan: object | None = None
    # A distributed run (docs/design.md §6.5): layer → the rank that solved it; None otherwise.
    owners: dict[str, int] | None = None

    @property
    def moves_base(self) -> bool:
        """True when the initialised model needs the residual base ``W − s·B₀A₀``."""
        return any(layer.subtract_scaling is not None for layer in self.layers.values())

    # ---- shortcuts to loradafast.integrations.peft -------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT-format keys, as ``PeftModel.save_pretrained`` writes them (no adapter name)."""
        return _peft().adapter_state_dict(self)

    def converted_state_dict(self) -> dict[str, torch.Tensor]:
        """The rank-2r adapter for the unmodified base (PEFT's ``subtract_mutated_init``)."""
        return _peft().converted_state_dict(self)

    @property
    def lora_config(self):
        """The ``LoraConfig`` of :meth:`state_dict` (for the residual base if :attr:`moves_base`)."""
        return _peft().lora_config(self)

    def save(self, directory, *, convert_to_lora: bool | None = None) -> Path:
        """A PEFT adapter directory: :func:`loradafast.integrations.peft.save`."""
        return _peft().save(self, directory, convert_to_lora=convert_to_lora)

    def apply_to(self, peft_model: nn.Module, adapter_name: str | None = None) -> nn.Module:
        """Fill the LoRA layers of ``peft_model`` in place: :func:`loradafast.integrations.peft.apply_to`."""
        return _peft().apply_to(self, peft_model, adapter_name)

    def report(self, directory, *, stats=None, plots: bool = True) -> Path:
        """A per-layer table (CSV and Markdown) and, with matplotlib, PNG plots in ``directory``:
        :func:`loradafast.report.write_report`.  ``stats`` (the statistics the result was solved
        from) adds Ω's spectrum around the cut for LoRA-DA."""
        from .report import write_report

        return write_report(self, directory, stats=stats, plots=plots)

    def __repr__(self) -> str:  # no tensors, no per-layer dump
        seconds = ", ".join(f"{k}={v:.2f}" for k, v in self.timings.items() if isinstance(v, (int, float)))
        return (f"InitResult(method={self.method!r}, {len(self.layers)} layers, rank={self.rank}, "
                f"lora_alpha={self.lora_alpha}, moves_base={self.moves_base}, "
                f"base_model={self.base_model_name_or_path!r}{', timings(s): ' + seconds if seconds else ''})")

    def summary(self) -> str:
        """One line per layer: shapes, the extreme kept eigenvalues, residual, ‖Δ‖₂, and the overlap of
        the subspaces solved from two halves of the data (``split_half_overlap``)."""
        rows = [f"{'layer':<48} {'in':>6} {'out':>6} {'r':>3}  {'λ_min(Ω)':>11} {'λ_r(Ω)':>11} "
                f"{'residual':>9} {'‖Δ‖₂':>10} {'½-overlap':>9}"]
        for name, layer in self.layers.items():
            d = layer.diagnostics
            ev = getattr(d, "eigenvalues", None)
            lo = f"{float(ev[0]):11.3e}" if ev is not None else f"{'-':>11}"
            hi = f"{float(ev[-1]):11.3e}" if ev is not None else f"{'-':>11}"
            res = f"{d['residual']:9.1e}" if "residual" in d else f"{'-':>9}"
            sig = f"{d['sigma']:10.3e}" if "sigma" in d else f"{'-':>10}"
            half = f"{d['split_half_overlap']:9.1%}" if "split_half_overlap" in d else f"{'-':>9}"
            rows.append(f"{name:<48} {layer.lora_A.shape[1]:>6} {layer.lora_B.shape[0]:>6} {layer.rank:>3}  "
                        f"{lo} {hi} {res} {sig} {half}")
        return "\n".join(rows)


def _peft():
    from .integrations import peft  # imported on use, as peft itself

    return peft
