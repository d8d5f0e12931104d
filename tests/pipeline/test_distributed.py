"""Many ranks on CPU with gloo (docs/design.md §6.5): owner computes, failures, global max_samples,
DDP and FSDP2.  Each test spawns 2 or 3 processes that run several scenarios, and compares what each
rank got with one process on the union of the shards."""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
import time

import pytest
import torch

import loradafast
from loradafast import planner
from tiny import padded_batches, random_sequences, tiny_llama

ATOL = 1e-5
CACHE_TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny():
    # Without grouped-query attention: with it, o_proj's input (4 heads over 2 value heads) makes
    # LoRA-DA's subspace so ill-conditioned at these widths that the fp32 summation order alone
    # (one process, the same batches in another order) moves its lora_A by 2e-5.
    return tiny_llama(num_key_value_heads=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Failing:
    """A re-iterable loader that yields its batches, then raises (a rank whose data is broken)."""

    def __init__(self, batches, after: int):
        self.batches, self.after = batches, after

    def __iter__(self):
        yield from self.batches[:self.after]
        raise ValueError("rank-local loader broke: corrupt sample")


def _model(wrap: str | None):
    model = tiny()
    if wrap == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"]))
    if wrap == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def _state(model) -> dict:
    from loradafast.distributed import full_weight

    return {k: full_weight(v.detach()).clone() for k, v in model.state_dict().items()}


class _Count(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record):
        self.count += 1


def _run_scenario(scenario: dict, rank: int) -> dict:
    log, count = logging.getLogger("loradafast"), _Count()
    log.setLevel(logging.INFO)
    log.addHandler(count)
    started = time.perf_counter()
    run = _preprocess if scenario.get("entry") == "preprocess" else _initialize
    try:
        return {**run(scenario, rank), "logs": count.count, "seconds": time.perf_counter() - started}
    finally:
        log.removeHandler(count)


def _failure(error: Exception, model, before: dict) -> dict:
    """What a rank that raised reports: the error, and whether its model is as it was."""
    import traceback

    after = _state(model)
    unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return {"error": f"{type(error).__name__}: {error}", "unchanged": unchanged, "trace": traceback.format_exc()}


def _initialize(scenario: dict, rank: int) -> dict:
    model = _model(scenario.get("wrap"))
    before = _state(model)
    loader = scenario["shards"][rank]
    if scenario.get("fail_rank") == rank:
        loader = _Failing(loader, after=scenario.get("fail_after", 1))
    if scenario.get("one_shot_rank") == rank:
        loader = iter(loader)
    try:
        result = loradafast.initialize(model, loader, rank=2, method=scenario.get("method", "lora-da"),
                                       max_samples=scenario.get("max_samples"), progress=False,
                                       memory_budget=scenario.get("memory_budget"), **scenario.get("options", {}))
    except Exception as e:  # noqa: BLE001 - the parent checks the message
        return _failure(e, model, before)
    layers = {n: (x.lora_A, x.lora_B, x.diagnostics.solved_by_rank, getattr(x.diagnostics, "input_group", None))
              for n, x in result.layers.items()}
    return {"layers": layers, "owners": result.owners, "num_passes": result.plan.num_passes if result.plan else 1}


def _preprocess(scenario: dict, rank: int) -> dict:
    """preprocess_lora_da with a cache file in this rank's own folder (a node-local disk)."""
    from peft import LoraConfig

    model = tiny()
    before = _state(model)
    cache_file = os.path.join(scenario["cache_dirs"][rank], "stats.safetensors")
    try:
        result = loradafast.preprocess_lora_da(model, LoraConfig(r=2, target_modules=CACHE_TARGETS),
                                               scenario["shards"][rank], cache_file=cache_file, max_samples=None,
                                               progress=False)
    except Exception as e:  # noqa: BLE001 - the parent checks the message
        return _failure(e, model, before)
    return {"layers": {n: (x.lora_A, x.lora_B) for n, x in result.layers.items()}}


def _worker(rank, world, port, scenarios, out_dir, timeout):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    results = []
    try:
        for scenario in scenarios:
            try:
                results.append(_run_scenario(scenario, rank))
            except Exception as e:  # noqa: BLE001 - e.g. a wrapper this torch lacks
                results.append({"setup_error": f"{type(e).__name__}: {e}"})
    finally:
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
        dist.destroy_process_group()


def run_ranks(scenarios: list[dict], world: int, out_dir, timeout: float = 180) -> list[list[dict]]:
    """Per scenario, what each rank got; fails (after killing them) if a rank hangs.  ``timeout``:
    the process group's, after which a rank stuck in a collective fails."""
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, scenarios, str(out_dir), timeout))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout + 120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    per_rank = [torch.load(out_dir / f"{r}.pt", weights_only=False) for r in range(world)]
    return [list(x) for x in zip(*per_rank)]


