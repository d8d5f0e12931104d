"""The methods other than LoRA-DA solved in stacks of same-shaped layers (issue 27): the randomized
SVD of LoRA-GA and LoRA-One runs on a whole stack with host synchronisations that do not grow
with it, each matrix still meets the backward-error check on its own (linalg/lowrank.py), and the
per-shape solve (methods/method.py ``per_shape``) gives every layer the factors and diagnostics
of the layer-by-layer solve.  Both paths run here on the CPU, against each other and against the
exact float64 SVD."""
import math

import pytest
import torch

import loradafast
from loradafast import methods
from loradafast.linalg import lowrank
from loradafast.linalg.eigen import span_sine
from loradafast.linalg.lowrank import BACKWARD_TOL, DEPTH, top_singular_triplets, top_singular_triplets_batched
from loradafast.methods import gradient_svd, registry
from loradafast.methods import method as method_module
from loradafast.methods.problem import Problem
from loradafast.statistics import LayerStats, Statistics
from syncs import OpCounter, SyncCounter

FP32 = 1e-5  # the randomized path's working precision (float32), as in test_lowrank.py
STACKED = ("cuda", "cpu")  # method.BATCHED_DEVICES that stacks on this CPU too


def _with_spectrum(out, inp, singular_values, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = min(out, inp)
    u = torch.linalg.qr(torch.randn(out, n, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inp, n, generator=g, dtype=torch.float64))[0]
    return (u * singular_values) @ v.T


def _geometric(out, inp, ratio, seed=0):
    return _with_spectrum(out, inp, ratio ** torch.arange(min(out, inp), dtype=torch.float64), seed)


def _low_rank(out, inp, rank, seed=0):
    values = torch.zeros(min(out, inp), dtype=torch.float64)
    values[:rank] = 0.9 ** torch.arange(rank, dtype=torch.float64)
    return _with_spectrum(out, inp, values, seed)


def _mixed(out=300, inp=200):
    """Every way a matrix can go, in one stack: accepted at DEPTH (15 % gaps), accepted after the
    space grew (2 % decay), the exact SVD after MAX_DEPTH (a flat spectrum), a rank below k + 1
    (the space ends early: exact), a rank just above it (dependent directions dropped mid-block),
    and scales far outside float32's comfortable range."""
    n = min(out, inp)
    return torch.stack([
        _geometric(out, inp, 0.85, seed=0),
        _geometric(out, inp, 0.98, seed=1),
        _with_spectrum(out, inp, torch.linspace(1.0, 0.9, n, dtype=torch.float64), seed=2),
        _low_rank(out, inp, 5, seed=3),
        _low_rank(out, inp, 12, seed=4),
        _geometric(out, inp, 0.85, seed=5) * 1e12,
        _geometric(out, inp, 0.9, seed=6) * 1e-14,
        _geometric(out, inp, 0.85, seed=7),
    ]).float()


def _counted(fn) -> tuple[int, int]:
    ops, syncs = OpCounter(), SyncCounter()
    with ops, syncs:
        fn()
    return ops.total, syncs.total


# ---- the batched randomized SVD --------------------------------------------------------------

@pytest.mark.parametrize("spectrum", ["decaying", "mixed"])
def test_ops_and_syncs_do_not_grow_with_the_stack(spectrum):
    """1 vs 16 same-shaped matrices: at most twice the aten ops and host synchronisations (a layer
    at a time: 16×).  "mixed": the single matrix is the costliest case (a flat spectrum: every
    growth step, then the exact SVD), the stack of 16 holds every case of ``_mixed`` twice."""
    if spectrum == "decaying":
        stack = torch.stack([_geometric(300, 130, 0.85, seed=i) for i in range(16)]).float()
        one = stack[:1]
    else:
        stack = torch.cat([_mixed(300, 130)] * 2)
        one = stack[2:3]
    single = _counted(lambda: top_singular_triplets_batched(one, 8, boundaries=(4, 8)))
    batched = _counted(lambda: top_singular_triplets_batched(stack, 8, boundaries=(4, 8)))
    assert all(b <= 2 * s for b, s in zip(batched, single)), (single, batched)
    # The counters see per-matrix work: a matrix at a time, the same 16 break the bound on both.
    looped = _counted(lambda: [top_singular_triplets(m, 8, boundaries=(4, 8)) for m in stack])
    assert all(x > 2 * s for x, s in zip(looped, single)), (single, looped)


@pytest.mark.parametrize("mode", ["auto", "randomized"])
def test_a_matrix_gets_the_same_triplets_alone_and_in_a_stack(mode):
    stack = _mixed()
    together = top_singular_triplets_batched(stack, 8, boundaries=(4, 8), mode=mode)
    assert set(together.paths) == {"randomized", "exact-fallback"}  # the stack takes both ways
    if mode == "auto":
        assert max(together.iterations) > DEPTH  # and some matrices grew
    else:
        # No growth; the low-rank matrices' spaces end early, the one of rank 5 < k + 1 in the exact SVD.
        assert max(together.iterations) == DEPTH > together.iterations[3] and together.paths[3] == "exact-fallback"
    for i, a in enumerate(stack):
        alone, mine = top_singular_triplets(a, 8, boundaries=(4, 8), mode=mode), together.layer(i)
        assert (mine.path, mine.iterations, mine.sketch_size) == (alone.path, alone.iterations, alone.sketch_size), i
        if alone.backward_error is not None and math.isfinite(alone.backward_error):
            assert mine.backward_error == pytest.approx(alone.backward_error, rel=1e-3, abs=1e-7), i
        torch.testing.assert_close(mine.s, alone.s, rtol=0, atol=FP32 * float(alone.s[0]))
        kept = 5 if i == 3 else 8  # beyond rank 5, any basis of the null space is the SVD's
        assert span_sine(mine.u[:, :kept], alone.u[:, :kept]) < FP32, i
        assert span_sine(mine.vh[:kept].T, alone.vh[:kept].T) < FP32, i


def _check_against_exact(a: torch.Tensor, top, k: int, tol: float = BACKWARD_TOL):
    """``top`` (a :class:`TopSingular` of ``a``) against the float64 SVD: a randomized result meets
    the documented check, recomputed here in float64 (the k triplets are exact for a matrix within
    tol·σ₁ of ``a``), and the exact ones are the SVD's."""
    a64 = a.double()
    k = top.s.shape[0]
    u, s, vh = top.u.double(), top.s.double(), top.vh.double()
    exact = torch.linalg.svdvals(a64)
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, eye, rtol=0, atol=10 * FP32)
    torch.testing.assert_close(vh @ vh.T, eye, rtol=0, atol=10 * FP32)
    backward = float(torch.linalg.matrix_norm(a64 @ vh.T - u * s) / exact[0])
    if top.path == "randomized":
        assert backward <= tol and backward == pytest.approx(top.backward_error, rel=1e-2, abs=FP32)
        # Weyl: singular values of a matrix within tol·σ₁ of a move by at most that.
        assert float((s - exact[:k]).abs().max()) <= tol * float(exact[0])
    else:
        assert backward < 1e-10  # the exact SVD, in float64
        torch.testing.assert_close(s, exact[:k], rtol=1e-12, atol=1e-12 * float(exact[0]))


