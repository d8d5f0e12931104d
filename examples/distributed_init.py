"""LoRA-DA initialisation on many GPUs with torchrun (docs/distributed.md).

    torchrun --nproc-per-node 8 examples/distributed_init.py --model meta-llama/Llama-2-7b-hf --out adapter/

Each rank reads its own shard of the samples (here: every world_size-th sample of a JSONL file of
{"text": ...} rows, or a few built-in sentences), the statistics of each input group are reduced to
the rank that solves it, and every rank ends with the same adapter; rank 0 saves it.
Add --fsdp to shard the weights with FSDP2 (fully_shard) first; on CPU the script runs with gloo.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

import loradafast

FALLBACK = ["The quick brown fox jumps over the lazy dog.", "LoRA adapters are low-rank updates.",
            "Initialisation from data can speed up fine-tuning.", "Every rank reads its own shard."] * 8


def shard(path: str | None, rank: int, world: int) -> list[str]:
    texts = FALLBACK if path is None else [json.loads(line)["text"] for line in open(path)]
    return texts[rank::world]


def batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", help="JSONL with a 'text' field per line (default: a few sentences)")
    parser.add_argument("--out", default="adapter")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=256, help="over all ranks together")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--fsdp", action="store_true", help="shard the weights with FSDP2 first")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16 if cuda else torch.float32)
    model.to(device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    loader = batches(tokenizer, shard(args.data, rank, world), args.batch_size, args.max_length)
    # With FSDP2 every forward is a collective: every rank must run the same number of batches.
    result = loradafast.initialize(model, loader, args.rank, method="lora-da", max_samples=args.max_samples)
    if rank == 0:
        result.save(args.out)
        solved = {r: sum(1 for layer in result.layers.values() if layer.diagnostics.solved_by_rank == r)
                  for r in range(world)}
        print(f"saved {len(result.layers)} layers to {args.out}; layers solved per rank: {solved}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
