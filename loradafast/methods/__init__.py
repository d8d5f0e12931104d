"""Stage 2, the solve (docs/design.md §1, §4, §5): from statistics (and, for some methods, the
base weights) to factors, with no model pass.

* :mod:`.registry`: one record per method (what it needs, whether it moves the base weight, its
  options class, its solve function);
* :mod:`.solver`: :func:`solve`, which validates, dispatches through the registry and returns an
  :class:`~loradafast.result.InitResult`;
* :mod:`.problem`: the layers one solve works on, as every method's solve function reads them;
* :mod:`.lora_da` (per-layer formulas), :mod:`.lora_da_operator` (Ω applied implicitly per input
  group) and :mod:`.lora_da_solve` (all layers at once): LoRA-DA;
* the per-layer formulas of the other methods: :mod:`.weight_svd` (LoRA, PiSSA, MiLoRA),
  :mod:`.gradient_svd` (LoRA-GA, LoRA-One) and :mod:`.fisher` (the Fisher subspace), on
  :mod:`.factors` (:class:`Factors`, which they return, :func:`lora_scaling` and their shared helpers).
"""
from .factors import Factors, lora_scaling
from .fisher import fisher_energies, fisher_subspace
from .gradient_svd import lora_ga, lora_one
from .weight_svd import lora, milora, pissa

__all__ = ["Factors", "fisher_energies", "fisher_subspace", "lora", "lora_ga", "lora_one", "lora_scaling",
           "milora", "pissa"]
