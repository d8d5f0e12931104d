"""The LoRA-DA solve, stage by stage, on one Llama-block-shaped set of synthetic statistics
(``benchmarks/bench_scale.py``'s ``tokens`` spectrum: q, k, v, o, gate, up, down at width × scale):

* ``factor``: the damped factors of one input group (one Cholesky of Zλ, the Y factors;
  ``_stack_factors``);
* ``sigma_estimate``: the rough σ = ‖Δ‖₂ from a few block power steps, on the group's operator
  (``_stack_operator``, which builds it from the factors and G);
* ``preconditioner``: building ``Zλ(sZλ + cI)⁻¹`` for the group's clusters of c;
* ``omega_product``: one implicit Ω product with a block of r + 8 columns;
* ``solve``: the whole ``loradafast.solve`` of the block, with each eigensolver.

The stage functions are internal (``loradafast.methods.lora_da.solve``); the suite follows them when they move."""
from __future__ import annotations

import pytest
import torch
from _micro import ON_CUDA
from bench_scale import synthetic_stats

import loradafast
from loradafast.methods.lora_da import LoraDAConfig
from loradafast.methods.lora_da.solve import _stack_factors, _stack_operator

SCALE = 1.0 if ON_CUDA else 1 / 32
HIDDEN, INTER = int(4096 * SCALE), int(11008 * SCALE)
RANK = 8
CONFIG = LoraDAConfig(beta=0.03, num_train_samples=100_000, alpha_b=1.0, damping=1e-6, damping_mode="absolute",
                      gradient="fisher", dtype=torch.float64)
GROUPS = {"attn": ["k", "q", "v"], "mlp": ["gate", "up"], "down": ["down"]}


@pytest.fixture(scope="module")
def stats():
    device = torch.device("cuda" if ON_CUDA else "cpu")
    return synthetic_stats(HIDDEN, INTER, "tokens", device)


def _device(stats, key):
    return stats.layers[GROUPS[key][0]].g_sum.device


def _group(stats, key):
    """The input group's operator (a stack of one group), σ estimated as the solve leaves it."""
    return _stack_operator(stats, [(key, GROUPS[key])], CONFIG, _device(stats, key), times={})


@pytest.mark.parametrize("key", list(GROUPS))
def test_factor(run, stats, key):
    run(lambda: _stack_factors(stats, [(key, GROUPS[key])], CONFIG, _device(stats, key)),
        group=f"solve stages {key}", stage="factor", hidden=HIDDEN, intermediate=INTER)


@pytest.mark.parametrize("key", list(GROUPS))
def test_sigma_estimate(run, stats, key):
    group = _group(stats, key)
    run(group.estimate_sigma, group=f"solve stages {key}", stage="sigma_estimate")


@pytest.mark.parametrize("key", list(GROUPS))
def test_preconditioner(run, stats, key):
    group = _group(stats, key)
    run(group.preconditioner, group=f"solve stages {key}", stage="preconditioner")


@pytest.mark.parametrize("key", list(GROUPS))
def test_omega_product(run, stats, key):
    group = _group(stats, key)
    x = torch.randn(group.batch, group.n, RANK + 8, dtype=group.dtype, device=group.chol.device)
    run(lambda: group.omega(x), group=f"solve stages {key}", stage="omega_product", k=RANK + 8)


@pytest.mark.parametrize("eigensolver", ["dense", "lobpcg"])
def test_solve(run, stats, eigensolver):
    run(lambda: loradafast.solve(stats, RANK, dtype=torch.float64, eigensolver=eigensolver),
        group="solve block", eigensolver=eigensolver, hidden=HIDDEN, intermediate=INTER, rank=RANK)