def _reference(batches, method="lora-da", max_samples=None):
    result = loradafast.initialize(tiny(), batches, rank=2, method=method, max_samples=max_samples,
                                   progress=False, memory_budget=float("inf"))
    return {n: (x.lora_A, x.lora_B) for n, x in result.layers.items()}


def _assert_same_adapter(per_rank: list[dict], reference: dict) -> None:
    for got in per_rank:
        assert "error" not in got and "setup_error" not in got, got
        assert list(got["layers"]) == list(reference)
        for name, (a, b) in reference.items():
            torch.testing.assert_close(got["layers"][name][0], a, rtol=0, atol=ATOL, msg=name)
            torch.testing.assert_close(got["layers"][name][1], b, rtol=0, atol=ATOL, msg=name)
    first = per_rank[0]["layers"]
    for got in per_rank[1:]:  # every rank holds the same adapter, bit for bit
        for name, (a, b, by, _) in first.items():
            assert torch.equal(got["layers"][name][0], a) and torch.equal(got["layers"][name][1], b)
            assert got["layers"][name][2] == by


def _assert_balanced(got: dict, world: int) -> None:
    """Each layer solved by its owner; whole input groups; estimated costs within one group's cost."""
    groups: dict[str, list] = {}
    for name, (a, b, by, group) in got["layers"].items():
        assert by == got["owners"][name]
        groups.setdefault(group, []).append((name, a.shape[1], b.shape[0], by))
    load = [0.0] * world
    largest = 0.0
    for key, layers in groups.items():
        assert len({by for *_, by in layers}) == 1, f"input group {key} split over ranks"
        shapes = [planner.LayerShape(n, i, o, key, 2) for n, i, o, _ in layers]
        cost = _lora_da_cost(shapes)
        load[layers[0][3]] += cost
        largest = max(largest, cost)
    assert max(load) - min(load) <= largest, (load, largest)
    assert all(x > 0 for x in load), load  # here every rank had work


def _batches(n, seed, size=2):
    return padded_batches(random_sequences(n, lengths=(3, 12), seed=seed), size)


def _budget_for_several_passes(shards) -> int:
    """A per-rank budget under which initialize(tiny(), rank=2) plans several passes on 2 ranks: a
    quarter of the way from the smallest workable budget to the one-pass peak, with the largest
    activations any rank's probe measures (as the ranks agree on them)."""
    from loradafast.methods import registry
    from loradafast.statistics.probe import probe
    from loradafast.targets import find_targets

    model = tiny()
    targets = find_targets(model)
    probes = [probe(model, shard[0], targets, loss_fn=None) for shard in shards if shard]
    groups = probes[0].input_groups
    shapes = [planner.LayerShape(t.name, t.in_features, t.out_features, groups[t.name], 2) for t in targets]
    memory = registry.memory_model(loradafast.REGISTRY["lora-da"], solve_dtype=torch.float64,
                                   device_type="cpu", world_size=2,
                                   activation_bytes=max(p.activation_bytes for p in probes))
    unlimited = planner.plan_passes(shapes, memory, None, "test")
    budget = unlimited.smallest_budget_bytes + (unlimited.peak_bytes - unlimited.smallest_budget_bytes) // 4
    assert planner.plan_passes(shapes, memory, budget, "test").num_passes > 1
    return budget


