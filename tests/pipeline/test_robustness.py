"""A catalogue of bad or unusual inputs (issue "Robustness").

Each case asserts a clear error (what was wrong and what to do) or the correct handling, and that
the model's parameters, buffers, requires_grad flags, train/eval modes and hooks are exactly as
before the call.
"""
import dataclasses
import json

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model
from torch import nn

import loradafast
from model_state import ModelState
from tiny import ToyTokenModel, padded_batches, random_sequences, tiny_gpt2, tiny_llama, toy_sequence_losses


@pytest.fixture
def llama():
    model = tiny_llama()
    model.train()  # a model in training mode, with a mix of frozen and trainable parameters
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 0)
    return model


def batches(n=4, bs=2, **kw):
    return padded_batches(random_sequences(n, **kw), bs)


def expect_error(model, exc, match, call):
    state = ModelState(model)
    with pytest.raises(exc, match=match):
        call()
    state.assert_unchanged()


# ---- the loader and its batches ------------------------------------------------------------------

def test_empty_loader(llama):
    expect_error(llama, ValueError, "no sequence", lambda: loradafast.initialize(llama, [], progress=False))


def test_batch_without_input_ids(llama):
    expect_error(llama, ValueError, "input_ids", lambda: loradafast.initialize(
        llama, [{"attention_mask": torch.ones(2, 5)}], progress=False))


@pytest.mark.parametrize("raw", ["some text", 42, [1, 2, 3, 4, 5], {"input_ids": [[1, 2, 3]]}])
def test_batch_of_unexpected_type(llama, raw):
    expect_error(llama, (TypeError, ValueError), "input_ids|loader must yield",
                 lambda: loradafast.initialize(llama, [raw], progress=False))


def test_float_input_ids(llama):
    expect_error(llama, ValueError, "integer tensor", lambda: loradafast.initialize(
        llama, [torch.rand(2, 5)], progress=False))


def test_mismatched_mask_and_labels(llama):
    ids = torch.randint(0, 97, (2, 6))
    expect_error(llama, ValueError, "attention_mask", lambda: loradafast.initialize(
        llama, [{"input_ids": ids, "attention_mask": torch.ones(2, 5)}], progress=False))
    expect_error(llama, ValueError, "labels", lambda: loradafast.initialize(
        llama, [{"input_ids": ids, "labels": ids[:, :3]}], progress=False))


def test_all_tokens_masked(llama):
    ids = torch.randint(0, 97, (2, 6))
    expect_error(llama, ValueError, "-100", lambda: loradafast.initialize(
        llama, [{"input_ids": ids, "labels": torch.full_like(ids, -100)}], progress=False))
    # Sequences of one token have no next token to predict.
    expect_error(llama, ValueError, "no sequence with a label", lambda: loradafast.initialize(
        llama, [torch.randint(0, 97, (3, 1))], progress=False))


def test_loader_raising_mid_pass(llama):
    def loader():
        yield from batches(2, 2)
        raise RuntimeError("disk on fire")

    expect_error(llama, RuntimeError, "disk on fire", lambda: loradafast.initialize(llama, loader(), progress=False))


def test_keyboard_interrupt_mid_pass(llama):
    def loader():
        yield from batches(2, 2)
        raise KeyboardInterrupt

    expect_error(llama, KeyboardInterrupt, None, lambda: loradafast.initialize(llama, loader(), progress=False))


def test_max_samples_smaller_than_one_batch(llama):
    seqs = random_sequences(6, lengths=(7, 7))
    state = ModelState(llama)
    few = loradafast.collect(llama, padded_batches(seqs, 6), max_samples=2, progress=False)
    state.assert_unchanged()
    ref = loradafast.collect(llama, padded_batches(seqs[:2], 2), progress=False)
    assert few.num_sequences == 2 and few.num_tokens == 14
    for name in ref.layers:
        torch.testing.assert_close(few.G(name), ref.G(name))
    expect_error(llama, ValueError, "max_samples", lambda: loradafast.initialize(
        llama, batches(), max_samples=0, progress=False))


def test_sequences_longer_than_context(llama):
    too_long = torch.randint(0, 97, (1, llama.config.max_position_embeddings + 1))
    expect_error(llama, ValueError, "truncate", lambda: loradafast.initialize(llama, [too_long], progress=False))


