"""Which layers get an adapter, and how their weights are laid out.

Names are module paths relative to the *base* model (the transformers model), so that the PEFT
state-dict key of a layer is always ``base_model.model.<name>.lora_A.weight``, whether the user
passed a plain model or a ``PeftModel``; :func:`base_model_only` runs a ``PeftModel`` as that
base model (the statistics pass reads the base model's layers).

What needs PEFT itself (which modules are its LoRA layers, its ``target_modules`` matching rule)
lives in :mod:`loradafast.integrations.peft_targets`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

try:  # transformers' GPT-2 style linear layer, weight stored [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()

from .integrations.peft_targets import is_lora_layer, lora_layers, target_module_matcher

PEFT_PREFIX = "base_model.model."
# Linear subclasses whose weight is packed or quantized (bitsandbytes Linear4bit/8bitLt, ...).
QUANTIZED_LIBRARIES = {"bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq", "optimum", "torchao"}


@dataclass
class Target:
    """One layer to initialise."""

    name: str  # path relative to the base model
    module: nn.Module  # the linear layer whose input and output the hooks see
    kind: str  # "linear" or "conv1d"
    lora_layer: nn.Module | None = None  # the PEFT LoraLayer wrapping ``module``, if any
    rank: int | None = None  # set by the PEFT layer when there is one
    alpha: float | None = None  # the PEFT layer's lora_alpha (alpha_pattern applied)
    use_rslora: bool = False  # the PEFT layer's
    quantized: bool = False  # a packed or quantized weight (bitsandbytes, ...): its shape says nothing

    @property
    def in_features(self) -> int:
        if self.quantized:
            return self.module.in_features
        w = self.module.weight
        return w.shape[0] if self.kind == "conv1d" else w.shape[1]

    @property
    def out_features(self) -> int:
        if self.quantized:
            return self.module.out_features
        w = self.module.weight
        return w.shape[1] if self.kind == "conv1d" else w.shape[0]

    def weight_out_in(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (transposed view for ``Conv1D``)."""
        if self.quantized:
            raise TypeError(f"layer {self.name!r} is quantized ({type(self.module).__name__}); "
                            "its weight cannot be read")
        w = self.module.weight
        return w.T if self.kind == "conv1d" else w


def is_peft_model(model: nn.Module) -> bool:
    return any(is_lora_layer(m) for m in model.modules())


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers (or plain) model under any PEFT wrapping."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return get_base()
    if type(model).__name__ == "PeftMixedModel":  # get_peft_model(..., mixed=True): no get_base_model
        return model.base_model.model
    return model


def layer_kind(module: nn.Module) -> str | None:
    if Conv1D and isinstance(module, Conv1D):
        kind = "conv1d"
    elif isinstance(module, nn.Linear):
        kind = "linear"
    else:
        return None
    return kind


def is_quantized(module: nn.Module) -> bool:
    """A linear layer whose weight is packed or quantized (bitsandbytes ``Linear4bit``/``Linear8bitLt``,
    GPTQ, AWQ, ...): its class comes from a quantization library, or its weight is not a float tensor."""
    weight = getattr(module, "weight", None)
    return type(module).__module__.split(".")[0] in QUANTIZED_LIBRARIES or not (
        torch.is_tensor(weight) and weight.is_floating_point())


def _check_real_weight(name: str, module: nn.Module, allow_quantized: bool = False) -> bool:
    """Whether ``module`` is quantized; raises for one if ``allow_quantized`` is False, and for one
    that does not say its shape (``in_features``/``out_features``) in any case."""
    weight = getattr(module, "weight", None)
    quantized = is_quantized(module)
    if quantized and allow_quantized:
        if not (isinstance(getattr(module, "in_features", None), int)
                and isinstance(getattr(module, "out_features", None), int)):
            raise TypeError(f"layer {name!r} is a quantized {type(module).__name__} without in_features/out_features "
                            "attributes; loradafast cannot tell its shape")
        return True
    if quantized:
        raise TypeError(
            f"layer {name!r} is a {type(module).__module__}.{type(module).__name__} with a quantized or non-float "
            f"weight ({getattr(weight, 'dtype', None)}); loradafast needs the real weight of every target layer: "
            "load the model unquantized (or dequantize it), or exclude these layers with target_modules"
        )
    return False


def _relative_name(model: nn.Module, name: str) -> str:
    # PeftModel -> LoraModel -> base model: strip the wrappers so names match the base model's.
    if model is not base_model_of(model) and name.startswith(PEFT_PREFIX):
        return name[len(PEFT_PREFIX):]
    return name


def find_targets(model: nn.Module, target_modules=None, *, adapter_name: str | None = None,
                 allow_quantized: bool = False) -> list[Target]:
    """The layers to initialise, in module order.

    * A model carrying PEFT LoRA layers: exactly its LoRA layers of the active adapter (their
      rank comes from the layer); ``target_modules`` must then be None.
    * Otherwise ``target_modules`` follows PEFT's rules (a list of names or suffixes, a regex
      string, or "all-linear"); None means "all-linear": every ``nn.Linear`` and ``Conv1D``
      except the output embedding, as PEFT does.

    A quantized layer raises, unless ``allow_quantized`` (its Target says ``quantized``: the
    statistics pass needs only its input and output gradient, never its weight).
    """
    if is_peft_model(model):
        if target_modules is not None:
            raise ValueError(
                "the model already carries PEFT LoRA layers, whose targets are fixed by its LoraConfig; "
                "pass target_modules=None (or pass the unwrapped base model)"
            )
        return _lora_layer_targets(model, adapter_name, allow_quantized)
    return _matching_linear_targets(model, target_modules, allow_quantized)


