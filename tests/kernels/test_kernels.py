"""Kernels against their references (and the references against float64 ground truth).

Without a GPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1 before
anything imports triton) through ``impl="triton"``; the interpreter runs each program instance in
Python, so shapes stay small, with a few medium ones.

Tolerance rule for the accumulations. bf16/fp16 products are exact in fp32 (8- or 11-bit
mantissas multiply into at most 22 bits), so kernel and reference differ only in the order of the
fp32 additions, and fp32 products round once more. For a sum of T terms each implementation is
within ``(T + 1)·u·Σ|terms|`` of the exact value (u = 2⁻²⁴, the textbook worst-case bound for
recursive summation), hence ``|kernel − reference| ≤ 2(T + 1)·u·Σ|terms|`` elementwise, plus the
rounding of the add into a nonzero accumulator. The bound is per element, uses the actual
magnitudes, and is tight enough that a dropped token, a wrong tile or a missed mask fails it by
orders of magnitude.
"""
from __future__ import annotations

import os

import pytest
import torch

from loradafast import kernels
from loradafast.kernels import reference

triton = pytest.importorskip("triton")
tl = triton.language
from loradafast.kernels.triton_common import lower_tile_coords  # noqa: E402  (after the importorskip)

U32 = 2.0 ** -24
DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# Where the Triton path runs: every test that takes ``triton_device`` is parametrised by
# conftest.pytest_generate_tests over the devices the path can use here ("cpu" in the interpreter,
# "cuda" where there is a GPU; a compiled kernel cannot read CPU tensors). Inputs are built on the
# CPU, moved for the Triton call, and results come back to the CPU, in-place accumulators written
# back, so every test reads the same on both machines.


def on_impl(fn, *args, impl, device="cpu", **kwargs):
    if impl != "triton" or device == "cpu":
        return fn(*args, impl=impl, **kwargs)
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*moved, impl=impl, **kwargs)
    for a, m in zip(args, moved):
        if isinstance(a, torch.Tensor) and a is not m:
            a.copy_(m.cpu())  # the accumulators are updated in place
    back = {id(m): a for a, m in zip(args, moved) if isinstance(a, torch.Tensor)}
    if isinstance(out, tuple):
        return tuple(back.get(id(o), o.cpu() if isinstance(o, torch.Tensor) else o) for o in out)
    return back.get(id(out), out.cpu() if isinstance(out, torch.Tensor) else out)


