"""Does the data support the subspace?  Split-half stability of every layer's initialisation.

A data-aware method's answer per layer is an r-dimensional input subspace (the row space of
``lora_A``).  The statistics pass can keep the sums of every second batch (``Statistics.half``);
the solve then solves the even and the odd batches' statistics on their own and compares the two
subspaces: their **overlap** ``‖Q_aᵀQ_b‖²_F / r`` (the mean squared cosine of the principal angles:
1 for the same subspace, about ``r / in`` for unrelated ones) and the **sine** of their largest
principal angle.  Each half holds half the data, so the sampling noise of the full statistics is
about ``1/√2`` of what separates the halves: the sine is an upper estimate of how far the full
statistics' subspace lies from the one infinite data would give, the accuracy that the solve of
the full statistics need not exceed.

The halves are solved as the method solves, with the options its options class gives for them
(``MethodConfig.for_halves``: LoRA-DA loosens its eigen-residual): the comparison needs two digits.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .. import user_warnings
from ..layer_init import LayerInit

# A layer's subspace is "supported" by the data when the halves share at least this much of it.
SUPPORTED_OVERLAP = 0.5
# The warning fires when fewer than this fraction of the layers are supported.
WARN_FRACTION = 0.5


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(overlap, sine of the largest principal angle) of the row spaces of ``a`` and ``b`` ``[r, n]``."""
    qa = torch.linalg.qr(a.double().T).Q
    qb = torch.linalg.qr(b.double().T).Q
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    r = min(qa.shape[1], qb.shape[1])
    overlap = float((cosines ** 2).sum()) / r
    smallest = float(cosines.min()) if cosines.numel() == r else 0.0
    return overlap, math.sqrt(max(0.0, 1.0 - smallest ** 2))


def split_half_diagnostics(layers: dict[str, LayerInit], even: dict, odd: dict) -> dict[str, LayerInit]:
    """``layers`` with each one's split-half overlap, sine and random baseline in its diagnostics;
    ``even`` and ``odd`` map the same names to the halves' solutions (anything with ``lora_A``)."""
    out = {}
    for name, layer in layers.items():
        overlap, sine = subspace_overlap(even[name].lora_A, odd[name].lora_A)
        out[name] = dataclasses.replace(layer, diagnostics=dataclasses.replace(
            layer.diagnostics, split_half_overlap=overlap, split_half_sine=sine,
            random_overlap=layer.rank / layer.lora_A.shape[1]))
    return out


MORE_SAMPLES = "pass more samples (max_samples, a larger loader)"  # what helps most methods


def summary(layers: dict[str, LayerInit]) -> dict | None:
    """Median overlap, its random baseline, and the layers the data support; None without halves."""
    measured = [(layer.diagnostics.split_half_overlap, layer.diagnostics.random_overlap)
                for layer in layers.values() if getattr(layer.diagnostics, "split_half_overlap", None) is not None]
    if not measured:
        return None
    overlaps = sorted(o for o, _ in measured)
    supported = sum(o >= SUPPORTED_OVERLAP for o in overlaps)
    return {"median_overlap": overlaps[len(overlaps) // 2], "median_random": sorted(r for _, r in measured)[
        len(measured) // 2], "supported": supported, "layers": len(overlaps)}


def warn_if_unsupported(layers: dict[str, LayerInit], method: str, num_sequences: int | None,
                        advice: str = MORE_SAMPLES) -> None:
    """A warning, with the figures and ``advice`` (the method's: what to do), when most layers'
    subspaces are noise."""
    s = summary(layers)
    if s is None or s["supported"] >= WARN_FRACTION * s["layers"]:
        return
    data = f" from {num_sequences} sequences" if num_sequences else ""
    user_warnings.warn(
        f"loradafast: the data{data} barely determine the {method} subspaces: two halves of the samples give "
        f"subspaces sharing a median {s['median_overlap']:.1%} of their span (unrelated subspaces share about "
        f"{s['median_random']:.1%}); only {s['supported']} of {s['layers']} layers reach {SUPPORTED_OVERLAP:.0%}. "
        f"The initialisation is then mostly sampling noise: {advice}. Per layer: "
        "result.layers[name].diagnostics.split_half_overlap", UserWarning)
