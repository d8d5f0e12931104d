"""What the planner must know before the statistics pass, learnt from one sequence.

Which target layers read the same input: the pass detects input sharing by tensor identity
(docs/design.md §3), so the memory planner, which must keep the layers of one input group in one
pass, learns it the same way.  And what a batch holds for its backward: the activations autograd
saves, plus the input rows the pass's hooks keep until each layer's backward.

One sequence of the first batch (padded to the batch's length) runs forward and backward through
the pass's own machinery (same batch handling, same loss, adapters off, state restored), with
hooks that record which tensor each layer reads and put each output on the gradient path as the
pass does; nothing is accumulated.  Every tensor saved for the backward belongs to one sequence
(the weights and buffers, shared by all, are not counted), so a batch of ``B`` such sequences
holds ``B`` times what the sequence held.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..targets import Target, model_device
from .batches import END, normalize_batch
from .collector import checked_targets, stream
from .hooks import Accumulator, capture_grad


@dataclass(frozen=True)
class Probe:
    """What one sequence of the first batch showed."""

    input_groups: dict[str, str]  # layer -> the first layer (in call order) that read the same input
    activation_bytes: int  # a whole first batch's: autograd's saved tensors and the hooks' kept inputs
    batch_shape: tuple[int, int]  # (sequences, tokens per sequence) of the first batch


class SavedBytes:
    """The bytes held for the backward: every storage autograd saves or the hooks keep, counted
    once however many tensors view it; the model's parameters and buffers are not counted."""

    def __init__(self, model: nn.Module):
        keys = (_storage_key(t) for t in itertools.chain(model.parameters(), model.buffers()))
        self.excluded = {key for key in keys if key is not None}
        self.storages: dict[tuple, int] = {}

    def add(self, t: torch.Tensor) -> None:
        # A parameter saved for the backward is a weight, not an activation: FSDP2 saves the
        # unsharded parameters it gathers for the forward, which model.parameters() (the shards)
        # does not list.
        if isinstance(t, nn.Parameter):
            return
        key = _storage_key(t)
        if key is not None and key not in self.excluded:
            self.storages[key] = t.untyped_storage().nbytes()

    def saved_tensors(self):
        """A context in which every tensor autograd saves is counted (and kept as autograd keeps it)."""
        def pack(t):
            self.add(t)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _storage_key(t: torch.Tensor) -> tuple | None:
    """(device, address) of ``t``'s storage; None where it has none to count (a DTensor's, or a
    storage FSDP2 has freed until the next gather)."""
    try:
        return t.device, t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _ignore(grad) -> None:
    return None


class _Probe(Accumulator):
    """An accumulator whose hooks record each layer's input group and, as the pass would, keep
    its input and put its output on the gradient path; nothing is accumulated."""

    def __init__(self, targets, y_factor, device, factors, saved: SavedBytes):
        super().__init__(targets, y_factor, device, factors)
        self.saved = saved

    def forward_hook(self, target: Target):
        def hook(module, args, output):
            x = args[0] if args else None
            if self.mask is None or not torch.is_tensor(x):
                return None
            self._group_leader(target.name, x)
            if self.keeps_inputs:
                self.saved.add(x)
            return capture_grad(output, self.anchor, _ignore) if torch.is_tensor(output) else None

        return hook


def first_batch(loader: Iterable) -> tuple[object, Iterable]:
    """The loader's first batch (``END`` if it has none) and the loader to use afterwards: the
    same object when it can be iterated again, else the first batch chained back in front."""
    if isinstance(loader, Iterator):
        first = next(loader, END)
        return first, loader if first is END else itertools.chain([first], loader)
    return next(iter(loader), END), loader


def probe(model: nn.Module, batch, targets: list[Target], *, loss_fn: Callable | None,
          factors=frozenset("GYZ"), y_factor: str = "diag") -> Probe:
    """The input groups and a batch's activations, from one forward and backward of the first
    sequence of ``batch``; a layer the forward did not reach is its own group.  The pass's own
    checks come first, so that a model the pass would refuse fails as it would.  ``factors`` and
    ``y_factor``: the pass's, which decide whether its hooks keep the layers' inputs."""
    targets = checked_targets(model, targets, target_modules=None, adapter_name=None, loss_fn=loss_fn)
    device = model_device(model)
    saved = SavedBytes(model)
    acc = _Probe(targets, y_factor, device, factors, saved)
    with saved.saved_tensors():
        stream(model, [batch], acc, loss_fn=loss_fn, max_samples=1, progress=False)
    shape = tuple(normalize_batch(batch, index=0, token_labels=loss_fn is None).attention_mask.shape)
    return Probe({t.name: acc.input_group.get(t.name, t.name) for t in targets}, saved.total * shape[0], shape)


def input_groups(model: nn.Module, batch, targets: list[Target], *, loss_fn: Callable | None) -> dict[str, str]:
    """:attr:`Probe.input_groups` of :func:`probe`."""
    return probe(model, batch, targets, loss_fn=loss_fn).input_groups
