"""Writes into a PEFT model and the guards around them (docs/peft_backend.md).

* writing into a ``PeftModel``: :func:`apply_to`, :func:`freeze_lora_a`, :func:`attach` for
  ``initialize(peft_model)``, and :func:`apply_base_update` to rebuild a residual base from an
  adapter directory (:mod:`.peft_files`);
* reading a ``PeftModel`` before the pass: :func:`peft_layout` (its ranks, alphas, LoraConfig;
  refusing adapters loradafast cannot honour); the pass itself runs the base model under
  :func:`loradafast.targets.base_model_only`;
* :func:`wrap` for ``get_peft_model``: PEFT wraps the model, and the wrapping is undone on failure;
* the hand-over from ``preprocess_lora_da`` to ``get_peft_model`` or a PEFT init
  (:func:`mark_preprocessed`, :func:`init_lora_layer`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import logging
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from .. import user_warnings
from ..layout import AdapterLayout
from ..methods.registry import REGISTRY
from ..options import check_ranks
from ..targets import (PEFT_PREFIX, Target, active_adapter, base_model_of, check_not_merged, find_targets,
                       is_peft_model, is_quantized, layer_kind, peft_config_of)
from .peft_files import ADAPTER_WEIGHTS, INIT_SUMMARY, adapter_key, layer_of_key, magnitude_key

# Set on a base layer whose weight a loradafast initialisation has moved; a second move would
# subtract twice and silently change the model's output.
_MOVED_FLAG = "_loradafast_base_moved"


# ---- writing into a PEFT model ------------------------------------------------------------------

def apply_to(result, peft_model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fill the LoRA layers of ``peft_model`` in place.

    Every layer is checked (presence, rank, shapes) before the first one is written, so a
    mismatch leaves the model untouched.  For a method that moves the base weight, the base
    layer's weight becomes ``W − s·B·A`` (computed in float32 from the factors as stored in
    the adapter's dtype, as PEFT's PiSSA/LoRA-GA init does), once per model; a warning says
    so when that weight is tied to another (an output embedding tied to the input one).
    A DoRA layer's magnitude is recomputed from the new factors, as PEFT's DoRA init does.
    With ``freeze_a`` the ``lora_A`` weights stop requiring grad (PEFT's ``set_adapter`` and
    ``add_adapter`` make them trainable again; call :func:`freeze_lora_a` after those).
    """
    plan = _plan(result, peft_model, adapter_name)
    _warn_if_tied(peft_model, [(name, target.module.weight) for name, target, adapter in plan
                               if result.layers[name].subtract_scaling is not None], f"method {result.method!r}")
    with torch.no_grad():
        for name, target, adapter in plan:
            layer = result.layers[name]
            _materialise(target, adapter)
            a = target.lora_layer.lora_A[adapter].weight
            b = target.lora_layer.lora_B[adapter].weight
            a.copy_(layer.lora_A.to(device=a.device, dtype=a.dtype))
            b.copy_(layer.lora_B.to(device=b.device, dtype=b.dtype))
            if layer.subtract_scaling is not None:
                _subtract_(target, a, b, layer.subtract_scaling)
            if adapter in getattr(target.lora_layer, "lora_magnitude_vector", {}):
                _refresh_dora_magnitude(target.lora_layer, adapter)
            if result.freeze_a:
                a.requires_grad_(False)
    return peft_model


def _materialise(target: Target, adapter: str) -> None:
    """LoRA factors that PEFT left on the ``meta`` device (``low_cpu_mem_usage=True``) become real
    tensors next to the base weight, to be written."""
    for factors in (target.lora_layer.lora_A, target.lora_layer.lora_B):
        w = factors[adapter].weight
        if w.is_meta:
            factors[adapter].weight = nn.Parameter(
                torch.empty(w.shape, dtype=w.dtype, device=target.module.weight.device), requires_grad=w.requires_grad)


