"""LoRA-DA initialisation inside a transformers.Trainer run: the adapters are initialised from the
trainer's own train dataloader before the first step (loradafast.integrations.LoraDACallback).

    python examples/trainer_lora_da.py                      # a tiny random Llama, no download
    python examples/trainer_lora_da.py --model ./my-llama --data train.txt --method lora-one

--model: a local transformers causal-LM directory (with its tokenizer); --data: a text file, one
sample per line.  Without them the script builds a tiny Llama and random token ids.
"""
from __future__ import annotations

import argparse
import logging

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from loradafast.integrations import LoraDACallback


def tiny_model_and_data(n: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    data = [{"input_ids": torch.randint(1, 97, (int(torch.randint(8, 24, (1,))),))} for _ in range(n)]
    return LlamaForCausalLM(config), data, 0


def model_and_data(model_dir: str, data_file: str, max_length: int = 256):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = [line for line in open(data_file, encoding="utf-8").read().splitlines() if line.strip()]
    data = [{"input_ids": torch.tensor(tokenizer(line, truncation=True, max_length=max_length)["input_ids"])}
            for line in lines]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return AutoModelForCausalLM.from_pretrained(model_dir), data, pad


def collator(pad_id: int):
    def collate(rows):
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r["input_ids"])] = r["input_ids"]
            mask[i, :len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return collate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--method", default="lora-da")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="out/trainer_lora_da")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)  # loradafast logs one line per stage

    model, data, pad = model_and_data(args.model, args.data) if args.model else tiny_model_and_data()
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
    callback = LoraDACallback(method=args.method, max_samples=256)
    trainer = Trainer(
        model=peft_model,
        args=TrainingArguments(output_dir=args.out, per_device_train_batch_size=8, max_steps=args.steps,
                               learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to=[]),
        train_dataset=data, data_collator=collator(pad), callbacks=[callback],
    )
    trainer.train()
    print(callback.result.summary())
    peft_model.save_pretrained(args.out)


if __name__ == "__main__":
    main()
