"""The methods of docs/design.md §5: formulas on tensors, then end to end on tiny Llama and GPT-2."""
import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel

import loradafast
from loradafast.linalg.eigen import span_sine as sin_largest_angle
from loradafast import methods
from tiny import padded_batches, random_sequences, tiny_gpt2, tiny_llama

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}
MOVING = ("pissa", "milora", "lora-ga", "fisher-subspace")
KEEPING = ("lora", "lora-one", "lora-da")




def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(9))


def _loader():
    return padded_batches(random_sequences(6), 3)


def _config(arch, r=4, **kw):
    return LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS[arch], fan_in_fan_out=arch == "gpt2", **kw)


# ---- formulas ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mats():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(10, 7, generator=g, dtype=torch.float64)
    G = torch.randn(10, 7, generator=g, dtype=torch.float64)
    return W, G


def test_pissa_and_milora_split_the_singular_spectrum(mats):
    W, _ = mats
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    scaling, r = 0.5, 3
    p = methods.pissa(W, r, scaling)
    torch.testing.assert_close(scaling * p.lora_B @ p.lora_A, u[:, :r] @ torch.diag(s[:r]) @ vh[:r])
    torch.testing.assert_close(p.lora_A @ p.lora_A.T, torch.diag(s[:r] / scaling))  # A = √(S/s) Vᵀ
    torch.testing.assert_close(torch.linalg.svdvals(W - scaling * p.lora_B @ p.lora_A)[:4], s[r:])
    m = methods.milora(W, r, scaling)
    torch.testing.assert_close(scaling * m.lora_B @ m.lora_A, u[:, -r:] @ torch.diag(s[-r:]) @ vh[-r:])
    assert p.moves_base and m.moves_base
    # The fast option approximates the exact SVD; with a spectral gap its subspace iteration
    # converges to it.
    gapped = u @ torch.diag(torch.tensor([9.0, 8.0, 7.0, 0.3, 0.2, 0.1, 0.05], dtype=W.dtype)) @ vh
    fast = methods.pissa(gapped, r, scaling, niter=8)
    exact = methods.pissa(gapped, r, scaling)
    torch.testing.assert_close(fast.lora_B @ fast.lora_A, exact.lora_B @ exact.lora_A, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("variant", ["paper", "peft"])
def test_lora_ga_formula(mats, variant):
    _, G = mats
    u, s, vh = torch.linalg.svd(G, full_matrices=False)
    r, gamma = 2, 16.0
    f = methods.lora_ga(G, r, gamma=gamma, variant=variant)
    c = 10**0.25 / gamma**0.5
    assert sin_largest_angle(f.lora_A.T, vh[:r].T) < 1e-6  # A: top-r right singular vectors
    assert sin_largest_angle(f.lora_B, u[:, r:2 * r]) < 1e-6  # B: the next r left ones
    col_norms = torch.linalg.vector_norm(f.lora_B, dim=0)
    row_norms = torch.linalg.vector_norm(f.lora_A, dim=1)
    if variant == "paper":
        torch.testing.assert_close(row_norms, torch.full((r,), c, dtype=G.dtype))
        torch.testing.assert_close(col_norms, torch.full((r,), c, dtype=G.dtype))
    else:
        torch.testing.assert_close(row_norms, torch.ones(r, dtype=G.dtype))
        torch.testing.assert_close(col_norms, s[r:2 * r] * c)
    with pytest.raises(ValueError, match="2r"):
        methods.lora_ga(G, 4, gamma=gamma)
    with pytest.raises(ValueError, match="paper"):
        methods.lora_ga(G, r, variant="official")


def test_lora_one_is_a_scaled_descent_step(mats):
    _, G = mats
    u, s, vh = torch.linalg.svd(-G, full_matrices=False)
    r, gamma = 3, 128.0
    f = methods.lora_one(G, r, gamma=gamma)
    torch.testing.assert_close(f.lora_B @ f.lora_A, u[:, :r] @ torch.diag(s[:r]) @ vh[:r] / (s[0] * gamma))
    assert float((f.lora_B @ f.lora_A * G).sum()) < 0  # along −G
    torch.testing.assert_close(f.lora_A @ f.lora_A.T, torch.diag(s[:r] / (s[0] * gamma)))
    assert not f.moves_base


def test_lora_default_matches_peft_bounds():
    g = torch.Generator().manual_seed(0)
    f = methods.lora(50, 400, 16, generator=g)
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=√5): gain √(1/3) · √(3/fan_in)
    assert f.lora_A.abs().max() <= bound and f.lora_A.abs().max() > 0.99 * bound
    assert abs(float(f.lora_A.var()) - bound**2 / 3) < 0.05 * bound**2 / 3
    assert torch.equal(f.lora_B, torch.zeros(50, 16))
    again = methods.lora(50, 400, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.lora_A, f.lora_A)