@pytest.mark.parametrize("shape,k", [((300, 130), 8), ((130, 300), 8), ((257, 301), 9), ((701, 650), 40),
                                     ((301, 257), 1), ((97, 96), 2), ((40, 24), 3)],
                         ids=["tall", "wide", "odd", "large-k", "k=1", "near-minimum", "small"])
def test_every_matrix_of_a_stack_meets_the_check_against_the_exact_svd(shape, k):
    """A well-separated spectrum, a slowly decaying one, a flat one and a tiny scale (rescaled), in
    one stack; every matrix's result against the float64 SVD of its (float32) entries."""
    out, inp = shape
    n = min(out, inp)
    stack = torch.stack([_geometric(out, inp, 0.8, seed=0), _geometric(out, inp, 0.99, seed=1),
                         _with_spectrum(out, inp, torch.linspace(1.0, 0.95, n, dtype=torch.float64), seed=2),
                         _geometric(out, inp, 0.8, seed=3) * 3e-9]).float()
    top = top_singular_triplets_batched(stack, k, dtype=torch.float64)
    for i, a in enumerate(stack):
        _check_against_exact(a, top.layer(i), k)
    if n < max(lowrank.MIN_SIZE, lowrank.MIN_SIZE_RATIO * k * (DEPTH + 1)):
        assert set(top.paths) == {"exact"}  # too small for the randomized path to pay
    else:
        assert top.paths[0] == top.paths[3] == "randomized" and top.paths[2] == "exact-fallback", top.paths


