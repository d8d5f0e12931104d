"""Turning whatever a loader yields into model inputs, labels and a token mask."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
# What ``next(batches, END)`` returns once a loader is exhausted: one marker for the pass and the
# probe, since a loader may yield None (or anything else) as a batch.
END = object()


@dataclass
class Batch:
    """One batch as the pass uses it: model inputs, token labels, attention mask, size."""

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


def normalize_batch(raw, *, index: int, token_labels: bool = True) -> Batch:
    """Accept a dict (``input_ids``, optional ``attention_mask`` and ``labels``, other model
    keyword arguments passed through), a 1-tuple ``(input_ids,)`` or a bare ``input_ids`` tensor.

    ``token_labels``: labels are one per token, shaped like ``input_ids`` (the built-in causal-LM
    loss); otherwise (a user ``loss_fn``) they only need one row per sequence, e.g. class ids [B].
    """
    data = _as_dict(raw, index)
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
    mask = _attention_mask(data.get("attention_mask"), input_ids, index)
    labels = _labels(data.pop("labels", None), input_ids, mask, index, token_labels)
    data["attention_mask"] = mask
    return Batch(data, labels, mask, input_ids.shape[0])


def _as_dict(raw, index: int) -> dict:
    if isinstance(raw, Mapping):
        return dict(raw)
    if torch.is_tensor(raw):
        return {"input_ids": raw}
    if isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)) and raw:
        if all(isinstance(item, Mapping) for item in raw):
            raise TypeError(
                f"batch {index} is a list of {len(raw)} per-sample dicts, not one batch; give the DataLoader a "
                "collate function that pads and stacks them, e.g. "
                "collate_fn=transformers.DataCollatorWithPadding(tokenizer), or "
                "torch.utils.data.default_collate when every sample has the same length"
            )
        if len(raw) == 1:
            return {"input_ids": raw[0]}
        if any(torch.is_tensor(item) for item in raw):
            # TensorDataset(input_ids, labels) yields (input_ids, labels); TensorDataset(input_ids,
            # attention_mask) yields the same shapes: the position cannot tell which is which.
            raise TypeError(
                f"batch {index} is a {type(raw).__name__} of {len(raw)} tensors, whose meaning is ambiguous "
                "((input_ids, labels) and (input_ids, attention_mask) look alike); yield dicts "
                "{'input_ids': ..., 'attention_mask': ..., 'labels': ...} instead, e.g. "
                "DataLoader(..., collate_fn=lambda rows: dict(zip(('input_ids', 'labels'), default_collate(rows))))"
            )
    raise TypeError(
        f"batch {index} is a {type(raw).__name__}; the loader must yield dicts with 'input_ids' "
        "(and optionally 'attention_mask', 'labels'), 1-tuples (input_ids,) or input_ids tensors"
    )


def _attention_mask(mask, input_ids: torch.Tensor, index: int) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(input_ids)
    if not torch.is_tensor(mask) or mask.shape != input_ids.shape:
        raise ValueError(
            f"batch {index}: attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}"
        )
    other = mask[(mask != 0) & (mask != 1)]
    if other.numel():
        raise ValueError(
            f"batch {index}: attention_mask must hold only 0 and 1 (1: a token, 0: padding), found "
            f"{torch.unique(other)[:5].tolist()}; labels such as -100 go in 'labels', not in the mask"
        )
    return mask


def _labels(labels, input_ids: torch.Tensor, mask: torch.Tensor, index: int, token_labels: bool):
    if labels is None:
        labels = input_ids  # causal-LM convention: predict the input itself
    elif not torch.is_tensor(labels) or labels.shape != input_ids.shape:
        if token_labels:
            raise ValueError(
                f"batch {index}: labels must be a tensor shaped like input_ids {tuple(input_ids.shape)} "
                f"(use {IGNORE_INDEX} for tokens without a loss); labels of another shape, such as one class "
                "per sequence, need a loss_fn that reads them"
            )
        if not torch.is_tensor(labels) or labels.dim() == 0 or labels.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"batch {index}: labels must be a tensor with one row per sequence ({input_ids.shape[0]}), "
                f"got {getattr(labels, 'shape', type(labels).__name__)}"
            )
        return labels  # per-sequence labels: the user's loss_fn reads them as they are
    if labels.is_floating_point():
        return labels  # soft or multi-label targets that happen to have the shape of input_ids
    # A label on padding would add a loss term that depends on how much padding the batch has.
    return labels.masked_fill(mask == 0, IGNORE_INDEX)
