"""The PEFT adapter format: the keys of the factors, a result's state dicts and ``LoraConfig``, and
the adapter directory :func:`save` writes (docs/peft_backend.md).

The key of a factor in an adapter file is spelled in :func:`adapter_key` only.

Methods that move the base weight (PiSSA, MiLoRA, LoRA-GA, the Fisher subspace) pair the adapter
with a *residual* base ``W − s·B₀A₀`` (``s`` the LoRA scaling), so that the model's output is
unchanged at initialisation.  Such a result is saved in one of two forms (PEFT's own conventions,
``LoraModel.subtract_mutated_init`` and ``PeftModel.save_pretrained(...,
path_initial_model_for_weight_conversion=...)``):

* ``save(dir, convert_to_lora=False)``: the rank-r adapter for the residual base.  The residual
  is not stored (it is determined by the adapter itself):
  :func:`loradafast.integrations.peft_model.apply_base_update` turns the original base model into
  it, after which ``PeftModel.from_pretrained(model, dir)`` gives the initialised model.  This
  directory is also what PEFT's conversion of a *trained* adapter expects as the initial adapter
  (``path_initial_model_for_weight_conversion=dir``).
* ``save(dir, convert_to_lora=True)``: a plain rank-2r adapter for the *unmodified* base,
  ``lora_A = [A₀; A₀]``, ``lora_B = [B₀, −B₀]``, ``r → 2r`` and ``lora_alpha → 2·lora_alpha``
  (``√2·lora_alpha`` with rsLoRA) so the scaling is unchanged; its ``ΔW`` is zero, as it must be
  before training.
"""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import torch

from ..targets import PEFT_PREFIX

ADAPTER_WEIGHTS = "adapter_model.safetensors"
INIT_SUMMARY = "loradafast_init.json"


def adapter_key(name: str, factor: str) -> str:
    """The key of ``lora_A`` (``factor="A"``) or ``lora_B`` of layer ``name`` in an adapter file,
    as ``PeftModel.save_pretrained`` writes it (no adapter name)."""
    return f"{PEFT_PREFIX}{name}.lora_{factor}.weight"


def magnitude_key(name: str) -> str:
    """The key of layer ``name``'s DoRA magnitude in an adapter file, as ``get_peft_model_state_dict``
    writes it (no adapter name, no ``.weight``)."""
    return f"{PEFT_PREFIX}{name}.lora_magnitude_vector"


def layer_of_key(key: str) -> tuple[str, str] | None:
    """``(layer name, "A" or "B")`` of an :func:`adapter_key`; None for any other key."""
    for factor in "AB":
        suffix = f".lora_{factor}.weight"
        if key.startswith(PEFT_PREFIX) and key.endswith(suffix):
            return key[len(PEFT_PREFIX):-len(suffix)], factor
    return None


# ---- a result as PEFT files ---------------------------------------------------------------------

def adapter_state_dict(result) -> dict[str, torch.Tensor]:
    """PEFT-format keys, as ``PeftModel.save_pretrained`` writes them (no adapter name)."""
    out = dict(result.extra_state)
    for name, layer in result.layers.items():
        out[adapter_key(name, "A")] = layer.lora_A
        out[adapter_key(name, "B")] = layer.lora_B
    return out


def converted_state_dict(result) -> dict[str, torch.Tensor]:
    """The rank-2r adapter for the unmodified base (PEFT's ``subtract_mutated_init``)."""
    out = dict(result.extra_state)
    for name, layer in result.layers.items():
        a, b = layer.lora_A, layer.lora_B
        if layer.subtract_scaling is not None:
            a, b = torch.cat([a, a], dim=0), torch.cat([b, -b], dim=1)
        out[adapter_key(name, "A")] = a
        out[adapter_key(name, "B")] = b
    return out


