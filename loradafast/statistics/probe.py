"""Which target layers read the same input, learnt before the statistics pass.

The pass detects input sharing by tensor identity (docs/design.md §3), so the memory planner,
which must keep the layers of one input group in one pass, learns it the same way: one sequence of
the first batch is run forward through the pass's own machinery (same batch handling, same loss,
adapters off, state restored), with hooks that only record which tensor each layer reads.
Nothing is accumulated and, since nothing requires grad, no graph is kept and no backward runs.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ..targets import Target
from .batches import END
from .collector import checked_targets, stream
from .hooks import Accumulator


class _GroupProbe(Accumulator):
    """An accumulator whose hooks record each layer's input group and nothing else."""

    def forward_hook(self, target: Target):
        def hook(module, args, output):
            x = args[0] if args else None
            if self.mask is not None and torch.is_tensor(x):
                self._group_leader(target.name, x)
            return None

        return hook


def first_batch(loader: Iterable) -> tuple[object, Iterable]:
    """The loader's first batch (``END`` if it has none) and the loader to use afterwards: the
    same object when it can be iterated again, else the first batch chained back in front."""
    if isinstance(loader, Iterator):
        first = next(loader, END)
        return first, loader if first is END else itertools.chain([first], loader)
    return next(iter(loader), END), loader


def input_groups(model: nn.Module, batch, targets: list[Target], *, loss_fn: Callable | None) -> dict[str, str]:
    """Layer → the first layer (in call order) that read the same input tensor, from one forward
    of the first sequence of ``batch``; a layer the forward did not reach maps to itself.  The
    pass's own checks come first, so that a model the pass would refuse fails as it would."""
    targets = checked_targets(model, targets, target_modules=None, adapter_name=None, loss_fn=loss_fn)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    probe = _GroupProbe(targets, "diag", device)
    stream(model, [batch], probe, loss_fn=loss_fn, max_samples=1, progress=False)
    return {t.name: probe.input_group.get(t.name, t.name) for t in targets}
