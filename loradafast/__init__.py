"""loradafast: fast, verified data-aware LoRA initialisation (LoRA-DA and friends).

    result = loradafast.initialize(model, loader, rank=8)
    result.save("adapter")                      # a PEFT adapter directory
    peft_model = loradafast.get_peft_model(model, loader, lora_config)
    stats = loradafast.collect(model, loader)   # statistics only
    result = loradafast.solve(stats, rank=8)    # factors, no model pass
"""
__version__ = "0.1.0"

from .api import get_peft_model, initialize  # noqa: E402
from .collect import collect  # noqa: E402
from .result import InitResult, LayerInit  # noqa: E402
from .solve import METHODS, solve  # noqa: E402
from .stats import LayerStats, Statistics  # noqa: E402

__all__ = [
    "InitResult",
    "LayerInit",
    "LayerStats",
    "METHODS",
    "Statistics",
    "collect",
    "get_peft_model",
    "initialize",
    "solve",
    "__version__",
]