def test_two_ranks(tmp_path):
    a, b = _batches(7, 1), _batches(2, 2)  # uneven: 4 batches and 1
    union = a + b
    interleaved = [a[0], b[0], a[1]]  # max_samples=5 takes turns: 2 + 2 + 1 sequences
    scenarios = [
        {"shards": [a, b]},
        {"shards": [union, []]},  # an empty shard
        {"shards": [a, b], "method": "lora-ga", "memory_budget": float("inf")},  # no limit: planned after the pass
        {"shards": [a, b], "max_samples": 5},
        {"shards": [a, b], "fail_rank": 1, "wrap": "peft"},
        {"shards": [a, b], "wrap": "ddp", "memory_budget": _budget_for_several_passes([a, b])},  # DDP, passes
    ]
    uneven, empty, ga, capped, failed, ddp = run_ranks(scenarios, 2, tmp_path)
    reference = _reference(union)
    _assert_same_adapter(uneven, reference)
    _assert_balanced(uneven[0], 2)
    assert uneven[0]["logs"] > 0 and uneven[1]["logs"] == 0  # info logs from rank 0 only
    _assert_same_adapter(empty, reference)
    _assert_same_adapter(ga, _reference(union, "lora-ga"))
    _assert_same_adapter(capped, _reference(interleaved, max_samples=5))
    assert "corrupt sample" in failed[1]["error"] and failed[1]["error"].startswith("ValueError")
    assert failed[0]["error"].startswith("RankFailedError") and "rank 1" in failed[0]["error"], failed[0]
    assert "corrupt sample" in failed[0]["error"]
    assert all(r["unchanged"] for r in failed)
    _assert_same_adapter(ddp, reference)
    assert ddp[0]["num_passes"] > 1


def test_three_ranks(tmp_path):
    shards = [_batches(5, 3), [], _batches(3, 4, size=1)]  # uneven, one empty
    union = shards[0] + shards[2]
    (got, pissa) = run_ranks([{"shards": shards}, {"shards": shards, "method": "pissa"}], 3, tmp_path)
    _assert_same_adapter(got, _reference(union))
    _assert_balanced(got[0], 3)
    _assert_same_adapter(pissa, _reference(None, "pissa"))


_lora_da_cost = loradafast.REGISTRY["lora-da"].solve_cost


def test_owner_assignment_is_balanced():
    shapes = planner.llama_shapes(4096, 11008, 32)
    costs = {}
    for s in shapes:
        costs.setdefault(s.input_group, []).append(s)
    for world in (2, 3, 8):
        owners = planner.assign_owners(shapes, world, _lora_da_cost)
        load = [0.0] * world
        for key, layers in costs.items():
            load[owners[key]] += _lora_da_cost(layers)
        assert max(load) - min(load) <= max(_lora_da_cost(g) for g in costs.values())


@pytest.mark.skipif(not hasattr(torch.distributed, "fsdp"), reason="no torch.distributed.fsdp")
def test_fsdp2(tmp_path):
    batches = _batches(7, 1)
    a, b = batches[:2], batches[2:]  # FSDP2 runs collectives in every forward: equal batch counts
    (got, pissa) = run_ranks([{"shards": [a, b], "wrap": "fsdp2"},
                              {"shards": [a, b], "wrap": "fsdp2", "method": "pissa"}], 2, tmp_path)
    if "setup_error" in got[0]:
        pytest.skip(f"FSDP2 on CPU/gloo: {got[0]['setup_error']}")
    _assert_same_adapter(got, _reference(a + b))
    _assert_same_adapter(pissa, _reference(None, "pissa"))


SHORT_TIMEOUT = 30  # seconds: a rank left waiting in a collective fails fast instead of hanging the test


