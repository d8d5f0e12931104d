"""Turning whatever a loader yields into model inputs, labels and a token mask."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    inputs: dict  # keyword arguments for the model's forward (no labels)
    labels: torch.Tensor | None  # [B, S], IGNORE_INDEX where no loss is taken
    attention_mask: torch.Tensor  # [B, S] of 0/1
    size: int  # number of sequences B

    def take(self, n: int) -> "Batch":
        """The first ``n`` sequences."""
        if n >= self.size:
            return self
        cut = {k: (v[:n] if _is_batched(v, self.size) else v) for k, v in self.inputs.items()}
        labels = self.labels[:n] if self.labels is not None else None
        return Batch(cut, labels, self.attention_mask[:n], n)

    def to(self, device: torch.device) -> "Batch":
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.inputs.items()}
        labels = self.labels.to(device) if self.labels is not None else None
        return Batch(moved, labels, self.attention_mask.to(device), self.size)


def _is_batched(value, size: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == size


def normalize_batch(raw, *, index: int) -> Batch:
    """Accept a dict (``input_ids``, optional ``attention_mask`` and ``labels``, other model
    keyword arguments passed through), a tuple/list ``(input_ids[, attention_mask[, labels]])``,
    or a bare ``input_ids`` tensor."""
    if isinstance(raw, Mapping):
        data = dict(raw)
    elif torch.is_tensor(raw):
        data = {"input_ids": raw}
    elif isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)) and 1 <= len(raw) <= 3:
        data = dict(zip(("input_ids", "attention_mask", "labels"), raw))
    else:
        raise TypeError(
            f"batch {index} is a {type(raw).__name__}; the loader must yield dicts with 'input_ids' "
            "(and optionally 'attention_mask', 'labels'), tuples (input_ids[, attention_mask[, labels]]) "
            "or input_ids tensors"
        )
    input_ids = data.get("input_ids")
    if not torch.is_tensor(input_ids):
        raise ValueError(
            f"batch {index} has no 'input_ids' tensor (keys: {sorted(data)}); tokenize the samples "
            "and yield input_ids of shape [batch, seq_len]"
        )
    if input_ids.dim() == 1:  # one unbatched sequence
        data = {k: (v.unsqueeze(0) if torch.is_tensor(v) and v.dim() == 1 else v) for k, v in data.items()}
        input_ids = data["input_ids"]
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(
            f"batch {index}: input_ids must be an integer tensor [batch, seq_len], got "
            f"{input_ids.dtype} of shape {tuple(input_ids.shape)}"
        )
    size, length = input_ids.shape
    mask = data.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    elif not torch.is_tensor(mask) or mask.shape != input_ids.shape:
        raise ValueError(
            f"batch {index}: attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}"
        )
    labels = data.pop("labels", None)
    if labels is not None:
        if not torch.is_tensor(labels) or labels.shape != input_ids.shape:
            raise ValueError(
                f"batch {index}: labels must be a tensor shaped like input_ids {tuple(input_ids.shape)} "
                f"(use {IGNORE_INDEX} for tokens without a loss)"
            )
    else:
        # Causal-LM convention: predict the input itself, padding excluded.
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    data["attention_mask"] = mask
    return Batch(data, labels, mask, size)
