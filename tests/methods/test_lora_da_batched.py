"""The LoRA-DA solve batches the same-shaped input groups of every block (issue 27): what a deep
model costs in launches and host synchronisations does not grow with its depth, and a block's
adapter does not depend on the blocks solved beside it."""
import dataclasses

import pytest
import torch

import loradafast
from loradafast.linalg.eigen import span_sine
from loradafast.methods.lora_da import solve as lora_da_solve
from loradafast.statistics.sums import LayerStats, Statistics
from syncs import OpCounter, SyncCounter

HIDDEN, KV, FFN, TOKENS = 64, 16, 112, 150  # a Llama block at small width: GQA, an MLP wider than the input
MODULES = {"self_attn.q_proj": (HIDDEN, HIDDEN, "attn"), "self_attn.k_proj": (HIDDEN, KV, "attn"),
           "self_attn.v_proj": (HIDDEN, KV, "attn"), "self_attn.o_proj": (HIDDEN, HIDDEN, "o"),
           "mlp.gate_proj": (HIDDEN, FFN, "mlp"), "mlp.up_proj": (HIDDEN, FFN, "mlp"),
           "mlp.down_proj": (FFN, HIDDEN, "down")}


def _block_stats(blocks: int, first_seed: int = 0) -> Statistics:
    """Synthetic statistics of ``blocks`` Llama blocks; block ``b`` is drawn from seed ``first_seed + b``
    whatever the number of blocks, so block 0 is the same in every stack."""
    layers, z_sums = {}, {}
    for b in range(blocks):
        g = torch.Generator().manual_seed(first_seed + b)
        inputs = {}
        for group, n in (("attn", HIDDEN), ("o", HIDDEN), ("mlp", HIDDEN), ("down", FFN)):
            scale = torch.logspace(0, -2.5, n, dtype=torch.float64)
            inputs[group] = torch.randn(TOKENS, n, generator=g, dtype=torch.float64) * scale
            z_sums[f"model.layers.{b}.{group}"] = (inputs[group].T @ inputs[group]).float()
        for module, (n, out, group) in MODULES.items():
            name = f"model.layers.{b}.{module}"
            grads = torch.randn(TOKENS, out, generator=g, dtype=torch.float64) * torch.logspace(0, -1, out,
                                                                                               dtype=torch.float64)
            layers[name] = LayerStats(name, n, out, (grads.T @ inputs[group]).float(),
                                      (grads * grads).sum(0).float(), f"model.layers.{b}.{group}")
    return Statistics(layers, z_sums, TOKENS, 8, "diag", {})


@pytest.fixture(autouse=True)
def _stacked_on_cpu(monkeypatch):
    """The GPU's batching, here on the CPU (which by default solves one group at a time)."""
    monkeypatch.setattr(lora_da_solve, "MAX_STACK_GROUPS", {})


def _counted(stats: Statistics) -> tuple[int, int, int]:
    """(aten ops of the LoRA-DA solve, its host synchronisations, those of the whole ``solve()``).
    The whole solve's ops also include the per-tensor finite checks of its inputs and outputs,
    which on a CPU are one ``aminmax`` per tensor by choice (one multi-tensor kernel on CUDA)."""
    config = loradafast.LoraDAConfig(eigensolver="lobpcg", num_train_samples=1000)
    ops, syncs = OpCounter(), SyncCounter()
    with ops, syncs:
        lora_da_solve.solve_lora_da(stats, dict.fromkeys(stats.layers, 4), config)
    whole = SyncCounter()
    with whole:
        loradafast.solve(stats, 4, config=config)
    return ops.total, syncs.total, whole.total


def test_launches_and_syncs_do_not_grow_with_depth():
    """Issue 27's count: one group at a time made 1 → 16 blocks cost 16× the aten ops and host
    synchronisations; batched, the 16-block solve costs at most twice the 1-block one."""
    one = _counted(_block_stats(1))
    sixteen = _counted(_block_stats(16))
    assert all(s <= 2 * o for s, o in zip(sixteen, one)), (one, sixteen)


@pytest.mark.parametrize("options", [{"residual_tol": 1e-10}, {"residual_tol": 1e-10, "beta": 1e-12}],
                         ids=["lobpcg", "block-lanczos"])
def test_block_solved_with_others_equals_block_solved_alone(options):
    alone = loradafast.solve(_block_stats(1), 4, eigensolver="lobpcg", num_train_samples=1000, **options)
    stacked = loradafast.solve(_block_stats(16), 4, eigensolver="lobpcg", num_train_samples=1000, **options)
    for name, layer in alone.layers.items():
        other = stacked.layers[name]
        assert other.diagnostics["batch_groups"] == 16 and layer.diagnostics["batch_groups"] == 1
        assert span_sine(layer.lora_A.T, other.lora_A.T) <= 1e-6, name
        assert other.diagnostics["sigma"] == pytest.approx(layer.diagnostics["sigma"], rel=1e-8)
        torch.testing.assert_close(other.lora_B @ other.lora_A, layer.lora_B @ layer.lora_A, rtol=1e-4, atol=1e-7)


