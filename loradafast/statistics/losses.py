"""Per-sequence losses: the collect pass differentiates ``Σ_n ℓ_n`` itself so that the statistics
do not depend on how sequences are batched or padded (docs/design.md §3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batches import IGNORE_INDEX, Batch


def logits_of(outputs) -> torch.Tensor:
    if torch.is_tensor(outputs):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and torch.is_tensor(outputs[0]):
        logits = outputs[0]
    if logits is None:
        raise TypeError(
            f"cannot find logits in the model output ({type(outputs).__name__}); pass loss_fn=(outputs, batch) "
            "-> per-sequence losses [batch]"
        )
    return logits


def next_token_labels(batch: Batch) -> torch.Tensor:
    """The label each position predicts, ``labels[:, 1:]``, ignored where the predicting position is
    padding: with left padding the first token would otherwise be "predicted" from a pad, a term
    that the same sequence without padding does not have."""
    return batch.labels[:, 1:].masked_fill(batch.attention_mask[:, :-1] == 0, IGNORE_INDEX)


def causal_lm_sequence_losses(outputs, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy of each sequence, and which sequences have any label.

    Returns ``(losses [B], has_labels [B] bool)``; a sequence without labels gets loss 0.
    """
    logits = logits_of(outputs)
    if logits.dim() != 3 or logits.shape[:2] != batch.labels.shape:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match labels {tuple(batch.labels.shape)}; "
            "for a model that is not a causal LM pass loss_fn"
        )
    labels = next_token_labels(batch)
    # The labels are shifted, not the logits: with an ignored label at the last position the logits
    # are read as one contiguous [B·S, V] block.  The logits cut to [:, :-1] and transposed to
    # [B, V, S] made a strided log-softmax, several times slower on CPU (measured:
    # benchmarks/README.md, "Where the statistics pass spent its time").  fp32 log-softmax: bf16
    # cross-entropy over a large vocabulary loses the gradient's small entries.
    padded = F.pad(labels, (0, 1), value=IGNORE_INDEX)
    token_loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), padded.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(padded.shape)
    counts = (labels != IGNORE_INDEX).sum(1)
    return token_loss.sum(1) / counts.clamp(min=1), counts > 0
