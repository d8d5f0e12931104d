"""An adapter's shape before it has factors: its default rank and alpha, the layers that differ,
and rsLoRA (:class:`AdapterLayout`).  The arguments give it, or a ``LoraConfig``, or a PEFT
model's own layers (:mod:`loradafast.integrations.peft_model`); the solve reads it."""
from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_RANK = 8
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's own default


@dataclass
class AdapterLayout:
    """An adapter's ranks and scalings: from the arguments, or from a PEFT model's layers."""

    rank: int
    ranks: dict  # per-layer ranks that differ from ``rank``
    lora_alpha: float | None  # None: PEFT's default
    use_rslora: bool
    alphas: dict | None = None  # per-layer lora_alpha that differ from ``lora_alpha``
    peft_config: object | None = None  # the PeftModel's LoraConfig

    def rank_of(self, name: str) -> int:
        return self.ranks.get(name, self.rank)

    def within(self, names) -> AdapterLayout:
        """The layout of the layers ``names`` only (a pass's, a rank's share)."""
        names = set(names)
        return replace(self, ranks={k: v for k, v in (self.ranks or {}).items() if k in names},
                       alphas={k: v for k, v in (self.alphas or {}).items() if k in names})
