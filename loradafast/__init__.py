"""loradafast: fast, verified data-aware LoRA initialisation (LoRA-DA and friends).

    result = loradafast.initialize(model, loader, rank=8)
    result.save("adapter")                      # a PEFT adapter directory
    peft_model = loradafast.get_peft_model(model, lora_config, loader=loader)   # PEFT's order
    loradafast.preprocess_lora_da(model, lora_config, loader, cache_file="stats.safetensors")
    peft_model = loradafast.get_peft_model(model, lora_config)   # from the preprocessed factors
    stats = loradafast.collect(model, loader)   # statistics only
    result = loradafast.solve(stats, rank=8)    # factors, no model pass
    result = loradafast.solve(stats, 8, method="lora-ga")   # another method, same statistics
    result = loradafast.initialize(model, None, 8, method="pissa")   # weight-only: no pass
    result = loradafast.initialize(model, loader, 8, config=loradafast.LoraDAConfig(beta=0.1))  # options object
    result.save("adapter", convert_to_lora=True)   # plain LoRA for the unmodified base

Layout, in the order the data flows (docs/design.md §1):

* :mod:`.targets`: which layers get an adapter;
* :mod:`.statistics`: the pass (batches, losses, hooks) and the :class:`Statistics` it produces;
* :mod:`.options`: one validated options class per method, every list of allowed values;
* :mod:`.methods`: the solve: the registry of methods, LoRA-DA, the other methods' formulas;
* :mod:`.linalg`: dense helpers, the batched eigensolver, the native bindings of csrc/;
* :mod:`.kernels`: the pass's and the solver's hot loops (Triton, with PyTorch references);
* :mod:`.result` (and :mod:`.layer_init`, one layer's share): what a solve returns, as plain data;
* :mod:`.integrations`: the PEFT adapter format (``peft_files``), writes into a PeftModel and
  their guards (``peft_model``), the PEFT-shaped entry points (``peft_entry``), the Trainer callback;
* :mod:`.planner` and :mod:`.passes`: the memory budget, and one statistics pass or several;
* :mod:`.api`: ``initialize``.
"""
from ._version import __version__

import logging as _logging

# Library convention: log records go to the application's handlers; none of our own.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

from .api import initialize  # noqa: E402
from .integrations.peft_entry import get_lora_da_state_dict, get_peft_model, preprocess_lora_da  # noqa: E402
from .statistics import collect  # noqa: E402
from .integrations.peft_model import apply_base_update, freeze_lora_a  # noqa: E402
from .layer_init import LayerDiagnostics, LayerInit  # noqa: E402
from .result import InitResult  # noqa: E402
from .methods.registry import METHODS, REGISTRY, WEIGHT_ONLY_METHODS  # noqa: E402
from .methods.solver import solve  # noqa: E402
from .options import MethodConfig  # noqa: E402
from .methods.fisher import FisherSubspaceConfig  # noqa: E402
from .methods.gradient_svd import LoraGAConfig, LoraOneConfig  # noqa: E402
from .methods.lora_da import LoraDAConfig, LoraDADiagnostics  # noqa: E402
from .methods.weight_svd import MiloraConfig, PissaConfig, RandomLoraConfig  # noqa: E402
from .statistics import LayerStats, Statistics  # noqa: E402

__all__ = [
    "FisherSubspaceConfig",
    "InitResult",
    "LayerDiagnostics",
    "LayerInit",
    "LayerStats",
    "LoraDADiagnostics",
    "LoraDAConfig",
    "LoraGAConfig",
    "LoraOneConfig",
    "METHODS",
    "MethodConfig",
    "MiloraConfig",
    "PissaConfig",
    "REGISTRY",
    "RandomLoraConfig",
    "Statistics",
    "WEIGHT_ONLY_METHODS",
    "apply_base_update",
    "collect",
    "freeze_lora_a",
    "get_lora_da_state_dict",
    "get_peft_model",
    "initialize",
    "preprocess_lora_da",
    "solve",
    "__version__",
]
