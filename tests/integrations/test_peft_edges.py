"""PEFT at the edges (issue 10, items 1-3, 8 and 9): configs kept whole on save, a statistics pass
that sees the base model only, PEFT's own choice of layers, per-layer rank typos, provenance
carried by the statistics, tied weights, and the README run top to bottom."""
import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as peft_get_peft_model
from peft.tuners.lora import LoraLayer

import loradafast
from model_state import ModelState
from tiny import padded_batches, random_sequences, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(9))


def _loader(n=6, bs=3):
    return padded_batches(random_sequences(n), bs)


def _never():
    raise AssertionError("the loader must not be touched: the call should fail before the statistics pass")
    yield


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _wrapped(peft_model):
    """Names (relative to the base model) of the layers PEFT wrapped."""
    return {n[len("base_model.model."):] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


# ---- 1. save() keeps the PeftModel's LoraConfig whole ---------------------------------------------

KEPT_FIELDS = ("alpha_pattern", "rank_pattern", "use_dora", "layers_to_transform", "layers_pattern", "lora_dropout",
               "modules_to_save", "exclude_modules", "task_type", "target_modules", "use_rslora", "lora_bias")

CONFIGS = {
    "patterns": dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], alpha_pattern={"v_proj": 32},
                     rank_pattern={"up_proj": 3}, layers_to_transform=[1], layers_pattern="layers",
                     lora_dropout=0.1, modules_to_save=["lm_head"], exclude_modules=["model.layers.1.self_attn.q_proj"],
                     task_type="CAUSAL_LM"),
    "dora": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_save_keeps_the_peft_config_and_reloads_with_the_same_logits(kind, tmp_path):
    pristine = tiny_llama()
    config = LoraConfig(**CONFIGS[kind])
    peft_model = peft_get_peft_model(copy.deepcopy(pristine), copy.deepcopy(config))
    if kind == "patterns":  # a trained head (modules_to_save): saved as it is
        head = peft_model.base_model.model.lm_head.modules_to_save["default"]
        with torch.no_grad():
            head.weight.add_(torch.randn_like(head.weight))
    result = loradafast.initialize(peft_model, _loader(), progress=False)
    result.save(tmp_path / "a")
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "a")
    saved, ours = loaded.peft_config["default"], peft_model.peft_config["default"]
    for field in KEPT_FIELDS:
        assert getattr(saved, field) == getattr(ours, field), field
    assert saved.init_lora_weights is True
    assert _wrapped(loaded) == _wrapped(peft_model) == set(result.layers)
    peft_model.eval(), loaded.eval()
    torch.testing.assert_close(_logits(loaded), _logits(peft_model), rtol=0, atol=1e-6)
    assert not torch.allclose(_logits(loaded), _logits(pristine))  # B ≠ 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_magnitude_is_computed_from_the_new_factors(arch):
    """As PEFT's own DoRA init: m = ‖W + s·B·A‖ per output row, so the layer's output at
    initialisation is (W + s·B·A)·x, the same as plain LoRA with these factors."""
    pristine = tiny_llama() if arch == "llama" else tiny_gpt2()
    options = dict(r=2, target_modules=["q_proj", "v_proj"]) if arch == "llama" else \
        dict(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    dora = peft_get_peft_model(copy.deepcopy(pristine), LoraConfig(**options, use_dora=True))
    plain = peft_get_peft_model(copy.deepcopy(pristine), LoraConfig(**options))
    loradafast.initialize(dora, _loader(), progress=False)
    loradafast.initialize(plain, _loader(), progress=False)
    torch.testing.assert_close(_logits(dora), _logits(plain), rtol=0, atol=1e-5)


def test_converted_pissa_keeps_alpha_and_rank_patterns(tmp_path):
    pristine = tiny_llama()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], alpha_pattern={"up_proj": 16},
                        rank_pattern={"q_proj": 3})
    peft_model = peft_get_peft_model(copy.deepcopy(pristine), config)
    result = loradafast.initialize(peft_model, None, method="pissa", progress=False)
    torch.testing.assert_close(_logits(peft_model), _logits(pristine), rtol=0, atol=1e-5)
    result.save(tmp_path / "c", convert_to_lora=True)
    converted = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "c")
    saved = converted.peft_config["default"]
    assert (saved.r, saved.lora_alpha, saved.alpha_pattern, saved.rank_pattern) == (4, 8, {"up_proj": 32},
                                                                                    {"q_proj": 6})
    torch.testing.assert_close(_logits(converted), _logits(pristine), rtol=0, atol=1e-5)
    result.save(tmp_path / "r", convert_to_lora=False)
    residual = PeftModel.from_pretrained(loradafast.apply_base_update(copy.deepcopy(pristine), tmp_path / "r"),
                                         tmp_path / "r")
    torch.testing.assert_close(_logits(residual), _logits(peft_model), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["pissa", "milora", "lora-ga", "fisher-subspace"])
