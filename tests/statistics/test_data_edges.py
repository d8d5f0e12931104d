"""Data at the edges (issue 10, items 4-8): the padding side, in-place ops on a target's output,
ambiguous tuple batches and masks, empty distributed shards, inference mode, per-sample dicts,
sequence-classification labels and labels on padding."""
import os
import socket

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import loradafast
from model_state import ModelState
from tiny import assert_stats_close, padded_batches, random_sequences, tiny_gpt2, tiny_llama, toy_sequence_losses


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForMaskedLM(config).eval()


def token_losses(outputs, batch):
    """Masked-LM style: each unmasked token predicts its own label (no shift), mean per sequence."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    tok = F.cross_entropy(logits.float().transpose(1, 2), batch.labels, ignore_index=-100, reduction="none")
    return tok.sum(1) / (batch.labels != -100).sum(1).clamp(min=1)


def pad(seqs, batch_size, side, *, segments=False, labels=None, pad_id=0):
    """Dict batches padded on ``side``; ``segments`` adds token_type_ids (0 for the first half of
    each sequence, 1 for the rest); ``labels="ids"`` adds labels = input_ids, pads included."""
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        types = torch.zeros_like(ids)
        for j, s in enumerate(chunk):
            cols = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
            ids[j, cols] = s
            mask[j, cols] = 1
            types[j, cols] = (torch.arange(len(s)) >= len(s) // 2).long()
        batch = {"input_ids": ids, "attention_mask": mask}
        if segments:
            batch["token_type_ids"] = types
        if labels == "ids":
            batch["labels"] = ids.clone()
        out.append(batch)
    return out


# ---- item 4: left and right padding give the same statistics ------------------------------------

MODELS = {
    "gpt2": (tiny_gpt2, {}),
    "llama": (tiny_llama, {}),
    "bert": (tiny_bert, {"loss_fn": token_losses}),
}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_left_and_right_padding_agree(arch):
    factory, options = MODELS[arch]
    model = factory()
    seqs = random_sequences(7, lengths=(3, 14), seed=4)
    segments = arch == "bert"  # BERT also gets token_type_ids, padded like the ids

    def stats(side, batch_size):
        batches = pad(seqs, batch_size, side, segments=segments)
        return loradafast.collect(model, batches, y_factor="full", progress=False, **options)

    reference = stats("right", 1)  # one sequence per batch: no padding at all
    for batch_size in (2, 3, 7):
        assert_stats_close(stats("right", batch_size), reference)
        assert_stats_close(stats("left", batch_size), reference)


def test_roberta_positions_are_left_to_the_model():
    """RoBERTa numbers positions from input_ids, after padding_idx and skipping pads: already
    independent of the padding side, and 0-based derived ids would be wrong for it."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, pad_token_id=1,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = RobertaForMaskedLM(config).eval()
    seqs = [s.clamp(min=2) for s in random_sequences(5, lengths=(3, 14), seed=4)]  # no pad id inside

    def stats(side, batch_size):
        return loradafast.collect(model, pad(seqs, batch_size, side, pad_id=1), loss_fn=token_losses,
                                  progress=False)

    reference = stats("right", 1)
    assert_stats_close(stats("left", 5), reference)
    assert_stats_close(stats("right", 5), reference)


def test_user_position_ids_are_kept():
    """Position ids the batch brings are the user's choice: not replaced by derived ones."""
    model = tiny_gpt2()
    seqs = random_sequences(3, lengths=(4, 9), seed=2)
    left = pad(seqs, 3, "left")[0]
    shifted = dict(left, position_ids=torch.arange(left["input_ids"].shape[1]).expand_as(left["input_ids"]))
    derived = loradafast.collect(model, [left], progress=False)
    kept = loradafast.collect(model, [shifted], progress=False)
    name = "transformer.h.0.attn.c_attn"
    assert not torch.allclose(kept.G(name), derived.G(name), rtol=1e-3, atol=0)


# ---- item 5: in-place ops on a target layer's output --------------------------------------------

class InplaceToy(nn.Module):
    """embedding → proj → ReLU → proj2 → ReLU → head, with the ReLUs in place or not."""

    def __init__(self, inplace: bool, first: bool = True, later: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 5)
        self.act = nn.ReLU(inplace=inplace and first)
        self.proj2 = nn.Linear(5, 4)
        self.act2 = nn.ReLU(inplace=inplace and later)
        self.head = nn.Linear(4, 11)
        self.double()

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.act2(self.proj2(self.act(self.proj(self.embed(input_ids))))))


@pytest.mark.parametrize("first, later", [(True, False), (False, True), (True, True)])
def test_inplace_op_on_target_output(first, later):
    ids = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(0))
    options = dict(target_modules=["proj", "proj2"], loss_fn=toy_sequence_losses, y_factor="full", progress=False)
    inplace = InplaceToy(True, first, later)
    state = ModelState(inplace)
    got = loradafast.collect(inplace, [ids], **options)
    state.assert_unchanged()
    expected = loradafast.collect(InplaceToy(False), [ids], **options)
    assert_stats_close(got, expected, 1e-12)