def test_batches_split_into_chunks_where_memory_is_short(monkeypatch):
    """Free memory for about two groups' workspace: the 6-block stack is solved in chunks, with the
    same adapters as in one batch."""
    stats = _block_stats(6)
    whole = loradafast.solve(stats, 4, eigensolver="lobpcg", num_train_samples=1000, residual_tol=1e-10)
    per_group = lora_da_solve.workspace_bytes(FFN, [HIDDEN], 4, itemsize=8, full_y=False, dense=False)
    free = int(2.5 * per_group / lora_da_solve.STACK_MEMORY_FRACTION)
    monkeypatch.setattr(lora_da_solve, "free_memory", lambda dev: (free, None))
    chunked = loradafast.solve(stats, 4, eigensolver="lobpcg", num_train_samples=1000, residual_tol=1e-10)
    down = {layer.diagnostics["batch_groups"] for name, layer in chunked.layers.items() if "down_proj" in name}
    assert down <= {1, 2}, down  # the widest groups: at most two per chunk
    for name, layer in whole.layers.items():
        assert layer.diagnostics["batch_groups"] == 6
        assert span_sine(layer.lora_A.T, chunked.layers[name].lora_A.T) <= 1e-6, name


@pytest.mark.parametrize("y_factor", ["diag", "full"])
def test_stacked_solve_matches_dense_float64_within_the_stopping_rule(y_factor):
    """Default stopping rule (Davis–Kahan sine 1e-4): every layer's subspace within it of the dense
    float64 solve; its diagnostics name the target."""
    stats = _block_stats(3)
    if y_factor == "full":
        g = torch.Generator().manual_seed(7)
        for layer in stats.layers.values():
            grads = torch.randn(TOKENS, layer.out_features, generator=g)
            layer.y_sum = grads.T @ grads
        stats = dataclasses.replace(stats, y_factor="full")
    dense = loradafast.solve(stats, 4, eigensolver="dense", num_train_samples=1000)
    lobpcg = loradafast.solve(stats, 4, eigensolver="lobpcg", num_train_samples=1000)
    for name, layer in dense.layers.items():
        got = lobpcg.layers[name]
        assert got.diagnostics["subspace_sine_target"] == 1e-4
        assert span_sine(layer.lora_A.T, got.lora_A.T) <= 1e-4, name


def test_explicit_inverse_path_matches_the_triangular_solves(monkeypatch):
    """The CUDA path (Zλ⁻¹ formed once, applied by GEMM), run on the CPU: the same adapters."""
    stats = _block_stats(2)
    solves = loradafast.solve(stats, 4, eigensolver="lobpcg", num_train_samples=1000, residual_tol=1e-10)
    monkeypatch.setattr(lora_da_solve, "EXPLICIT_INVERSE_DEVICES", ("cpu",))
    gemm = loradafast.solve(stats, 4, eigensolver="lobpcg", num_train_samples=1000, residual_tol=1e-10)
    for name, layer in solves.layers.items():
        assert span_sine(layer.lora_A.T, gemm.layers[name].lora_A.T) <= 1e-6, name
        assert gemm.layers[name].diagnostics["sigma"] == pytest.approx(layer.diagnostics["sigma"], rel=1e-8)


def test_fused_finite_check_agrees_with_the_per_tensor_one():
    """The multi-tensor check CUDA takes, run on the CPU: NaN, ±Inf, huge finite values, empty tensors."""
    from loradafast.linalg.dense import finite_flags

    tensors = [torch.randn(3, 5), torch.tensor([1.0, float("nan")]), torch.tensor([-float("inf"), 2.0]),
               torch.empty(0), torch.tensor([3e38, -3e38]), torch.randn(7, dtype=torch.float64),
               torch.tensor([float("inf")], dtype=torch.bfloat16)]
    expected = [True, False, False, True, True, True, False]
    assert finite_flags(tensors, fused=False) == expected
    assert finite_flags(tensors, fused=True) == expected


def test_cpu_default_solves_group_by_group(monkeypatch):
    monkeypatch.setattr(lora_da_solve, "MAX_STACK_GROUPS", {"cpu": 1})
    result = loradafast.solve(_block_stats(3), 4, eigensolver="lobpcg", num_train_samples=1000)
    assert {layer.diagnostics["batch_groups"] for layer in result.layers.values()} == {1}
