"""Cross-checks against PEFT's own implementations (peft 0.21): PiSSA, the default LoRA init,
LoRA-GA (``preprocess_loraga``) and the PiSSA→LoRA conversion of ``save_pretrained``."""
import copy

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model
from safetensors.torch import load_file

import loradafast
from loradafast.linalg.eigen import span_sine as sin_largest_angle
from tiny import tiny_gpt2, tiny_llama

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}


def _config(arch, r, **kw):
    return LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS[arch], fan_in_fan_out=arch == "gpt2", **kw)


def _peft_factors(peft_model, name):
    layer = peft_model.base_model.model.get_submodule(name)
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), layer


def _out_in(weight, arch):
    return weight.T if arch == "gpt2" else weight


def _sign_aligned(ours_a, ours_b, theirs_a, theirs_b):
    """Flip each rank-1 component (row of A, column of B) of ``theirs`` to match ``ours``."""
    sa = torch.sign((ours_a * theirs_a).sum(1))
    sb = torch.sign((ours_b * theirs_b).sum(0))
    return theirs_a * sa[:, None], theirs_b * sb




@pytest.mark.parametrize("arch", list(FACTORIES))
def test_pissa_equals_peft_pissa(arch):
    pristine = FACTORIES[arch]()
    theirs = peft_get_peft_model(copy.deepcopy(pristine), _config(arch, 4, init_lora_weights="pissa"))
    ours = loradafast.get_peft_model(copy.deepcopy(pristine), None, _config(arch, 4), method="pissa", progress=False)
    result = ours.loradafast_result
    for name, layer in result.layers.items():
        a, b, peft_layer = _peft_factors(theirs, name)
        a, b = _sign_aligned(layer.lora_A, layer.lora_B, a, b)  # up to a sign per rank-1 component
        torch.testing.assert_close(layer.lora_A, a, rtol=0, atol=1e-4 * float(a.abs().max()))
        torch.testing.assert_close(layer.lora_B, b, rtol=0, atol=1e-4 * float(b.abs().max()))
        w_theirs = _out_in(peft_layer.base_layer.weight, arch)
        w_ours = _out_in(ours.base_model.model.get_submodule(name).base_layer.weight, arch)
        torch.testing.assert_close(w_ours, w_theirs, rtol=0, atol=1e-5)


def test_lora_default_matches_peft_distribution():
    """Same law as PEFT's ``init_lora_weights=True``: U(−1/√in, 1/√in) for A, B = 0 (two-sample
    Kolmogorov–Smirnov on A/bound pooled over layers; the streams differ, PEFT draws each A twice)."""
    pristine = tiny_llama()
    torch.manual_seed(0)
    theirs = peft_get_peft_model(copy.deepcopy(pristine), _config("llama", 8))
    result = loradafast.initialize(pristine, None, 8, method="lora", target_modules=TARGETS["llama"], seed=1,
                                   progress=False)
    ours_s, theirs_s = [], []
    for name, layer in result.layers.items():
        a, b, _ = _peft_factors(theirs, name)
        bound = a.shape[1] ** -0.5
        assert layer.lora_A.abs().max() <= bound and a.abs().max() <= bound
        assert torch.equal(layer.lora_B, torch.zeros_like(b)) and torch.equal(b, torch.zeros_like(b))
        ours_s.append(layer.lora_A.reshape(-1) / bound)
        theirs_s.append(a.reshape(-1) / bound)
    x, y = torch.cat(ours_s).sort().values, torch.cat(theirs_s).sort().values
    grid = torch.cat([x, y])
    ecdf_x = torch.searchsorted(x, grid, right=True) / len(x)
    ecdf_y = torch.searchsorted(y, grid, right=True) / len(y)
    ks = (ecdf_x - ecdf_y).abs().max()
    assert float(ks) < 1.36 * (2 / len(x)) ** 0.5  # 5% critical value for equal sample sizes
    uniform_ks = (torch.arange(1, len(x) + 1) / len(x) - (x + 1) / 2).abs().max()
    assert float(uniform_ks) < 1.36 / len(x) ** 0.5


@pytest.mark.parametrize("arch", list(FACTORIES))
def test_lora_ga_matches_peft_preprocess_loraga(arch):
    """Same samples, same loss: PEFT's gradient estimate (``weight.grad`` summed over the
    ``train_step`` backward passes, divided by their number) equals our G when every batch has
    equally many sequences of equal length (the HF loss is then the mean of per-sequence means).
    With ragged batches PEFT weights tokens, not sequences, and the two G differ.

    r = 6 makes PEFT's ``svd_lowrank(q=min(4r, min(out, in)))`` an exact SVD on these layers."""
    pytest.importorskip("peft.tuners.lora.loraga", reason="PEFT without LoRA-GA")
    from peft.tuners.lora import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    pristine = FACTORIES[arch]()
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 97, (3, 9), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    r = 6
    stats = loradafast.collect(pristine, batches, target_modules=TARGETS[arch], progress=False)

    model = copy.deepcopy(pristine)
    config = _config(arch, r, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

    def train_step():
        for batch in batches:
            model(**batch, labels=batch["input_ids"]).loss.backward()

    preprocess_loraga(model, config, train_step)
    grads = {n: _out_in(m._peft_loraga_grad, arch).clone() for n, m in model.named_modules()
             if hasattr(m, "_peft_loraga_grad")}
    assert set(grads) == set(stats.layers)
    theirs = peft_get_peft_model(model, config)

    paper = loradafast.solve(stats, r, method="lora-ga", lora_alpha=8)
    peft_variant = loradafast.solve(stats, r, method="lora-ga", loraga_variant="peft", lora_alpha=8)
    for name in stats.layers:
        G = grads[name]
        torch.testing.assert_close(stats.G(name, torch.float32), G, rtol=0, atol=1e-5 * float(G.abs().max()))
        a, b, peft_layer = _peft_factors(theirs, name)
        for result in (paper, peft_variant):
            assert sin_largest_angle(result.layers[name].lora_A.T, a.T) < 1e-4, name
            assert sin_largest_angle(result.layers[name].lora_B, b) < 1e-4, name
        # The "peft" variant reproduces PEFT's factors, up to a sign per factor column/row and
        # one known difference: for Conv1D (fan_in_fan_out) PEFT's "stable" scale takes
        # out_features from the stored [in, out] weight, so it scales B by in^¼ instead of out^¼.
        ours = peft_variant.layers[name]
        a, b = _sign_aligned(ours.lora_A, ours.lora_B, a, b)
        stored_rows, out_features = peft_layer.base_layer.weight.shape[0], ours.lora_B.shape[0]
        b = b * (out_features / stored_rows) ** 0.25
        torch.testing.assert_close(ours.lora_A, a, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours.lora_B, b, rtol=0, atol=1e-4 * float(b.abs().max()))


def test_peft_conversion_of_our_residual_adapter_equals_ours(tmp_path):
    """PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` applied to our
    initial adapter gives exactly our ``save(convert_to_lora=True)``."""
    pristine = tiny_gpt2()
    peft_model = loradafast.get_peft_model(copy.deepcopy(pristine), None, _config("gpt2", 4), method="pissa",
                                           progress=False)
    result = peft_model.loradafast_result
    result.save(tmp_path / "init", convert_to_lora=False)
    result.save(tmp_path / "ours", convert_to_lora=True)
    peft_model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(theirs) == set(ours)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    their_config = LoraConfig.from_pretrained(tmp_path / "peft")
    our_config = LoraConfig.from_pretrained(tmp_path / "ours")
    assert (their_config.r, their_config.lora_alpha) == (our_config.r, our_config.lora_alpha) == (8, 16)
