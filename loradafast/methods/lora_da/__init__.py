"""LoRA-DA (docs/design.md §4): everything about the method, and its :class:`~..method.Method` record.

* :mod:`.config`: its options, :class:`LoraDAConfig`;
* :mod:`.diagnostics`: what its solve reports per layer, :class:`LoraDADiagnostics`;
* :mod:`.formulas`: the per-layer mathematics, dense (the reference, and the report's spectra);
* :mod:`.operator`: Ω applied implicitly per input group;
* :mod:`.solve`: every layer at once, and the workspace and cost the planner counts for it.
"""
from __future__ import annotations

from ..method import Method
from ..problem import Problem
from . import solve
from .config import LoraDAConfig
from .diagnostics import LoraDADiagnostics
from .formulas import (DampedFactors, OmegaTerms, condition_estimate, damped_factors, damped_z, lora_da_factors,
                       natural_gradient, omega_spectra, omega_terms, spectral_norm)

__all__ = ["METHOD", "DampedFactors", "LoraDAConfig", "LoraDADiagnostics", "OmegaTerms", "condition_estimate",
           "damped_factors", "damped_z", "lora_da_factors", "natural_gradient", "omega_spectra", "omega_terms",
           "spectral_norm"]

# The split-half warning's advice.  Why: the split-half study (benchmarks/README.md) found Zλ⁻¹
# amplifying the gradient's noise along the input directions of least variance; a strong damping
# of Z, or no Z⁻¹ at all, made the halves agree where more data barely did.
NOISE_ADVICE = ("more samples help little here (Zλ⁻¹ amplifies the gradient's noise along the input directions "
                "of least variance): try a strong relative damping (damping_mode='relative', damping=10), or "
                "method='lora-one', whose subspaces the same data determine far better")


def _solve(p: Problem, c: LoraDAConfig):
    return solve.solve_lora_da(p.stats, p.ranks, c, device=p.device)


# All layers together: one factorisation per input group, its cost and workspace per group.
METHOD = Method("lora-da", "LoRA-DA", LoraDAConfig, _solve, diagnostics=LoraDADiagnostics, statistics=frozenset("GYZ"),
                workspace=solve.planned_workspace, solve_cost=solve.solve_cost, spectra=omega_spectra,
                noise_advice=NOISE_ADVICE)