def _mask(kind: str, tokens: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    keep = torch.rand(tokens, generator=gen) > 0.35
    if tokens > 3:  # a padded tail, as right-padded batches have
        keep[-3:] = False
    return keep if kind == "bool" else keep.float()


def _keep_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t if mask is None else t[mask.bool()]


def _assert_sum_close(actual, expected, abs_terms, n_terms, *, base=None, where=None):
    """Elementwise ``|actual − expected| ≤ 2(n_terms + 1)·u·Σ|terms| (+ u·|base|)``, see module doc."""
    bound = 2 * (n_terms + 1) * U32 * abs_terms + 1e-30
    if base is not None:
        bound = bound + 2 * U32 * base.abs()
    err = (actual - expected).abs()
    if where is not None:
        err, bound = err[where], bound[where]
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"deviation {worst:.2f}x the summation bound (max abs err {err.max().item():.3e})"


def _lower(d: int) -> torch.Tensor:
    return torch.ones(d, d, dtype=torch.bool).tril()


# ------------------------------------------------------------------------------------------
# References against float64 ground truth computed a different way (boolean row selection)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_kfac_reference_matches_float64(mask_kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 13, generator=gen).to(torch.bfloat16)
    mask = _mask(mask_kind, 50, gen)
    acc = reference.kfac_accumulate(torch.zeros(13, 13), x, mask)
    xs = _keep_rows(x.double(), mask)
    truth = xs.T @ xs
    _assert_sum_close(acc.double(), truth, xs.abs().T @ xs.abs(), xs.shape[0], where=_lower(13))
    full = reference.symmetric_from_lower(acc)
    assert torch.equal(full, full.T)


def test_gradient_and_diag_references_match_float64():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(40, 6, generator=gen, dtype=torch.float16)
    x = torch.randn(40, 9, generator=gen, dtype=torch.float16)
    mask = _mask("bool", 40, gen)
    gs, xs = _keep_rows(g.double(), mask), _keep_rows(x.double(), mask)
    acc = reference.gradient_accumulate(torch.zeros(6, 9), g, x, mask)
    _assert_sum_close(acc.double(), gs.T @ xs, gs.abs().T @ xs.abs(), gs.shape[0])
    diag = reference.diag_accumulate(torch.zeros(6), g, mask)
    _assert_sum_close(diag.double(), (gs * gs).sum(0), (gs * gs).sum(0), gs.shape[0])


def test_masked_padding_with_nan_is_ignored(triton_device):
    # Fully masked rows may hold NaN (e.g. attention over no keys); they must not reach the sums.
    x = torch.randn(9, 5)
    x[-2:] = float("nan")
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    for impl in ("reference", "triton"):
        acc = on_impl(kernels.kfac_accumulate, torch.zeros(5, 5), x, mask, impl=impl, device=triton_device)
        grad = on_impl(kernels.gradient_accumulate, torch.zeros(5, 5), x, x, mask, impl=impl, device=triton_device)
        assert torch.isfinite(acc.tril()).all() and torch.isfinite(grad).all(), impl


# ------------------------------------------------------------------------------------------
# K-FAC accumulation: Triton (interpreter on CPU) against the reference

KFAC_CASES = [
    # (d, tokens, dtype, mask)
    (1, 1, torch.bfloat16, "none"),
    (37, 1, torch.float16, "bool"),
    (37, 7, torch.bfloat16, "bool"),
    (37, 300, torch.bfloat16, "float"),
    (64, 300, torch.float32, "bool"),  # d a multiple of the tile: no column masking
    (129, 7, torch.float32, "none"),
    (129, 300, torch.bfloat16, "bool"),
    (70, 300, torch.float16, "none"),
]


@pytest.mark.parametrize("d,tokens,dtype,mask_kind", KFAC_CASES)
def test_kfac_triton_matches_reference(d, tokens, dtype, mask_kind, triton_device):
    gen = torch.Generator().manual_seed(d * 1000 + tokens)
    x = (torch.randn(tokens, d, generator=gen) * 3).to(dtype)
    mask = _mask(mask_kind, tokens, gen)
    got = on_impl(kernels.kfac_accumulate, torch.zeros(d, d), x, mask, impl="triton", device=triton_device)
    want = kernels.kfac_accumulate(torch.zeros(d, d), x, mask, impl="reference")
    xs = _keep_rows(x.float(), mask).double()
    _assert_sum_close(got, want, (xs.abs().T @ xs.abs()).float(), max(1, xs.shape[0]), where=_lower(d))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kfac_accumulates_across_calls(dtype, triton_device):
    # Several batches into one accumulator that starts nonzero: the kernel must add, not store.
    gen = torch.Generator().manual_seed(7)
    d = 45
    start = torch.randn(d, d, generator=gen) * 10
    got, want = start.clone(), start.clone()
    terms = torch.zeros(d, d, dtype=torch.float64)
    n = 0
    for tokens in (1, 33, 100):
        x = torch.randn(tokens, d, generator=gen).to(dtype)
        mask = _mask("bool", tokens, gen)
        on_impl(kernels.kfac_accumulate, got, x, mask, impl="triton", device=triton_device)
        kernels.kfac_accumulate(want, x, mask, impl="reference")
        xs = _keep_rows(x.double(), mask)
        terms += xs.abs().T @ xs.abs()
        n += xs.shape[0]
    _assert_sum_close(got, want, terms.float(), n + 3, base=start, where=_lower(d))


def test_kfac_skips_upper_tiles_and_split_k_atomics(triton_device):
    from loradafast.kernels import kfac_triton, triton_common

    gen = torch.Generator().manual_seed(3)
    d, tokens = 100, 260
    block = triton_common.block_for(d, None)
    x = torch.randn(tokens, d, generator=gen).to(torch.bfloat16)
    mask = _mask("bool", tokens, gen)
    start = torch.randn(d, d, generator=gen)
    want = kernels.kfac_accumulate(start.clone(), x, mask, impl="reference")
    xs = _keep_rows(x.double(), mask)
    terms = (xs.abs().T @ xs.abs()).float()
    for split in (1, 3):  # 3 slices of the tokens add into each tile with fp32 atomics
        got = kfac_triton.kfac_accumulate(start.clone().to(triton_device), x.to(triton_device), mask.to(triton_device),
                                         split_k=split).cpu()
        _assert_sum_close(got, want, terms, xs.shape[0], base=start, where=_lower(d))
        # Tiles strictly above the diagonal are never launched: their contents are untouched.
        tile = torch.arange(d) // block
        upper_tiles = tile[:, None] < tile[None, :]
        assert upper_tiles.any()
        assert torch.equal(got[upper_tiles], start[upper_tiles])


@triton.jit
def _tile_coords_probe(pid_ptr, i_ptr, j_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i, j = lower_tile_coords(tl.load(pid_ptr + offs))
    tl.store(i_ptr + offs, i)
    tl.store(j_ptr + offs, j)


def test_lower_tile_enumeration_is_exact_for_large_grids(triton_device):
    # pid -> (i, j) goes through an fp32 sqrt, which overshoots by one just below the triangular
    # numbers from about 4600 tile rows on (pid ~ 1e7); check the integer correction there and on
    # small grids, around every triangular number.
    rows = torch.cat([torch.arange(200), torch.arange(4500, 5400)]).long()
    tri = rows * (rows + 1) // 2
    pid = torch.cat([tri - 1, tri, tri + 1]).clamp(min=0).to(torch.int32)
    pid = torch.nn.functional.pad(pid, (0, -pid.numel() % 1024))
    pid = pid.to(triton_device)
    i, j = torch.empty_like(pid), torch.empty_like(pid)
    _tile_coords_probe[(pid.numel() // 1024,)](pid, i, j, BLOCK=1024)
    pid, i, j = pid.cpu(), i.cpu(), j.cpu()
    i64, j64 = i.long(), j.long()
    assert ((j64 >= 0) & (j64 <= i64)).all()
    assert torch.equal(i64 * (i64 + 1) // 2 + j64, pid.long())


def test_kfac_strided_input_and_leading_dims(triton_device):
    # A [batch, seq, d] activation, and a non-contiguous column slice of a wider tensor.
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(2, 11, 60, generator=gen).to(torch.bfloat16)
    x = wide[..., 5:45]  # row stride 60, not 40
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    got = on_impl(kernels.kfac_accumulate, torch.zeros(40, 40), x, mask, impl="triton", device=triton_device)
    want = kernels.kfac_accumulate(torch.zeros(40, 40), x.contiguous().reshape(22, 40), mask.reshape(-1),
                                   impl="reference")
    xs = _keep_rows(x.reshape(22, 40).double(), mask.reshape(-1))
    _assert_sum_close(got, want, (xs.abs().T @ xs.abs()).float(), xs.shape[0], where=_lower(40))


def test_kfac_medium_width(triton_device):
    # A realistic width (SmolLM2-135M hidden size) with few tokens: 171 lower tiles of 32.
    gen = torch.Generator().manual_seed(5)
    d, tokens = 576, 40
    x = torch.randn(tokens, d, generator=gen).to(torch.bfloat16)
    mask = _mask("bool", tokens, gen)
    got = on_impl(kernels.kfac_accumulate, torch.zeros(d, d), x, mask, impl="triton", device=triton_device)
    want = kernels.kfac_accumulate(torch.zeros(d, d), x, mask, impl="reference")
    xs = _keep_rows(x.double(), mask)
    _assert_sum_close(got, want, (xs.abs().T @ xs.abs()).float(), xs.shape[0], where=_lower(d))


@pytest.mark.parametrize("dx,dg,tokens,dtype", [(37, 70, 300, torch.bfloat16), (64, 9, 7, torch.float32)])
def test_kfac_pair_matches_two_references(dx, dg, tokens, dtype, triton_device):
    gen = torch.Generator().manual_seed(dx + dg)
    x = torch.randn(tokens, dx, generator=gen).to(dtype)
    g = (torch.randn(tokens, dg, generator=gen) * 1e-3).to(dtype)  # gradients are small
    mask = _mask("float", tokens, gen)
    ax0, ag0 = torch.randn(dx, dx, generator=gen), torch.randn(dg, dg, generator=gen) * 1e-6
    ax, ag = on_impl(kernels.kfac_accumulate_pair, ax0.clone(), x, ag0.clone(), g, mask, impl="triton",
                     device=triton_device)
    rx, rg = kernels.kfac_accumulate_pair(ax0.clone(), x, ag0.clone(), g, mask, impl="reference")
    xs, gs = _keep_rows(x.double(), mask), _keep_rows(g.double(), mask)
    _assert_sum_close(ax, rx, (xs.abs().T @ xs.abs()).float(), xs.shape[0], base=ax0, where=_lower(dx))
    _assert_sum_close(ag, rg, (gs.abs().T @ gs.abs()).float(), gs.shape[0], base=ag0, where=_lower(dg))


# ------------------------------------------------------------------------------------------
# G accumulation


@pytest.mark.parametrize("out,inp,tokens,dtype,mask_kind", [
    (1, 1, 1, torch.bfloat16, "none"),
    (45, 70, 300, torch.bfloat16, "bool"),
    (33, 20, 7, torch.float16, "float"),
    (96, 40, 65, torch.float32, "bool"),  # several row groups in the grouped tile order
])
def test_gradient_triton_matches_reference(out, inp, tokens, dtype, mask_kind, triton_device):
    gen = torch.Generator().manual_seed(out * inp + tokens)
    g = (torch.randn(tokens, out, generator=gen) * 1e-2).to(dtype)
    x = torch.randn(tokens, inp, generator=gen).to(dtype)
    mask = _mask(mask_kind, tokens, gen)
    start = torch.randn(out, inp, generator=gen) * 1e-2
    got = on_impl(kernels.gradient_accumulate, start.clone(), g, x, mask, impl="triton", device=triton_device)
    want = kernels.gradient_accumulate(start.clone(), g, x, mask, impl="reference")
    gs, xs = _keep_rows(g.double(), mask), _keep_rows(x.double(), mask)
    _assert_sum_close(got, want, (gs.abs().T @ xs.abs()).float(), max(1, gs.shape[0]), base=start)


# ------------------------------------------------------------------------------------------
# Ω with an explicit Δ̂ (the reference that LoRA-DA's dense formulas use; no kernel)


def _omega_problem(b, n, ms, k, gen, dtype=torch.float32):
    """A batch of b layers of width n with output sizes ms, Δ̂ zero-padded to max(ms) rows."""
    m = max(ms)
    a = torch.randn(b, 3 * n, n, generator=gen, dtype=torch.float64)
    z = a.mT @ a / (3 * n) + 0.1 * torch.eye(n, dtype=torch.float64)  # Zλ, condition number ~ 100
    chol = torch.linalg.cholesky(z)
    delta = torch.zeros(b, m, n, dtype=torch.float64)
    for i, mi in enumerate(ms):
        di = torch.randn(mi, n, generator=gen, dtype=torch.float64)
        delta[i, :mi] = di / torch.linalg.matrix_norm(di, ord=2)  # Δ̂ = Δ/‖Δ‖₂
    c = torch.rand(b, generator=gen, dtype=torch.float64) * 0.5 + 0.05
    X = torch.randn(b, n, k, generator=gen, dtype=torch.float64)
    return X.to(dtype), chol.to(dtype), c.to(dtype), delta.to(dtype), z


def test_omega_dense_matches_explicit_formula():
    gen = torch.Generator().manual_seed(10)
    X, chol, c, delta, z = _omega_problem(2, 7, [5, 3], 2, gen, torch.float64)
    explicit = c[:, None, None] * torch.linalg.inv(z) - 0.7 * delta.mT @ delta
    torch.testing.assert_close(reference.omega_dense(chol, c, delta, 0.7), explicit)
    torch.testing.assert_close(reference.omega_dense(torch.linalg.inv(z), c, delta, 0.7, z_is_inverse=True),
                               explicit)


@pytest.mark.parametrize("z_is_inverse", [False, True])
def test_omega_apply_matches_dense(z_is_inverse):
    gen = torch.Generator().manual_seed(11 + z_is_inverse)
    X, chol, c, delta, z = _omega_problem(3, 37, [45, 20, 1], 5, gen)
    zarg = torch.linalg.inv(z).float() if z_is_inverse else chol
    got = reference.omega_apply(X, zarg, c, delta, 0.7, z_is_inverse=z_is_inverse)
    # Ground truth in float64 from the float32 inputs. fp32 error of a solve with cond(Zλ) ≈ 100 on
    # n = 37 is ~cond·n·u ≈ 2e-4 relative to ‖c·Zλ⁻¹X‖ in the worst case, typically far less;
    # 1e-4 of the column scale with a 1e-4 rtol separates round-off from a wrong term (O(1)).
    truth = reference.omega_dense(torch.linalg.cholesky(z), c.double(), delta.double(), 0.7) @ X.double()
    scale = truth.abs().amax(dim=1, keepdim=True)
    assert ((got.double() - truth).abs() <= 1e-4 * scale + 1e-4 * truth.abs()).all()


def test_omega_zero_padded_rows_change_nothing():
    # Layers of width n and different output sizes are batched by zero-padding Δ̂'s rows.
    gen = torch.Generator().manual_seed(12)
    ms = [45, 20, 3]
    X, chol, c, delta, _ = _omega_problem(3, 33, ms, 4, gen)
    batched = reference.omega_apply(X, chol, c, delta, 0.5)
    for i, mi in enumerate(ms):
        one = slice(i, i + 1)
        alone = reference.omega_apply(X[one], chol[one], c[one], delta[one, :mi], 0.5)[0]
        # fp32 sums of the same O(1) terms in another order: 1e-5 is
        # ~100 ulp of the result, far below any dropped or doubled row (O(1)).
        torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-5)
        # and Δ̂ᵀΔ̂ itself is unchanged by the zero rows
        torch.testing.assert_close(delta[i].mT @ delta[i], delta[i, :mi].mT @ delta[i, :mi])


# ------------------------------------------------------------------------------------------
# Autotuning: configs that spill or overflow shared memory on sm_90 are pruned before they are
# compiled (tests/kernels/test_kernels_sm90.py compiles every config kept, for sm_90, and checks)


def _cfg(c):
    return c.kwargs["BLOCK_K"], c.num_warps, c.num_stages


def _kept(block, precision, branches=1):
    from loradafast.kernels import triton_common

    return {_cfg(c) for c in triton_common.kept_configs(triton_common.TUNED_CONFIGS, block, precision, branches)}


def test_autotune_prunes_configs_that_spill_or_overflow_shared_memory():
    from loradafast.kernels import triton_common

    everything = {_cfg(c) for c in triton_common.TUNED_CONFIGS}
    assert _kept(64, None) == _kept(64, "ieee") == everything  # narrow tiles: every candidate fits
    # 128-wide tiles spill at 4 warps (sm_90 compiles); BLOCK_K 128 over 3 stages of 4-byte operands
    # needs 384 KB of shared memory.
    assert _kept(128, None) == {(64, 8, 3), (128, 8, 3), (32, 8, 4)}
    assert _kept(128, "tf32") == {(64, 8, 3), (32, 8, 4)}
    # The pair kernel's two branches each allocate their pipeline buffers: twice the shared memory.
    assert _kept(128, None, branches=2) == {(64, 8, 3), (32, 8, 4)}
    assert triton_common.tile_shared_bytes(128, 32, 4, 4, branches=2) > triton_common.SHARED_MEMORY_LIMIT  # 256 KB
    assert triton_common.tile_shared_bytes(128, 64, 3, 4, branches=2) > triton_common.SHARED_MEMORY_LIMIT  # 384 KB
    assert triton_common.SHARED_MEMORY_LIMIT == 227 * 1024
    for block in (64, 128, 256):  # never empty, even where nothing fits the model
        for precision in (None, "ieee", "tf32"):
            assert _kept(block, precision, branches=2)


@pytest.mark.parametrize("branches", [1, 2])
@pytest.mark.parametrize("precision", [None, "ieee", "tf32"])
def test_every_tile_the_host_picks_has_a_config_that_fits(branches, precision, monkeypatch):
    # The pruner's fallback (the config with the fewest registers) would compile a config the model
    # rejects: the host picks the tile so that it is never needed.
    from loradafast.kernels import triton_common

    monkeypatch.setattr(triton_common, "INTERPRET", False)  # the GPU's tiles, not the interpreter's
    operand_bytes = 2 if precision is None else 4
    for size in (64, 576, 1024, 4096, 11008):
        block = triton_common.block_for(size, precision, branches)
        assert block == (128 if size >= 1024 and precision != "ieee" and (branches, precision) != (2, "tf32") else 64)
        assert any(triton_common.config_fits(block, k, w, s, operand_bytes, precision == "ieee", branches)
                   for k, w, s in map(_cfg, triton_common.TUNED_CONFIGS))


def test_autotuners_prune_and_cache_across_processes():
    from loradafast.kernels import gradient_triton, kfac_pair_triton, kfac_triton, triton_common

    for kernel, branches in ((kfac_triton._kfac_kernel, 1), (kfac_pair_triton._kfac_pair_kernel, 2),
                             (gradient_triton._gradient_kernel, 1)):
        assert kernel.early_config_prune.branches == branches
    # Triton turns the on-disk cache off in the interpreter; on a GPU timings persist per shape.
    assert triton_common.autotune_options()["cache_results"] is True


# ------------------------------------------------------------------------------------------
# Dispatch


def test_auto_on_cpu_never_touches_triton(monkeypatch):
    from loradafast.kernels import dispatch

    def boom(module):
        raise AssertionError(f"Triton path ({module}) taken for CPU tensors under impl='auto'")

    monkeypatch.setattr(dispatch, "_triton_op", boom)
    x = torch.randn(5, 4)
    kernels.kfac_accumulate(torch.zeros(4, 4), x)
    kernels.kfac_accumulate_pair(torch.zeros(4, 4), x, torch.zeros(4, 4), x)
    kernels.gradient_accumulate(torch.zeros(4, 4), x, x)


def test_launch_guard_makes_the_tensors_cuda_device_current(monkeypatch):
    # Triton launches on the current CUDA device: the guard must make the tensor's device current
    # (a layer on cuda:1 of a device_map model), and leave CUDA alone for CPU tensors.
    import contextlib
    from types import SimpleNamespace

    from loradafast.kernels import triton_common

    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with triton_common.on_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))):
        assert entered == [torch.device("cuda", 1)]
    with triton_common.on_device(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]


def _guard_cases(gen):
    x, g = torch.randn(7, 5, generator=gen), torch.randn(7, 3, generator=gen)
    return {
        "kfac_triton": ("_kfac_kernel", kernels.kfac_accumulate, (torch.zeros(5, 5), x)),
        "kfac_pair_triton": ("_kfac_pair_kernel", kernels.kfac_accumulate_pair,
                             (torch.zeros(5, 5), x, torch.zeros(3, 3), g)),
        "gradient_triton": ("_gradient_kernel", kernels.gradient_accumulate, (torch.zeros(3, 5), g, x)),
    }


@pytest.mark.parametrize("module_name", ["kfac_triton", "kfac_pair_triton", "gradient_triton"])
def test_every_kernel_launches_inside_its_tensors_device_guard(module_name, monkeypatch, triton_device):
    import contextlib
    import importlib

    from loradafast.kernels import triton_common

    module = importlib.import_module(f"loradafast.kernels.{module_name}")
    kernel_name, op, args = _guard_cases(torch.Generator().manual_seed(20))[module_name]
    real_guard, kernel = triton_common.on_device, getattr(module, kernel_name)
    inside, at_launch = [], []

    @contextlib.contextmanager
    def spy(t):
        inside.append(t.device)
        with real_guard(t):
            yield
        inside.pop()

    class Launch:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                at_launch.append(list(inside))
                return kernel[grid](*a, **kw)
            return launch

    monkeypatch.setattr(triton_common, "on_device", spy)
    monkeypatch.setattr(module, kernel_name, Launch())
    on_impl(op, *args, impl="triton", device=triton_device)
    assert at_launch == [[torch.device(triton_device, 0) if triton_device == "cuda" else torch.device("cpu")]]


def test_force_reference_env(monkeypatch):
    monkeypatch.setenv("LORADAFAST_FORCE_REFERENCE", "1")
    assert kernels.force_reference()
    monkeypatch.setenv("LORADAFAST_FORCE_REFERENCE", "0")
    assert not kernels.force_reference()
    monkeypatch.delenv("LORADAFAST_FORCE_REFERENCE")
    assert not kernels.force_reference()


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.kfac_accumulate(torch.zeros(3, 3), torch.randn(2, 3), impl="triton")


@pytest.mark.parametrize("cuda,interpreting,want", [
    (False, True, ["cpu"]),  # the CPU test machine
    (True, False, ["cuda"]),  # a GPU machine: CPU tensors cannot reach a compiled kernel
    (True, True, ["cpu", "cuda"]),  # interpreter chosen by hand on a GPU machine
    (False, False, []),
])
def test_triton_device_rule(cuda, interpreting, want):
    from devices import triton_devices

    assert triton_devices(cuda, interpreting) == want


def test_triton_device_matches_kernel_mode(triton_device):
    # The kernels' interpreter mode is fixed at import: "cpu" is offered exactly when it is on, and
    # a CUDA machine without TRITON_INTERPRET compiles (no test feeds CPU tensors to a kernel).
    from loradafast.kernels import triton_common

    assert (triton_device == "cpu") <= triton_common.INTERPRET
    assert triton_common.INTERPRET == (os.environ.get("TRITON_INTERPRET", "0") == "1")
    if torch.cuda.is_available() and not triton_common.INTERPRET:
        assert triton_device == "cuda"


def test_argument_checks():
    with pytest.raises(ValueError, match="impl"):
        kernels.kfac_accumulate(torch.zeros(3, 3), torch.randn(2, 3), impl="cuda")
    with pytest.raises(TypeError):
        kernels.kfac_accumulate(torch.zeros(3, 3, dtype=torch.float16), torch.randn(2, 3))
    with pytest.raises(ValueError):
        kernels.kfac_accumulate(torch.zeros(4, 4), torch.randn(2, 3))
    with pytest.raises(ValueError, match="mask"):
        kernels.kfac_accumulate(torch.zeros(3, 3), torch.randn(2, 3), torch.ones(3))
    with pytest.raises(ValueError):
        kernels.gradient_accumulate(torch.zeros(2, 3), torch.randn(4, 2), torch.randn(5, 3))


# ------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the compiled kernels, autotuning, split-K, cuBLAS fp32-out path


@pytest.mark.gpu
@pytest.mark.parametrize("d,tokens", [(576, 8192), (1536, 2048), (37, 5000), (4096, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kfac_matches_reference(d, tokens, dtype):
    gen = torch.Generator(device="cuda").manual_seed(d)
    x = torch.randn(tokens, d, device="cuda", generator=gen).to(dtype)
    mask = torch.rand(tokens, device="cuda", generator=gen) > 0.2
    start = torch.randn(d, d, device="cuda", generator=gen)
    got = kernels.kfac_accumulate(start.clone(), x, mask)  # auto -> Triton
    want = kernels.kfac_accumulate(start.clone(), x, mask, impl="reference")
    xs = x.float() * mask[:, None]
    _assert_sum_close(got, want, xs.abs().T @ xs.abs(), tokens, base=start, where=_lower(d).cuda())


@pytest.mark.gpu
def test_gpu_kfac_pair_and_deterministic_mode():
    x = torch.randn(4096, 576, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(4096, 1536, device="cuda", dtype=torch.bfloat16) * 1e-3
    mask = torch.rand(4096, device="cuda") > 0.1
    ax, ag = kernels.kfac_accumulate_pair(torch.zeros(576, 576, device="cuda"), x,
                                          torch.zeros(1536, 1536, device="cuda"), g, mask)
    rx, rg = kernels.kfac_accumulate_pair(torch.zeros(576, 576, device="cuda"), x,
                                          torch.zeros(1536, 1536, device="cuda"), g, mask, impl="reference")
    xs, gs = x.float() * mask[:, None], g.float() * mask[:, None]
    _assert_sum_close(ax, rx, xs.abs().T @ xs.abs(), 4096, where=_lower(576).cuda())
    _assert_sum_close(ag, rg, gs.abs().T @ gs.abs(), 4096, where=_lower(1536).cuda())
    torch.use_deterministic_algorithms(True)
    try:  # no split-K atomics: bitwise reproducible
        a1 = kernels.kfac_accumulate(torch.zeros(576, 576, device="cuda"), x, mask)
        a2 = kernels.kfac_accumulate(torch.zeros(576, 576, device="cuda"), x, mask)
        assert torch.equal(a1.tril(), a2.tril())
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_gpu_gradient_matches_reference(impl):
    g = torch.randn(3000, 1536, device="cuda", dtype=torch.bfloat16) * 1e-2
    x = torch.randn(3000, 576, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(3000, device="cuda") > 0.2
    start = torch.randn(1536, 576, device="cuda")
    got = on_impl(kernels.gradient_accumulate, start.clone(), g, x, mask, impl=impl, device="cuda")
    want = kernels.gradient_accumulate(start.clone(), g, x, mask, impl="reference")
    gs, xs = g.float() * mask[:, None], x.float() * mask[:, None]
    _assert_sum_close(got, want, gs.abs().T @ xs.abs(), 3000, base=start)