class DetachingToy(InplaceToy):
    """proj2 sees a detached input: no gradient reaches proj, proj2 still gets its own."""

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.act2(self.proj2(self.act(self.proj(self.embed(input_ids))).detach())))


def test_under_no_grad_and_after_a_detach():
    ids = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(0))
    options = dict(loss_fn=toy_sequence_losses, progress=False)
    model = InplaceToy(True)
    expected = loradafast.collect(model, [ids], target_modules=["proj", "proj2"], **options)
    with torch.no_grad():  # the pass turns gradients on itself
        assert_stats_close(loradafast.collect(model, [ids], target_modules=["proj", "proj2"], **options),
                           expected, 1e-12)
    detaching = DetachingToy(True)
    with pytest.raises(RuntimeError, match="'proj' received no gradient"):
        loradafast.collect(detaching, [ids], target_modules=["proj", "proj2"], **options)
    only = loradafast.collect(detaching, [ids], target_modules=["proj2"], **options)
    torch.testing.assert_close(only.G("proj2"), expected.G("proj2"), rtol=1e-12, atol=0)


class ScaleInPlaceThen(nn.Module):
    """An in-place op that changes nothing numerically, then ``act``."""

    def __init__(self, act):
        super().__init__()
        self.inner = act

    def forward(self, x):
        return self.inner(x.mul_(1.0))


def test_inplace_op_after_hf_target():
    """An in-place op on a transformers layer's output (a GPT-2 Conv1D, whose output is a view)."""
    model = tiny_gpt2()
    batches = padded_batches(random_sequences(4), 2)
    expected = loradafast.collect(model, batches, progress=False)
    mlp = model.transformer.h[0].mlp
    original = mlp.act
    mlp.act = ScaleInPlaceThen(original)
    try:
        got = loradafast.collect(model, batches, progress=False)
    finally:
        mlp.act = original
    assert_stats_close(got, expected)


# ---- item 6: ambiguous tuples and masks that are not 0/1 ----------------------------------------

def test_tensor_dataset_pair_is_refused():
    from torch.utils.data import DataLoader, TensorDataset

    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 6))
    labels = ids.clone()
    labels[:, :2] = -100
    loader = DataLoader(TensorDataset(ids, labels), batch_size=2)
    state = ModelState(model)
    with pytest.raises(TypeError, match=r"dict.*'input_ids'.*'attention_mask'.*'labels'"):
        loradafast.collect(model, loader, progress=False)
    state.assert_unchanged()
    for raw in ([ids, torch.ones_like(ids)], (ids, torch.ones_like(ids), ids)):
        with pytest.raises(TypeError, match="ambiguous"):
            loradafast.collect(model, [raw], progress=False)


def test_one_tuple_is_input_ids():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 6))
    assert_stats_close(loradafast.collect(model, [(ids,)], progress=False),
                       loradafast.collect(model, [{"input_ids": ids}], progress=False), 1e-7)


