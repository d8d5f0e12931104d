"""Finiteness of what a solve reads (statistics, base weights) and of what it returns (factors and
the numbers their diagnostics certify them with), so that nothing non-finite reaches a model and a corrupted
input fails with a message that names it rather than with an error from deep inside LAPACK."""
from __future__ import annotations

import torch

from ..layer_init import LayerInit
from ..linalg.dense import finite_flags
from ..statistics.sums import Statistics


def _refuse(what: str, bad: list[str], advice: str) -> None:
    if bad:
        raise FloatingPointError(f"{what} for {len(bad)} layer(s), e.g. {bad[:3]}; {advice}")


def check_inputs(method: str, needs: frozenset, stats: Statistics | None, weights: dict | None,
                 names: list[str]) -> None:
    """The statistics ``needs`` names ("G", "Y", "Z") and the weights of ``names`` are finite."""
    if stats is not None and needs:
        if stats.num_tokens <= 0 or stats.num_sequences <= 0:
            raise ValueError(f"the statistics count {stats.num_tokens} token(s) in {stats.num_sequences} "
                             "sequence(s): they were collected from no data; collect them again")
        checked, labels = [], []
        for name in names:
            layer = stats.layers[name]
            for label, tensor in (("G", layer.g_sum), ("Y", layer.y_sum)):
                if label in needs and tensor is not None:
                    checked.append(tensor)
                    labels.append(f"{name} ({label})")
        if "Z" in needs:
            groups = sorted({stats.layers[name].input_group for name in names})
            checked += [stats.z_sums[key] for key in groups]
            labels += [f"{key} (Z)" for key in groups]
        _refuse(f"method {method!r}: the statistics hold non-finite values",
                [label for label, ok in zip(labels, finite_flags(checked)) if not ok],
                "they are corrupted: collect them again (a collect pass refuses non-finite sums itself)")
    if weights is not None:
        _refuse(f"method {method!r}: the base weights hold non-finite values",
                [name for name, ok in zip(names, finite_flags([weights[name] for name in names])) if not ok],
                "check the model's weights for NaN/Inf (a diverged checkpoint, a bad conversion)")


def check_outputs(layers: dict[str, LayerInit], method: str, dtype: torch.dtype, data_aware: bool) -> None:
    """Non-finite factors would be written into the model as they are, and a non-finite number
    that certifies them (LoRA-DA's norms, residuals, σ: ``LayerDiagnostics.certifying_numbers``)
    means they were never tested: refuse them here, before anything is applied."""
    names, tensors = [], []
    for name, layer in layers.items():
        numbers = [layer.lora_A, layer.lora_B, *layer.diagnostics.certifying_numbers()]
        names += [name] * len(numbers)
        tensors += numbers
    bad = sorted({name for name, ok in zip(names, finite_flags(tensors)) if not ok}, key=list(layers).index)
    if dtype != torch.float64:
        advice = "solve in float64 (the default dtype), whose range these layers need"
    elif data_aware:
        advice = "check the statistics for layers that saw no tokens, or raise the damping"
    else:
        advice = "check these layers' base weights"
    _refuse(f"method {method!r} produced non-finite factors (or numbers that certify them) in "
            f"{str(dtype).replace('torch.', '')}", bad, f"nothing was applied to the model: {advice}")
