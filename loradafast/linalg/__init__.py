"""Numerical building blocks of the solve (docs/design.md §4, §7): dense helpers
(:mod:`.dense`), the batched eigensolver (:mod:`.eigen`), the checked randomized SVD of LoRA-GA and
LoRA-One (:mod:`.lowrank`) and the native bindings of csrc/ (:mod:`.native`)."""
