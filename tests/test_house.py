"""The structure of the package: one validated options object per method, the method registry."""
import dataclasses

import pytest
import torch

import loradafast
from loradafast import options
from loradafast.methods import registry
from tiny import padded_batches, random_sequences, tiny_llama


@pytest.fixture(scope="module")
def stats():
    return loradafast.collect(tiny_llama(), padded_batches(random_sequences(4), 2), progress=False)


# ---- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, field, value, match", [
    (loradafast.LoraDAConfig, "beta", -1.0, "beta"),
    (loradafast.LoraDAConfig, "gamma", 0.0, "gamma"),
    (loradafast.LoraDAConfig, "damping", float("inf"), "finite"),
    (loradafast.LoraDAConfig, "num_train_samples", 1.5, "num_train_samples"),
    (loradafast.LoraDAConfig, "y_factor", "kron", "y_factor"),
    (loradafast.LoraDAConfig, "eigensolver", "qr", "eigensolver"),
    (loradafast.LoraDAConfig, "residual_tol", -1e-3, "residual_tol"),
    (loradafast.LoraDAConfig, "dtype", torch.float16, "dtype"),
    (loradafast.LoraGAConfig, "variant", "official", "loraga_variant"),
    (loradafast.LoraOneConfig, "gamma", -2.0, "gamma"),
    (loradafast.PissaConfig, "niter", -1, "pissa_niter"),
    (loradafast.FisherSubspaceConfig, "y_factor", "kron", "y_factor"),
])
def test_configs_validate_when_built(cls, field, value, match):
    cls()  # the defaults are valid
    with pytest.raises(ValueError, match=match):
        cls(**{field: value})


def test_every_method_has_a_record_and_an_options_class():
    assert set(loradafast.METHODS) == set(registry.REGISTRY)
    for name, record in registry.REGISTRY.items():
        assert record.name == name and issubclass(record.config, options.MethodConfig)
        assert record.data_aware == (name not in loradafast.WEIGHT_ONLY_METHODS)
        assert record.statistics <= {"G", "Y", "Z"}
    assert registry.REGISTRY["lora-ga"].statistics == {"G"} == registry.REGISTRY["lora-one"].statistics
    assert {n: m.default_gamma for n, m in registry.REGISTRY.items() if m.default_gamma is not None} == {
        "lora-da": 1024.0, "lora-ga": 16.0, "lora-one": 128.0}
    assert {n for n, m in registry.REGISTRY.items() if m.moves_base} == {"pissa", "milora", "lora-ga",
                                                                         "fisher-subspace"}


def test_config_object_equals_keywords(stats):
    by_keywords = loradafast.solve(stats, 2, beta=0.1, gamma=64.0, damping_mode="relative")
    by_config = loradafast.solve(stats, 2, config=loradafast.LoraDAConfig(beta=0.1, gamma=64.0,
                                                                          damping_mode="relative"))
    assert by_config.config == by_keywords.config
    assert by_config.options == by_keywords.options and by_config.options["beta"] == 0.1
    for name, layer in by_keywords.layers.items():
        torch.testing.assert_close(layer.lora_A, by_config.layers[name].lora_A, rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B, by_config.layers[name].lora_B, rtol=0, atol=0)


def test_options_that_do_not_apply_raise(stats):
    with pytest.raises(ValueError, match="pissa_niter.*'lora-da'.*LoraDAConfig"):
        loradafast.solve(stats, 2, pissa_niter=4)
    with pytest.raises(ValueError, match="beta.*'lora-ga'"):
        loradafast.solve(stats, 2, method="lora-ga", beta=0.1)
    with pytest.raises(ValueError, match="seed.*'pissa'"):
        loradafast.initialize(tiny_llama(), None, 2, method="pissa", seed=0)
    with pytest.raises(TypeError, match="takes a LoraGAConfig"):
        loradafast.solve(stats, 2, method="lora-ga", config=loradafast.LoraDAConfig())
    with pytest.raises(ValueError, match="not both"):
        loradafast.solve(stats, 2, config=loradafast.LoraDAConfig(), beta=0.1)
    with pytest.raises(ValueError, match="y_factor='full'.*'diag'"):
        loradafast.solve(stats, 2, config=loradafast.LoraDAConfig(y_factor="full"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        loradafast.solve(stats, 2, rnak=2)


def test_options_are_checked_once_where_they_are_built(stats, monkeypatch):
    built = []
    real = loradafast.LoraDAConfig.__post_init__
    monkeypatch.setattr(loradafast.LoraDAConfig, "__post_init__", lambda self: built.append(1) or real(self))
    loradafast.initialize(tiny_llama(), padded_batches(random_sequences(4), 2), 2, beta=0.1, progress=False)
    assert len(built) == 1


def test_recorded_options_name_the_keywords(stats):
    result = loradafast.solve(stats, 2, method="lora-ga", loraga_variant="peft")
    assert result.options["loraga_variant"] == "peft" and result.options["gamma"] == 16.0
    assert isinstance(result.config, loradafast.LoraGAConfig)
    assert dataclasses.replace(result.config, gamma=8.0).gamma == 8.0


# ---- layout ----------------------------------------------------------------------------------------

MAX_FUNCTION_LINES = 80


def _long_functions(root, limit):
    import ast
    from pathlib import Path

    long = []
    for path in sorted(Path(root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    long.append(f"{path.relative_to(Path(root).parent)}:{node.lineno} {node.name} ({length} lines)")
    return long


def test_no_function_over_80_lines():
    from pathlib import Path

    package = Path(loradafast.__file__).parent
    assert _long_functions(package, MAX_FUNCTION_LINES) == []


# ---- the pass: full Y adds an input group's Z with its first layer's Y in one launch ---------------

def test_full_y_adds_z_and_y_in_one_call(monkeypatch):
    from loradafast import kernels
    from loradafast.statistics import hooks

    model, batches = tiny_llama(), padded_batches(random_sequences(4), 2)
    pairs = []
    real_pair = kernels.kfac_accumulate_pair
    monkeypatch.setattr(kernels, "kfac_accumulate_pair", lambda *a, **k: pairs.append(1) or real_pair(*a, **k))
    paired = loradafast.collect(model, batches, y_factor="full", progress=False)
    assert len(pairs) == 2 * len(paired.z_sums)  # every input group, every batch

    def add_z_in_forward(self, name, rows):  # what the pass did before: Z in the forward hook
        acc = self.z_sum.setdefault(name, torch.zeros(rows.shape[1], rows.shape[1]))
        kernels.kfac_accumulate(acc, rows, self.mask)

    monkeypatch.setattr(hooks.Accumulator, "_add_z", add_z_in_forward)
    forward = loradafast.collect(model, batches, y_factor="full", progress=False)
    assert paired.z_sums.keys() == forward.z_sums.keys()
    for key, z in paired.z_sums.items():
        torch.testing.assert_close(z, forward.z_sums[key], rtol=0, atol=0)
    for name, layer in paired.layers.items():
        torch.testing.assert_close(layer.y_sum, forward.layers[name].y_sum, rtol=0, atol=0)
        assert layer.input_group == forward.layers[name].input_group
