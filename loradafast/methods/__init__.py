"""Stage 2, the solve (docs/design.md §1, §4, §5): from statistics (and, for some methods, the
base weights) to factors, with no model pass.

* :mod:`.method`: what a method is to the rest of the package, a :class:`~.method.Method` record
  (what it needs, whether it moves the base weight, its options and diagnostics classes, its
  solve, its workspace and cost), and the helpers of the methods solved layer by layer or in stacks;
* :mod:`.registry`: the records, collected, and what the entry points read from them;
* :mod:`.solver`: :func:`solve`, which validates, dispatches through the registry and returns an
  :class:`~loradafast.result.InitResult`;
* :mod:`.problem`: the layers one solve works on, as every method's solve function reads them;
* the methods, each module (or package) holding everything about its methods, their options,
  diagnostics, formulas and records: :mod:`.lora_da` (a package: its options, diagnostics, the
  per-layer formulas, Ω applied implicitly per input group, and every layer solved at once),
  :mod:`.weight_svd` (LoRA, PiSSA, MiLoRA), :mod:`.gradient_svd` (LoRA-GA, LoRA-One) and
  :mod:`.fisher` (the Fisher subspace), on :mod:`.factors` (:class:`Factors`, which they
  return, :func:`lora_scaling` and their shared helpers).
"""
from .factors import Factors, lora_scaling
from .fisher import fisher_energies, fisher_subspace
from .gradient_svd import lora_ga, lora_one
from .weight_svd import lora, milora, pissa

__all__ = ["Factors", "fisher_energies", "fisher_subspace", "lora", "lora_ga", "lora_one", "lora_scaling",
           "milora", "pissa"]
