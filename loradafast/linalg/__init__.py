"""Numerical building blocks of the solve (docs/design.md §4, §7): dense helpers
(:mod:`.dense`), the batched eigensolver (:mod:`.eigen`) and the native bindings of csrc/
(:mod:`.native`)."""
