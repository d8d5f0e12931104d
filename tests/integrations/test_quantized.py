"""Quantized bases (bitsandbytes Linear8bitLt / Linear4bit, its CPU backend): statistics and the
methods that never read or move the base weight; the others refuse before the pass."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model

import loradafast
from tiny import padded_batches, random_sequences, tiny_llama

bnb = pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "v_proj"]
# bitsandbytes repacks 4-bit weights for CPUs with AVX-512 BF16 (Intel Xeon since Sapphire Rapids) in
# blocks of 32 output rows, so a quantized layer there needs out % 32 == 0 and an even in: widths real
# models have.  hidden 64 with 4 heads, 2 of them key/value: q_proj 64 → 64, v_proj 64 → 32.
WIDTHS = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def _loader():
    return padded_batches(random_sequences(6), 3)


def _quantized(bits: int):
    """A tiny Llama whose q_proj/v_proj are bitsandbytes layers, and the float model with the
    dequantized weights (what the quantized layers compute)."""
    model, reference = tiny_llama(**WIDTHS), tiny_llama(**WIDTHS)
    for layer, ref in zip(model.model.layers, reference.model.layers):
        for name in TARGETS:
            linear = getattr(layer.self_attn, name)
            if bits == 8:
                q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
                q = q.to("cpu")
                dequantized = q.weight.CB.float() * q.weight.SCB[:, None].float() / 127
            else:
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                      compute_dtype=torch.float32, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
                q = q.to("cpu")
                dequantized = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
            setattr(layer.self_attn, name, q)
            getattr(ref.self_attn, name).weight.data.copy_(dequantized)
    setattr(model, f"is_loaded_in_{bits}bit", True)  # as transformers marks a bnb model; PEFT dispatches on it
    return model, reference


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("method", ["lora-da", "lora-one"])
def test_statistics_on_a_quantized_base(bits, method):
    model, reference = _quantized(bits)
    ours = loradafast.initialize(model, _loader(), 2, method=method, target_modules=TARGETS, progress=False)
    expected = loradafast.initialize(reference, _loader(), 2, method=method, target_modules=TARGETS, progress=False)
    # bitsandbytes' CPU matmuls round differently from the float model's: close, not equal.  The
    # 4-bit layers dequantize the weight and multiply in fp32; the 8-bit ones also round every input
    # to fp16 and then to int8 per row (about 1 %), which LoRA-DA's damped inverses amplify: up to
    # 9.6e-2 of the largest entry measured here, against 1.07-1.51 for statistics of other data.
    tolerance = 2e-2 if bits == 4 else 2e-1
    for name, layer in expected.layers.items():
        product = layer.lora_B @ layer.lora_A
        torch.testing.assert_close(ours.layers[name].lora_B @ ours.layers[name].lora_A, product,
                                   atol=tolerance * product.abs().max().item(), rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_get_peft_model_on_a_quantized_base(bits):
    model, _ = _quantized(bits)
    peft_model = loradafast.get_peft_model(model, LoraConfig(r=2, target_modules=TARGETS), loader=_loader(),
                                           progress=False)
    from peft.tuners.lora import bnb as peft_bnb

    lora_layers = [m for m in peft_model.modules() if isinstance(m, (peft_bnb.Linear8bitLt, peft_bnb.Linear4bit))]
    assert len(lora_layers) == 4  # PEFT's bitsandbytes LoRA layers, filled by loradafast
    result = peft_model.loradafast_result
    for m in lora_layers:
        assert not torch.equal(m.lora_B["default"].weight, torch.zeros_like(m.lora_B["default"].weight))
    assert len(result.layers) == 4
    out = peft_model(**_loader()[0], labels=_loader()[0]["input_ids"])
    out.loss.backward()  # and it trains
    assert all(m.lora_A["default"].weight.grad is not None for m in lora_layers)


@pytest.mark.parametrize("method", ["pissa", "milora", "lora-ga", "fisher-subspace"])
def test_weight_reading_methods_refuse_a_quantized_base(method):
    model, _ = _quantized(8)
    loader = None if method in loradafast.WEIGHT_ONLY_METHODS else _loader()
    before = {n: p.detach().clone() for n, p in model.state_dict().items() if torch.is_tensor(p)}
    with pytest.raises(ValueError, match="quantized.*lora-da"):
        loradafast.initialize(model, loader, 2, method=method, target_modules=TARGETS, progress=False)
    with pytest.raises(ValueError, match="quantized"):
        loradafast.get_peft_model(model, LoraConfig(r=2, target_modules=TARGETS), loader=loader, method=method,
                                  progress=False)
    assert not any("lora" in n for n, _ in model.named_modules())
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items())


def test_random_lora_and_collect_on_a_quantized_base():
    model, _ = _quantized(4)
    result = loradafast.initialize(model, None, 2, method="lora", target_modules=TARGETS, progress=False)
    assert {tuple(layer.lora_A.shape) for layer in result.layers.values()} == {(2, 64)}
    stats = loradafast.collect(model, _loader(), target_modules=TARGETS, progress=False)
    assert stats.layers["model.layers.0.self_attn.q_proj"].in_features == 64
    peft_model = peft_get_peft_model(model, LoraConfig(r=2, target_modules=TARGETS))
    loradafast.initialize(peft_model, stats=stats, progress=False)


def test_preprocess_on_a_quantized_base():
    model, _ = _quantized(8)
    config = LoraConfig(r=2, target_modules=TARGETS)
    with pytest.raises(ValueError, match="quantized"):
        loradafast.preprocess_lora_da(model, config, None, method="pissa", progress=False)
    result = loradafast.preprocess_lora_da(model, config, _loader(), progress=False)
    peft_model = loradafast.get_peft_model(model, config, progress=False)
    assert peft_model.loradafast_result is result and len(result.layers) == 4


def test_four_bit_layers_pack_for_avx512_cpus():
    """The repacking bitsandbytes does on AVX-512 BF16 CPUs (at the first forward without grad) is
    plain torch: run it here on every quantized layer, whatever this machine's CPU, so that widths
    it refuses fail on every machine and not only on Intel ones."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model, _ = _quantized(4)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4
    for m in layers:
        state = copy.deepcopy(m.weight.quant_state)
        packed, state = _convert_weight_packed_for_cpu(m.weight.data.clone(), state)
        assert packed.shape == (m.out_features, m.in_features // 2)
