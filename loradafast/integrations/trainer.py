"""A ``transformers.TrainerCallback`` that initialises the LoRA adapters from the trainer's own data.

``Trainer(model=peft_model, ..., callbacks=[LoraDACallback()])`` or TRL's
``SFTTrainer(model, peft_config=LoraConfig(...), callbacks=[LoraDACallback(method="lora-one")])``:
before the first step, one statistics pass over the trainer's train dataloader (the batches its
collator makes, on its device), the solve, and the factors written into the PEFT model.

Order of events (transformers 5, ``Trainer._inner_training_loop``): the train dataloader, the
optimizer and the scheduler exist, and ``accelerator.prepare`` has run, *before* ``on_train_begin``.
So the factors (and, for base-moving methods, the base weights) are written in place, into the
very parameters the optimizer holds, and the optimizer's per-parameter state for the model's
parameters is dropped (empty unless the user handed in an optimizer that already stepped).  A run
resumed from a checkpoint (``state.global_step > 0``) keeps the checkpoint's adapters, which is exact
because the methods allowed here keep the base weight: those that move it are refused when the
callback is built, since the checkpoints would not hold the moved base.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging

from transformers import TrainerCallback

from ..methods.registry import DEFAULT_METHOD, REGISTRY, get_method
from ..pipeline import method_and_options
from ..targets import base_model_of, is_peft_model

logger = logging.getLogger("loradafast")


class LoraDACallback(TrainerCallback):
    """Initialise the trainer's PEFT model by ``method`` from its train dataloader, before the first step.

    Keywords are :func:`loradafast.initialize`'s: ``method`` ("lora-da"; any of
    :data:`loradafast.METHODS` that keeps the base weight), ``max_samples`` (sequences of the pass,
    256; None: one epoch),
    ``stats`` (saved statistics instead of a pass), ``loss_fn``, ``memory_budget``, ``freeze_a``,
    ``adapter_name``, ``config`` and the method's options (checked here, when the callback is built).
    ``num_train_samples`` (LoRA-DA's N, the size of the fine-tuning set) is the train dataset's
    length when it has one, unless given as a keyword or as a ``config`` whose value is not the
    default (an iterable dataset has no length: the default stays).
    Progress is shown on the main process only.  After training starts, ``callback.result`` is the
    :class:`~loradafast.InitResult`.
    """

    def __init__(self, method: str = DEFAULT_METHOD, *, max_samples: int | None = 256, stats=None, loss_fn=None,
                 memory_budget=None, freeze_a: bool = False, adapter_name: str | None = None, config=None,
                 progress: bool = True, **options):
        record = get_method(method)
        if record.moves_base:  # before the options: the method is the first thing wrong
            raise ValueError(base_moving_refusal(record.name))
        _, self.config = method_and_options(method, config, options, "LoraDACallback")
        # A config object cannot tell a value the user chose from the default it carries: only a value
        # other than the default counts as chosen there.
        default = _field_default(self.config, "num_train_samples")
        self._size_given = options.get("num_train_samples") is not None or (
            config is not None and getattr(config, "num_train_samples", default) != default)
        self.method = method
        self.kwargs = dict(max_samples=max_samples, stats=stats, loss_fn=loss_fn, memory_budget=memory_budget,
                           freeze_a=freeze_a, adapter_name=adapter_name)
        self.progress = progress
        self.result = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        from ..api import initialize

        if self.result is not None:  # a second train() call: the adapters are trained already
            return
        if state.global_step > 0:
            logger.info("LoraDACallback: resuming at step %d; the adapters come from the checkpoint", state.global_step)
            return
        if model is None or not is_peft_model(model):
            raise ValueError(
                "LoraDACallback initialises the LoRA adapters of a PEFT model: give the Trainer a PeftModel "
                "(peft.get_peft_model(model, LoraConfig(...))), or SFTTrainer peft_config=LoraConfig(...)")
        data = None if self.kwargs["stats"] is not None else train_dataloader
        config = self._sized_config(train_dataloader)
        with _without_activation_checkpointing(model, args):
            self.result = initialize(model, data, method=self.method, config=config,
                                     progress=self.progress and state.is_world_process_zero, **self.kwargs)
        dropped = reset_optimizer_state(optimizer, model)
        logger.info("LoraDACallback: %s initialised %d layers before step %d%s", self.method, len(self.result.layers),
                    state.global_step, f"; optimizer state of {dropped} parameter(s) dropped" if dropped else "")


    def _sized_config(self, train_dataloader):
        """The options, ``num_train_samples`` the train dataset's length where the user left it unset."""
        if self._size_given or _field_default(self.config, "num_train_samples") is None:
            return self.config
        size = dataset_length(train_dataloader)
        if size is None:
            logger.info("LoraDACallback: the train dataset has no length; num_train_samples stays %d",
                        self.config.num_train_samples)
            return self.config
        logger.info("LoraDACallback: num_train_samples = %d, the train dataset's length", size)
        return dataclasses.replace(self.config, num_train_samples=size)


def dataset_length(dataloader) -> int | None:
    """The number of samples of the dataloader's dataset (the whole set, not one process's share:
    every process's dataloader holds the same dataset and shards it by its sampler); None where the
    dataset has no length (an iterable dataset) or is empty."""
    try:
        size = len(dataloader.dataset)
    except (AttributeError, TypeError, NotImplementedError):
        return None
    return size if size > 0 else None


def _field_default(config, name: str):
    """The default of ``config``'s field ``name``; None where it has no such field."""
    for f in dataclasses.fields(config):
        if f.name == name:
            return f.default
    return None


def base_moving_refusal(method: str) -> str:
    return (
        f"LoraDACallback cannot run method {method!r}: it moves the base weight (W ← W − s·B₀A₀), and the "
        "Trainer's checkpoints and save_pretrained store the adapter only, so a resumed run or a reloaded model "
        "would pair the trained adapter with the original W, silently wrong. In the callback use a method that "
        f"keeps the base weight ({', '.join(name for name, m in REGISTRY.items() if not m.moves_base)}). For this "
        "one, initialise before the Trainer: "
        f"peft_model = loradafast.get_peft_model(model, config, loader=loader, method={method!r}); save "
        "peft_model.loradafast_result.save(init_dir, convert_to_lora=False) before training, and after it "
        "peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=init_dir): PEFT's conversion "
        "to a plain LoRA adapter for the original base model"
    )


def reset_optimizer_state(optimizer, model) -> int:
    """Drop the optimizer's state (Adam moments, step counts) of ``model``'s parameters, which were
    just rewritten; the parameters themselves are the same objects, so its param groups stay valid."""
    if optimizer is None:
        return 0
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
    dropped = 0
    for p in model.parameters():
        if inner.state.pop(p, None) is not None:
            dropped += 1
    return dropped


@contextlib.contextmanager
def _without_activation_checkpointing(model, args):
    """The pass refuses gradient checkpointing (it would run the hooks twice): off for the pass, back on after."""
    from ..statistics.collector import uses_activation_checkpointing

    base = base_model_of(model)
    on = uses_activation_checkpointing(base)
    new = hasattr(base, "activation_checkpointing_disable")  # transformers 5's names
    if on:
        base.activation_checkpointing_disable() if new else base.gradient_checkpointing_disable()
    try:
        yield
    finally:
        if on:
            kwargs = getattr(args, "gradient_checkpointing_kwargs", None)
            if new:
                base.activation_checkpointing_enable(kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
