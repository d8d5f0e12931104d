"""Hot loops with a fast path per device and a PyTorch reference everywhere else.

Each op takes ``impl="auto" | "reference" | "triton"``. ``"auto"`` runs Triton (or cuBLAS where
that is faster, see :mod:`.dispatch`) for CUDA tensors and the references in :mod:`.reference`
otherwise; ``LORADAFAST_FORCE_REFERENCE=1`` makes ``"auto"`` pick the references everywhere.
``impl="triton"`` on CPU tensors runs the kernels in the Triton interpreter when
``TRITON_INTERPRET=1`` was set before the first kernel call (the CPU test-suite does this).

One op per module: :mod:`.kfac_triton`, :mod:`.kfac_pair_triton` and :mod:`.gradient_triton`,
each the Triton twin of the function of the same name in :mod:`.reference`, with what they share
(autotune candidates and the model that prunes them, the tile routine, the device guard) in
:mod:`.triton_common`.  :mod:`.reference` also holds Ω with an explicit Δ̂ (``omega_apply``,
``omega_dense``), the one definition of Ω that LoRA-DA's dense formulas use; the solve applies Ω
without forming Δ̂ (:mod:`loradafast.methods.lora_da.operator`), so it has no kernel here.
"""
from .dispatch import (  # noqa: F401
    force_reference,
    gradient_accumulate,
    kfac_accumulate,
    kfac_accumulate_pair,
    triton_available,
)
from .reference import diag_accumulate, symmetric_from_lower, symmetrize_lower_  # noqa: F401

__all__ = [
    "diag_accumulate",
    "force_reference",
    "gradient_accumulate",
    "kfac_accumulate",
    "kfac_accumulate_pair",
    "symmetric_from_lower",
    "symmetrize_lower_",
    "triton_available",
]
