"""What a solve hands on, as plain data: every layer's :class:`LayerInit` with its typed
diagnostics (:mod:`loradafast.layer_init` and the methods' modules, re-exported here), gathered
in an :class:`InitResult`.

Nothing here changes a model.  Writing a result out (``save``, ``state_dict``, ``lora_config``)
or into a ``PeftModel`` (``apply_to``) is :mod:`loradafast.integrations.peft_files`' and
:mod:`loradafast.integrations.peft_model`'s work; the methods of
:class:`InitResult` of those names are shortcuts to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# The per-layer types live below every stage (the methods and the distributed exchange build
# them; each method's diagnostics class lives in its module); they are also part of a result, so
# they keep their old address here.
from .layer_init import LayerDiagnostics, LayerInit
from .methods.fisher import FisherSubspaceDiagnostics
from .methods.gradient_svd import GradientDiagnostics
from .methods.lora_da import LoraDADiagnostics
from .methods.weight_svd import SingularDiagnostics

__all__ = ["FisherSubspaceDiagnostics", "GradientDiagnostics", "InitResult", "LayerDiagnostics", "LayerInit",
           "LoraDADiagnostics", "SingularDiagnostics"]


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
    # PEFT's lora_dropout for the saved LoraConfig (training only; no initialisation uses it).  None:
    # the PeftModel's own for a result of initialize(peft_model), else 0.0 (integrations.peft_files.lora_config).
    lora_dropout: float | None = None

    @property
    def moves_base(self) -> bool:
        """True when the initialised model needs the residual base ``W − s·B₀A₀``."""
        return any(layer.subtract_scaling is not None for layer in self.layers.values())

    # ---- shortcuts to loradafast.integrations.peft_files and .peft_model ----------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT-format keys, as ``PeftModel.save_pretrained`` writes them (no adapter name)."""
        return _peft_files().adapter_state_dict(self)

    def converted_state_dict(self) -> dict[str, torch.Tensor]:
        """The rank-2r adapter for the unmodified base (PEFT's ``subtract_mutated_init``)."""
        return _peft_files().converted_state_dict(self)

    @property
    def lora_config(self):
        """The ``LoraConfig`` of :meth:`state_dict` (for the residual base if :attr:`moves_base`)."""
        return _peft_files().lora_config(self)

    def save(self, directory, *, convert_to_lora: bool | None = None) -> Path:
        """A PEFT adapter directory (:func:`loradafast.integrations.peft_files.save`) with the per-layer
        diagnostics beside it (:func:`loradafast.report.save_diagnostics`), so that
        ``loradafast report DIR`` works on every adapter, saved from Python or by the CLI."""
        from .report import save_diagnostics

        directory = _peft_files().save(self, directory, convert_to_lora=convert_to_lora)
        save_diagnostics(self, directory)
        return directory

    def apply_to(self, peft_model: nn.Module, adapter_name: str | None = None) -> nn.Module:
        """Fill the LoRA layers of ``peft_model`` in place: :func:`loradafast.integrations.peft_model.apply_to`."""
        return _peft_model().apply_to(self, peft_model, adapter_name)

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


# Imported on use, as peft itself.
def _peft_files():
    from .integrations import peft_files

    return peft_files


def _peft_model():
    from .integrations import peft_model

    return peft_model
