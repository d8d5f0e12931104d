"""LoRA-GA's and LoRA-One's randomized SVD (loradafast.linalg.lowrank) against the exact one: the
same subspaces where the spectrum has a gap (to float32 accuracy, the randomized path's working
precision: sin θ ≤ 1e-5 here), the exact SVD where the spectrum is too flat for the check, and the
path taken recorded in the diagnostics."""
import pytest
import torch

import loradafast
from loradafast import methods
from loradafast.linalg.eigen import span_sine
from loradafast.linalg.lowrank import BACKWARD_TOL, DEPTH, MAX_DEPTH, top_singular_triplets
from loradafast.statistics import LayerStats, Statistics

SHAPES = [(300, 130), (130, 300), (257, 257)]  # tall, wide, odd square: no power of two
FP32 = 1e-5  # ~100 float32 ulps: the randomized SVD runs in float32 (linalg/lowrank.py)


def _with_spectrum(out, inp, singular_values, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = min(out, inp)
    u = torch.linalg.qr(torch.randn(out, n, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inp, n, generator=g, dtype=torch.float64))[0]
    return u @ torch.diag(singular_values) @ v.T


def _decaying(out, inp, ratio=0.85, seed=0):
    """A gradient-like spectrum: geometric decay, every consecutive gap 15 %."""
    return _with_spectrum(out, inp, ratio ** torch.arange(min(out, inp), dtype=torch.float64), seed)


def _flat(out, inp, seed=0):
    """Singular values from 1 down to 0.9 in even steps: power iterations barely separate them."""
    return _with_spectrum(out, inp, torch.linspace(1.0, 0.9, min(out, inp), dtype=torch.float64), seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["paper", "peft"])
def test_randomized_lora_ga_spans_the_exact_subspaces(shape, variant):
    G, r = _decaying(*shape), 4
    exact = methods.lora_ga(G, r, variant=variant, svd="exact")
    auto = methods.lora_ga(G, r, variant=variant)
    assert exact.diagnostics.svd == "exact" and auto.diagnostics.svd == "randomized"
    assert auto.diagnostics.svd_backward_error <= BACKWARD_TOL
    assert span_sine(auto.lora_A.T, exact.lora_A.T) < FP32  # top-r right vectors
    assert span_sine(auto.lora_B, exact.lora_B) < FP32  # the next r left vectors
    # Canonical signs make the factors themselves agree, not only their spans.
    torch.testing.assert_close(auto.lora_A, exact.lora_A, rtol=0, atol=FP32 * float(exact.lora_A.abs().max()))
    torch.testing.assert_close(auto.lora_B, exact.lora_B, rtol=0, atol=FP32 * float(exact.lora_B.abs().max()))


@pytest.mark.parametrize("shape", SHAPES)
def test_randomized_lora_one_is_the_exact_descent_step(shape):
    G, r = _decaying(*shape, seed=1), 5
    exact = methods.lora_one(G, r, svd="exact")
    auto = methods.lora_one(G, r)
    assert auto.diagnostics.svd == "randomized"
    assert span_sine(auto.lora_A.T, exact.lora_A.T) < FP32
    step = exact.lora_B @ exact.lora_A
    torch.testing.assert_close(auto.lora_B @ auto.lora_A, step, rtol=0, atol=FP32 * float(step.abs().max()))


def test_flat_spectrum_falls_back_to_the_exact_svd():
    G, r = _flat(300, 200), 4
    forced = methods.lora_ga(G, r, svd="randomized")
    assert forced.diagnostics.svd == "randomized" and forced.diagnostics.svd_backward_error > BACKWARD_TOL
    auto = methods.lora_ga(G, r)
    exact = methods.lora_ga(G, r, svd="exact")
    assert auto.diagnostics.svd == "exact-fallback"
    # "auto" grew the Krylov space before giving up: a smaller error than the fixed depth's, still too large.
    assert BACKWARD_TOL < auto.diagnostics.svd_backward_error < forced.diagnostics.svd_backward_error
    torch.testing.assert_close(auto.lora_A, exact.lora_A, rtol=0, atol=0)
    torch.testing.assert_close(auto.lora_B, exact.lora_B, rtol=0, atol=0)
    assert methods.lora_one(G, r).diagnostics.svd == "exact-fallback"


def test_the_sine_estimate_covers_the_actual_error():
    """Few iterations leave a measurable error; the Wedin estimate must not understate it."""
    G, k = _with_spectrum(400, 300, 0.97 ** torch.arange(300, dtype=torch.float64)), 8
    u, s, vh = torch.linalg.svd(G, full_matrices=False)
    for depth in (1, 2, 3):  # depth 0: k columns, no triplet beyond them for the check
        top = top_singular_triplets(G, k, mode="randomized", depth=depth)
        actual = max(span_sine(top.vh.T, vh[:k].T), span_sine(top.u, u[:, :k]))
        assert 1e-12 < actual <= top.sine_estimate, (depth, actual, top.sine_estimate)


def test_a_failed_check_grows_the_krylov_space_before_the_exact_svd():
    """Slow geometric decay (2 % per singular value): the default depth misses the check, a deeper
    space passes it, and the result is still the exact SVD's to float32 accuracy."""
    G, k = _with_spectrum(300, 200, 0.98 ** torch.arange(200, dtype=torch.float64)), 8
    fixed = top_singular_triplets(G, k, mode="randomized")
    assert fixed.iterations == DEPTH and fixed.backward_error > BACKWARD_TOL
    grown = top_singular_triplets(G, k)
    assert grown.path == "randomized" and DEPTH < grown.iterations <= MAX_DEPTH
    assert grown.backward_error <= BACKWARD_TOL and grown.sketch_size == k * (grown.iterations + 1)
    u, s, vh = torch.linalg.svd(G)
    torch.testing.assert_close(grown.s, s[:k], rtol=1e-4, atol=0)


@pytest.mark.parametrize("rank", [3, 12])
def test_low_rank_gradients(rank):
    """A gradient of lower rank than the Krylov space (few tokens): the space stops growing where
    the rank is exhausted, and stays orthonormal; below k + 1 directions the exact SVD runs."""
    values = torch.zeros(200, dtype=torch.float64)
    values[:rank] = 0.9 ** torch.arange(rank, dtype=torch.float64)
    G, k = _with_spectrum(300, 200, values), 8
    top = top_singular_triplets(G, k)
    u, s, vh = torch.linalg.svd(G)
    kept = min(rank, k)
    assert span_sine(top.vh[:kept].T, vh[:kept].T) < FP32 and span_sine(top.u[:, :kept], u[:, :kept]) < FP32
    eye = torch.eye(k, dtype=G.dtype)
    torch.testing.assert_close(top.vh @ top.vh.T, eye, rtol=0, atol=FP32)
    torch.testing.assert_close(top.u.T @ top.u, eye, rtol=0, atol=FP32)
    if rank <= k:
        assert top.path == "exact-fallback"
        # Even where the check is only reported: k triplets, not fewer.
        forced = top_singular_triplets(G, k, mode="randomized")
        assert forced.path == "exact-fallback" and forced.vh.shape == (k, 200) and forced.u.shape == (300, k)
    else:
        assert top.path == "randomized" and top.sketch_size <= rank + 1 and top.backward_error < FP32


def test_small_layers_take_the_exact_svd_and_randomized_is_deterministic():
    G = _decaying(40, 24)  # min(out, in) < 64: the exact SVD is as fast as the sketch
    assert methods.lora_ga(G, 2).diagnostics.svd == "exact"
    G = _decaying(300, 130)
    a, b = methods.lora_ga(G, 4, svd="randomized"), methods.lora_ga(G, 4, svd="randomized")
    assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    with pytest.raises(ValueError, match="svd"):
        methods.lora_ga(G, 4, svd="lowrank")


def _stats(layers: dict[str, torch.Tensor]) -> Statistics:
    return Statistics({n: LayerStats(n, g.shape[1], g.shape[0], g.float(), None, n) for n, g in layers.items()},
                      {}, num_tokens=100, num_sequences=1, y_factor=None)


@pytest.mark.parametrize("method", ["lora-ga", "lora-one"])
def test_solve_records_the_svd_path_and_obeys_the_option(method):
    stats = _stats({"decaying": _decaying(300, 130), "flat": _flat(130, 300)})
    auto = loradafast.solve(stats, 4, method=method)
    assert auto.layers["decaying"].diagnostics.svd == "randomized"
    assert auto.layers["flat"].diagnostics.svd == "exact-fallback"
    assert auto.options["svd"] == "auto"
    config = loradafast.LoraGAConfig if method == "lora-ga" else loradafast.LoraOneConfig
    exact = loradafast.solve(stats, 4, method=method, config=config(svd="exact"))
    assert {layer.diagnostics.svd for layer in exact.layers.values()} == {"exact"}
    assert span_sine(auto.layers["decaying"].lora_A.T, exact.layers["decaying"].lora_A.T) < 1e-6
    forced = loradafast.solve(stats, 4, method=method, svd="randomized")
    assert {layer.diagnostics.svd for layer in forced.layers.values()} == {"randomized"}
    with pytest.raises(ValueError, match="svd"):
        config(svd="fast")


@pytest.mark.parametrize("scale", [1e-14, 1e12])
def test_the_randomized_path_does_not_depend_on_the_gradient_scale(scale):
    """σ₁ = 1e12 or 1e-14: the Krylov norms carry σ₁⁴, which left float32's range, so every check
    failed and "auto" took the exact SVD with infinite diagnostics (even "randomized" did)."""
    G, r = _decaying(300, 130), 4
    reference = top_singular_triplets(G, r, mode="randomized")
    for mode in ("auto", "randomized"):
        top = top_singular_triplets(G * scale, r, mode=mode)
        assert top.path == "randomized" and top.backward_error <= max(10 * reference.backward_error, 1e-5)
        torch.testing.assert_close(top.s / scale, reference.s, rtol=1e-5, atol=0)
        assert span_sine(top.vh.T, reference.vh.T) < FP32


@pytest.mark.parametrize("shape", SHAPES)
def test_a_stack_gives_each_matrix_its_own_result(shape):
    """The batched randomized SVD (top_singular_triplets_batched) on a stack of a gapped, a flat and
    a low-rank gradient: each gets the path, depth and triplets it gets alone, the gapped one the
    exact SVD's subspaces."""
    from loradafast.linalg.lowrank import top_singular_triplets_batched

    values = torch.zeros(min(shape), dtype=torch.float64)
    values[:5] = 0.9 ** torch.arange(5, dtype=torch.float64)
    stack = torch.stack([_decaying(*shape), _flat(*shape), _with_spectrum(*shape, values)])
    together = top_singular_triplets_batched(stack, 8, boundaries=(4, 8))
    assert together.paths == ["randomized", "exact-fallback", "exact-fallback"]
    for i, a in enumerate(stack):
        alone, mine = top_singular_triplets(a, 8, boundaries=(4, 8)), together.layer(i)
        assert (mine.path, mine.iterations, mine.sketch_size) == (alone.path, alone.iterations, alone.sketch_size)
        kept = 5 if i == 2 else 8  # beyond rank 5, any basis of the null space is the SVD's
        assert span_sine(mine.vh[:kept].T, alone.vh[:kept].T) < FP32
        assert span_sine(mine.u[:, :kept], alone.u[:, :kept]) < FP32
    u, s, vh = torch.linalg.svd(stack[0])
    assert span_sine(together.vh[0].T, vh[:8].T) < FP32 and span_sine(together.u[0], u[:, :8]) < FP32
    torch.testing.assert_close(together.s[0], s[:8], rtol=FP32, atol=0)