def test_a_stack_rescaled_by_powers_of_two_loses_nothing():
    """Scaling by a power of two is exact: a matrix scaled by 2^40 gets the same triplets, its
    singular values multiplied by exactly 2^40."""
    a = _geometric(300, 130, 0.85).float()
    reference = top_singular_triplets(a, 6)
    scaled = top_singular_triplets(a * 2.0**40, 6)  # max entry ≈ 1e11: rescaled
    assert scaled.path == reference.path == "randomized"
    assert torch.equal(scaled.u, reference.u) and torch.equal(scaled.vh, reference.vh)
    assert torch.equal(scaled.s, reference.s * 2.0**40)


def test_stack_input_is_checked():
    with pytest.raises(ValueError, match="stack"):
        top_singular_triplets_batched(torch.zeros(30, 20), 2)
    empty = top_singular_triplets_batched(torch.zeros(0, 300, 130), 4)
    assert len(empty) == 0 and empty.u.shape == (0, 300, 4)


# ---- the per-shape solve against the layer-by-layer one ----------------------------------------

GROUPS = {"a": 130, "b": 300, "c": 257}
LAYERS = {  # name: (in, out, input group, kind of gradient)
    **{f"tall.{i}": (130, 300, "a", "decaying") for i in range(4)},
    "tall.slow": (130, 300, "a", "slow"),
    "tall.flat": (130, 300, "a", "flat"),
    "tall.few": (130, 300, "a", "few"),
    "wide.0": (300, 130, "b", "decaying"), "wide.1": (300, 130, "b", "slow"),
    "odd.0": (257, 257, "c", "decaying"), "odd.1": (257, 257, "c", "decaying"),
    "small.0": (130, 40, "a", "decaying"), "small.1": (130, 40, "a", "decaying"),
}
RANKS = {"tall.3": 3, "odd.1": 5}  # beside the default 4: a shape split by rank


def _gradient(out, inp, kind, seed):
    n = min(out, inp)
    if kind == "flat":
        return _with_spectrum(out, inp, torch.linspace(1.0, 0.9, n, dtype=torch.float64), seed)
    if kind == "few":  # fewer than LoRA-GA's 2r + 1 directions: the exact SVD, its 2r triplets unique
        return _low_rank(out, inp, 8, seed)
    return _geometric(out, inp, 0.85 if kind == "decaying" else 0.98, seed)


@pytest.fixture(scope="module")
def problem():
    layers, z_sums, weights = {}, {}, {}
    g = torch.Generator().manual_seed(11)
    for group, n in GROUPS.items():
        x = torch.randn(400, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1, n, dtype=torch.float64)
        z_sums[group] = (x.T @ x).float()
    for i, (name, (inp, out, group, kind)) in enumerate(LAYERS.items()):
        grad = _gradient(out, inp, kind, seed=i).float() * 3.0  # num_sequences = 3: G is the sum / 3
        y = torch.rand(out, generator=g) + 0.05
        layers[name] = LayerStats(name, inp, out, grad, y * 400, group)
        weights[name] = _with_spectrum(out, inp, torch.linspace(2.0, 0.1, min(out, inp), dtype=torch.float64) ** 2,
                                       seed=100 + i).float()
    stats = Statistics(layers, z_sums, num_tokens=400, num_sequences=3, y_factor="diag")
    return stats, weights


def _solve(stats, weights, method, stacked, monkeypatch, **options):
    monkeypatch.setattr(method_module, "BATCHED_DEVICES", STACKED if stacked else ())
    needs = registry.REGISTRY[method].needs_weights
    return loradafast.solve(stats if registry.REGISTRY[method].data_aware else None, 4, method=method,
                            weights=weights if needs else None, ranks=RANKS, lora_alpha=16, **options)