def test_dora_with_a_base_moving_method_is_refused_before_the_pass(method):
    peft_model = peft_get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    state = ModelState(peft_model)
    with pytest.raises(ValueError, match="use_dora.*lora-da"):
        loradafast.initialize(peft_model, _never(), method=method, progress=False)
    state.assert_unchanged()


# ---- 2. the statistics pass sees the base model only ---------------------------------------------

def _peft_model_with_another_active_adapter(pristine):
    """Adapter "fill" (to initialise) and adapter "other", active, which changes the output."""
    peft_model = peft_get_peft_model(copy.deepcopy(pristine), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                                     adapter_name="fill")
    peft_model.add_adapter("other", LoraConfig(r=3, target_modules=["q_proj", "up_proj"],
                                               modules_to_save=["lm_head"]))
    peft_model.set_adapter("other")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".other." in name:
                p.add_(torch.randn_like(p))  # B ≠ 0 and a trained head copy
    assert not torch.allclose(_logits(peft_model), _logits(pristine))
    return peft_model


def test_statistics_of_a_peft_model_are_those_of_its_base():
    pristine = tiny_llama()
    peft_model = _peft_model_with_another_active_adapter(pristine)
    state = ModelState(peft_model)
    ours = loradafast.collect(peft_model, _loader(), adapter_name="fill", progress=False)
    state.assert_unchanged()
    base = loradafast.collect(pristine, _loader(), target_modules=["q_proj", "v_proj"], progress=False)
    assert set(ours.layers) == set(base.layers)
    for name in base.layers:
        for stat in ("G", "Y", "Z"):
            want = getattr(base, stat)(name)
            torch.testing.assert_close(getattr(ours, stat)(name), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert peft_model.active_adapters == ["other"]


def test_initialize_a_peft_model_twice_gives_the_same_adapter():
    peft_model = peft_get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"]))
    first = loradafast.initialize(peft_model, _loader(), progress=False)
    second = loradafast.initialize(peft_model, _loader(), progress=False)
    for name, layer in first.layers.items():
        torch.testing.assert_close(second.layers[name].lora_A, layer.lora_A, rtol=0, atol=1e-6)
        torch.testing.assert_close(second.layers[name].lora_B, layer.lora_B, rtol=0, atol=1e-6)


def test_adapters_are_enabled_again_after_a_failed_pass():
    peft_model = _peft_model_with_another_active_adapter(tiny_llama())

    def loader():
        yield from _loader(2, 2)
        raise RuntimeError("disk on fire")

    state = ModelState(peft_model)
    with pytest.raises(RuntimeError, match="disk on fire"):
        loradafast.initialize(peft_model, loader(), adapter_name="fill", progress=False)
    state.assert_unchanged()


def test_merged_adapters_are_refused():
    peft_model = peft_get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.merge_adapter()
    state = ModelState(peft_model)
    with pytest.raises(ValueError, match="unmerge_adapter"):
        loradafast.initialize(peft_model, _never(), progress=False)
    state.assert_unchanged()


# ---- 3. get_peft_model: PEFT chooses the layers ----------------------------------------------------

PEFT_CHOICES = {
    "default-targets": (dict(r=2), "lora-da"),
    "layers_to_transform": (dict(r=2, target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1]),
                            "lora-da"),
    "exclude_modules": (dict(r=2, target_modules="all-linear", exclude_modules=["o_proj", "down_proj"]), "lora-one"),
    "all-linear": (dict(r=2, target_modules="all-linear"), "lora-da"),
    "patterns-pissa": (dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"],
                            alpha_pattern={"v_proj": 16}, rank_pattern={"up_proj": 3}), "pissa"),
}


