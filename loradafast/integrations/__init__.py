"""Where loradafast meets other libraries.  PEFT, by layer: :mod:`.peft_targets` (PEFT's LoRA layers
and ``target_modules`` matching, for :mod:`loradafast.targets`), :mod:`.peft_files` (the adapter format:
keys, state dicts, LoraConfig, the adapter directory), :mod:`.peft_model` (writes into a PEFT model,
base updates, the guards and the hand-over from ``preprocess_lora_da``), :mod:`.peft_entry` (the
PEFT-shaped entry points: ``get_peft_model``, ``preprocess_lora_da``, ``get_lora_da_state_dict``).
:mod:`.trainer` (:class:`LoraDACallback`, for ``transformers.Trainer`` and TRL's trainers; imported
on first use, since it imports ``transformers.TrainerCallback``)."""


def __getattr__(name):
    if name in ("LoraDACallback", "reset_optimizer_state"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LoraDACallback"]