@pytest.mark.parametrize("full_y", [False, True])
def test_fisher_energies_equal_the_dense_kfac_quadratic_form(full_y):
    g = torch.Generator().manual_seed(2)
    out, inp = 4, 3
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    x = torch.randn(inp, 20, generator=g, dtype=torch.float64)
    Z = x @ x.T / 20
    if full_y:
        y = torch.randn(out, 20, generator=g, dtype=torch.float64)
        Y = y @ y.T / 20
    else:
        Y = torch.rand(out, generator=g, dtype=torch.float64) + 0.1
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    energy = methods.fisher_energies(u, s, vh, Y, Z)
    F = torch.kron(Y if full_y else torch.diag(Y), Z)  # vec row-major: index (o, i) → o·in + i
    for i in range(len(s)):
        vec = (s[i] * torch.outer(u[:, i], vh[i])).reshape(-1)
        torch.testing.assert_close(energy[i], vec @ F @ vec)


def test_fisher_subspace_selects_by_energy_and_reduces_to_pissa():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 6, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    eye_y, eye_z = torch.ones(8, dtype=torch.float64), torch.eye(6, dtype=torch.float64)
    f = methods.fisher_subspace(W, eye_y, eye_z, 2, 0.5)
    p = methods.pissa(W, 2, 0.5)
    torch.testing.assert_close(f.lora_A, p.lora_A)
    torch.testing.assert_close(f.lora_B, p.lora_B)
    # An input distribution concentrated on the smallest right singular vector makes that
    # component the most Fisher-energetic one, though PiSSA would never pick it.
    Z = torch.outer(vh[-1], vh[-1]) * 100 + 1e-3 * eye_z
    f = methods.fisher_subspace(W, eye_y, Z, 2, 0.5)
    assert int(f.diagnostics["singular_indices"][0]) == len(s) - 1
    torch.testing.assert_close(0.5 * f.lora_B[:, :1] @ f.lora_A[:1], s[-1] * torch.outer(u[:, -1], vh[-1]))
    assert 0 < f.diagnostics["energy_fraction"] <= 1


# ---- end to end ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_stats():
    return loradafast.collect(tiny_llama(), _loader(), progress=False)