@pytest.mark.parametrize("case", list(PEFT_CHOICES))
def test_get_peft_model_initialises_exactly_the_layers_peft_wraps(case):
    options, method = PEFT_CHOICES[case]
    pristine = tiny_llama()
    theirs = peft_get_peft_model(copy.deepcopy(pristine), LoraConfig(**options))
    ours = loradafast.get_peft_model(copy.deepcopy(pristine), _loader(), LoraConfig(**options), method=method,
                                     progress=False)
    assert set(ours.loradafast_result.layers) == _wrapped(ours) == _wrapped(theirs)
    for name, layer in ours.loradafast_result.layers.items():
        lora = ours.base_model.model.get_submodule(name)
        assert torch.equal(lora.lora_A["default"].weight, layer.lora_A), name
        assert lora.r["default"] == theirs.base_model.model.get_submodule(name).r["default"]
    if method == "pissa":  # the residual base and the adapter's scaling match per layer
        torch.testing.assert_close(_logits(ours), _logits(pristine), rtol=0, atol=1e-5)


def _all_masked_loader():
    ids = torch.randint(0, 97, (2, 6))
    return [{"input_ids": ids, "labels": torch.full_like(ids, -100)}]


def _failing_calls():
    return {
        "all labels -100": (ValueError, "-100", lambda m: loradafast.get_peft_model(
            m, _all_masked_loader(), LoraConfig(r=2), progress=False)),
        "dora with pissa": (ValueError, "use_dora", lambda m: loradafast.get_peft_model(
            m, None, LoraConfig(r=2, use_dora=True), method="pissa", progress=False)),
        "ranks typo": (ValueError, "ranks", lambda m: loradafast.get_peft_model(
            m, _loader(), LoraConfig(r=2), ranks={"q_prj": 3}, progress=False)),
        "interrupted pass": (KeyboardInterrupt, None, lambda m: loradafast.get_peft_model(
            m, _interrupted(), LoraConfig(r=2, modules_to_save=["lm_head"]), progress=False)),
    }


def _interrupted():
    yield from _loader(2, 2)
    raise KeyboardInterrupt


@pytest.mark.parametrize("case", list(_failing_calls()))
def test_get_peft_model_failure_leaves_the_model_as_it_was(case):
    model = tiny_llama()
    model.train()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 0)
    exc, match, call = _failing_calls()[case]
    state = ModelState(model)
    with pytest.raises(exc, match=match):
        call(model)
    state.assert_unchanged()
    assert "peft_config" not in vars(model) and "_hf_peft_config_loaded" not in vars(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_get_peft_model_refuses_options_that_belong_to_the_config():
    model = tiny_llama()
    state = ModelState(model)
    with pytest.raises(ValueError, match="lora_config"):
        loradafast.get_peft_model(model, _never(), LoraConfig(r=2), rank=4, progress=False)
    state.assert_unchanged()


# ---- 8. smaller ones -------------------------------------------------------------------------------

def test_ranks_key_matching_no_layer_is_refused_before_the_pass():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_prj.*did you mean.*"
                                         r"model\.layers\.0\.self_attn\.q_proj"):
        loradafast.initialize(model, _never(), 2, ranks={"model.layers.0.self_attn.q_prj": 4}, progress=False)
    stats = loradafast.collect(model, _loader(), target_modules=["q_proj"], progress=False)
    with pytest.raises(ValueError, match="ranks.*no_such_layer"):
        loradafast.solve(stats, 2, ranks={"no_such_layer": 3})
    peft_model = peft_get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="ranks"):  # a PeftModel's ranks come from its layers
        loradafast.initialize(peft_model, _never(), ranks={"model.layers.0.self_attn.q_proj": 4}, progress=False)


