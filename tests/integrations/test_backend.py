"""PEFT-shaped entry points: get_peft_model in PEFT's order, preprocess_lora_da (+ cache_file),
get_lora_da_state_dict, stats= wherever a loader goes, and the hook a PEFT init would call."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft import get_peft_model as peft_get_peft_model

import loradafast
from loradafast.integrations.peft_model import init_lora_layer
from tiny import padded_batches, random_sequences, tiny_llama


def _loader():
    return padded_batches(random_sequences(6), 3)


def _config(**kw):
    return LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **kw)


def _factors(peft_model, adapter_name="default"):
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    return {k: v.clone() for k, v in state.items()}


def _same(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-5)


@pytest.fixture(scope="module")
def reference():
    """The adapter of the older call form, which keeps working (with a DeprecationWarning)."""
    with pytest.warns(DeprecationWarning, match="older argument order"):
        peft_model = loradafast.get_peft_model(tiny_llama(), _loader(), _config(), progress=False)
    return _factors(peft_model)


def test_peft_order_and_keywords(reference):
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        peft_model = loradafast.get_peft_model(model, _config(), loader=_loader(), progress=False,
                                               autocast_adapter_dtype=False, revision=None)
    _same(_factors(peft_model), reference)
    # adapter_name positionally, in PEFT's order
    other = loradafast.get_peft_model(tiny_llama(), _config(), "mine", loader=_loader(), progress=False)
    assert "mine" in other.peft_config
    _same(_factors(other, "mine"), reference)


def test_low_cpu_mem_usage_materialises_the_factors(reference):
    peft_model = loradafast.get_peft_model(tiny_llama(), _config(), loader=_loader(), low_cpu_mem_usage=True,
                                           progress=False)
    assert not any(p.is_meta for p in peft_model.parameters())
    _same(_factors(peft_model), reference)
    assert any(p.requires_grad for p in peft_model.parameters())


def test_misordered_call_says_what_to_do():
    model = tiny_llama()
    with pytest.raises(TypeError, match="loader=loader"):
        loradafast.get_peft_model(model, _config(), _loader())
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        loradafast.get_peft_model(model, _loader(), loader=_loader())
    from peft import IA3Config

    with pytest.raises(TypeError, match="LoRA adapters"):
        loradafast.get_peft_model(model, IA3Config(target_modules=["q_proj"]), loader=_loader())
    assert not any("lora" in n for n, _ in model.named_modules())


def test_stats_object_or_path_replace_the_loader(reference, tmp_path):
    stats = loradafast.collect(tiny_llama(), _loader(), target_modules=["q_proj", "v_proj", "down_proj"],
                               progress=False)
    stats.save(tmp_path / "s.safetensors")
    for given in (stats, tmp_path / "s.safetensors", str(tmp_path / "s.safetensors")):
        peft_model = loradafast.get_peft_model(tiny_llama(), _config(), stats=given, progress=False)
        _same(_factors(peft_model), reference)
    # initialize takes it too; statistics of more layers than targeted serve a subset
    everything = loradafast.collect(tiny_llama(), _loader(), progress=False)
    peft_model = peft_get_peft_model(tiny_llama(), _config())
    loradafast.initialize(peft_model, stats=everything, progress=False)
    _same(_factors(peft_model), reference)
    with pytest.raises(ValueError, match="not both"):
        loradafast.initialize(tiny_llama(), _loader(), stats=stats)
    with pytest.raises(ValueError, match="no entry"):
        loradafast.initialize(tiny_llama(), None, stats=stats, target_modules=["o_proj"])


def test_preprocess_then_get_peft_model(reference, tmp_path):
    cache = tmp_path / "cache" / "stats.safetensors"
    model = tiny_llama()
    config = _config()
    result = loradafast.preprocess_lora_da(model, config, _loader(), cache_file=cache, progress=False)
    assert cache.exists() and set(result.layers) == {n for n, m in model.named_modules()
                                                     if n.endswith(("q_proj", "v_proj", "down_proj"))}
    peft_model = loradafast.get_peft_model(model, config)
    _same(_factors(peft_model), reference)
    assert peft_model.loradafast_result is result
    assert not any(hasattr(m, "_loradafast_init") for m in peft_model.modules())
    # the cache serves the next run without a loader
    again = tiny_llama()
    loradafast.preprocess_lora_da(again, config, cache_file=cache, progress=False)
    _same(_factors(loradafast.get_peft_model(again, config)), reference)


@pytest.mark.parametrize("method", ["lora-da", "pissa"])
def test_peft_own_get_peft_model_after_preprocess(method):
    """PEFT's LoRA-GA recipe, copied: preprocess, then PEFT's own get_peft_model, which knows nothing
    of loradafast.  The factors are written at the first forward, never PEFT's plain init."""
    model = tiny_llama()
    result = loradafast.preprocess_lora_da(model, _config(), _loader(), method=method, progress=False)
    x = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        before = model(input_ids=x).logits  # the plain model runs as it is
    copied = copy.deepcopy(model)
    peft_model = peft_get_peft_model(model, _config())
    peft_get_peft_model(copied, _config())(input_ids=x)  # a copy's hooks leave the original alone
    with torch.no_grad():
        logits = peft_model(input_ids=x).logits
    state = get_peft_model_state_dict(peft_model)
    for name, layer in result.layers.items():
        torch.testing.assert_close(state[f"base_model.model.{name}.lora_A.weight"], layer.lora_A, atol=0, rtol=0)
        torch.testing.assert_close(state[f"base_model.model.{name}.lora_B.weight"], layer.lora_B, atol=0, rtol=0)
    if method == "pissa":  # the base moved once: the output at initialisation is the original's
        torch.testing.assert_close(logits, before, atol=1e-4, rtol=1e-4)
    assert not any(m._forward_pre_hooks for m in model.modules())  # and nothing is left behind
    assert not hasattr(model, "_loradafast_preprocessed")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, logits, atol=0, rtol=0)


