"""One initialisation is one :class:`loradafast.pipeline.Pipeline`: every entry point builds one
and runs it, and what the pipeline works out about the model (its targets, layout, description) is
worked out once, however many statistics passes the memory plan takes."""
import math
import warnings

import pytest
import torch
from peft import LoraConfig

import loradafast
from loradafast import pipeline as pipeline_module
from test_planner import _batches, _budget_for, _memory, _shapes
from tiny import tiny_llama

RANK = 2


@pytest.fixture
def runs(monkeypatch):
    """Every pipeline solved, and every call of the targets' search and of the model's description."""
    seen = {"solved": [], "find_targets": 0, "model_meta": 0}
    real_solve, real_find, real_meta = (pipeline_module.Pipeline.solve, pipeline_module.find_targets,
                                        pipeline_module.model_meta)

    def solve(self, loader=None, stats=None):
        seen["solved"].append(self)
        return real_solve(self, loader, stats)

    def find(*args, **kwargs):
        seen["find_targets"] += 1
        return real_find(*args, **kwargs)

    def meta(*args, **kwargs):
        seen["model_meta"] += 1
        return real_meta(*args, **kwargs)

    monkeypatch.setattr(pipeline_module.Pipeline, "solve", solve)
    monkeypatch.setattr(pipeline_module, "find_targets", find)
    monkeypatch.setattr(pipeline_module, "model_meta", meta)
    return seen


def test_initialize_runs_one_pipeline_and_describes_the_model_once(runs):
    model, batches = tiny_llama(), _batches()
    budget = _budget_for(_shapes(model, batches), _memory("lora-da"), "two")
    result = loradafast.initialize(model, batches, RANK, memory_budget=budget, progress=False, split_halves=False)
    assert result.plan.num_passes == 2
    assert len(runs["solved"]) == 1 and runs["find_targets"] == 1 and runs["model_meta"] == 1
    pipeline = runs["solved"][0]
    # The result records every target, not the last pass's, as the pipeline described them.
    assert result.target_modules == pipeline.meta.target_modules
    assert sorted(result.layers) == sorted(t.name for t in pipeline.targets)
    assert {n: layer.rank for n, layer in result.layers.items()} == {t.name: RANK for t in pipeline.targets}


@pytest.mark.parametrize("entry", ["get_peft_model", "preprocess_lora_da", "get_lora_da_state_dict", "weights"])
def test_every_entry_point_is_a_face_over_one_pipeline(runs, entry):
    model, batches = tiny_llama(), _batches()
    config = LoraConfig(r=RANK, target_modules=["q_proj", "v_proj"])
    if entry == "get_peft_model":
        peft_model = loradafast.get_peft_model(model, config, loader=batches, progress=False)
        assert peft_model.loradafast_result is not None
    elif entry == "preprocess_lora_da":
        loradafast.preprocess_lora_da(model, config, batches, progress=False)
    elif entry == "get_lora_da_state_dict":
        loradafast.get_lora_da_state_dict(model, batches, config, progress=False)
    else:  # a weight-only method: no pass, the same pipeline
        loradafast.initialize(model, None, RANK, method="pissa", target_modules=["q_proj", "v_proj"], progress=False)
    assert len(runs["solved"]) == 1 and runs["model_meta"] == 1
    pipeline = runs["solved"][0]
    assert {t.name.rsplit(".", 1)[-1] for t in pipeline.targets} == {"q_proj", "v_proj"}
    assert pipeline.layout.rank == RANK


def test_a_pipeline_solves_saved_statistics_like_a_pass():
    model, batches = tiny_llama(), _batches()
    stats = loradafast.collect(model, batches, progress=False, split_halves=False)
    record, config = pipeline_module.method_and_options("lora-da", None, {}, "initialize")
    run_options = pipeline_module.RunOptions(progress=False, split_halves=False)
    built = pipeline_module.Pipeline.for_model(model, record, config, run_options, rank=RANK, ranks=None,
                                               target_modules=None, lora_alpha=None, use_rslora=False)
    from_stats, _ = built.solve(stats=stats)
    from_pass = loradafast.initialize(model, batches, RANK, memory_budget=math.inf, progress=False,
                                      split_halves=False)
    assert from_stats.target_modules == from_pass.target_modules == built.meta.target_modules
    for name, layer in from_pass.layers.items():
        torch.testing.assert_close(from_stats.layers[name].lora_A, layer.lora_A, rtol=1e-5, atol=1e-6)


def test_run_options_are_checked_when_built():
    with pytest.raises(ValueError, match="max_samples"):
        pipeline_module.RunOptions(max_samples=0)
    with pytest.raises(ValueError):
        pipeline_module.RunOptions(memory_budget="lots")


@pytest.mark.parametrize("entry", ["initialize", "preprocess_lora_da"])
def test_warnings_name_the_callers_line(entry):
    # The split-half warning arises some frames deep in the solve, and deeper from one entry point
    # than from another; it names the line of the caller, not one of ours.
    model, batches = tiny_llama(), _batches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if entry == "initialize":
            loradafast.initialize(model, batches, RANK, progress=False)
        else:
            loradafast.preprocess_lora_da(model, LoraConfig(r=RANK, target_modules=["q_proj"]), batches,
                                          progress=False)
    ours = [w for w in caught if "barely determine" in str(w.message)]
    assert ours, [str(w.message)[:80] for w in caught]
    assert {w.filename for w in ours} == {__file__}


def test_the_stages_run_in_order_once(monkeypatch):
    calls = []
    for stage in ("plan", "solve", "apply"):
        real = getattr(pipeline_module.Pipeline, stage)

        def spy(self, *args, _real=real, _stage=stage, **kwargs):
            calls.append(_stage)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(pipeline_module.Pipeline, stage, spy)
    real_collect = pipeline_module.passes.collect
    monkeypatch.setattr(pipeline_module.passes, "collect",
                        lambda *a, **k: calls.append("collect") or real_collect(*a, **k))
    loradafast.initialize(tiny_llama(), _batches(), RANK, progress=False)
    assert calls == ["solve", "plan", "collect", "apply"]  # solve plans, collects, then solves
    calls.clear()
    loradafast.initialize(tiny_llama(), None, RANK, method="pissa", progress=False)
    assert calls == ["solve", "apply"]  # a weight-only method: no plan, no pass