def _same_diagnostics(mine, theirs, name, exact: bool):
    """The same fields, the same meaning: equal where they are discrete, within rounding where they
    are numbers (the exact paths up to float64 rounding; the randomized ones up to float32's)."""
    assert type(mine) is type(theirs) and set(mine) == set(theirs), name
    for key, value in theirs.items():
        other = mine[key]
        if torch.is_tensor(value):
            assert other.dtype == value.dtype and other.shape == value.shape, (name, key)
            if value.is_floating_point():
                torch.testing.assert_close(other, value, rtol=1e-12 if exact else FP32, atol=0, msg=f"{name} {key}")
            else:
                assert torch.equal(other, value), (name, key)
        elif isinstance(value, float) and not exact and key.startswith("svd_"):
            assert other == pytest.approx(value, rel=1e-3, abs=1e-7), (name, key)
        elif isinstance(value, float):
            assert other == pytest.approx(value, rel=1e-12, nan_ok=True), (name, key)
        else:
            assert other == value, (name, key)


@pytest.mark.parametrize("method,options", [
    ("pissa", {}), ("milora", {}), ("fisher-subspace", {}),
    ("lora-ga", {"svd": "exact"}), ("lora-one", {"svd": "exact"}),
    ("lora-ga", {"svd": "exact", "dtype": torch.float32}),
])
def test_exact_paths_per_shape_equal_per_layer(problem, method, options, monkeypatch):
    stats, weights = problem
    per_layer = _solve(stats, weights, method, False, monkeypatch, **options)
    per_shape = _solve(stats, weights, method, True, monkeypatch, **options)
    for name, layer in per_layer.layers.items():
        got = per_shape.layers[name]
        assert got.rank == RANKS.get(name, 4) and got.subtract_scaling == layer.subtract_scaling
        scale = float(layer.lora_A.abs().max()), float(layer.lora_B.abs().max())
        torch.testing.assert_close(got.lora_A, layer.lora_A, rtol=0, atol=1e-6 * scale[0])
        torch.testing.assert_close(got.lora_B, layer.lora_B, rtol=0, atol=1e-6 * scale[1])
        _same_diagnostics(got.diagnostics, layer.diagnostics, name, exact=True)


@pytest.mark.parametrize("method,variant", [("lora-ga", "paper"), ("lora-ga", "peft"), ("lora-one", None)])
def test_randomized_paths_per_shape_agree_with_per_layer_and_the_exact_svd(problem, method, variant, monkeypatch):
    stats, weights = problem
    options = {} if variant is None else {"loraga_variant": variant}
    per_layer = _solve(stats, weights, method, False, monkeypatch, **options)
    per_shape = _solve(stats, weights, method, True, monkeypatch, **options)
    exact = _solve(stats, weights, method, False, monkeypatch, svd="exact", **options)
    paths = set()
    for name, layer in per_layer.layers.items():
        got, reference = per_shape.layers[name], exact.layers[name]
        d = got.diagnostics
        paths.add(d.svd)
        _same_diagnostics(d, layer.diagnostics, name, exact=False)
        if d.svd == "randomized":
            assert d.svd_backward_error <= BACKWARD_TOL, name
        for factor in ("lora_A", "lora_B"):
            mine, theirs = getattr(got, factor), getattr(layer, factor)
            torch.testing.assert_close(mine, theirs, rtol=0, atol=FP32 * float(theirs.abs().max()), msg=name)
        # The per-shape factors against the exact SVD's: where the spectrum has 15 % gaps, their
        # subspaces to float32 accuracy (the others: the check above, test_lowrank.py).
        if d.svd == "randomized" and LAYERS[name][3] == "decaying":
            assert span_sine(got.lora_A.T, reference.lora_A.T) < 10 * FP32, name
            assert span_sine(got.lora_B, reference.lora_B) < 10 * FP32, name
    assert paths == {"randomized", "exact-fallback", "exact"}  # every path, stacked
    assert per_shape.layers["tall.flat"].diagnostics.svd == "exact-fallback"
    assert per_shape.layers["tall.slow"].diagnostics.svd_krylov_depth > DEPTH