def _plan(result, peft_model: nn.Module, adapter_name: str | None) -> list[tuple[str, Target, str]]:
    """(layer, target, adapter) for every layer, after checking that each can be written."""
    targets = {t.name: t for t in find_targets(peft_model, adapter_name=adapter_name, allow_quantized=True)}
    missing = sorted(set(result.layers) - set(targets))
    if missing:
        raise ValueError(
            f"the PEFT model has no LoRA layer for {len(missing)} initialised layer(s), e.g. {missing[:3]}; "
            "create it with result.lora_config"
        )
    plan = []
    for name, layer in result.layers.items():
        target: Target = targets[name]
        adapter = adapter_name or active_adapter(target.lora_layer)
        a = target.lora_layer.lora_A[adapter].weight
        b = target.lora_layer.lora_B[adapter].weight
        if a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
            raise ValueError(
                f"layer {name!r}: the PEFT model has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, the "
                f"initialisation has {tuple(layer.lora_A.shape)} / {tuple(layer.lora_B.shape)}; use the same rank"
            )
        if layer.subtract_scaling is not None and target.quantized:
            raise ValueError(f"layer {name!r} is quantized ({type(target.module).__name__}); method {result.method!r} "
                             "moves the base weight and cannot be applied to it")
        if layer.subtract_scaling is not None:
            _check_movable(name, target, adapter, layer.subtract_scaling, result.method)
        plan.append((name, target, adapter))
    return plan