# ---- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, -3, 25, 2.5])
def test_rank_out_of_range(llama, rank):
    # 25 > min(in, out) = 12 of k_proj; checked before the pass.
    expect_error(llama, ValueError, "rank", lambda: loradafast.initialize(llama, batches(), rank, progress=False))


def test_target_modules_matching_nothing(llama):
    expect_error(llama, ValueError, "matches no", lambda: loradafast.initialize(
        llama, batches(), target_modules=["no_such_proj"], progress=False))


@pytest.mark.parametrize("option, value, match", [
    ("method", "lora-xx", "unknown method"),
    ("y_factor", "kron", "y_factor"),
    ("damping_mode", "adaptive", "damping_mode"),
    ("gradient", "adam", "gradient"),
    ("beta", -1.0, "beta"),
    ("beta", float("nan"), "finite"),
    ("num_train_samples", 0, "num_train_samples"),
    ("loraga_variant", "x", "loraga_variant"),
])
def test_bad_option_values_fail_before_the_pass(llama, option, value, match):
    def never():
        raise AssertionError("the loader must not be touched when an option is invalid")
        yield

    expect_error(llama, ValueError, match, lambda: loradafast.initialize(
        llama, never(), progress=False, **{option: value}))


def test_unknown_keyword(llama):
    expect_error(llama, TypeError, "unexpected keyword", lambda: loradafast.initialize(
        llama, batches(), progress=False, rnak=4))


def test_not_a_causal_lm_without_loss_fn():
    model = ToyTokenModel()
    expect_error(model, ValueError, "loss_fn", lambda: loradafast.initialize(
        model, batches(), 2, target_modules=["proj"], progress=False))
    bad_loss = lambda outputs, batch: outputs.mean()  # noqa: E731 - one number, not one per sequence
    expect_error(model, ValueError, "one mean loss per sequence", lambda: loradafast.initialize(
        model, [torch.randint(0, 11, (2, 4))], 2, target_modules=["proj"], loss_fn=bad_loss, progress=False))


# ---- numerics ------------------------------------------------------------------------------------

def test_nan_in_weights_gives_non_finite_loss_error(llama):
    with torch.no_grad():
        llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    expect_error(llama, FloatingPointError, "not finite", lambda: loradafast.initialize(
        llama, batches(), progress=False))


def test_infinite_gradients_give_non_finite_statistics_error():
    model = ToyTokenModel()

    def loss_with_infinite_gradient(outputs, batch):
        # sqrt at 0: the value is finite (0), its derivative is infinite.
        return torch.sqrt((outputs - outputs.detach()).abs().sum((1, 2)))

    expect_error(model, FloatingPointError, "non-finite", lambda: loradafast.initialize(
        model, [torch.randint(0, 11, (2, 4))], 2, target_modules=["proj"], loss_fn=loss_with_infinite_gradient,
        progress=False))


def test_zero_gradient_layer():
    model = ToyTokenModel()
    with torch.no_grad():
        model.embed.weight.zero_()  # proj sees only zeros: G = 0, no direction to follow
    expect_error(model, FloatingPointError, "zero", lambda: loradafast.initialize(
        model, [torch.randint(0, 11, (2, 4))], rank=2, target_modules=["proj"], loss_fn=toy_sequence_losses,
        progress=False))


def test_non_finite_factors_are_refused_before_anything_is_applied(llama, monkeypatch):
    import dataclasses

    from loradafast.methods import registry

    record = registry.REGISTRY["lora-ga"]

    def solve_with_a_nan(problem, config):
        factors = record.solve(problem, config)
        name = sorted(factors)[1]
        factors[name].lora_B[0, 0] = float("nan")
        return factors

    monkeypatch.setitem(registry.REGISTRY, "lora-ga", dataclasses.replace(record, solve=solve_with_a_nan))
    expect_error(llama, FloatingPointError, "produced non-finite factors .* for 1 layer.*nothing was applied",
                 lambda: loradafast.get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                                                   loader=batches(), method="lora-ga", progress=False))