def _lora_layer_targets(model: nn.Module, adapter_name: str | None, allow_quantized: bool) -> list[Target]:
    """The PEFT LoRA layers of ``adapter_name`` (else each layer's active adapter), each with the
    rank, alpha and rsLoRA flag its LoraConfig gave it."""
    targets = []
    for name, module in lora_layers(model):
        adapter = adapter_name or active_adapter(module)
        if adapter not in module.lora_A:
            continue
        base = module.get_base_layer()
        kind = layer_kind(base)
        if kind is None:
            raise TypeError(
                f"LoRA layer {name!r} wraps a {type(base).__name__}; loradafast initialises LoRA on "
                "nn.Linear and transformers Conv1D layers only"
            )
        quantized = _check_real_weight(name, base, allow_quantized)
        targets.append(Target(_relative_name(model, name), base, kind, lora_layer=module,
                              rank=module.r[adapter], alpha=module.lora_alpha[adapter],
                              use_rslora=bool(module.use_rslora.get(adapter, False)), quantized=quantized))
    return targets


def _output_embedding(model: nn.Module) -> nn.Module | None:
    """The base model's output embedding, or None where it has none (or cannot say)."""
    get_out = getattr(base_model_of(model), "get_output_embeddings", None)
    if callable(get_out):
        try:
            return get_out()
        except (NotImplementedError, AttributeError):
            return None
    return None


def _matching_linear_targets(model: nn.Module, target_modules, allow_quantized: bool) -> list[Target]:
    """The linear and Conv1D layers of a model without LoRA layers that ``target_modules`` names,
    matched by PEFT's own rule; None (or "all-linear") means all but the output embedding."""
    output_layer = _output_embedding(model)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        target_modules = None
    matches = None
    if target_modules is not None:
        matches = target_module_matcher(target_modules)

    targets = []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or not name:
            continue
        if matches is None:
            if module is output_layer:
                continue
        elif not matches(name):
            continue
        quantized = _check_real_weight(name, module, allow_quantized)
        targets.append(Target(_relative_name(model, name), module, kind, quantized=quantized))
    return targets


def active_adapter(layer: nn.Module) -> str:
    active = layer.active_adapters if hasattr(layer, "active_adapters") else layer.active_adapter
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise ValueError(f"expected one active adapter, found {list(active)}; pass adapter_name")
        return active[0]
    return active


def short_target_modules(model: nn.Module, targets: list[Target]) -> list[str]:
    """The shortest PEFT ``target_modules`` list that selects exactly ``targets``.

    Leaf names (``q_proj``) when they select the same set as the full paths, the full paths
    otherwise; PEFT matches a list entry by equality or by ``.endswith('.' + entry)``.
    """
    wanted = {t.name for t in targets}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wanted})
    matches = target_module_matcher(leaves)
    base = base_model_of(model)
    chosen = {
        name
        for name, module in base.named_modules()
        if name and layer_kind(module) is not None and matches(name)
    }
    return leaves if chosen == wanted else sorted(wanted)


def peft_config_of(model: nn.Module, adapter_name: str | None):
    """The LoraConfig of ``adapter_name`` (the active adapter) of a PEFT model, or None."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    name = adapter_name or getattr(model, "active_adapter", None) or next(iter(configs))
    if isinstance(name, (list, tuple)):
        name = name[0]
    return configs.get(name)


def model_meta(model: nn.Module, targets: list[Target], *, causal: bool, adapter_name: str | None = None) -> dict:
    """What an adapter config records about the model: its name, task type and targets."""
    base = base_model_of(model)
    config = getattr(base, "config", None)
    name_or_path = getattr(config, "_name_or_path", None) or getattr(base, "name_or_path", None) or None
    peft_config = peft_config_of(model, adapter_name) if is_peft_model(model) else None
    if peft_config is not None:
        target_modules = peft_config.target_modules
        if isinstance(target_modules, set):
            target_modules = sorted(target_modules)
    else:
        target_modules = short_target_modules(model, targets)
    return {
        "base_model_name_or_path": name_or_path,
        "task_type": "CAUSAL_LM" if causal else None,
        "target_modules": target_modules,
    }


def _adapter_switches(model: nn.Module) -> list[nn.Module]:
    # PEFT's tuner layers (LoRA and the other methods) and its modules_to_save / trainable-token
    # wrappers all gate their adapters on this one flag.
    return [m for m in model.modules() if hasattr(m, "_disable_adapters") and hasattr(m, "enable_adapters")]


def check_not_merged(model: nn.Module) -> None:
    merged = [name for name, m in model.named_modules() if getattr(m, "merged", False) is True]
    if merged:
        raise ValueError(
            f"{len(merged)} PEFT layer(s) have adapters merged into their base weights (e.g. {merged[0]!r}), so the "
            "base model is not available; call peft_model.unmerge_adapter() first"
        )


@contextlib.contextmanager
def base_model_only(model: nn.Module):
    """Run ``model`` as its base model: every PEFT adapter layer, active or not, and every
    ``modules_to_save`` copy switched off, then switched back exactly as they were.

    The flag is set directly: PEFT's ``enable_adapters``/``disable_adapter()`` would also change
    the adapters' ``requires_grad`` and, on exit, enable adapters that the user had disabled.
    """
    check_not_merged(model)
    switches = [(m, m._disable_adapters) for m in _adapter_switches(model)]
    try:
        for m, _ in switches:
            m._disable_adapters = True
        yield model
    finally:
        for m, flag in switches:
            m._disable_adapters = flag


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
