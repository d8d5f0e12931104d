"""What one solve works on: the layers, their ranks and scalings, and their statistics or weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..statistics.sums import Statistics


@dataclass
class Problem:
    """The layers of one solve, read by every method's solve function.

    ``shapes``: layer → (in, out, kind); ``ranks`` and ``scalings`` (PEFT's LoRA scaling ``s``):
    per layer, every layer present.  The accessors return one layer's tensors in ``dtype`` on the
    solve's device (``device``, or where the statistics or the weight live).
    """

    stats: Statistics | None
    weights: dict[str, torch.Tensor] | None
    shapes: dict[str, tuple[int, int, str]]
    ranks: dict[str, int]
    scalings: dict[str, float]
    device: torch.device | str | None = None
    generator: torch.Generator | None = None
    # Bytes the solve's workspace may take at once (the memory plan's budget less the statistics it
    # solves); None: what the device has free.  LoRA-DA sizes its batches of input groups by it.
    workspace_budget: int | None = None

    def device_of(self, name: str):
        if self.device is not None:
            return self.device
        if self.weights is not None and name in self.weights:
            return self.weights[name].device
        return self.stats.device_of(name)

    def weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.weights[name].to(self.device_of(name), dtype)

    def G(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.stats.G(name, dtype).to(self.device_of(name))

    def Y(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.stats.Y(name, dtype).to(self.device_of(name))

    def Z(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.stats.Z(name, dtype).to(self.device_of(name))