def test_singular_factors_without_damping():
    model = ToyTokenModel(d_in=5)
    with torch.no_grad():
        model.embed.weight[:, 0] = 0  # one input direction never excited: Z is singular
    expect_error(model, torch.linalg.LinAlgError, "increase damping", lambda: loradafast.initialize(
        model, [torch.randint(0, 11, (3, 6))], rank=2, target_modules=["proj"], loss_fn=toy_sequence_losses,
        damping=0.0, progress=False))
    # With the default damping the same statistics solve, and the damping used is reported.
    result = loradafast.initialize(model, [torch.randint(0, 11, (3, 6))], rank=2, target_modules=["proj"],
                                   loss_fn=toy_sequence_losses, progress=False)
    assert result.layers["proj"].diagnostics["damping_z"] == 1e-6


# ---- models --------------------------------------------------------------------------------------

def test_peft_model_with_different_rank():
    peft_model = peft_get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    expect_error(peft_model, ValueError, "rank", lambda: loradafast.initialize(
        peft_model, batches(), rank=8, progress=False))
    expect_error(peft_model, ValueError, "target_modules", lambda: loradafast.initialize(
        peft_model, batches(), target_modules=["v_proj"], progress=False))


class FakeLinear4bit(nn.Linear):
    """Shaped like bitsandbytes' Linear4bit: a Linear subclass whose weight is packed uint8."""

    def __init__(self, fin, fout):
        super().__init__(fin, fout, bias=False)
        self.weight = nn.Parameter(torch.zeros(fout * fin // 2, 1, dtype=torch.uint8), requires_grad=False)
        self.dequantized = torch.zeros(fout, fin)

    def forward(self, x):
        return nn.functional.linear(x, self.dequantized.to(x.dtype))


def test_quantized_base_layers():
    """Methods that read or move the weight refuse a quantized layer before the pass (the others
    run on it: tests/integrations/test_quantized.py, with bitsandbytes)."""
    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj = FakeLinear4bit(24, 24)
    for method in ("pissa", "lora-ga"):
        expect_error(model, ValueError, "quantized", lambda method=method: loradafast.initialize(
            model, None if method == "pissa" else batches(), 2, method=method, progress=False))
    # Not targeted, not a problem.
    loradafast.initialize(model, batches(), target_modules=["v_proj"], method="pissa", progress=False)


def test_gradient_checkpointing_is_refused():
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    model.train()
    expect_error(model, ValueError, "gradient_checkpointing_disable", lambda: loradafast.initialize(
        model, batches(), progress=False))


def test_model_and_batch_dtypes():
    model = tiny_llama(dtype=torch.bfloat16)
    state = ModelState(model)
    result = loradafast.initialize(model, batches(), rank=2, progress=False)
    state.assert_unchanged()
    assert all(torch.isfinite(layer.lora_B).all() for layer in result.layers.values())
    assert all(layer.lora_A.dtype == torch.float32 for layer in result.layers.values())


def test_statistics_file_whose_tensors_contradict_its_header(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    stats = loradafast.collect(tiny_llama(hidden_size=48), batches(), progress=False)
    stats.save(tmp_path / "s.safetensors")
    tensors = load_file(tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["loradafast"])
    name = "model.layers.0.self_attn.o_proj"
    header["layers"][name][0] = 32  # says 32 wide; its G and Z are 48 wide
    save_file(tensors, tmp_path / "edited.safetensors", metadata={"loradafast": json.dumps(header)})
    with pytest.raises(ValueError, match="edited.safetensors.*header says.*delete"):
        loradafast.Statistics.load(tmp_path / "edited.safetensors")

    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors.*delete it"):
        loradafast.Statistics.load(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError):
        loradafast.Statistics.load(tmp_path / "absent.safetensors")


def test_timings_with_saved_statistics_keep_the_solve_out_of_the_pass():
    model = tiny_llama()
    stats = loradafast.collect(model, batches(), progress=False)
    result = loradafast.initialize(model, stats=stats, rank=2, progress=False)
    t = result.timings
    # pass_s is what replaced the pass (reading and checking the statistics), not the solve as well.
    assert t["pass_s"] + t["solve_s"] + t["apply_s"] <= t["total_s"]


def test_statistics_of_another_model_with_the_same_shapes_are_refused(tmp_path):
    stats = loradafast.collect(tiny_llama(seed=0), batches(), progress=False)
    stats.save(tmp_path / "a.safetensors")
    other = tiny_llama(seed=1)  # same architecture and shapes, other weights
    for given in (stats, tmp_path / "a.safetensors"):
        expect_error(other, ValueError, "another model", lambda given=given: loradafast.initialize(
            other, stats=given, rank=2, progress=False))
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    expect_error(other, ValueError, "another model", lambda: loradafast.preprocess_lora_da(
        other, config, batches(), cache_file=tmp_path / "a.safetensors", progress=False))
    expect_error(other, ValueError, "another model", lambda: loradafast.get_peft_model(
        other, config, stats=tmp_path / "a.safetensors", progress=False))
    # The same weights in bf16 are the same model: accepted.
    same = tiny_llama(seed=0, dtype=torch.bfloat16)
    loradafast.initialize(same, stats=stats, rank=2, progress=False)


def test_a_cache_file_of_other_data_is_refused(tmp_path):
    cache = tmp_path / "stats.safetensors"
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    loradafast.preprocess_lora_da(tiny_llama(), config, batches(6, 2), cache_file=cache, progress=False)
    model = tiny_llama()
    expect_error(model, ValueError, "other samples.*delete the file", lambda: loradafast.preprocess_lora_da(
        model, config, batches(6, 2, seed=5), cache_file=cache, progress=False))
    # The same samples in other batches (other padding) are the same data; no loader: reused as it is.
    loradafast.preprocess_lora_da(model, config, batches(6, 3), cache_file=cache, progress=False)
    loradafast.preprocess_lora_da(tiny_llama(), config, cache_file=cache, progress=False)
    # max_samples takes another subset: other data.
    expect_error(model, ValueError, "other samples", lambda: loradafast.preprocess_lora_da(
        model, config, batches(6, 2), cache_file=cache, max_samples=4, progress=False))


def test_one_ranks_share_of_an_owner_pass_is_refused():
    stats = loradafast.collect(tiny_llama(), batches(), progress=False)
    names = list(stats.layers)
    # What collect(reduce="owner") leaves on rank 0 of 2: its own layers and every layer's owner.
    owners = {n: i % 2 for i, n in enumerate(names)}
    share = dataclasses.replace(stats, layers={n: s for n, s in stats.layers.items() if owners[n] == 0},
                                meta={**stats.meta, "owners": owners, "rank": 0, "world_size": 2})
    with pytest.raises(ValueError, match="rank 0's share.*reduce='all'"):
        loradafast.solve(share, 2)
    model = tiny_llama()
    expect_error(model, ValueError, "rank 0's share", lambda: loradafast.initialize(model, stats=share, rank=2,
                                                                                    progress=False))


def test_statistics_of_another_version_or_model(tmp_path):
    stats = loradafast.collect(tiny_llama(), batches(), progress=False)
    stats.save(tmp_path / "s.safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "s.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["loradafast"])
    header["format_version"] = 999
    save_file(tensors, tmp_path / "future.safetensors", metadata={"loradafast": json.dumps(header)})
    with pytest.raises(ValueError, match="format version"):
        loradafast.Statistics.load(tmp_path / "future.safetensors")
    save_file(tensors, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a loradafast statistics"):
        loradafast.Statistics.load(tmp_path / "plain.safetensors")
    # Statistics of a Llama applied to a GPT-2: refused before anything is written.
    result = loradafast.solve(loradafast.Statistics.load(tmp_path / "s.safetensors"), 2)
    other = peft_get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    expect_error(other, ValueError, "no LoRA layer", lambda: result.apply_to(other))
    # Same names, other shapes: refused too.
    wider = peft_get_peft_model(tiny_llama(hidden_size=32), result.lora_config)
    expect_error(wider, ValueError, "same rank|shape|statistics|lora_A", lambda: result.apply_to(wider))


def test_get_peft_model_failure_leaves_model_unwrapped(llama):
    expect_error(llama, ValueError, "not found in the base model", lambda: loradafast.get_peft_model(
        llama, batches(), LoraConfig(r=2, target_modules=["nothing_here"]), progress=False))


# ---- determinism ---------------------------------------------------------------------------------

def test_bitwise_deterministic_on_cpu():
    def run():
        return loradafast.initialize(tiny_llama(), batches(6, 3), rank=3, progress=False)

    a, b = run(), run()
    for name in a.layers:
        assert torch.equal(a.layers[name].lora_A, b.layers[name].lora_A)
        assert torch.equal(a.layers[name].lora_B, b.layers[name].lora_B)