def test_preprocess_default_targets_and_patterns(tmp_path):
    model = tiny_llama()
    config = LoraConfig(r=2, lora_alpha=8, rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 16})
    result = loradafast.preprocess_lora_da(model, config, _loader(), method="pissa", progress=False)
    assert config.target_modules == {"q_proj", "v_proj"}  # PEFT's Llama default, written in as PEFT does
    assert {layer.rank for name, layer in result.layers.items() if name.endswith("v_proj")} == {4}
    peft_model = loradafast.get_peft_model(model, config)  # pissa moved the base: scalings checked per layer
    x = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, tiny_llama()(input_ids=x).logits,
                                   atol=1e-4, rtol=1e-4)


def test_preprocess_mismatched_config_is_refused_and_undone():
    model = tiny_llama()
    loradafast.preprocess_lora_da(model, _config(), _loader(), progress=False)
    with pytest.raises(ValueError, match="did not initialise"):
        loradafast.get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "k_proj"]))
    assert not any("lora" in n for n, _ in model.named_modules())
    assert hasattr(model, "_loradafast_preprocessed")  # still there for a corrected call
    with pytest.raises(ValueError, match="preprocess_lora_da"):
        loradafast.get_peft_model(model, _config(), beta=0.1)
    with pytest.raises(ValueError, match="plain model"):
        loradafast.preprocess_lora_da(peft_get_peft_model(tiny_llama(), _config()), _config(), _loader())


def test_get_state_dict_plain_and_peft(reference, tmp_path):
    state = loradafast.get_lora_da_state_dict(tiny_llama(), _loader(), _config(), progress=False)
    _same(state, reference)
    peft_model = peft_get_peft_model(tiny_llama(), _config())
    before = _factors(peft_model)
    state = loradafast.get_lora_da_state_dict(peft_model, _loader(), progress=False)
    _same(_factors(peft_model), before)  # unchanged
    _same(state, reference)
    set_peft_model_state_dict(peft_model, state)
    _same(_factors(peft_model), reference)
    with pytest.raises(ValueError, match="convert_to_lora"):
        loradafast.get_lora_da_state_dict(tiny_llama(), None, _config(), method="pissa")
    converted = loradafast.get_lora_da_state_dict(tiny_llama(), None, _config(), method="pissa",
                                                  convert_to_lora=True)
    assert next(iter(converted.values())).shape[0] in (4, 24)  # rank 2r


# ---- get_lora_da_state_dict: the whole adapter, the model untouched ------------------------------

def _full_config(**kw):
    # lora_alpha=256: a DoRA magnitude left at PEFT's ‖W‖ shows in the logits (2e-2 off)
    return LoraConfig(r=2, lora_alpha=256, target_modules=["q_proj", "v_proj", "down_proj"], **kw)


