"""One layer's share of a solve, as plain data: its initial factors (:class:`LayerInit`) and what
the solve reports about it (:class:`LayerDiagnostics`, one subclass per method family).

These sit below every stage: the methods fill them, :mod:`loradafast.distributed` sends them
between ranks, and :class:`loradafast.result.InitResult` gathers them.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch


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
    # The stopping rule's Davis–Kahan target for the subspace's sine (None: solved to residual_tol alone)
    subspace_sine_target: float | None = None
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
    group_times_s: dict | None = None  # stage times of the whole batch of input groups solved with this one
    batch_groups: int | None = None  # how many same-shaped input groups that batch stacked


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