def _assert_agreed_failure(per_rank: list[dict], failing: int, message: str, error_type: str = "ValueError") -> None:
    """The failing rank raised its own error, every other one RankFailedError naming it; both at
    once (not after the process group's timeout), and every model unchanged."""
    for r, got in enumerate(per_rank):
        assert "error" in got, (r, got)
        assert message in got["error"], (r, got["error"])
        if r == failing:
            assert got["error"].startswith(error_type), got["error"]
        else:
            assert got["error"].startswith("RankFailedError") and f"rank {failing}" in got["error"], got["error"]
        assert got["unchanged"], r
        assert got["seconds"] < SHORT_TIMEOUT / 2, (r, got["seconds"])


def test_rank_failing_before_the_pass(tmp_path):
    """Under a memory limit the probe runs one sequence before the pass: a rank whose loader or
    probe fails there, or whose one-shot loader cannot serve a plan of several passes, stops every rank."""
    a, b = _batches(7, 1), _batches(2, 2)
    long = padded_batches(random_sequences(2, lengths=(70, 80), seed=5), 2)  # tiny_llama's context is 64
    scenarios = [
        {"shards": [a, b], "fail_rank": 1, "fail_after": 0, "memory_budget": "1GB"},  # loader raises at once
        {"shards": [a, long], "memory_budget": "1GB"},  # the probe's forward refuses the sequence
        {"shards": [a, b], "one_shot_rank": 1, "memory_budget": _budget_for_several_passes([a, b])},  # on rank 1 a
        # generator, which cannot serve several passes
        {"shards": [a, b], "memory_budget": "1GB"},  # and the ranks still work together afterwards
    ]
    loader, context, one_shot, fine = run_ranks(scenarios, 2, tmp_path, timeout=SHORT_TIMEOUT)
    _assert_agreed_failure(loader, 1, "corrupt sample")
    _assert_agreed_failure(context, 1, "the model's context is 64")
    _assert_agreed_failure(one_shot, 1, "one-shot iterator")
    _assert_same_adapter(fine, _reference(a + b))


def test_preprocess_cache_decided_by_rank_0(tmp_path):
    """preprocess_lora_da(cache_file=...) with node-local disks (a folder per rank): rank 0's disk
    decides for every rank whether the statistics are cached, and only rank 0 writes the file."""
    from peft import LoraConfig

    a, b = _batches(7, 1), _batches(2, 2)
    saved = tmp_path / "saved.safetensors"
    loradafast.collect(tiny(), a + b, max_samples=None, progress=False).save(saved)
    dirs = {case: [tmp_path / case / f"node{r}" for r in range(2)] for case in ("rank0_only", "none", "both")}
    for d in (*dirs["rank0_only"], *dirs["none"], *dirs["both"]):
        d.mkdir(parents=True)
    for d in (dirs["rank0_only"][0], *dirs["both"]):
        shutil.copy(saved, d / "stats.safetensors")
    scenarios = [{"entry": "preprocess", "shards": [a, b], "cache_dirs": [str(d) for d in dirs[case]]}
                 for case in ("rank0_only", "none", "both")]
    rank0_only, none, both = run_ranks(scenarios, 2, tmp_path, timeout=SHORT_TIMEOUT)
    _assert_agreed_failure(rank0_only, 1, "exists on rank 0", "FileNotFoundError")
    model = tiny()
    reference = loradafast.preprocess_lora_da(model, LoraConfig(r=2, target_modules=CACHE_TARGETS), stats=str(saved),
                                              progress=False)
    reference = {n: (x.lora_A, x.lora_B) for n, x in reference.layers.items()}
    for got in (none, both):  # the pass on every rank, or the file loaded on every rank
        for r in got:
            assert "error" not in r, r
            for name, (lora_a, lora_b) in reference.items():
                torch.testing.assert_close(r["layers"][name][0], lora_a, rtol=0, atol=ATOL, msg=name)
                torch.testing.assert_close(r["layers"][name][1], lora_b, rtol=0, atol=ATOL, msg=name)
    assert (dirs["none"][0] / "stats.safetensors").exists()  # written by rank 0 ...
    assert not (dirs["none"][1] / "stats.safetensors").exists()  # ... only
