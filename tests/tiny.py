"""Tiny models and data for the tests (no downloads)."""
from __future__ import annotations

import torch
from torch import nn


def tiny_llama(seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attn_implementation="eager")
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model


def tiny_gpt2(seed: int = 0, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=97, n_embd=24, n_layer=2, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    model = GPT2LMHeadModel(config).to(dtype)
    model.eval()
    return model


def random_sequences(n: int, lengths=(5, 12), vocab: int = 97, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = lengths
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def padded_batches(seqs: list[torch.Tensor], batch_size: int, pad_id: int = 0) -> list[dict]:
    """Right-padded dict batches with attention_mask; labels left to the library's default."""
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, :len(s)] = s
            mask[j, :len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


class ToyTokenModel(nn.Module):
    """embedding → proj (the layer under test) → tanh → head; per-token logits [B, S, V]."""

    def __init__(self, vocab=11, d_in=5, d_out=4, seed=0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d_in)
        self.proj = nn.Linear(d_in, d_out)
        self.head = nn.Linear(d_out, vocab)
        self.to(dtype)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.proj(self.embed(input_ids))))


def toy_sequence_losses(outputs, batch):
    """Mean token cross-entropy per sequence, no shift (each token predicts its own label)."""
    labels = batch.labels
    tok = nn.functional.cross_entropy(outputs.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    valid = labels != -100
    return tok.sum(1) / valid.sum(1).clamp(min=1)


def assert_stats_close(a, b, rel=2e-6):
    """Same counts and layers, and G, Y, Z within ``rel`` of the largest entry (fp32 sums in
    another order, e.g. other batch shapes, reach ~7e-7 on the tiny models; hence 2e-6)."""
    assert (a.num_tokens, a.num_sequences) == (b.num_tokens, b.num_sequences)
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        for getter in ("G", "Y", "Z"):
            x, y = getattr(a, getter)(name), getattr(b, getter)(name)
            err = float((x - y).abs().max() / y.abs().max())
            assert err < rel, (name, getter, err)