@pytest.mark.parametrize("bad", [-100, 2, 0.5])
def test_mask_must_be_zero_or_one(bad):
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.ones(2, 6)
    mask[1, 0] = bad
    state = ModelState(model)
    with pytest.raises(ValueError, match="attention_mask.*0 and 1"):
        loradafast.collect(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    state.assert_unchanged()


def test_bool_float_and_int_masks_agree():
    model = tiny_llama()
    batch = padded_batches(random_sequences(3), 3)[0]
    as_int = loradafast.collect(model, [batch], progress=False)
    for dtype in (torch.bool, torch.float32):
        other = dict(batch, attention_mask=batch["attention_mask"].to(dtype))
        assert_stats_close(loradafast.collect(model, [other], progress=False), as_int, 1e-7)


# ---- item 7: an empty shard in a distributed pass -----------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world, port, scenarios, out_dir):
    """Run ``collect`` once per scenario (one shard per rank each, or ``(shards, factors)``) and save
    what each run gave."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = []
    try:
        for scenario in scenarios:
            shards, factors = scenario if isinstance(scenario, tuple) else (scenario, None)
            try:
                results.append({"stats": loradafast.collect(tiny_llama(), shards[rank], y_factor="full",
                                                            progress=False, factors=factors)})
            except Exception as e:  # noqa: BLE001 - the parent checks the message
                results.append({"error": f"{type(e).__name__}: {e}"})
    finally:
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
        dist.destroy_process_group()


def _run_distributed(scenarios, world, out_dir):
    """Per scenario, the list of what each rank got; fails (after killing them) if a rank hangs."""
    ctx = torch.multiprocessing.get_context("spawn")  # fork is unsafe once torch has started threads
    port = _free_port()
    procs = [ctx.Process(target=_distributed_worker, args=(r, world, port, scenarios, str(out_dir)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    per_rank = [torch.load(out_dir / f"{r}.pt", weights_only=False) for r in range(world)]
    return list(zip(*per_rank))


def test_distributed_empty_shard(tmp_path):
    batches = padded_batches(random_sequences(5, lengths=(3, 12), seed=7), 2)
    # Rank 1 empty; then every rank empty.
    some, none = _run_distributed([[batches, []], [[], []]], 2, tmp_path)
    assert all("error" not in r for r in some), [r.get("error") for r in some]
    union = loradafast.collect(tiny_llama(), batches, y_factor="full", progress=False)
    a, b = (r["stats"] for r in some)
    assert_stats_close(a, union)
    assert a.num_tokens == b.num_tokens and a.num_sequences == b.num_sequences
    for name in a.layers:
        assert a.layers[name].input_group == b.layers[name].input_group
        assert torch.equal(a.layers[name].g_sum, b.layers[name].g_sum)
        assert torch.equal(a.layers[name].y_sum, b.layers[name].y_sum)
    assert a.z_sums.keys() == b.z_sums.keys() and all(torch.equal(a.z_sums[k], b.z_sums[k]) for k in a.z_sums)
    # Every rank empty: the same clear error on every rank, and no hang.
    for r in none:
        assert "no sequence" in r.get("error", "") and "on any rank" in r["error"], r


def test_distributed_g_only_empty_shard(tmp_path):
    """A G-only pass reduces G alone, also from a rank that saw no batch (zeros made for G only)."""
    batches = padded_batches(random_sequences(5, lengths=(3, 12), seed=7), 2)
    (some,) = _run_distributed([([batches, []], {"G"})], 2, tmp_path)
    assert all("error" not in r for r in some), [r.get("error") for r in some]
    # No halves in the reference either (a distributed pass keeps none): the same summation order.
    union = loradafast.collect(tiny_llama(), batches, progress=False, factors={"G"}, split_halves=False)
    for stats in (r["stats"] for r in some):
        assert stats.factors == {"G"} and stats.z_sums == {} and stats.y_factor is None
        assert (stats.num_tokens, stats.num_sequences) == (union.num_tokens, union.num_sequences)
        for name, layer in union.layers.items():
            assert stats.layers[name].y_sum is None
            torch.testing.assert_close(stats.layers[name].g_sum, layer.g_sum, rtol=0, atol=0)


# ---- item 8: smaller ones ------------------------------------------------------------------------

def test_inference_mode_is_named():
    model = tiny_llama()
    state = ModelState(model)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            loradafast.collect(model, padded_batches(random_sequences(2), 2), progress=False)
        with pytest.raises(RuntimeError, match="inference_mode"):
            loradafast.initialize(model, padded_batches(random_sequences(2), 2), rank=2, progress=False)
    state.assert_unchanged()
    with torch.inference_mode():
        built_there = tiny_llama()
    with pytest.raises(RuntimeError, match="created under torch.inference_mode"):
        loradafast.collect(built_there, padded_batches(random_sequences(2), 2), progress=False)


def test_list_of_per_sample_dicts():
    model = tiny_llama()
    samples = [{"input_ids": torch.randint(0, 97, (6,)), "attention_mask": torch.ones(6, dtype=torch.long)}
               for _ in range(2)]
    state = ModelState(model)
    with pytest.raises(TypeError, match="collate"):
        loradafast.collect(model, [samples], progress=False)
    state.assert_unchanged()


def test_sequence_classification_labels_with_loss_fn():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         num_labels=3, pad_token_id=0, attn_implementation="eager")
    model = LlamaForSequenceClassification(config).eval()
    seqs = [s.clamp(min=1) for s in random_sequences(4, lengths=(4, 9))]  # no pad id inside
    classes = torch.tensor([0, 2, 1, 2])
    batches = [dict(b, labels=classes[i * 2:i * 2 + 2]) for i, b in enumerate(padded_batches(seqs, 2))]

    def per_sequence_ce(outputs, batch):
        return F.cross_entropy(outputs.logits.float(), batch.labels, reduction="none")

    stats = loradafast.collect(model, batches, loss_fn=per_sequence_ce, progress=False)
    assert stats.num_sequences == 4
    # G is the gradient of the mean per-sequence loss.
    ref = __import__("copy").deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    for s, c in zip(seqs, classes):
        (F.cross_entropy(ref(input_ids=s[None]).logits, c[None]) / 4).backward()
    modules = dict(ref.named_modules())
    for name in stats.layers:
        expected = modules[name].weight.grad
        err = (stats.G(name, torch.float32) - expected).abs().max() / expected.abs().max()
        assert err < 1e-4, (name, float(err))


@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_on_padding_are_ignored(side):
    model = tiny_llama()
    seqs = random_sequences(8, lengths=(3, 14), seed=3)
    one = loradafast.collect(model, pad(seqs, 1, side, labels="ids"), progress=False)
    four = loradafast.collect(model, pad(seqs, 4, side, labels="ids"), progress=False)
    assert_stats_close(four, one)
    assert one.num_tokens == sum(len(s) for s in seqs)