def _subtract_(target: Target, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """``W ← W − s·B·A`` in float32, rounded once to W's dtype (PEFT's ``pissa_init`` order)."""
    w = target.weight_out_in()  # a transposed view for Conv1D: the write lands in its storage
    update = scaling * (b.to(device=w.device, dtype=torch.float32) @ a.to(device=w.device, dtype=torch.float32))
    w.copy_((w.float() - update).to(w.dtype))
    setattr(target.module, _MOVED_FLAG, True)


def _check_movable(name: str, target: Target, adapter: str, subtract_scaling: float, method: str) -> None:
    scaling = target.lora_layer.scaling[adapter]
    if not math.isclose(scaling, subtract_scaling, rel_tol=1e-6):
        raise ValueError(
            f"layer {name!r}: the PEFT model's LoRA scaling is {scaling}, the initialisation was solved "
            f"for {subtract_scaling}; use the same lora_alpha, rank and use_rslora"
        )
    if adapter in getattr(target.lora_layer, "lora_magnitude_vector", {}):
        raise ValueError(dora_refusal(method))
    if getattr(target.module, _MOVED_FLAG, False):
        raise ValueError(
            f"the base weight of layer {name!r} was already moved by a loradafast initialisation; moving "
            "it again would change the model's output. Start from the original model"
        )


def dora_refusal(method: str) -> str:
    return (
        f"use_dora=True cannot be combined with method {method!r}, which moves the base weight: DoRA's magnitude "
        "is the norm of the base weight plus the adapter, and loradafast does not carry it through the residual "
        "base and the rank-2r conversion. Use DoRA with a method that keeps the base weight "
        f"({', '.join(name for name, m in REGISTRY.items() if not m.moves_base)}), or set use_dora=False"
    )


def _refresh_dora_magnitude(lora_layer: nn.Module, adapter: str) -> None:
    """DoRA's magnitude ``‖W + s·B·A‖`` (per output row), computed by PEFT's own code from the
    factors just written.  PEFT computed it when the layer was created, from the factors of its
    own init; written into the existing parameter so that references to it stay valid."""
    dora = lora_layer.lora_magnitude_vector[adapter]
    dora.weight.copy_(_dora_magnitude(lora_layer, adapter, lora_layer.lora_A[adapter].weight,
                                      lora_layer.lora_B[adapter].weight))
    if hasattr(dora, "_cache_clear"):  # a weight norm cached in eval mode is stale now
        dora._cache_clear()


def _dora_magnitude(lora_layer: nn.Module, adapter: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """The magnitude that ``adapter``'s DoRA layer gets with the factors ``lora_a``, ``lora_b``: PEFT's
    own ``DoraLinearLayer.update_layer`` on a throwaway DoRA layer, so that nothing of ``lora_layer``
    is written.  The factors are first rounded as the adapter would store them (its dtype, and its
    device, or the base weight's when PEFT left it on ``meta``), which makes this bit-identical to
    writing them and refreshing the layer."""
    from peft.tuners.lora.dora import DoraLinearLayer

    dora = lora_layer.lora_magnitude_vector[adapter]
    a_param = lora_layer.lora_A[adapter].weight
    base = lora_layer.get_base_layer()
    device = base.weight.device if a_param.is_meta else a_param.device
    fresh = DoraLinearLayer(fan_in_fan_out=getattr(dora, "fan_in_fan_out", False))
    with torch.no_grad():
        fresh.update_layer(base_layer=base, lora_A=lora_a.to(device=device, dtype=a_param.dtype),
                           lora_B=lora_b.to(device=device, dtype=lora_layer.lora_B[adapter].weight.dtype),
                           scaling=lora_layer.scaling[adapter])
    target = fresh.weight if dora.weight.is_meta else dora.weight
    return fresh.weight.detach().to(device=target.device, dtype=target.dtype)


def _warn_if_tied(model: nn.Module, moved: list[tuple[str, torch.Tensor]], who: str) -> None:
    """One warning for every moved weight that other modules share (tied embeddings)."""
    owners = defaultdict(list)
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)].append(pname.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."))
    tied = []
    for name, weight in moved:
        others = [o for o in owners.get(id(weight), []) if o != f"{name}.weight"]
        if others:
            tied.append(f"{name!r} is tied to {', '.join(repr(o) for o in others)}")
    if tied:
        user_warnings.warn(
            f"loradafast: {who} moves the base weight of layers whose weight is tied to another: "
            f"{'; '.join(tied)}. The tied weight moves too, so the model's logits at initialisation change "
            "(PEFT's own PiSSA does the same, silently). To keep them, give each layer its own copy of the weight "
            "before initialising (layer.weight = torch.nn.Parameter(layer.weight.detach().clone()), and "
            "model.config.tie_word_embeddings = False so that transformers does not tie it again), or exclude "
            "these layers from target_modules",
            UserWarning,
        )


def peft_extra_state(peft_model: nn.Module, adapter_name: str, layers, *,
                     copy_only=None) -> dict[str, torch.Tensor]:
    """Copies of the adapter's tensors other than the factors of ``layers`` (DoRA magnitudes,
    modules_to_save copies, LoRA biases, trainable tokens), keyed as ``save_pretrained`` writes
    them; empty for a model that is not a PeftModel.  ``copy_only`` (data pointers): copy only
    these tensors, the others are returned as they are (a throwaway PEFT model's own)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    if not isinstance(peft_model, PeftModel):
        return {}
    factors = {adapter_key(name, ab) for name in layers for ab in "AB"}
    # Base weights stay out: for a targeted embedding PEFT would add the embedding matrices (meant
    # for resized vocabularies), which after a base-moving method hold the residual base.
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    return {k: v.detach().clone() if copy_only is None or v.data_ptr() in copy_only else v.detach()
            for k, v in state.items() if k not in factors}


def extra_state_for(result, peft_model: nn.Module, adapter_name: str | None, *,
                    copy_only=None) -> dict[str, torch.Tensor]:
    """:func:`peft_extra_state` as :func:`attach` would leave it, with nothing written into
    ``peft_model``: the DoRA magnitudes are those of ``result``'s factors (PEFT's are those of its own
    init).  For ``get_lora_da_state_dict``, which must leave the model as it is."""
    from ..distributed import unwrap

    peft_model = unwrap(peft_model)  # under DistributedDataParallel, as initialize reads it
    targets = {t.name: t for t in find_targets(peft_model, adapter_name=adapter_name, allow_quantized=True)}
    missing = sorted(set(result.layers) - set(targets))
    if missing:
        raise ValueError(f"the PEFT model has no LoRA layer for {len(missing)} initialised layer(s), e.g. "
                         f"{missing[:3]}")
    adapter = adapter_name or active_adapter(targets[next(iter(result.layers))].lora_layer)
    extra = peft_extra_state(peft_model, adapter, result.layers, copy_only=copy_only)
    for name, layer in result.layers.items():
        lora_layer = targets[name].lora_layer
        if adapter not in getattr(lora_layer, "lora_magnitude_vector", {}):
            continue
        if layer.subtract_scaling is not None:  # the magnitude would be that of the wrong base
            raise ValueError(dora_refusal(result.method))
        extra[magnitude_key(name)] = _dora_magnitude(lora_layer, adapter, layer.lora_A, layer.lora_B)
    return extra


def config_extra_state(result, model: nn.Module, lora_config, adapter_name: str) -> dict[str, torch.Tensor]:
    """:func:`extra_state_for` the PEFT model that ``peft.get_peft_model(model, lora_config)`` builds,
    ``model`` a plain model, left as it was.

    PEFT wraps ``model`` itself, in place, for the reading, and the wrapping is undone afterwards (as a
    failed :func:`wrap` is): what PEFT adds (the LoRA factors, DoRA magnitudes, the modules_to_save
    copies) is all the memory this takes, and no weight is copied but those modules_to_save copies, which
    are the state dict's own.  PEFT's own initialisation is plain LoRA's here, whatever ``lora_config``
    asks (pissa & co would move the base weights), and the random numbers it draws are given back."""
    import peft

    config = copy.deepcopy(lora_config)
    config.init_lora_weights = True
    # The model's own tensors that PEFT's state dict can hold (its biases, with bias="all"): copied, so
    # that the state dict does not alias the model.
    owned = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    cuda = sorted({t.device.index for t in model.parameters() if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), undone_afterwards(model):
        peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
        return extra_state_for(result, peft_model, adapter_name, copy_only=owned)


def apply_base_update(model: nn.Module, directory) -> nn.Module:
    """Turn the original base model into the residual base of an adapter saved with
    ``save(dir, convert_to_lora=False)``: ``W ← W − s·B·A`` for every layer of the adapter.

    Then ``PeftModel.from_pretrained(model, dir)`` is the initialised model.  ``model`` is the
    plain (transformers) model; every layer is checked before the first one is written.
    """
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    directory = Path(directory)
    summary_path = directory / INIT_SUMMARY
    base_weight = json.loads(summary_path.read_text()).get("base_weight") if summary_path.exists() else None
    if base_weight != "residual":
        raise ValueError(
            f"{directory} does not hold an adapter for a residual base (its {INIT_SUMMARY} says base_weight="
            f"{base_weight!r}); load it with PeftModel.from_pretrained on the unmodified model"
        )
    config = LoraConfig.from_pretrained(str(directory))
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    base = base_model_of(model)
    plan = []
    for key, a in tensors.items():
        if layer_of_key(key) is None or layer_of_key(key)[1] != "A":
            continue
        name = layer_of_key(key)[0]
        b = tensors[adapter_key(name, "B")]
        try:
            module = base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r} of the adapter in {directory}") from None
        kind = layer_kind(module)
        target = Target(name, module, kind) if kind is not None else None
        if target is None or (target.out_features, target.in_features) != (b.shape[0], a.shape[1]):
            raise ValueError(f"layer {name!r} of the model does not match the adapter's factors {tuple(b.shape)}·"
                             f"{tuple(a.shape)}")
        if getattr(module, _MOVED_FLAG, False):
            raise ValueError(f"the base weight of layer {name!r} was already moved; start from the original model")
        r = a.shape[0]
        alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), name), config.lora_alpha) \
            if config.alpha_pattern else config.lora_alpha
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        plan.append((target, a, b, scaling))
    _warn_if_tied(base, [(target.name, target.module.weight) for target, *_ in plan], f"the adapter in {directory}")
    with torch.no_grad():
        for target, a, b, scaling in plan:
            _subtract_(target, a, b, scaling)
    return model


def freeze_lora_a(peft_model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """LoRA-FA: stop ``lora_A`` of ``adapter_name`` (the active adapter) from training.

    A saved adapter does not record this; call it after ``PeftModel.from_pretrained(...,
    is_trainable=True)``, and again after ``set_adapter``/``add_adapter``, which make it trainable.
    """
    targets = find_targets(peft_model, adapter_name=adapter_name, allow_quantized=True)
    if not targets:
        raise ValueError("the model has no LoRA layer to freeze")
    for t in targets:
        t.lora_layer.lora_A[adapter_name or active_adapter(t.lora_layer)].weight.requires_grad_(False)
    return peft_model


# ---- reading a PEFT model; wrapping and unwrapping one ------------------------------------------

@contextlib.contextmanager
def undone_on_failure(model: nn.Module):
    """On any exception, put ``model`` back as it was on entry: its module tree (children,
    parameters, buffers and hooks: the containers are refilled, so the original objects come
    back), every other module attribute (``peft_config`` and the like are removed), the
    ``requires_grad`` flags and the config's attributes.

    Parameter *values* are not saved: what runs inside must not write them before it can no
    longer fail (``InitResult.apply_to`` checks every layer before it writes the first).
    """
    restore = _restorer(model)
    try:
        yield model
    except BaseException:
        restore()
        raise


@contextlib.contextmanager
def undone_afterwards(model: nn.Module):
    """:func:`undone_on_failure`, undone on success too: for a throwaway PEFT wrapping, which must
    not write any parameter value of ``model``."""
    restore = _restorer(model)
    try:
        yield model
    finally:
        restore()


def _restorer(model: nn.Module):
    """A function that puts ``model`` back as it is now (see :func:`undone_on_failure`)."""
    modules = list(model.modules())
    saved = []
    for m in modules:
        attrs = dict(vars(m))
        contents = {k: copy.copy(v) for k, v in attrs.items() if isinstance(v, (dict, set))}
        saved.append((m, attrs, contents))
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters(recurse=False)]
    configs = {}  # PeftModel sets config.pretraining_tp, for one
    for m in modules:
        config = getattr(m, "config", None)
        if config is not None and not isinstance(config, nn.Module) and hasattr(config, "__dict__"):
            configs[id(config)] = config
    config_attrs = [(c, dict(vars(c))) for c in configs.values()]

    def restore() -> None:
        for m, attrs, contents in saved:
            vars(m).clear()
            vars(m).update(attrs)
            for key, content in contents.items():
                attrs[key].clear()
                attrs[key].update(content)
        for p, flag in flags:
            p.requires_grad_(flag)
        for c, attrs in config_attrs:
            vars(c).clear()
            vars(c).update(attrs)

    return restore


# PEFT initialisations that are not plain LoRA's: they ran when the PEFT model was created, and
# pissa, olora, corda, loftq and lora_ga moved its base weight then.
_PEFT_OWN_INIT = "init_lora_weights={init!r} asks PEFT to initialise the adapter; loradafast does that"


def peft_layout(model: nn.Module, targets, *, adapter_name: str | None, method, rank: int | None,
                ranks: dict | None) -> AdapterLayout:
    """A PEFT model's adapter as its layers define it: rank, per-layer ranks that differ,
    lora_alpha, per-layer alphas that differ, use_rslora and its LoraConfig.  ``rank`` and ``ranks``, if
    given, must agree with the layers."""
    peft_config = peft_config_of(model, adapter_name)
    _check_peft_adapter(model, targets, peft_config, adapter_name=adapter_name, method=method)
    first = targets[0]
    default_rank = peft_config.r if peft_config is not None else first.rank
    default_alpha = peft_config.lora_alpha if peft_config is not None else first.alpha
    use_rslora = peft_config.use_rslora if peft_config is not None else first.use_rslora
    if rank is not None and rank != default_rank:
        raise ValueError(
            f"rank={rank} was requested but the PEFT model's LoRA layers have rank {default_rank}; "
            "pass rank=None (or the same rank), or wrap the base model with a new LoraConfig"
        )
    layer_ranks = {t.name: t.rank for t in targets}
    check_ranks(ranks, layer_ranks)
    differing = {name: r for name, r in (ranks or {}).items() if layer_ranks[name] != r}
    if differing:
        name, r = next(iter(differing.items()))
        raise ValueError(
            f"ranks asks rank {r} for {name!r}, whose LoRA layer has rank {layer_ranks[name]}: a PEFT model's ranks "
            "come from its LoraConfig (r, rank_pattern); pass ranks=None, or wrap the base model with a new LoraConfig"
        )
    ranks = {name: r for name, r in layer_ranks.items() if r != default_rank}
    alphas = {t.name: t.alpha for t in targets if t.alpha != default_alpha}
    return AdapterLayout(default_rank, ranks, default_alpha, use_rslora, alphas, peft_config)


def _check_peft_adapter(model: nn.Module, targets, peft_config, *, adapter_name: str | None, method) -> None:
    """Refuse, before the pass, a PEFT adapter that this initialisation cannot honour."""
    check_not_merged(model)
    init = getattr(peft_config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower() != "gaussian":
        raise ValueError(
            _PEFT_OWN_INIT.format(init=init) + ", and PEFT already did it when it created this model (pissa, olora, "
            "corda, loftq and lora_ga also moved the base weights, which the statistics would see); create the "
            "PeftModel with init_lora_weights=True and choose the method with method=..."
        )
    for t in targets:
        adapter = adapter_name or active_adapter(t.lora_layer)
        dora = bool(getattr(t.lora_layer, "use_dora", {}).get(adapter, False))
        variant = getattr(t.lora_layer, "lora_variant", {}).get(adapter)
        if variant is not None and not dora:
            raise ValueError(
                f"layer {t.name!r} uses the LoRA variant {type(variant).__name__}, which changes how lora_A and "
                "lora_B act; loradafast initialises plain LoRA and DoRA adapters: remove that option from the "
                "LoraConfig"
            )
        if dora and method.moves_base:
            raise ValueError(dora_refusal(method.name))


# initialize's options that the LoraConfig holds when get_peft_model builds the adapter.
_CONFIG_OPTIONS = {"rank": "r", "ranks": "rank_pattern", "target_modules": "target_modules",
                   "lora_alpha": "lora_alpha", "use_rslora": "use_rslora"}


def attach(result, peft_model: nn.Module, targets: list[Target], layout: AdapterLayout,
           adapter_name: str | None) -> None:
    """``initialize(peft_model)``: fill the model's LoRA layers with ``result`` and keep, for
    ``result.save``, its LoraConfig and its other adapter tensors."""
    apply_to(result, peft_model, adapter_name)
    result.peft_config = copy.deepcopy(layout.peft_config)
    adapter = adapter_name or active_adapter(targets[0].lora_layer)
    result.extra_state = peft_extra_state(peft_model, adapter, result.layers)


def wrap(model: nn.Module, lora_config, peft_kwargs: dict, options: dict, fill):
    """``peft.get_peft_model(model, lora_config, **peft_kwargs)`` filled by ``fill(peft_model)``; on
    any failure the wrapping is undone and ``model`` is left exactly as it was."""
    import peft

    if not isinstance(lora_config, peft.LoraConfig):
        raise TypeError(f"loradafast initialises LoRA adapters: peft_config must be a peft.LoraConfig, got "
                        f"{type(lora_config).__name__}")
    if is_peft_model(model):
        raise ValueError("the model already carries LoRA layers; call loradafast.initialize(peft_model, loader)")
    owned = [name for name in options if name in _CONFIG_OPTIONS]
    if owned:
        fields = ", ".join(f"{name} → lora_config.{_CONFIG_OPTIONS[name]}" for name in owned)
        raise ValueError(f"{', '.join(owned)} belong to lora_config here; set them there ({fields})")
    init = lora_config.init_lora_weights
    if isinstance(init, str) and init.lower() != "gaussian":
        # PEFT would run its own init first, and pissa/olora/corda/lora_ga would move the base
        # weights before ours is applied on top.
        raise ValueError(_PEFT_OWN_INIT.format(init=init) + ": leave init_lora_weights=True and choose the method "
                         "with method=...")
    with undone_on_failure(model):
        peft_model = peft.get_peft_model(model, copy.deepcopy(lora_config), **peft_kwargs)
        result = fill(peft_model)
    peft_model.loradafast_result = result
    return peft_model


# ---- preprocess_lora_da's hand-over to get_peft_model (and to a PEFT init) ----------------------

# On the base model: the InitResult of preprocess_lora_da; on each target layer: its LayerInit.
PREPROCESSED = "_loradafast_preprocessed"
LAYER_INIT = "_loradafast_init"


_FILL_HOOKS = "_loradafast_fill_hooks"
logger = logging.getLogger("loradafast")


def mark_preprocessed(model: nn.Module, result, targets: list[Target]) -> None:
    """Leave ``result`` on ``model`` and each layer's factors on its layer, for get_peft_model.

    PEFT's own ``get_peft_model`` knows nothing of them (it is the usual second step of PEFT's
    LoRA-GA recipe, which users copy): each layer also gets a forward pre-hook that, on the first
    forward after PEFT has wrapped it, writes every preprocessed layer's factors, so that the model
    trains from them and not from PEFT's plain LoRA init.
    """
    clear_preprocessed(model)
    object.__setattr__(model, PREPROCESSED, result)
    root = weakref.ref(model)
    hooks = []
    for t in targets:
        object.__setattr__(t.module, LAYER_INIT, result.layers[t.name])
        hooks.append(t.module.register_forward_pre_hook(_fill_when_wrapped(root, t.name)))
    object.__setattr__(model, _FILL_HOOKS, hooks)


def _fill_when_wrapped(root, name: str):
    def hook(module, args):
        model = root()
        if model is None or PREPROCESSED not in vars(model) or LAYER_INIT not in vars(module):
            return None  # written already (init_lora_layer), or no longer pending
        try:
            wrapper = model.get_submodule(name)
        except AttributeError:
            return None
        get_base_layer = getattr(wrapper, "get_base_layer", None)
        if wrapper is module or not callable(get_base_layer) or get_base_layer() is not module:
            return None  # the plain model runs (not wrapped yet), or a copy of it whose hooks came along
        # Wrapped in place by something other than loradafast.get_peft_model (PEFT's get_peft_model):
        # its LoRA layers were created with PEFT's init; write ours before the wrapper uses them.
        logger.info("loradafast: writing the factors of preprocess_lora_da into the LoRA layers that "
                    "peft.get_peft_model created, at their first forward")
        fill_preprocessed(model, vars(model)[PREPROCESSED], None)
        return None

    return hook


def clear_preprocessed(model: nn.Module) -> None:
    for handle in vars(model).get(_FILL_HOOKS, ()):
        handle.remove()  # safe inside a forward pre-hook: torch iterates over a copy of the hooks
    for m in [model, *model.modules()]:
        for attr in (PREPROCESSED, LAYER_INIT, _FILL_HOOKS):
            if attr in vars(m):
                delattr(m, attr)


def fill_preprocessed(peft_model: nn.Module, result, adapter_name: str):
    """Write the factors left by preprocess_lora_da into the PEFT model that PEFT just built; every
    LoRA layer PEFT created must have been preprocessed (the same LoraConfig)."""
    targets = find_targets(peft_model, adapter_name=adapter_name, allow_quantized=True)
    extra = sorted({t.name for t in targets} - set(result.layers))
    if extra:
        raise ValueError(f"PEFT created {len(extra)} LoRA layer(s) that preprocess_lora_da did not initialise (e.g. "
                         f"{extra[:3]}); give get_peft_model the LoraConfig given to preprocess_lora_da")
    layout = AdapterLayout(result.rank, {}, result.lora_alpha, result.use_rslora,
                           peft_config=peft_config_of(peft_model, adapter_name))
    attach(result, peft_model, targets, layout, adapter_name)
    clear_preprocessed(base_model_of(peft_model))
    return result


def init_lora_layer(lora_layer: nn.Module, adapter_name: str) -> bool:
    """What PEFT's ``LoraLayer.update_layer`` would call for ``init_lora_weights="lora_da"``: write the
    factors that :func:`loradafast.preprocess_lora_da` left on the base layer into ``adapter_name``
    (and, for a base-moving method, ``W ← W − s·B·A``).  False, with nothing written, when the base
    layer carries none (loading a saved adapter: its weights come from the file)."""
    base = lora_layer.get_base_layer()
    layer = vars(base).get(LAYER_INIT)
    if layer is None:
        return False
    target = Target(layer.name, base, layer_kind(base) or "linear", lora_layer=lora_layer, quantized=is_quantized(base))
    a_module, b_module = lora_layer.lora_A[adapter_name], lora_layer.lora_B[adapter_name]
    if a_module.weight.shape != layer.lora_A.shape or b_module.weight.shape != layer.lora_B.shape:
        raise ValueError(f"layer {layer.name!r}: preprocess_lora_da solved rank {layer.rank}, the LoRA layer has "
                         f"rank {a_module.weight.shape[0]}; use the same LoraConfig")
    if layer.subtract_scaling is not None:
        if target.quantized:
            raise ValueError(f"layer {layer.name!r} is quantized; a base-moving method cannot be applied to it")
        _check_movable(layer.name, target, adapter_name, layer.subtract_scaling, "preprocessed")
    _materialise(target, adapter_name)
    with torch.no_grad():
        a, b = lora_layer.lora_A[adapter_name].weight, lora_layer.lora_B[adapter_name].weight
        a.copy_(layer.lora_A.to(device=a.device, dtype=a.dtype))
        b.copy_(layer.lora_B.to(device=b.device, dtype=b.dtype))
        if layer.subtract_scaling is not None:
            _subtract_(target, a, b, layer.subtract_scaling)
    delattr(base, LAYER_INIT)
    return True