def test_collect_solve_save_writes_task_type_and_base_model(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # its name_or_path is the directory
    loradafast.collect(model, _loader(), progress=False).save(tmp_path / "stats.safetensors")
    stats = loradafast.Statistics.load(tmp_path / "stats.safetensors")
    assert stats.meta["task_type"] == "CAUSAL_LM" and stats.meta["base_model_name_or_path"] == str(tmp_path / "base")
    result = loradafast.solve(stats, 2)
    result.save(tmp_path / "adapter")
    via_initialize = loradafast.initialize(model, _loader(), 2, progress=False)
    via_initialize.save(tmp_path / "reference")
    for directory in ("adapter", "reference"):
        config = LoraConfig.from_pretrained(tmp_path / directory)
        assert (config.task_type, config.base_model_name_or_path) == ("CAUSAL_LM", str(tmp_path / "base"))
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    in_memory = result.apply_to(peft_get_peft_model(copy.deepcopy(model), result.lora_config))
    torch.testing.assert_close(_logits(loaded), _logits(in_memory), rtol=0, atol=1e-6)


def test_moving_a_tied_weight_warns(tmp_path):
    config = LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    with pytest.warns(UserWarning, match=r"loradafast.*lm_head.*tied.*embed_tokens.*logits.*(untie|exclude)"):
        loradafast.get_peft_model(tiny_llama(tie_word_embeddings=True), None, config, method="pissa", progress=False)
    result = loradafast.initialize(tiny_llama(tie_word_embeddings=True), None, 2, method="pissa",
                                   target_modules=["q_proj", "lm_head"], progress=False)
    result.save(tmp_path / "r", convert_to_lora=False)
    with pytest.warns(UserWarning, match="loradafast.*tied"):
        loradafast.apply_base_update(tiny_llama(tie_word_embeddings=True), tmp_path / "r")
    with warnings.catch_warnings():  # untied, or the base kept: nothing to say
        warnings.filterwarnings("error", message="loradafast.*tied")
        loradafast.get_peft_model(tiny_llama(), None, config, method="pissa", progress=False)
        loradafast.get_peft_model(tiny_llama(tie_word_embeddings=True), _loader(), config, progress=False)


def test_converted_adapter_of_a_tied_peft_model_holds_no_base_weight(tmp_path):
    """PEFT's state dict adds the embedding matrices when an embedding layer is targeted; here they
    hold the residual base, which the rank-2r adapter for the unmodified base must not carry."""
    pristine = tiny_llama(tie_word_embeddings=True)
    config = LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    with pytest.warns(UserWarning, match="loradafast.*tied"):
        peft_model = loradafast.get_peft_model(copy.deepcopy(pristine), None, config, method="pissa", progress=False)
    peft_model.loradafast_result.save(tmp_path / "c", convert_to_lora=True)
    from safetensors.torch import load_file

    assert all(".lora_" in key for key in load_file(tmp_path / "c" / "adapter_model.safetensors"))
    converted = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "c")
    torch.testing.assert_close(_logits(converted), _logits(pristine), rtol=0, atol=1e-5)


# ---- 9. the README runs top to bottom --------------------------------------------------------------

def _readme_blocks():
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run_top_to_bottom(tmp_path, monkeypatch):
    blocks = _readme_blocks()
    assert blocks
    monkeypatch.chdir(tmp_path)
    # Wide enough for the README's rank 16 on every layer.
    model = tiny_llama(hidden_size=64, intermediate_size=96, num_key_value_heads=4)
    loader = padded_batches(random_sequences(8), 4)
    # The Trainer block's train set: the same samples, padded to one length, one dict each (the
    # default collator stacks them).
    whole = padded_batches(random_sequences(8), 8)[0]
    dataset = [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
               for ids, mask in zip(whole["input_ids"], whole["attention_mask"])]
    namespace = {"model": model, "loader": loader, "dataset": dataset}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
