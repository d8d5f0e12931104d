"""The memory planner (issue 12 item 4, docs/design.md §6.4): budgets that force one, two and many
statistics passes give the one-pass adapters; the statistics held stay within the plan; budgets
too small and loaders that cannot be iterated again fail clearly, with the model untouched."""
import dataclasses
import functools
import math
import weakref

import pytest
import torch
from peft import LoraConfig

import loradafast
from loradafast import passes, planner
from loradafast.methods import registry
from loradafast.statistics import hooks
from loradafast.statistics.probe import input_groups, probe
from loradafast.targets import find_targets
from model_state import ModelState
from tiny import padded_batches, random_sequences, tiny_gpt2, tiny_llama

RANK = 2


def _batches():
    return padded_batches(random_sequences(6), 2)


def _memory(method: str) -> planner.MemoryModel:
    # What the method's pass collects (LoRA-GA: G alone) and one batch's activations, as initialize plans it.
    return registry.memory_model(loradafast.REGISTRY[method], y_factor="diag", solve_dtype=torch.float64,
                                 device_type="cpu", activation_bytes=_activations(method))


@functools.cache
def _activations(method: str) -> int:
    model = tiny_llama()
    return probe(model, _batches()[0], find_targets(model), loss_fn=None,
                 factors=frozenset(loradafast.REGISTRY[method].statistics)).activation_bytes


def _shapes(model, batches) -> list[planner.LayerShape]:
    targets = find_targets(model)
    groups = input_groups(model, batches[0], targets, loss_fn=None)
    return [planner.LayerShape(t.name, t.in_features, t.out_features, groups[t.name], RANK) for t in targets]


