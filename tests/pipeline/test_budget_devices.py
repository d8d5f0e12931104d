"""The memory budget of a model spread over devices (``device_map``): read on every device the
target layers live on, the smallest wins (loradafast/passes.py)."""
import torch

import loradafast
from loradafast import passes, planner
from tiny import padded_batches, random_sequences, tiny_llama

GB = 10 ** 9
# A model over three GPUs whose middle one has the least free memory; the host has plenty.
FREE = {"cuda:0": 40 * GB, "cuda:1": 3 * GB, "cuda:2": 20 * GB, "meta": None, "cpu": 500 * GB}


def _fake_default_budget(device):
    budget = FREE[str(torch.device(device))]
    return budget, f"fake free memory of {device}"


def _spread(targets):
    """The devices of a model spread round-robin over three GPUs, one entry per target."""
    return list(dict.fromkeys(torch.device("cuda", i % 3) for i, _ in enumerate(targets)))


def test_the_smallest_device_budget_is_the_plan_budget(monkeypatch):
    monkeypatch.setattr(planner, "default_budget", _fake_default_budget)
    monkeypatch.setattr(passes, "_target_devices", _spread)
    budget, source = passes._budget(None, [object()] * 5, torch.device("cuda", 0))
    assert budget == 3 * GB and "cuda:1" in source and "3 devices" in source
    # A device without a known limit constrains nothing; an explicit budget is taken as given.
    monkeypatch.setattr(passes, "_target_devices", lambda targets: [torch.device("meta"), torch.device("cuda", 2)])
    assert passes._budget(None, [], torch.device("meta"))[0] == 20 * GB
    assert passes._budget("1GB", [object()] * 5, torch.device("cuda", 0)) == (GB, "memory_budget")


def test_initialize_plans_against_the_tightest_device(monkeypatch):
    # The weights live on the CPU; the fake device list stands in for a device_map over three GPUs.
    monkeypatch.setattr(planner, "default_budget", _fake_default_budget)
    monkeypatch.setattr(passes, "_target_devices", _spread)
    result = loradafast.initialize(tiny_llama(), padded_batches(random_sequences(4), 2), 2, progress=False)
    assert result.plan.budget_bytes == 3 * GB and "cuda:1" in result.plan.budget_source


def test_target_devices_reads_each_layers_weight():
    from loradafast.targets import find_targets

    model = tiny_llama()
    targets = find_targets(model)
    model.model.layers[1].mlp.to("meta")  # a layer elsewhere (as offloaded weights are)
    assert passes._target_devices(targets) == [torch.device("cpu"), torch.device("meta")]
