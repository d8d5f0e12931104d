"""End to end on tiny Llama and GPT-2: adapters that PEFT loads, in-place filling of PEFT models."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as peft_get_peft_model

import loradafast
from tiny import padded_batches, random_sequences, tiny_gpt2, tiny_llama

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", list(FACTORIES))
def test_saved_adapter_loads_in_vanilla_peft_with_same_logits(arch, tmp_path):
    model = FACTORIES[arch]()
    pristine = copy.deepcopy(model)
    loader = padded_batches(random_sequences(6), 3)
    result = loradafast.initialize(model, loader, rank=4, lora_alpha=16, progress=False)
    # The plain model is not touched.
    for (n, p), q in zip(model.named_parameters(), pristine.parameters()):
        assert torch.equal(p, q), n
    assert result.layers and all(l.rank == 4 for l in result.layers.values())
    assert set(result.timings) >= {"pass_s", "solve_s", "apply_s"}

    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(9))
    in_memory = result.apply_to(peft_get_peft_model(copy.deepcopy(pristine), result.lora_config))
    result.save(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded, ids), _logits(in_memory, ids), rtol=0, atol=0)
    # The initialisation is not a no-op: B ≠ 0, so the adapted model differs from the base.
    assert not torch.allclose(_logits(loaded, ids), _logits(pristine, ids))
    # Every targeted layer got our factors.
    sd = loaded.state_dict()
    for name, layer in result.layers.items():
        key = f"base_model.model.{name}.lora_A.default.weight"
        assert torch.equal(sd[key], layer.lora_A)


def test_initialize_fills_peft_model_in_place_with_its_config():
    model = tiny_llama()
    loader = padded_batches(random_sequences(6), 3)
    reference = loradafast.initialize(copy.deepcopy(model), loader, rank=2, target_modules=["q_proj", "v_proj"],
                                      progress=False)
    peft_model = peft_get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    result = loradafast.initialize(peft_model, loader, progress=False)
    assert result.lora_alpha == 4 and result.rank == 2
    assert set(result.layers) == set(reference.layers) and len(result.layers) == 4
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            rel = name[len("base_model.model."):]
            assert torch.equal(module.lora_A["default"].weight, reference.layers[rel].lora_A)
            assert torch.equal(module.lora_B["default"].weight, reference.layers[rel].lora_B)
    with pytest.raises(ValueError, match="rank"):
        loradafast.initialize(peft_model, loader, rank=8, progress=False)


def test_get_peft_model_matches_initialize_and_rank_pattern():
    model = tiny_gpt2()
    loader = padded_batches(random_sequences(4), 2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2},
                        fan_in_fan_out=True)
    peft_model = loradafast.get_peft_model(model, loader, config, progress=False)
    result = peft_model.loradafast_result
    ranks = {n: l.rank for n, l in result.layers.items()}
    assert ranks == {"transformer.h.0.attn.c_attn": 4, "transformer.h.0.mlp.c_fc": 2,
                     "transformer.h.1.attn.c_attn": 4, "transformer.h.1.mlp.c_fc": 2}
    layer = peft_model.base_model.model.transformer.h[1].mlp.c_fc
    assert torch.equal(layer.lora_B["default"].weight, result.layers["transformer.h.1.mlp.c_fc"].lora_B)