def _budget_for(shapes, memory, passes_wanted: str) -> int:
    """The smallest budget that gives one pass, the largest that gives two, or the smallest of all
    (as many passes as the packing makes)."""
    unlimited = planner.plan_passes(shapes, memory, None, "test")
    one, smallest = unlimited.peak_bytes, unlimited.smallest_budget_bytes
    if passes_wanted == "one":
        return one
    if passes_wanted == "many":
        return smallest
    for budget in range(one - 1, smallest - 1, -max(1, (one - smallest) // 400)):
        if planner.plan_passes(shapes, memory, budget, "test").num_passes == 2:
            return budget
    raise AssertionError("no budget gives two passes")


@pytest.fixture(scope="module")
def setup():
    model, batches = tiny_llama(), _batches()
    return model, batches, _shapes(model, batches)


@pytest.fixture(scope="module")
def one_pass(setup):
    model, batches, _ = setup
    # split_halves=False throughout: keeping the halves changes the totals' summation order (round-off),
    # and these tests compare plans of the same pass.
    return {m: loradafast.initialize(model, batches, RANK, method=m, memory_budget=math.inf, progress=False,
                                     split_halves=False)
            for m in ("lora-da", "lora-ga")}


@pytest.mark.parametrize("method", ["lora-da", "lora-ga"])
@pytest.mark.parametrize("wanted", ["one", "two", "many"])
def test_planned_passes_give_the_one_pass_adapters(setup, one_pass, monkeypatch, method, wanted):
    model, batches, shapes = setup
    budget = _budget_for(shapes, _memory(method), wanted)
    held = _track_statistics(monkeypatch)
    result = loradafast.initialize(model, batches, RANK, method=method, memory_budget=budget, progress=False,
                                   split_halves=False)
    plan = result.plan
    assert plan.num_passes == {"one": 1, "two": 2}.get(wanted, plan.num_passes)
    if wanted == "many":
        assert plan.num_passes >= 4
    assert plan.peak_bytes <= budget and plan.budget_bytes == budget
    # Whole input groups stay together, every layer in exactly one pass, in model order.
    assert [n for p in plan.passes for n in p.layers] == [s.name for s in shapes]
    group_of = {s.name: s.input_group for s in shapes}
    for p in plan.passes:
        assert {group_of[n] for n in p.layers} == set(p.input_groups)
    # The statistics each pass held: exactly the plan's, nothing left from an earlier pass.
    assert [h["collected"] for h in held] == [p.statistics_bytes for p in plan.passes]
    assert all(h["alive_before"] == 0 for h in held)
    reference = one_pass[method]
    assert list(result.layers) == list(reference.layers)
    for name, layer in reference.layers.items():
        torch.testing.assert_close(result.layers[name].lora_A, layer.lora_A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(result.layers[name].lora_B, layer.lora_B, rtol=1e-6, atol=1e-7)
    assert result.target_modules == reference.target_modules and result.moves_base == reference.moves_base


def _track_statistics(monkeypatch) -> list[dict]:
    """Wrap the pass's collect: the bytes of each pass's statistics, and of every earlier pass's
    statistics tensors still alive when the next pass starts."""
    held, refs = [], []
    real = passes.collect

    def tracked(*args, **kwargs):
        alive = sum(t.numel() * t.element_size() for r in refs if (t := r()) is not None)
        stats = real(*args, **kwargs)
        tensors = [*stats.z_sums.values()] + [t for s in stats.layers.values() for t in (s.g_sum, s.y_sum)
                                              if t is not None]  # LoRA-GA's pass collects G alone
        refs.extend(weakref.ref(t) for t in tensors)
        held.append({"collected": sum(t.numel() * t.element_size() for t in tensors), "alive_before": alive})
        return stats

    monkeypatch.setattr(passes, "collect", tracked)
    return held


def test_max_samples_is_the_same_in_every_pass(setup):
    model, batches, shapes = setup
    budget = _budget_for(shapes, _memory("lora-da"), "many")
    one = loradafast.initialize(model, batches, RANK, max_samples=3, memory_budget=math.inf, progress=False,
                                split_halves=False)
    many = loradafast.initialize(model, batches, RANK, max_samples=3, memory_budget=budget, progress=False,
                                 split_halves=False)
    assert many.plan.num_passes > 1
    for name, layer in one.layers.items():
        assert layer.diagnostics.num_sequences == many.layers[name].diagnostics.num_sequences == 3
        torch.testing.assert_close(many.layers[name].lora_B, layer.lora_B, rtol=1e-6, atol=1e-7)


def test_a_budget_too_small_names_the_group_and_leaves_the_model_alone(setup):
    model, batches, shapes = setup
    budget = _budget_for(shapes, _memory("lora-da"), "many") - 1
    state = ModelState(model)
    with pytest.raises(planner.MemoryBudgetError,
                       match=r"input group .* needs an estimated .* budget is .*no plan fits below"):
        loradafast.initialize(model, batches, RANK, memory_budget=budget, progress=False)
    state.assert_unchanged()
    fresh = tiny_llama()
    state = ModelState(fresh)
    with pytest.raises(planner.MemoryBudgetError, match="memory budget is 1 B"):
        loradafast.get_peft_model(fresh, batches, LoraConfig(r=2), memory_budget=1, progress=False)
    state.assert_unchanged()


def test_a_one_shot_iterator_needing_several_passes_is_refused(setup):
    model, batches, shapes = setup
    state = ModelState(model)
    with pytest.raises(ValueError, match="one-shot iterator"):
        loradafast.initialize(model, iter(batches), RANK, memory_budget=_budget_for(shapes, _memory("lora-da"), "two"),
                              progress=False)
    state.assert_unchanged()
    # One pass is fine: the probe's batch goes back in front of the iterator.
    one = loradafast.initialize(model, (b for b in batches), RANK, progress=False)
    again = loradafast.initialize(model, batches, RANK, progress=False)
    assert one.plan.num_passes == 1 and one.plan.budget_bytes is not None
    for name, layer in again.layers.items():
        torch.testing.assert_close(one.layers[name].lora_B, layer.lora_B, rtol=0, atol=0)


class _Reshuffled:
    """Re-iterable, but yields the batches in another order each time (a shuffling loader)."""

    def __init__(self, batches):
        self.batches, self.calls = batches, 0

    def __iter__(self):
        self.calls += 1
        return iter(self.batches if self.calls % 2 else self.batches[::-1])


def test_a_loader_that_changes_between_passes_is_refused(setup):
    model, batches, shapes = setup
    state = ModelState(model)
    with pytest.raises(ValueError, match="other samples in statistics pass 2"):
        loradafast.initialize(model, _Reshuffled(batches), RANK, max_samples=4, progress=False,
                              memory_budget=_budget_for(shapes, _memory("lora-da"), "two"))
    state.assert_unchanged()


def test_parse_bytes():
    assert planner.parse_bytes("40GB") == 40 * 10**9
    assert planner.parse_bytes(" 1.5 GiB") == 3 * 2**29
    assert planner.parse_bytes("512mib") == 512 * 2**20
    assert planner.parse_bytes(2e9) == 2 * 10**9
    assert planner.parse_bytes(math.inf) is None and planner.parse_bytes("unlimited") is None
    for bad in ("lots", "40 GX", -1, 0, float("nan")):
        with pytest.raises(ValueError, match="memory_budget"):
            planner.parse_bytes(bad)
    with pytest.raises(TypeError, match="memory_budget"):
        planner.parse_bytes(True)
    with pytest.raises(ValueError, match="memory_budget"):
        loradafast.initialize(tiny_llama(), None, 2, method="pissa", memory_budget="much")


def test_default_budget_on_cpu():
    budget, source = planner.default_budget("cpu")
    assert budget is None or (budget > 0 and "RAM" in source)


def test_default_budget_never_refuses_a_small_job(monkeypatch):
    # 10 GB free of 128 GB: "free less 10 % of the total" was 1 byte, which refused an 810 KB job.
    monkeypatch.setattr(planner, "_host_memory", lambda: (10 * 2**30, 128 * 2**30))
    budget, _ = planner.default_budget("cpu")
    assert budget == int(0.9 * 10 * 2**30)
    model = tiny_llama()
    result = loradafast.initialize(model, padded_batches(random_sequences(4), 2), 2, progress=False)
    assert result.plan.budget_bytes == budget and result.plan.num_passes == 1
    monkeypatch.setattr(planner, "_host_memory", lambda: (100 * 2**30, 128 * 2**30))
    assert planner.default_budget("cpu")[0] == int(0.9 * 100 * 2**30)


def test_plans_from_shapes():
    shapes = planner.llama_shapes(4096, 11008, 32)
    assert len(shapes) == 224
    one = registry.plan_for_shapes(shapes, memory_budget="1TB")
    assert one.num_passes == 1
    # fp32 statistics of Llama-2-7B: ≈ 26 GB of G + 22 GB of Z (issue 12), Y diagonal.
    assert 47e9 < one.statistics_bytes < 49e9
    previous = 1
    for budget in ("60GB", "40GB", "20GB"):
        plan = registry.plan_for_shapes(shapes, memory_budget=budget)
        assert plan.peak_bytes <= planner.parse_bytes(budget) and plan.num_passes >= previous
        previous = plan.num_passes
        assert sum(p.statistics_bytes for p in plan.passes) == one.statistics_bytes
    text = str(plan)
    assert "pass 1:" in text and "input groups" in text and repr(plan).startswith("MemoryPlan(")
    d = plan.to_dict()
    assert d["num_passes"] == plan.num_passes and d["passes"][0]["layers"][0] == "model.layers.0.self_attn.q_proj"
    with pytest.raises(planner.MemoryBudgetError, match="mlp.down_proj"):
        registry.plan_for_shapes(shapes, memory_budget="2GB")


def test_split_halves_kept_where_they_fit_one_pass(setup):
    model, batches, shapes = setup
    fits = loradafast.initialize(model, batches, RANK, memory_budget=math.inf, progress=False)
    assert all(layer.diagnostics.split_half_overlap is not None for layer in fits.layers.values())
    # A budget that one pass fits without the halves, and not with them: halves off, said in the plan.
    budget = _budget_for(shapes, _memory("lora-da"), "one")
    with_halves = planner.plan_passes(shapes, dataclasses.replace(_memory("lora-da"), halves=True), budget, "test")
    assert with_halves.num_passes > 1
    tight = loradafast.initialize(model, batches, RANK, memory_budget=budget, progress=False)
    assert tight.plan.num_passes == 1 and any("split-half stability off" in n for n in tight.plan.notes)
    assert all(layer.diagnostics.split_half_overlap is None for layer in tight.layers.values())
    forced = loradafast.initialize(model, batches, RANK, memory_budget=budget, progress=False, split_halves=True)
    assert forced.plan.num_passes > 1
    assert all(layer.diagnostics.split_half_overlap is not None for layer in forced.layers.values())


# ---- activations (issue 28) -------------------------------------------------------------------------

def _held_for_backward(model, batch, factors) -> int:
    """What a real pass over ``batch`` holds for its backward, counted here independently of the
    probe: every storage autograd saves (parameters and buffers excluded) and the input rows the
    hooks keep until the backward, each storage once."""
    excluded = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    storages = {}

    def count(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            storages[ptr] = t.untyped_storage().nbytes()

    def pack(t):
        count(t)
        return t

    real_flush = hooks.Accumulator.flush_pending

    def flush(self):  # after the backward, before end_batch drops the kept inputs
        for x in self.inputs.values():
            count(x)
        return real_flush(self)

    hooks.Accumulator.flush_pending = flush
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loradafast.collect(model, [batch], factors=tuple(factors), progress=False)
    finally:
        hooks.Accumulator.flush_pending = real_flush
    return sum(storages.values())


@pytest.mark.parametrize("build, factors", [
    (lambda: tiny_llama(), "GYZ"),
    (lambda: tiny_llama(attn_implementation="sdpa", dtype=torch.bfloat16), "GYZ"),
    (lambda: tiny_llama(), "YZ"),  # no G: the hooks keep no input
    (lambda: tiny_gpt2(), "G"),
])
def test_probe_activations_are_what_a_pass_holds(build, factors):
    model = build()
    batch = padded_batches(random_sequences(6, lengths=(20, 40)), 6)[0]
    found = probe(model, batch, find_targets(model), loss_fn=None, factors=frozenset(factors))
    held = _held_for_backward(model, batch, factors)
    assert found.batch_shape == tuple(batch["input_ids"].shape)
    assert 0.75 * held <= found.activation_bytes <= 1.25 * held, (found.activation_bytes, held)


def test_the_llama_activation_formula_is_the_probe_s():
    model = tiny_llama(attn_implementation="sdpa", dtype=torch.bfloat16, hidden_size=64, intermediate_size=176,
                       num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, vocab_size=300)
    batch = padded_batches(random_sequences(3, lengths=(50, 50), vocab=300), 3)[0]
    measured = probe(model, batch, find_targets(model), loss_fn=None).activation_bytes
    formula = planner.llama_activation_bytes(64, 176, 3, heads=4, kv_dim=32, vocab=300, tokens=150)
    assert 0.9 * measured <= formula <= 1.1 * measured, (formula, measured)


def test_activations_share_the_peak_with_the_pass_not_the_solve():
    shapes = planner.llama_shapes(512, 1376, 2)
    plain = registry.plan_for_shapes(shapes, memory_budget=math.inf)
    small = registry.plan_for_shapes(shapes, memory_budget=math.inf, activation_bytes=1000)
    assert small.peak_bytes == plain.peak_bytes  # a batch in flight smaller than the solve's workspace
    huge = 10**10
    big = registry.plan_for_shapes(shapes, memory_budget=math.inf, activation_bytes=huge)
    assert plain.peak_bytes < big.peak_bytes < plain.peak_bytes + huge
    assert big.peak_bytes > huge + plain.statistics_bytes
    with pytest.raises(planner.MemoryBudgetError, match=r"activations 10.00 GB.*smaller batches"):
        registry.plan_for_shapes(shapes, memory_budget=huge, activation_bytes=huge)


def test_initialize_plans_with_the_first_batch_s_activations(setup):
    model, batches, _ = setup
    result = loradafast.initialize(model, batches, RANK, memory_budget="1TB", progress=False, split_halves=False)
    activations = _activations("lora-da")
    note = next(n for n in result.plan.notes if n.startswith("a batch in flight"))
    assert planner.format_bytes(activations) in note and f"{len(batches[0]['input_ids'])} ×" in note
    without = planner.plan_passes([planner.LayerShape(s.name, s.in_features, s.out_features, s.input_group, s.rank)
                                   for s in _shapes(model, batches)],
                                  dataclasses.replace(_memory("lora-da"), activation_bytes=0, halves=False),
                                  None, "test")
    assert result.plan.peak_bytes >= without.peak_bytes
    assert result.plan.peak_bytes >= activations + result.plan.statistics_bytes


def test_the_plan_is_shown_once(setup, capsys, caplog):
    model, batches, _ = setup
    with caplog.at_level("INFO", logger="loradafast"):
        loradafast.initialize(model, batches, RANK, memory_budget="1TB", progress=True, split_halves=False)
    shown = capsys.readouterr().err.count("loradafast memory plan") + caplog.text.count("loradafast memory plan")
    assert shown == 1
    caplog.clear()
    with caplog.at_level("INFO", logger="loradafast"):
        loradafast.initialize(model, batches, RANK, memory_budget="1TB", progress=False, split_halves=False)
    assert capsys.readouterr().err.count("loradafast memory plan") == 0
    assert caplog.text.count("loradafast memory plan") == 1