@pytest.mark.parametrize("method", MOVING)
@pytest.mark.parametrize("arch", list(FACTORIES))
def test_base_moving_methods_keep_the_output_and_convert_to_plain_lora(arch, method, tmp_path):
    pristine = FACTORIES[arch]()
    reference = _logits(pristine, IDS)
    peft_model = loradafast.get_peft_model(copy.deepcopy(pristine), _loader(), _config(arch), method=method,
                                           progress=False)
    result = peft_model.loradafast_result
    assert result.moves_base and result.method == method
    torch.testing.assert_close(_logits(peft_model, IDS), reference, rtol=0, atol=1e-5)
    # The base really moved: W_res = W − s·B·A.
    name, layer = next(iter(result.layers.items()))
    w = pristine.get_submodule(name).weight
    w_res = peft_model.base_model.model.get_submodule(name).base_layer.weight
    w, w_res = (w.T, w_res.T) if arch == "gpt2" else (w, w_res)
    torch.testing.assert_close(w_res, w + layer.weight_update, rtol=0, atol=1e-6)
    assert float(layer.weight_update.abs().max()) > 1e-3

    with pytest.raises(ValueError, match="convert_to_lora"):
        result.save(tmp_path / "ambiguous")
    # Plain rank-2r adapter on the unmodified base: zero ΔW at initialisation.
    result.save(tmp_path / "converted", convert_to_lora=True)
    converted = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "converted")
    config = converted.peft_config["default"]
    assert config.r == 8 and config.lora_alpha == 16 and config.init_lora_weights is True
    torch.testing.assert_close(_logits(converted, IDS), reference, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "converted" / "loradafast_init.json").read_text())["base_weight"] == "converted"
    # Rank-r adapter on the residual base, rebuilt from the original model.
    result.save(tmp_path / "residual", convert_to_lora=False)
    base = loradafast.apply_base_update(copy.deepcopy(pristine), tmp_path / "residual")
    residual = PeftModel.from_pretrained(base, tmp_path / "residual")
    torch.testing.assert_close(_logits(residual, IDS), _logits(peft_model, IDS), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="residual"):
        loradafast.apply_base_update(copy.deepcopy(pristine), tmp_path / "converted")


@pytest.mark.parametrize("method", KEEPING)
def test_base_keeping_methods_save_plain_adapters(method, tmp_path):
    pristine = tiny_gpt2()
    result = loradafast.initialize(pristine, _loader(), 4, method=method, target_modules=TARGETS["gpt2"],
                                   lora_alpha=8, progress=False)
    assert not result.moves_base and all(l.weight_update is None for l in result.layers.values())
    result.save(tmp_path / "a")  # no choice needed
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "a")
    moved = float((_logits(loaded, IDS) - _logits(pristine, IDS)).abs().max())
    assert (moved == 0.0) if method == "lora" else (moved > 1e-4)


def test_rslora_conversion_keeps_the_scaling(tmp_path):
    pristine = tiny_llama()
    result = loradafast.initialize(pristine, None, 2, method="pissa", target_modules=["q_proj", "down_proj"],
                                   ranks={"model.layers.0.mlp.down_proj": 4}, lora_alpha=4, use_rslora=True,
                                   progress=False)
    result.save(tmp_path / "c", convert_to_lora=True)
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "c")
    assert loaded.peft_config["default"].lora_alpha == pytest.approx(4 * math.sqrt(2))
    layer = loaded.base_model.model.model.layers[0].mlp.down_proj
    assert layer.r["default"] == 8 and layer.scaling["default"] == pytest.approx(4 / math.sqrt(4))
    torch.testing.assert_close(_logits(loaded, IDS), _logits(pristine, IDS), rtol=0, atol=1e-5)


def test_one_statistics_pass_serves_every_data_aware_method(llama_stats, monkeypatch):
    model = tiny_llama()
    weights = {n: model.get_submodule(n).weight.detach() for n in llama_stats.layers}
    for method in ("lora-da", "lora-ga", "lora-one", "fisher-subspace"):
        result = loradafast.solve(llama_stats, 4, method=method, weights=weights)
        assert set(result.layers) == set(llama_stats.layers) and result.method == method
        assert all(torch.isfinite(l.lora_A).all() and torch.isfinite(l.lora_B).all() for l in result.layers.values())
    # Weight-only methods skip the pass: loader None, and collect is never called.
    monkeypatch.setattr(loradafast.passes, "collect",
                        lambda *a, **k: pytest.fail("statistics pass for a weight-only method"))
    for method in loradafast.WEIGHT_ONLY_METHODS:
        result = loradafast.initialize(model, None, 4, method=method, progress=False)
        assert set(result.layers) == set(llama_stats.layers)
        assert result.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
        assert result.task_type == "CAUSAL_LM"
    with pytest.raises(ValueError, match="weights"):
        loradafast.solve(llama_stats, 4, method="fisher-subspace")


