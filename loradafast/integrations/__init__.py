"""Where loradafast meets other libraries: :mod:`.peft` (adapter files, LoRA layers, LoraConfigs),
:mod:`.trainer` (:class:`LoraDACallback`, for ``transformers.Trainer`` and TRL's trainers; imported
on first use, since it imports ``transformers.TrainerCallback``)."""


def __getattr__(name):
    if name in ("LoraDACallback", "reset_optimizer_state"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LoraDACallback"]
