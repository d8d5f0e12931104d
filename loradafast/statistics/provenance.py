"""Where statistics came from, recorded in their meta and checked before they are reused.

* The model: a few entries of every target weight (:func:`weight_samples`).  Statistics are refused
  for a model whose sampled weights differ beyond bf16 rounding (:func:`check_same_model`): the
  same architecture with other weights passes every shape check and silently gives another adapter.
* The data: an order-free checksum of the sequences the pass used (:func:`sequence_checksums`,
  :func:`data_fingerprint`), so that a cached statistics file is not reused for other samples.
* The pass: statistics that hold one rank's share of an owner-computes pass (``reduce="owner"``)
  are refused outside that run (:func:`check_whole`).
"""
from __future__ import annotations

import torch

SAMPLES_PER_LAYER = 16
# bf16 keeps 8 significant bits: the same weights in fp32, bf16 or fp16 differ by at most 2⁻⁸
# relatively (plus fp16's subnormals); other weights of the same shapes differ by far more.
SAME_WEIGHT_RTOL = 2.0 ** -7
SAME_WEIGHT_ATOL = 1e-6
_MASK63 = (1 << 63) - 1


def weight_samples(targets) -> dict[str, list[float] | None]:
    """``SAMPLES_PER_LAYER`` evenly spaced entries of each target's weight ``[out, in]``; None where
    the weight cannot be read as such (quantized, on the meta device, or a shard of a DTensor)."""
    picked = {}
    for t in targets:
        w = None if t.quantized else t.weight_out_in().detach()
        if w is None or w.is_meta or type(w).__name__ == "DTensor" or not w.is_floating_point():
            continue
        index = torch.linspace(0, w.numel() - 1, SAMPLES_PER_LAYER, device=w.device).long()
        picked[t.name] = w.reshape(-1)[index].double().cpu().tolist()  # layers may be on several devices
    return {t.name: picked.get(t.name) for t in targets}


def check_same_model(recorded: dict | None, current: dict, model_name: str | None = None) -> None:
    """Raise unless every layer sampled both then and now has the same weights (to bf16 rounding)."""
    if not recorded:
        return  # statistics saved before the samples were recorded
    differ = []
    for name, now in current.items():
        then = recorded.get(name)
        if then is None or now is None or len(then) != len(now):
            continue
        a, b = torch.tensor(then, dtype=torch.float64), torch.tensor(now, dtype=torch.float64)
        if ((a - b).abs() > SAME_WEIGHT_RTOL * torch.maximum(a.abs(), b.abs()) + SAME_WEIGHT_ATOL).any():
            differ.append(name)
    if differ:
        recorded_from = f" (recorded from {model_name!r})" if model_name else ""
        raise ValueError(
            f"these statistics were collected on another model{recorded_from}: the weights of {len(differ)} of "
            f"{len(current)} layer(s) differ from this model's (e.g. {differ[0]!r}), so the adapter would be "
            "another model's; collect the statistics on this model (delete the cache file, or run the pass again)"
        )


def sequence_checksums(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor | None) -> torch.Tensor:
    """One int64 per sequence from its real tokens and their labels, independent of the padding
    (left or right, and how much): positions are counted over the real tokens only."""
    real = attention_mask != 0
    position = (real.long().cumsum(-1) - 1).clamp(min=0)
    weight = position % 8191 + 1
    ids = input_ids.long() * real
    h = (ids * weight).sum(-1) * 1_000_003 + (ids * weight * weight).sum(-1)
    if labels is not None and labels.shape == input_ids.shape and not labels.is_floating_point():
        h = h * 31 + (labels.long() * real * weight).sum(-1)
    return _mix(h + real.sum(-1))


def _mix(h: torch.Tensor) -> torch.Tensor:
    """An invertible scramble of each int64 (splitmix64's, in wrapping arithmetic), so that the sum
    over sequences of :func:`sequence_checksums` does not cancel the way sums of linear checksums do."""
    h = h ^ (h >> 31)
    h = h * -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
    h = h ^ (h >> 29)
    h = h * -4658895280553007687  # 0xBF58476D1CE4E5B9
    return h ^ (h >> 32)


def data_fingerprint(total: int, count: int) -> str:
    """The recorded form of a pass's data: the wrapped sum of its sequence checksums and their count."""
    return f"{count}:{total & _MASK63:016x}"


def check_same_data(recorded: str | None, current: str, path) -> None:
    """Raise unless the loader's fingerprint is the one the cached statistics recorded."""
    if recorded is not None and recorded != current:
        then, now = recorded.split(":")[0], current.split(":")[0]
        raise ValueError(
            f"cache_file {str(path)!r} holds statistics of other samples than the loader yields ({then} sequences "
            f"then, {now} now, or other tokens); delete the file to collect the statistics of this data, or pass "
            f"stats={str(path)!r} without a loader to reuse them as they are"
        )


def check_whole(stats, what: str) -> None:
    """Refuse one rank's share of an owner-computes pass (``collect(..., reduce="owner")``)."""
    meta = stats.meta
    if meta.get("owners") is not None and meta.get("world_size", 1) > 1:
        owners = meta["owners"]
        raise ValueError(
            f"{what}: these statistics hold rank {meta.get('rank')}'s share ({len(stats.layers)} of {len(owners)} "
            f"layers) of a pass over {meta['world_size']} ranks with reduce='owner'; each rank's file lacks the "
            "other ranks' layers. Initialise within that distributed run (loradafast.initialize does it), or collect "
            "with reduce='all' to save statistics of every layer"
        )
