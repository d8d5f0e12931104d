"""LoRA-DA (or LoRA-One, or plain LoRA) initialisation in TRL's SFTTrainer with peft_config=: TRL
wraps the model, loradafast.integrations.LoraDACallback initialises the adapters from the SFT
trainer's own batches before the first step.

    pip install trl
    python examples/trl_sft_lora_da.py                      # a tiny random Llama, no download
    python examples/trl_sft_lora_da.py --model ./my-llama --data train.jsonl --method lora-one

--model: a local causal-LM directory with its tokenizer; --data: a JSONL file with a "text"
field (any format SFTTrainer takes).  Without them: a tiny Llama, a word-level tokenizer and
pre-tokenised random samples.
"""
from __future__ import annotations

import argparse
import logging

import torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from loradafast.integrations import LoraDACallback


def tiny_model_tokenizer_and_data(n: int = 32):
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    vocab = {f"t{i}": i for i in range(97)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                        pad_token="t0", eos_token="t2", unk_token="t1")
    ids = [torch.randint(3, 97, (int(torch.randint(8, 24, (1,))),)).tolist() for _ in range(n)]
    return LlamaForCausalLM(config), tokenizer, Dataset.from_dict({"input_ids": ids})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--method", default="lora-da")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="out/trl_sft_lora_da")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    if args.model:
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
        dataset = load_dataset("json", data_files=args.data, split="train")
    else:
        model, tokenizer, dataset = tiny_model_tokenizer_and_data()
    callback = LoraDACallback(method=args.method, max_samples=256)
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        args=SFTConfig(output_dir=args.out, per_device_train_batch_size=8, max_steps=args.steps, learning_rate=2e-4,
                       logging_steps=1, save_strategy="no", report_to=[],
                       use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available()),
        peft_config=LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"),
        callbacks=[callback],
    )
    trainer.train()
    print(callback.result.summary())
    trainer.model.save_pretrained(args.out)


if __name__ == "__main__":
    main()