def _adapter_state(model, config, how):
    """get_lora_da_state_dict of ``model`` (pristine, kept) given with ``config`` (plain) or as PEFT wraps it."""
    if how == "plain":
        return loradafast.get_lora_da_state_dict(model, _loader(), config, progress=False)
    return loradafast.get_lora_da_state_dict(peft_get_peft_model(copy.deepcopy(model), config), _loader(),
                                             progress=False)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))).logits


@pytest.mark.parametrize("how", ["plain", "peft"])
@pytest.mark.parametrize("extra", [{"use_dora": True}, {"modules_to_save": ["lm_head"]}], ids=["dora", "modules"])
def test_get_state_dict_is_the_whole_initialised_adapter(how, extra):
    """DoRA magnitudes (from the new factors, not PEFT's ‖W‖) and modules_to_save copies are in it: loaded
    into a fresh PEFT model, it gives loradafast.get_peft_model's adapter, keys, values and logits."""
    model = tiny_llama()
    state = _adapter_state(model, _full_config(**extra), how)
    initialised = loradafast.get_peft_model(copy.deepcopy(model), _full_config(**extra), loader=_loader(),
                                            progress=False)
    expected = get_peft_model_state_dict(initialised)
    loaded = peft_get_peft_model(copy.deepcopy(model), _full_config(**extra))
    set_peft_model_state_dict(loaded, state)  # a KeyError inside PEFT when modules_to_save was missing
    _same(state, expected)
    _same(get_peft_model_state_dict(loaded), expected)
    torch.testing.assert_close(_logits(loaded), _logits(initialised), rtol=1e-6, atol=1e-7)


def _fingerprint(model):
    """Everything get_lora_da_state_dict must leave as it was: values, modules, attributes, flags."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(name, type(m), sorted(vars(m)), sorted(m._modules), sorted(m._parameters), sorted(m._buffers))
             for name, m in model.named_modules()],
            [(name, p.requires_grad) for name, p in model.named_parameters()], model.config.to_dict())


@pytest.mark.parametrize("how", ["plain", "peft"])
def test_get_state_dict_leaves_the_model_bit_for_bit(how):
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag PEFT would change while wrapping
    if how == "peft":
        model = peft_get_peft_model(model, _full_config(use_dora=True, modules_to_save=["lm_head"]))
    before = _fingerprint(model)
    rng = torch.get_rng_state()
    if how == "plain":
        state = loradafast.get_lora_da_state_dict(model, _loader(), _full_config(use_dora=True, bias="all",
                                                                                 modules_to_save=["lm_head"]),
                                                  progress=False)
    else:
        state = loradafast.get_lora_da_state_dict(model, _loader(), progress=False)
    after = _fingerprint(model)
    _same(after[0], before[0])
    assert after[1:] == before[1:]
    assert torch.equal(torch.get_rng_state(), rng)  # PEFT's random init of the throwaway wrapping
    # ... and the state dict is the whole adapter, none of its tensors the model's own
    assert any(k.endswith("lora_magnitude_vector") for k in state) and any("lm_head" in k for k in state)
    model_tensors = {t.data_ptr() for t in model.state_dict().values()}
    assert not any(v.data_ptr() in model_tensors for v in state.values())


def test_get_state_dict_refuses_dora_with_a_base_moving_method():
    with pytest.raises(ValueError, match="use_dora=True cannot be combined"):
        loradafast.get_lora_da_state_dict(tiny_llama(), None, _full_config(use_dora=True), method="pissa",
                                          convert_to_lora=True)

def test_the_lines_a_peft_init_would_call(reference):
    """docs/peft_backend.md: LoraLayer.update_layer, init_lora_weights="lora_da", calls init_lora_layer."""
    from peft.tuners.lora import LoraLayer

    model = tiny_llama()
    loradafast.preprocess_lora_da(model, _config(), _loader(), progress=False)
    peft_model = peft_get_peft_model(model, _config())  # PEFT's init ran; then the layer init
    written = [init_lora_layer(m, "default") for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert all(written) and len(written) == 6
    _same(_factors(peft_model), reference)
    assert not any(init_lora_layer(m, "default") for m in peft_model.modules() if isinstance(m, LoraLayer))


def test_mixed_peft_model(reference):
    peft_model = loradafast.get_peft_model(tiny_llama(), _config(), mixed=True, loader=_loader(), progress=False)
    assert type(peft_model).__name__ == "PeftMixedModel"
    lora = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora.keys() == reference.keys()
    for k, v in reference.items():
        torch.testing.assert_close(lora[k], v, atol=0, rtol=0)
