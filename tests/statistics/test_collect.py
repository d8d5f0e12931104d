"""The statistics pass: G is the autograd gradient of the mean per-sequence loss, statistics do
not depend on batching or padding, inputs are shared by identity, and the model is left as it
was."""
import copy

import pytest
import torch

import loradafast
from loradafast.statistics.batches import IGNORE_INDEX
from tiny import assert_stats_close, padded_batches, random_sequences, tiny_gpt2, tiny_llama


def _autograd_mean_sequence_loss_grads(model, seqs):
    """∇_W (1/n) Σ_n ℓ_n with ℓ_n the mean next-token loss of sequence n, one sequence at a time."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad()
    for s in seqs:
        out = model(input_ids=s[None])
        loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], s[1:])
        (loss / len(seqs)).backward()
    return {n: m.weight.grad for n, m in model.named_modules() if hasattr(m, "weight") and m.weight.grad is not None}


@pytest.mark.parametrize("factory, conv1d", [(tiny_llama, False), (tiny_gpt2, True)])
def test_G_is_autograd_gradient_of_mean_sequence_loss(factory, conv1d):
    model = factory()
    seqs = random_sequences(6)
    stats = loradafast.collect(model, padded_batches(seqs, 3), progress=False)
    grads = _autograd_mean_sequence_loss_grads(model, seqs)
    assert stats.num_sequences == 6
    assert stats.num_tokens == sum(len(s) for s in seqs)
    assert len(stats.layers) >= 8
    for name in stats.layers:
        expected = grads[name].T if conv1d else grads[name]  # Conv1D stores [in, out]
        err = (stats.G(name, torch.float32) - expected).abs().max() / expected.abs().max()
        assert err < 1e-4, (name, float(err))


@pytest.mark.parametrize("y_factor", ["diag", "full"])
def test_batch_size_one_equals_padded_batches(y_factor):
    model = tiny_llama()
    seqs = random_sequences(8, lengths=(3, 14))
    one = loradafast.collect(model, padded_batches(seqs, 1), y_factor=y_factor, progress=False)
    four = loradafast.collect(model, padded_batches(seqs, 4), y_factor=y_factor, progress=False)
    # Only fp32 summation order differs (and padded attention rows): round-off level.
    assert_stats_close(four, one, 1e-5)


def test_loader_formats_agree():
    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(5))
    as_dict = loradafast.collect(model, [{"input_ids": ids}], progress=False)
    as_tuple = loradafast.collect(model, [(ids,)], progress=False)  # longer tuples are ambiguous: refused
    as_tensor = loradafast.collect(model, [ids[:2], ids[2:]], progress=False)
    assert_stats_close(as_tuple, as_dict, 1e-6)
    assert_stats_close(as_tensor, as_dict, 1e-5)


def test_labels_and_max_samples():
    model = tiny_llama()
    seqs = random_sequences(6, lengths=(6, 6))
    batches = padded_batches(seqs, 3)
    limited = loradafast.collect(model, batches, max_samples=4, progress=False)
    first4 = loradafast.collect(model, padded_batches(seqs[:4], 4), progress=False)
    assert_stats_close(limited, first4, 1e-5)
    # A sequence whose labels are all ignored adds nothing: no tokens, no sequence.
    b = dict(batches[0])
    labels = b["input_ids"].clone()
    labels[1] = IGNORE_INDEX
    b["labels"] = labels
    masked = loradafast.collect(model, [b], progress=False)
    others = loradafast.collect(model, [{"input_ids": b["input_ids"][[0, 2]]}], progress=False)
    assert_stats_close(masked, others, 1e-5)


def test_shared_inputs_share_Z_by_identity():
    stats = loradafast.collect(tiny_llama(), padded_batches(random_sequences(2), 2), progress=False)
    key = {n: s.input_group for n, s in stats.layers.items()}
    for i in range(2):
        p = f"model.layers.{i}."
        assert key[p + "self_attn.q_proj"] == key[p + "self_attn.k_proj"] == key[p + "self_attn.v_proj"]
        assert key[p + "mlp.gate_proj"] == key[p + "mlp.up_proj"]
        assert key[p + "self_attn.o_proj"] == p + "self_attn.o_proj"
        assert key[p + "mlp.down_proj"] == p + "mlp.down_proj"
        assert key[p + "self_attn.q_proj"] != key[p + "mlp.gate_proj"]
    assert len(stats.z_sums) == 8


def _snapshot(model):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
         for n, m in model.named_modules()},
        {n: p.grad for n, p in model.named_parameters()},
    )


def test_model_state_restored_frozen_or_trainable():
    model = tiny_llama()
    model.train()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
    before = _snapshot(model)
    stats = loradafast.collect(model, padded_batches(random_sequences(3), 3), progress=False)
    after = _snapshot(model)
    for x, y in zip(before[0].values(), after[0].values()):
        assert torch.equal(x, y)
    assert before[1:4] == after[1:4]
    assert all(g is None for g in after[4].values())  # no .grad materialised
    # A fully frozen model works the same.
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = loradafast.collect(model, padded_batches(random_sequences(3), 3), progress=False)
    assert_stats_close(frozen, stats, 1e-6)


def test_statistics_roundtrip(tmp_path):
    stats = loradafast.collect(tiny_llama(), padded_batches(random_sequences(4), 2), y_factor="full",
                               progress=False)
    stats.save(tmp_path / "stats.safetensors")
    loaded = loradafast.Statistics.load(tmp_path / "stats.safetensors")
    assert loaded.y_factor == "full" and loaded.meta["model_class"] == "LlamaForCausalLM"
    for name in stats.layers:
        assert torch.equal(loaded.layers[name].g_sum, stats.layers[name].g_sum)
        assert torch.equal(loaded.Z(name), stats.Z(name))
        assert torch.equal(loaded.Y(name), stats.Y(name))
    a = loradafast.solve(stats, 4)
    b = loradafast.solve(loaded, 4)
    for name in a.layers:
        assert torch.equal(a.layers[name].lora_A, b.layers[name].lora_A)
