"""What :mod:`loradafast.targets` asks of PEFT: which modules are PEFT LoRA layers, and which module
names a ``target_modules`` selects under PEFT's own matching rule.

A foundation, as :mod:`loradafast.targets` is (tests/test_house.py's ``LAYERS``): it imports nothing
of the package, so that the targets, and the statistics pass below the rest of ``integrations/``,
can use it.
"""
from __future__ import annotations

from collections.abc import Callable

from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT ``LoraLayer`` (the wrapper of a base layer, of any adapter)."""
    return isinstance(module, LoraLayer)


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every PEFT ``LoraLayer`` of ``model``, in module order; names as
    ``model.named_modules()`` gives them."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def target_module_matcher(target_modules) -> Callable[[str], bool]:
    """Whether a module name is selected by ``target_modules`` (a list of names or suffixes, or a regex
    string), by PEFT's own rule: ``check_target_module_exists`` on ``LoraConfig(target_modules=...)``.
    The LoraConfig is built here, so that it raises for an invalid ``target_modules`` at once."""
    config = LoraConfig(target_modules=target_modules)
    return lambda name: bool(check_target_module_exists(config, name))
