"""LoraDACallback with transformers.Trainer (and TRL's SFTTrainer when trl is installed), on a tiny Llama."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import loradafast
from loradafast.integrations import LoraDACallback
from tiny import padded_batches, random_sequences, tiny_llama

SEQS = random_sequences(8)


def _collate(rows):
    batch = padded_batches([r["input_ids"] for r in rows], len(rows))[0]
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _config():
    return LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


class _Probe(TrainerCallback):
    """The LoRA weights and the optimizer's state as the first step sees them."""

    def __init__(self):
        self.first = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.first is None:
            inner = getattr(optimizer, "optimizer", optimizer)
            self.first = ({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
                          len(inner.state))


def _trainer(tmp_path, model, callbacks, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1,
                             disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=[{"input_ids": s} for s in SEQS], data_collator=_collate,
                   callbacks=callbacks, **kw)


def _lora(peft_model):
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("method", ["lora-da", "lora-one"])
def test_trainer_callback_initialises_before_the_first_step(tmp_path, method):
    peft_model = peft_get_peft_model(tiny_llama(), _config())
    # An optimizer handed in that already stepped: its state must not survive the initialisation.
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    sum(p.sum() for p in peft_model.parameters() if p.requires_grad).backward()
    optimizer.step()
    optimizer.zero_grad()
    probe, callback = _Probe(), LoraDACallback(method, max_samples=None, progress=False)
    trainer = _trainer(tmp_path, peft_model, [callback, probe], optimizers=(optimizer, None))
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    weights, optimizer_state = probe.first
    assert optimizer_state == 0

    # The same batches (all 8 sequences, in whatever order the sampler chose), initialised directly.
    direct = peft_get_peft_model(tiny_llama(), _config())
    # LoRA-DA's N is the train dataset's length in the callback (8 here, not the default 100,000).
    size = {"num_train_samples": len(SEQS)} if method == "lora-da" else {}
    loradafast.initialize(direct, [_collate([{"input_ids": s} for s in SEQS])], method=method, max_samples=None,
                          progress=False, **size)
    expected = _lora(direct)
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], atol=1e-5, rtol=1e-4)
    trained = _lora(peft_model)
    assert any(not torch.equal(trained[n], weights[n]) for n in weights)  # training ran and moved them
    assert callback.result.method == method


def test_callback_refuses_a_plain_model_and_bad_options(tmp_path):
    with pytest.raises(ValueError, match="do\\(es\\) not apply"):
        LoraDACallback("lora-one", beta=0.1)
    trainer = _trainer(tmp_path, tiny_llama(), [LoraDACallback(progress=False)])
    with pytest.raises(ValueError, match="PEFT model"):
        trainer.train()


@pytest.mark.parametrize("method", ["lora-ga", "pissa", "milora", "fisher-subspace"])
def test_callback_refuses_base_moving_methods_before_training(method):
    # The Trainer's checkpoints and save_pretrained hold the adapter only: a resumed or reloaded
    # model would pair it with the original W instead of W − s·B₀A₀.
    with pytest.raises(ValueError, match="moves the base weight.*path_initial_model_for_weight_conversion"):
        LoraDACallback(method, progress=False)


def test_resumed_training_equals_the_uninterrupted_one(tmp_path):
    """lora-da keeps the base weight, so a checkpoint (the adapter and the optimizer) is the whole
    trained state: resuming from step 1 ends where the uninterrupted run ends."""
    def run(output, resume=None):
        peft_model = peft_get_peft_model(tiny_llama(), _config())
        args = TrainingArguments(output_dir=str(output), per_device_train_batch_size=4, max_steps=2,
                                 learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=1, use_cpu=True,
                                 seed=0, disable_tqdm=True)
        trainer = Trainer(model=peft_model, args=args, train_dataset=[{"input_ids": s} for s in SEQS],
                          data_collator=_collate, callbacks=[LoraDACallback(max_samples=None, progress=False)])
        trainer.train(resume_from_checkpoint=resume)
        batch = _collate([{"input_ids": s} for s in SEQS])
        with torch.no_grad():
            return peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-1"))
    torch.testing.assert_close(resumed, whole, atol=1e-5, rtol=1e-5)


def test_sft_trainer_with_peft_config(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(97)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                        pad_token="t0", eos_token="t2", unk_token="t1")
    dataset = Dataset.from_dict({"input_ids": [s.tolist() for s in SEQS]})
    callback = LoraDACallback(max_samples=None, progress=False)
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                         save_strategy="no", use_cpu=True, learning_rate=1e-2, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=tiny_llama(), args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=_config(), callbacks=[callback])
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert set(callback.result.layers) == {n for n, _ in tiny_llama().named_modules()
                                           if n.endswith(("q_proj", "v_proj"))}


# ---- num_train_samples from the train dataset ----------------------------------------------------------

class _Stream(torch.utils.data.IterableDataset):
    """A dataset without a length, as a streamed one."""

    def __iter__(self):
        return iter([{"input_ids": s} for s in SEQS])


def _begin(callback, dataset):
    """The callback's on_train_begin as the Trainer calls it, with a plain DataLoader over ``dataset``."""
    from transformers import TrainerControl, TrainerState

    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=_collate)
    model = peft_get_peft_model(tiny_llama(), _config())
    callback.on_train_begin(None, TrainerState(), TrainerControl(), model=model, train_dataloader=loader)
    return callback.result


@pytest.mark.parametrize("kwargs, expected", [
    ({}, len(SEQS)),
    ({"num_train_samples": 50}, 50),
    ({"num_train_samples": 100_000}, 100_000),  # the default's value, but given: kept
    ({"config": loradafast.LoraDAConfig(num_train_samples=70)}, 70),
    ({"config": loradafast.LoraDAConfig(beta=0.05)}, len(SEQS)),
])
def test_callback_takes_num_train_samples_from_the_dataset_unless_given(kwargs, expected):
    result = _begin(LoraDACallback(max_samples=None, progress=False, **kwargs), [{"input_ids": s} for s in SEQS])
    assert result.config.num_train_samples == expected
    assert result.options["num_train_samples"] == expected


def test_callback_keeps_the_default_num_train_samples_without_a_dataset_length():
    default = loradafast.LoraDAConfig().num_train_samples
    assert _begin(LoraDACallback(max_samples=None, progress=False), _Stream()).config.num_train_samples == default


def test_callback_in_a_trainer_sees_the_dataset_length(tmp_path):
    """Through the Trainer's own (accelerate-prepared) dataloader, and for a method without the option."""
    for method, expected in (("lora-da", len(SEQS)), ("lora-one", None)):
        callback = LoraDACallback(method, max_samples=None, progress=False)
        trainer = _trainer(tmp_path, peft_get_peft_model(tiny_llama(), _config()), [callback])
        trainer.args.max_steps = 1
        trainer.train()
        assert getattr(callback.result.config, "num_train_samples", None) == expected