def lora_config(result, converted: bool = False, lora_dropout: float | None = None):
    """The ``LoraConfig`` of ``result``'s adapter (of the rank-2r conversion with ``converted``).

    ``lora_dropout`` is PEFT's, for the training that follows (no initialisation uses it); None
    takes ``result.lora_dropout``, and where that is None too, the PeftModel's own for a result
    of ``initialize(peft_model)`` and 0.0 otherwise.
    """
    from peft import LoraConfig

    if lora_dropout is None:
        lora_dropout = getattr(result, "lora_dropout", None)
    if lora_dropout is not None and (isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float))
                                     or not 0 <= lora_dropout < 1):
        raise ValueError(f"lora_dropout must be a number at least 0 and less than 1, got {lora_dropout!r}")
    if result.peft_config is not None:
        config = _kept_peft_config(result, converted)
        if lora_dropout is not None:
            config.lora_dropout = float(lora_dropout)
        return config
    factor = 2 if converted and result.moves_base else 1
    ranks = {name: layer.rank * factor for name, layer in result.layers.items()}
    rank = result.rank * factor
    alpha_factor = (math.sqrt(2) if result.use_rslora else 2) if factor == 2 else 1
    # Per-layer ranks and alphas that differ from the defaults go to rank_pattern and
    # alpha_pattern, keyed by full path (PEFT matches their keys as regexes anchored at a
    # path boundary).
    rank_pattern = {re.escape(name): r for name, r in ranks.items() if r != rank}
    alpha_pattern = {re.escape(name): a * alpha_factor for name, a in result.alphas.items()}
    return LoraConfig(
        r=rank,
        # Keep the scaling alpha/r (alpha/√r with rsLoRA) as PEFT's conversion does.
        lora_alpha=result.lora_alpha * alpha_factor,
        use_rslora=result.use_rslora,
        target_modules=result.target_modules if result.target_modules is not None else sorted(result.layers),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=any(layer.kind == "conv1d" for layer in result.layers.values()),
        base_model_name_or_path=result.base_model_name_or_path,
        task_type=result.task_type,
        lora_dropout=0.0 if lora_dropout is None else float(lora_dropout),
    )


def _kept_peft_config(result, converted: bool):
    """The PeftModel's own LoraConfig, changed only where the saved adapter requires it."""
    config = copy.deepcopy(result.peft_config)
    # The factors are in the file; a PEFT init such as "pissa" would run again on loading and
    # move the base weight a second time.
    config.init_lora_weights = True
    if config.base_model_name_or_path is None:  # as PeftModel.save_pretrained fills it
        config.base_model_name_or_path = result.base_model_name_or_path
    if converted and result.moves_base:
        # r → 2r with the scaling kept, per layer as well (PEFT's conversion, with √2 for
        # rsLoRA's alpha/√r applied to alpha_pattern too).
        alpha_factor = math.sqrt(2) if config.use_rslora else 2
        config.r *= 2
        config.lora_alpha *= alpha_factor
        config.rank_pattern = {key: 2 * r for key, r in (config.rank_pattern or {}).items()}
        config.alpha_pattern = {key: a * alpha_factor for key, a in (config.alpha_pattern or {}).items()}
    return config


def save(result, directory, *, convert_to_lora: bool | None = None) -> Path:
    """A PEFT adapter directory that vanilla ``PeftModel.from_pretrained`` loads.

    For a method that keeps the base weight (``lora``, ``lora-one``, ``lora-da``) the adapter
    is a plain LoRA adapter and ``convert_to_lora`` does not matter.  For one that moves it
    (``pissa``, ``milora``, ``lora-ga``, ``fisher-subspace``) choose explicitly:

    * ``convert_to_lora=False``: the rank-r adapter for the residual base ``W − s·B₀A₀``;
      build that base from the original with :func:`apply_base_update` (same directory).
    * ``convert_to_lora=True``: a rank-2r adapter ``[A₀; A₀]``, ``[B₀, −B₀]`` for the
      unmodified base, with ``r`` and ``lora_alpha`` adjusted as PEFT's own conversion does.

    ``loradafast_init.json`` records the method, options, timings, ``freeze_a`` and which
    base the adapter is for (``"base_weight"``: "unchanged", "residual" or "converted").
    LoRA-FA's frozen A is not part of the PEFT format: after loading with
    ``is_trainable=True``, call :func:`freeze_lora_a`.
    """
    from safetensors.torch import save_file

    if result.moves_base and convert_to_lora is None:
        raise ValueError(
            f"method {result.method!r} moves the base weights (W ← W − s·B₀A₀), so the adapter alone does not "
            "reproduce the initialised model; choose save(dir, convert_to_lora=True) for a plain rank-2r "
            "adapter on the unmodified base model, or save(dir, convert_to_lora=False) for the rank-r "
            "adapter on the residual base (rebuild it with loradafast.apply_base_update(model, dir))"
        )
    converted = bool(convert_to_lora) and result.moves_base
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora_config(result, converted).save_pretrained(str(directory))
    state = converted_state_dict(result) if converted else adapter_state_dict(result)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    summary = {
        "method": result.method,
        "rank": result.rank,
        "base_weight": "converted" if converted else ("residual" if result.moves_base else "unchanged"),
        "freeze_a": result.freeze_a,
        "options": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                    for k, v in result.options.items()},
        "timings": result.timings,
    }
    (directory / INIT_SUMMARY).write_text(json.dumps(summary, indent=2))
    return directory