@pytest.mark.parametrize("r", [2, 4])
def test_remark_4_3_lora_da_degenerates_to_the_lora_ga_and_lora_one_subspace(llama_stats, r):
    da = loradafast.solve(llama_stats, r, beta=0.0, gradient="raw")
    ga = loradafast.solve(llama_stats, r, method="lora-ga")
    one = loradafast.solve(llama_stats, r, method="lora-one")
    for name in da.layers:
        s = torch.linalg.svdvals(llama_stats.G(name))
        assert s[r - 1] > 1.01 * s[r], "test needs a singular-value gap for the subspace to be defined"
        a = da.layers[name].lora_A.T
        assert sin_largest_angle(a, ga.layers[name].lora_A.T) < 1e-5, name
        assert sin_largest_angle(a, one.layers[name].lora_A.T) < 1e-5, name


def test_lora_da_ablations_and_y_factor_reachable_from_initialize():
    model = tiny_llama()
    loader = _loader()
    stats = loradafast.collect(model, loader, y_factor="full", progress=False)
    via_solve = loradafast.solve(stats, 3, beta=0.0, gradient="raw")
    via_init = loradafast.initialize(model, loader, 3, beta=0.0, gradient="raw", y_factor="full", progress=False)
    for name, layer in via_solve.layers.items():
        torch.testing.assert_close(via_init.layers[name].lora_A, layer.lora_A)
    assert via_init.options["beta"] == 0.0 and via_init.options["gradient"] == "raw"
    assert via_init.options["y_factor"] == "full"
    fisher = loradafast.initialize(model, loader, 3, method="fisher-subspace", y_factor="full", progress=False)
    assert fisher.options["y_factor"] == "full" and fisher.moves_base


def test_freeze_a_lora_fa(tmp_path):
    pristine = tiny_llama()
    peft_model = loradafast.get_peft_model(copy.deepcopy(pristine), _loader(), _config("llama", r=2),
                                           method="lora-da", freeze_a=True, progress=False)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert not layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
    result = peft_model.loradafast_result
    assert result.freeze_a
    result.save(tmp_path / "fa")
    assert json.loads((tmp_path / "fa" / "loradafast_init.json").read_text())["freeze_a"] is True
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "fa", is_trainable=True)
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.requires_grad
    loradafast.freeze_lora_a(loaded)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all("lora_B" in n for n in trainable)


def test_bad_inputs_get_clear_errors(llama_stats):
    model = tiny_llama()
    with pytest.raises(ValueError, match="unknown method 'dora'.*lora-da.*pissa.*fisher-subspace"):
        loradafast.initialize(model, None, method="dora")
    with pytest.raises(ValueError, match="unknown method"):
        loradafast.solve(llama_stats, method="LoRA-GA")
    with pytest.raises(ValueError, match="'lora-ga' is data-aware and needs a loader"):
        loradafast.initialize(model, None, method="lora-ga")
    with pytest.raises(ValueError, match="statistics"):
        loradafast.solve(None, 4, method="lora-one", weights={})
    with pytest.raises(ValueError, match="2r = 14"):  # k_proj has min(in, out) = 12
        loradafast.initialize(model, _loader(), 7, method="lora-ga", progress=False)
    with pytest.raises(ValueError, match="init_lora_weights"):
        loradafast.get_peft_model(model, None, _config("llama", init_lora_weights="pissa"), method="pissa")
    peft_model = loradafast.get_peft_model(model, None, _config("llama", r=2), method="pissa", progress=False)
    with pytest.raises(ValueError, match="already moved"):
        peft_model.loradafast_result.apply_to(peft_model)


def test_initialize_fills_a_peft_model_and_moves_its_base():
    from peft import get_peft_model as peft_get_peft_model

    pristine = tiny_gpt2()
    peft_model = peft_get_peft_model(copy.deepcopy(pristine), _config("gpt2", r=2))
    result = loradafast.initialize(peft_model, None, method="pissa", pissa_niter=4, freeze_a=True, progress=False)
    assert result.options["pissa_niter"] == 4 and result.rank == 2
    torch.testing.assert_close(_logits(peft_model, IDS), _logits(pristine, IDS), rtol=0, atol=1e-5)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_B" in n for n in trainable)
