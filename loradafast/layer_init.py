"""One layer's share of a solve, as plain data: its initial factors (:class:`LayerInit`) and what
the solve reports about it (:class:`LayerDiagnostics`; each method's module subclasses it).

These sit below every stage: the methods fill them, :mod:`loradafast.distributed` sends them
between ranks, and :class:`loradafast.result.InitResult` gathers them.  A subclass also says what
the stages above do with its fields, so that they need not name a method: which numbers certify
the factors (refused when not finite), which values make the solve warn, what the solve's log line
adds, and what the report tabulates, derives, flags and plots.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar

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


def reported(default=None):
    """A diagnostics field the report keeps (``loradafast_diagnostics.json``): a scalar, or a
    tensor kept as a list."""
    return field(default=default, metadata={"report": True})


@dataclass
class LayerDiagnostics(_FieldMapping):
    """What a solve reports about one layer; each method's diagnostics class adds its fields."""

    # The report's table: the method's columns (between the shapes and the split-half ones), the
    # fields it shows under another name, what deserves a look as (label, column, test of the
    # value), and the note that explains the columns; and its plots, as (file name, plot) with
    # plot(fig, data, rows) -> bool (loradafast.plots).
    COLUMNS: ClassVar[tuple[str, ...]] = ()
    RENAMED: ClassVar[dict[str, str]] = {}
    FLAGS: ClassVar[tuple] = ()
    COLUMN_NOTES: ClassVar[str] = ""
    PLOTS: ClassVar[tuple] = ()

    num_tokens: int | None = reported()  # of the statistics (data-aware methods)
    num_sequences: int | None = reported()
    solved_by_rank: int | None = None  # the rank that solved this layer (a distributed run; else None)
    # Split-half stability (loradafast.methods.stability): the subspaces solved from the even and
    # from the odd batches share this much of their span (1: the same; random_overlap: unrelated),
    # and the sine of their largest principal angle.  None where the pass kept no half.
    split_half_overlap: float | None = reported()
    split_half_sine: float | None = reported()
    random_overlap: float | None = reported()

    def certifying_numbers(self) -> list[torch.Tensor]:
        """The numbers that certify the layer's factors: a non-finite one refuses the solve."""
        return []

    def degradations(self, dtype: torch.dtype) -> list[str]:
        """Why this layer's solve looks fragile in the working ``dtype`` (one warning lists them)."""
        return []

    @classmethod
    def solve_summary(cls, diagnostics: list[LayerDiagnostics]) -> str:
        """What the solve's one log line adds about these layers (", ..." or empty)."""
        return ""

    @classmethod
    def derived_columns(cls, entry: dict) -> dict:
        """The report's columns computed from a layer's diagnostics data (e.g. the first and last
        of a list), beside the fields it tabulates as they are."""
        return {}


@dataclass
class LayerInit:
    """The initial LoRA factors of one layer, in PEFT's layout, with what the solve reports.

    ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` (float32) are ``lora_A.weight`` and
    ``lora_B.weight`` of the layer's adapter; ``kind`` is how the base layer stores its weight
    ("linear" ``[out, in]`` or "conv1d" ``[in, out]``).  ``subtract_scaling`` is set for methods that
    move the base weight (it becomes ``W − s·B·A``); ``diagnostics`` is a
    :class:`LayerDiagnostics` of the method's own class (its record's ``diagnostics``).
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
