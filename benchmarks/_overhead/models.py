"""The benchmark models (the same weights in every process), their samples and batches, and the
floor's loss."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import sync

from .config import MODEL_DESCRIPTIONS, TARGETS


def make_batches(ids, batch_size: int, device) -> list[dict]:
    out = []
    for i in range(0, len(ids), batch_size):
        x = ids[i:i + batch_size].to(device)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x})
    return out


def lora_config(rank: int, alpha: float, **kw):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGETS), lora_dropout=0.0, **kw)


def build_model(spec: dict):
    """The benchmark model on ``spec['device']`` (same weights in every process)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    name = spec["model"]
    if name == "tiny":
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=max(128, spec["seq_len"]), tie_word_embeddings=False)
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    elif name == "smollm2":
        from transformers import AutoConfig

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec["model_dir"]), dtype=dtype)
        model.load_state_dict(torch.load(Path(spec["model_dir"]) / "state_dict.pt"))  # tied lm_head stays tied
        model.to(dtype)
    elif name == "llama2-7b":
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                          rms_norm_eps=1e-5, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    else:
        raise ValueError(f"unknown model {name!r}")
    model.config.use_cache = False
    return model.to(device).eval()


def prepare_model_data(name: str, settings: dict, workdir: Path, log) -> dict:
    """Token ids (saved for the workers) and, for SmolLM2, a local copy of the dequantized model."""
    info = {"description": MODEL_DESCRIPTIONS[name]}
    n, length = settings["samples"], settings["seq_len"]
    if name == "smollm2":
        import sysconfig

        from loradafast.demo import load_smollm2, stdlib_chunks

        t0 = time.perf_counter()
        model, tokenizer = load_smollm2()
        files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 20_000)
        ids = stdlib_chunks(tokenizer, count=n, length=length, files=files[0::2])
        # transformers refuses save_pretrained on a GGUF-loaded model: keep config + state dict.
        model_dir = workdir / "smollm2"
        model.config.save_pretrained(str(model_dir))
        torch.save(model.state_dict(), model_dir / "state_dict.pt")
        info["model_dir"] = str(model_dir)
        info["data"] = f"{n} sequences × {length} tokens cut from the standard library's larger .py files"
        log(f"[smollm2] loaded, tokenised and saved a local copy in {time.perf_counter() - t0:.1f}s")
        del model
    else:
        vocab = 512 if name == "tiny" else 32000
        g = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, vocab, (n, length), generator=g)
        info["data"] = f"{n} sequences × {length} uniformly random token ids (seed 1234)"
    ids_path = workdir / f"ids_{name}.pt"
    torch.save(ids, ids_path)
    info["ids_path"] = str(ids_path)
    return info


def save_lora_factors(model, path) -> None:
    """``{layer: (lora_A [r, in], lora_B [out, r])}`` of a model that PEFT wrapped in place, as fp32
    CPU tensors, keyed by the layer's name in the unwrapped model (comparable across methods)."""
    factors = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and "default" in lora_a:
            factors[name] = (lora_a["default"].weight.detach().float().cpu(),
                             module.lora_B["default"].weight.detach().float().cpu())
    torch.save(factors, path)


def embedding_leaf_hook(module, args, output):
    """Make the embedding output a leaf that requires grad (backward to the activations only)."""
    return output.detach().requires_grad_(True)


def sequence_loss_sum(logits, input_ids):
    """Σ_n mean token loss of sequence n: loradafast's own loss (docs/design.md §3), called rather
    than copied, so that the floor computes exactly what the statistics pass does."""
    from loradafast.statistics.batches import Batch
    from loradafast.statistics.losses import causal_lm_sequence_losses

    batch = Batch({}, input_ids, torch.ones_like(input_ids), input_ids.shape[0])
    return causal_lm_sequence_losses(logits, batch)[0].sum()


def warm_up(model, ids, device) -> None:
    """One short forward+backward (kernel selection, lazy initialisation), outside the timing."""
    for p in model.parameters():
        p.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(embedding_leaf_hook)
    try:
        x = ids[:1, :16].to(device)
        with torch.enable_grad():
            sequence_loss_sum(model(input_ids=x, use_cache=False).logits, x).backward()
    finally:
        handle.remove()
    sync(device)
