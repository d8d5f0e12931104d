"""Each method collects only what it reads (docs/design.md §6): a G-only pass for LoRA-GA and
LoRA-One gives the G of a full pass, does no K-FAC work, and its statistics are saved, loaded and
refused by the methods that need more, with a message that says what to do."""
import json

import pytest
import torch

import loradafast
import loradafast.passes
from loradafast import kernels
from loradafast.statistics import MissingStatisticsError
from tiny import padded_batches, random_sequences, tiny_gpt2, tiny_llama


def _no_kfac_work(monkeypatch):
    """Make every Z/Y kernel (and the symmetric copy at the end of collect) fail the test."""
    def refuse(*args, **kwargs):
        pytest.fail("Z/Y work in a pass that did not ask for Z or Y")

    for name in ("kfac_accumulate", "kfac_accumulate_pair", "diag_accumulate", "symmetric_from_lower"):
        monkeypatch.setattr(kernels, name, refuse)


@pytest.fixture(scope="module")
def llama_g_only():
    return loradafast.collect(tiny_llama(), padded_batches(random_sequences(6), 3), progress=False, factors={"G"})


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_g_only_pass_gives_the_g_of_a_full_pass_and_no_kfac_work(factory, monkeypatch):
    model, batches = factory(), padded_batches(random_sequences(6), 3)
    full = loradafast.collect(model, batches, progress=False)
    _no_kfac_work(monkeypatch)
    g_only = loradafast.collect(model, batches, progress=False, factors={"G"})
    assert g_only.factors == {"G"} and full.factors == {"G", "Y", "Z"}
    assert g_only.z_sums == {} and g_only.y_factor is None
    assert (g_only.num_tokens, g_only.num_sequences) == (full.num_tokens, full.num_sequences)
    assert g_only.layers.keys() == full.layers.keys()
    for name, layer in full.layers.items():
        assert g_only.layers[name].y_sum is None
        assert g_only.layers[name].input_group == layer.input_group
        # The same kernel on the same operands in the same order: bitwise.
        torch.testing.assert_close(g_only.layers[name].g_sum, layer.g_sum, rtol=0, atol=0)
    assert g_only.nbytes == sum(layer.g_sum.numel() * 4 for layer in full.layers.values())
    assert "factors=G," in repr(g_only) and "tensor" not in repr(g_only)


@pytest.mark.parametrize("method", ["lora-ga", "lora-one", "fisher-subspace"])
def test_initialize_collects_what_the_method_reads(method, monkeypatch):
    model, batches = tiny_llama(), padded_batches(random_sequences(6), 3)
    full = loradafast.collect(model, batches, progress=False)
    weights = {n: model.get_submodule(n).weight.detach() for n in full.layers}
    expected = loradafast.solve(full, 2, method=method, weights=weights)
    seen = []
    real = loradafast.passes.collect  # initialize's passes (loradafast/passes.py) call it
    monkeypatch.setattr(loradafast.passes, "collect", lambda *a, **k: seen.append(k["factors"]) or real(*a, **k))
    if method != "fisher-subspace":
        _no_kfac_work(monkeypatch)
    result = loradafast.initialize(model, batches, 2, method=method, progress=False)
    assert seen == [loradafast.REGISTRY[method].statistics]
    for name, layer in expected.layers.items():
        torch.testing.assert_close(result.layers[name].lora_A, layer.lora_A, rtol=0, atol=0)
        torch.testing.assert_close(result.layers[name].lora_B, layer.lora_B, rtol=0, atol=0)


def test_statistics_without_z_refuse_lora_da_and_say_what_to_do(llama_g_only):
    with pytest.raises(MissingStatisticsError, match=r"'lora-da'.*needs the statistics G, Y, Z, but these hold "
                                                     r"only G.*loradafast.collect\(model, loader\).*serve lora-ga"):
        loradafast.solve(llama_g_only, 2)
    with pytest.raises(MissingStatisticsError, match="'fisher-subspace'.*Y, Z"):
        loradafast.solve(llama_g_only, 2, method="fisher-subspace",
                         weights={n: torch.zeros(s.out_features, s.in_features)
                                  for n, s in llama_g_only.layers.items()})
    with pytest.raises(MissingStatisticsError, match="Statistics.Z"):
        llama_g_only.Z(next(iter(llama_g_only.layers)))
    yz = loradafast.collect(tiny_llama(), padded_batches(random_sequences(2), 2), progress=False,
                            factors={"Y", "Z"})
    with pytest.raises(MissingStatisticsError, match="'lora-ga'.*needs the statistics G.*hold only Y, Z"):
        loradafast.solve(yz, 2, method="lora-ga")
    for bad in ({"X"}, set(), "G"):
        with pytest.raises(ValueError, match="factors must be"):
            loradafast.collect(tiny_llama(), padded_batches(random_sequences(2), 2), progress=False, factors=bad)


def test_g_only_statistics_round_trip(llama_g_only, tmp_path):
    llama_g_only.save(tmp_path / "g.safetensors")
    loaded = loradafast.Statistics.load(tmp_path / "g.safetensors")
    assert loaded.factors == {"G"} and loaded.z_sums == {} and loaded.y_factor is None
    for name, layer in llama_g_only.layers.items():
        assert loaded.layers[name].y_sum is None
        torch.testing.assert_close(loaded.layers[name].g_sum, layer.g_sum, rtol=0, atol=0)
    a, b = (loradafast.solve(s, 2, method="lora-ga") for s in (llama_g_only, loaded))
    for name in a.layers:
        torch.testing.assert_close(a.layers[name].lora_A, b.layers[name].lora_A, rtol=0, atol=0)
    with pytest.raises(MissingStatisticsError, match="'lora-da'"):
        loradafast.solve(loaded, 2)


def test_version_1_files_still_load_with_every_factor(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    stats = loradafast.collect(tiny_llama(), padded_batches(random_sequences(2), 2), progress=False)
    stats.save(tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["loradafast"])
    header["format_version"] = 1
    del header["factors"]  # version 1 had no such key: every factor was there
    save_file(load_file(tmp_path / "s.safetensors"), tmp_path / "v1.safetensors",
              metadata={"loradafast": json.dumps(header)})
    loaded = loradafast.Statistics.load(tmp_path / "v1.safetensors")
    assert loaded.factors == {"G", "Y", "Z"}
    for name in stats.layers:
        torch.testing.assert_close(loaded.Z(name), stats.Z(name), rtol=0, atol=0)