def test_stacks_are_bounded_and_split_by_device_shape_and_rank(problem, monkeypatch):
    """A stack holds at most STACK_BYTES of matrices: with room for two tall layers, the tall rank-4
    layers come in stacks of two, with the factors of one stack."""
    stats, weights = problem
    calls = []
    original = gradient_svd.lora_ga_stack

    def spy(grads, rank, **kw):
        calls.append((tuple(grads.shape), rank))
        return original(grads, rank, **kw)

    monkeypatch.setattr(gradient_svd, "lora_ga_stack", spy)
    whole = _solve(stats, weights, "lora-ga", True, monkeypatch)
    assert sorted(calls) == sorted([((6, 300, 130), 4), ((1, 300, 130), 3), ((2, 130, 300), 4),
                                    ((1, 257, 257), 4), ((1, 257, 257), 5), ((2, 40, 130), 4)])
    calls.clear()
    monkeypatch.setattr(method_module, "STACK_BYTES", 2 * 8 * 300 * 130 + 1)
    split = _solve(stats, weights, "lora-ga", True, monkeypatch)
    tall = [shape[0] for shape, rank in calls if shape[1:] == (300, 130) and rank == 4]
    assert tall == [2, 2, 2]
    for name, layer in whole.layers.items():  # (a batched product's rounding may depend on the batch)
        assert split.layers[name].diagnostics.svd == layer.diagnostics.svd, name
        torch.testing.assert_close(split.layers[name].lora_A, layer.lora_A, rtol=0,
                                   atol=FP32 * float(layer.lora_A.abs().max()))
    calls.clear()
    _solve(stats, weights, "lora-ga", False, monkeypatch)
    assert {shape[0] for shape, _ in calls} == {1}  # a layer at a time where the device is not listed


def test_per_shape_solve_costs_do_not_grow_with_the_layers(monkeypatch):
    """The whole per-shape solve of 16 same-shaped layers: host synchronisations as for one layer;
    its aten ops grow only by the per-layer reads and outputs (a copy in and a few out per layer)."""
    monkeypatch.setattr(method_module, "BATCHED_DEVICES", STACKED)

    def problem_of(count):
        layers = {f"l{i}": LayerStats(f"l{i}", 130, 300, _geometric(300, 130, 0.85, seed=i).float(), None, "x")
                  for i in range(count)}
        stats = Statistics(layers, {}, num_tokens=100, num_sequences=1, y_factor=None)
        return Problem(stats, None, {n: (130, 300, "linear") for n in layers},
                                       dict.fromkeys(layers, 4), dict.fromkeys(layers, 2.0))

    record = registry.REGISTRY["lora-ga"]
    config = registry.build_config(record, None, {})
    one = _counted(lambda: record.solve(problem_of(1), config))
    sixteen = _counted(lambda: record.solve(problem_of(16), config))
    assert sixteen[1] <= one[1] and sixteen[0] <= 2 * one[0], (one, sixteen)


def test_stacked_lora_one_refuses_a_zero_gradient_as_one_layer_does():
    grads = torch.stack([_geometric(300, 130, 0.85).float(), torch.zeros(300, 130)])
    with pytest.raises(FloatingPointError, match="zero or not finite"):
        gradient_svd.lora_one_stack(grads, 4)
    with pytest.raises(FloatingPointError, match="zero or not finite"):
        methods.lora_one(grads[1], 4)
    grads[0, 3, 7] = float("nan")
    with pytest.raises(FloatingPointError, match="zero or not finite"):
        gradient_svd.lora_one_stack(grads[:1], 4)


def test_pissa_niter_stays_random_layer_by_layer(problem, monkeypatch):
    """svd_lowrank draws from the global RNG: where it runs, the layers are solved one at a time
    in the problem's order, stacked or not, so a seed gives the same factors either way."""
    _, weights = problem
    solved = []
    for stacked in (False, True):
        torch.manual_seed(3)
        solved.append(_solve(None, weights, "pissa", stacked, monkeypatch, pissa_niter=2))
    for name, layer in solved[0].layers.items():
        assert torch.equal(solved[1].layers[name].lora_A, layer.lora_A), name


def test_stacked_factors_are_saved_as_separate_tensors(problem, monkeypatch, tmp_path):
    """Each layer's factors own their storage (safetensors refuses tensors that share one)."""
    stats, weights = problem
    result = _solve(stats, weights, "lora-ga", True, monkeypatch, dtype=torch.float32)
    tall = [result.layers[f"tall.{i}"].lora_A for i in range(3)]
    assert len({t.untyped_storage().data_ptr() for t in tall}) == 3
    result.save(tmp_path / "adapter", convert_to_lora=False)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
