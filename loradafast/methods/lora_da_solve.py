"""LoRA-DA for many layers at once: one factorisation per shared input, then one batched
eigensolve per input group and rank (docs/design.md §4, §6).

The layers that read the same input (q, k, v; gate, up) share ``Zλ``.  Each such group is solved
on its own, from its statistics, and freed before the next, so the working memory is that of one
group.  The LOBPCG path applies Ω implicitly (:mod:`.lora_da_operator`): ``O((n² + n·out)·k)`` per
product and no per-layer ``O(n³)`` work.  The dense path materialises Ω per layer (``O(n³)``),
which on CPU is still the faster choice for small widths.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from ..linalg import eigen
from ..options import LoraDAConfig
from ..progress import track
from ..result import LoraDADiagnostics
from ..statistics.store import Statistics
from . import lora_da
from .baselines import Factors
from .lora_da_operator import GroupOmega

# eigensolver="auto" on CPU: dense eigh of the materialised Ω (O(n³) per layer) up to width
# CPU_DENSE_MAX_N, except for ranks up to CPU_ITERATIVE_MAX_RANK from width CPU_ITERATIVE_MIN_N
# on; the iterative path (block Lanczos / LOBPCG, O(n²) per product) above.  On CUDA "auto" is
# always iterative (not yet measured there).  Measured with the start block and the sine test
# (below): SmolLM2-135M's real statistics (210 layers, widths 576 and 1536, 2 threads,
# solve_cpu.json), iterative over dense 0.42 (r = 8), 0.51 (16), 0.70 (32), 1.34 (64); one
# synthetic q/k/v group (bench_scale.py "tokens", 1 thread) 0.52-0.85 at width 576 and 0.27-0.47
# at 2048 for r = 8-64, ties (milliseconds) below 512.  Before those two changes dense won
# at these widths, hence the rank limit where only synthetic statistics favour iterative.
CPU_DENSE_MAX_N = 2048
CPU_ITERATIVE_MAX_RANK = 32
CPU_ITERATIVE_MIN_N = 512
# Mixed precision of the float64 solve: the products with G (an fp32 sum) and the preconditioner
# (an approximation anyway) in this dtype, the solves with Zλ, whose conditioning needs float64,
# in float64.  None: everything in the working dtype.  Measured (bench_scale --dtypes
# float64,mixed,float32, 7B block ×1/4, "tokens" spectrum, CPU): subspace sin θ against dense
# float64 5.7e-9 (float64), 5.2e-4 (mixed: misses the 1e-4 goal, and σ's LOBPCG stalls on the
# noise), 3.5e-1 (float32); so the default stays float64 throughout.
MIXED_DTYPE: torch.dtype | None = None
# How far above the measured rounding of the implicit Ω products LOBPCG's default tolerance sits.
FLOOR_MARGIN = 30.0
# LOBPCG block beyond r.  A product with G reads all of G whatever the number of columns, and up
# to ~32 columns it costs about the same time (CPU, measured; on a GPU it is bandwidth-bound up
# to ~100 columns in float64), while each extra column speeds convergence: iterations for the
# q/k/v group at 7B widths, r = 8, "decay" / "tokens" spectra: 17 / 39 (8+16), 14 / 33 (8+24),
# 11 / 27 (8+40) (benchmarks/bench_scale.py statistics).
OVERSAMPLE = 24
# Where every layer's preconditioner is the identity (the variance term is negligible: the
# shortcut of lora_da_operator.GroupOmega.preconditioner), block Lanczos runs before LOBPCG
# (linalg/eigen.py), in blocks of r + KRYLOV_OVERSAMPLE columns with a basis of up to
# KRYLOV_COLUMNS.  Measured on the bench_scale.py statistics at 7B widths, "tokens", 1 thread,
# to a residual of 1e-10: q/k/v group, LOBPCG (8 + 24 columns) 33 iterations = 1,152
# column-products; block Lanczos, blocks of 16: 496; blocks of 32: 672.  In time (one run, same
# machine): eigen stage 32.7 s (LOBPCG), 24.7 s (blocks of 32, capped at 640 columns, then 3
# LOBPCG iterations), 21.5 s (blocks of 16): the products are bound by reading G, whatever
# their width up to ~32 columns, so fewer, narrower products win.  The basis of 768 columns costs
# 2·768·n per layer (≈ 135 MB at n = 11008 in float64), beside the n² of the factor.
KRYLOV_OVERSAMPLE = 8
KRYLOV_COLUMNS = 768
# A layer is converged where its residual meets the tolerance (default: 1e-10 in float64, or
# 30× the rounding floor), or where Davis–Kahan bounds its subspace's sine to the exact one by
# SUBSPACE_SINE (residual·‖Ω‖₂/gap, the gap θ_{r+1} − θ_r from the Ritz values).  The default
# tolerance was chosen for that sine where ‖Ω‖₂ ~ c/λ dwarfs the gaps; where the variance term is
# small ‖Ω‖₂/gap is ~500 (the q/k/v group above) and the sine test stops 4 blocks earlier (28 of
# 32), the subspace then 1.5e-8 from the one at 1e-10 (the bound is pessimistic).
SUBSPACE_SINE = 1e-6
# The eigensolve starts from the block σ's power steps end with (GroupOmega.estimate_sigma),
# r + KRYLOV_OVERSAMPLE columns wide, instead of a random one: on the q/k/v group above, with the
# sine test, 24 blocks instead of 28 (eigen stage 8.4 s against 10.9 s; the power steps at 16
# columns instead of 8 cost 0.15-0.35 s more; one run each).


def solve_lora_da(stats: Statistics, ranks: dict[str, int], config: LoraDAConfig, *,
                  device=None) -> dict[str, Factors]:
    """The LoRA-DA factors (``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``, diagnostics) of the
    layers in ``ranks``, one input group after the other."""
    out: dict[str, Factors] = {}
    groups = _input_groups(stats, ranks)
    for key, names in track(groups.items(), total=len(groups), desc="loradafast: LoRA-DA solve", unit="group"):
        dev = torch.device(device) if device is not None else stats.layers[names[0]].g_sum.device
        out.update(_solve_input_group(stats, names, ranks, config, dev, key))
    return {name: out[name] for name in ranks}


def auto_is_dense(device_type: str, n: int, r: int) -> bool:
    """Whether ``eigensolver="auto"`` solves a group of width ``n`` at rank ``r`` densely."""
    if device_type == "cuda" or n > CPU_DENSE_MAX_N:
        return False
    return not (r <= CPU_ITERATIVE_MAX_RANK and n >= CPU_ITERATIVE_MIN_N)


def _input_groups(stats: Statistics, ranks: dict[str, int]) -> dict[str, list[str]]:
    """Input group (the key of its Z) → the layers that read that input, in sorted order."""
    by_input: dict[str, list[str]] = defaultdict(list)
    for name in sorted(ranks):
        by_input[stats.layers[name].input_group].append(name)
    return {key: by_input[key] for key in sorted(by_input)}


def _solve_input_group(stats, names, ranks, config: LoraDAConfig, dev, key) -> dict[str, Factors]:
    """Factor the group's Zλ once, eigensolve per rank, make σ exact, then form every lora_B."""
    times: dict[str, float] = {}
    start_columns = max(ranks[k] for k in names) + KRYLOV_OVERSAMPLE
    group, factors = _group_operator(stats, names, config, dev, times, start_columns)
    solved = {}
    for r in sorted({ranks[k] for k in names}):
        idx = [i for i, k in enumerate(names) if ranks[k] == r]
        solver = config.eigensolver
        if solver == "auto":
            solver = "dense" if auto_is_dense(dev.type, group.n, r) else "lobpcg"
        with _timed(times, "eigen_s", dev):
            solved[r] = (idx, *_eigensolve(group, _Subset(group, idx), r, solver, config.residual_tol))
    _refine_sigma(group, solved, times, dev)
    out = {}
    for idx, result, floor, precond_count in solved.values():
        with _timed(times, "lora_b_s", dev):
            b_all = group.lora_b(_Subset(group, idx)._embed(result.eigenvectors.to(group.dtype)))
        out.update(_layer_results(group, idx, [names[i] for i in idx], result, floor, precond_count, b_all,
                                  config.gamma, factors))
    for name in names:  # stage times of the whole input group, shared by its layers
        out[name].diagnostics.input_group = key
        out[name].diagnostics.group_times_s = dict(times)
    return out


def _refine_sigma(group: GroupOmega, solved: dict, times: dict, dev) -> None:
    """σ made exact from the eigenvectors; the eigenvalues, found with the rough σ, rescaled."""
    rough = group.sigma.clone()
    with _timed(times, "sigma_s", dev):
        group.refine_sigma(_start_block(group, solved), tol=_sigma_tol(group.dtype), check_every=_check_every(dev))
    rescale = (rough / group.sigma) ** 2  # the eigensolve saw Ω with the rough σ
    for idx, result, _, _ in solved.values():
        result.eigenvalues = result.eigenvalues * rescale[idx, None].to(result.eigenvalues.dtype)
        result.op_norm = result.op_norm * rescale[idx].to(result.op_norm.dtype)


@contextmanager
def _timed(times: dict, stage: str, device: torch.device):
    """Wall time of a stage, synchronised on CUDA so that queued kernels are counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times[stage] = times.get(stage, 0.0) + time.perf_counter() - start


def _group_operator(stats, names, config: LoraDAConfig, dev, times, start_columns: int = 8):
    with _timed(times, "factor_s", dev):
        group, factors = _factor_group(stats, names, config, dev)
    with _timed(times, "sigma_s", dev):
        group.estimate_sigma(k=min(group.n, start_columns))
    bad = [k for k, s in zip(names, group.sigma.tolist()) if not (s > 0 and s < float("inf"))]
    if bad:
        raise FloatingPointError(
            f"the gradient estimate of {bad} is zero or not finite, so it defines no direction; the layer "
            "does not influence the loss on these samples (exclude it, or use more samples)"
        )
    return group, factors


def _factor_group(stats, names, config: LoraDAConfig, dev):
    dtype = config.dtype
    z_mat = stats.Z(names[0], dtype).to(dev)
    z = lora_da.damped_z(z_mat, config.damping, config.damping_mode)
    work = z.dtype
    factors = [lora_da.damped_factors(z, stats.Y(k, dtype).to(dev), config.damping, config.damping_mode)
               for k in names]
    if any(f.cholesky_dtype == torch.float64 for f in factors):
        work = torch.float64  # one working precision for the group: the highest any factor needed
    # Zλ for the preconditioner, made in place from Z, which is not needed any more.
    z_lambda = z_mat.to(work)
    z_lambda.diagonal().add_(z.damping)
    grads = [stats.G(k, dtype).to(dev) for k in names]
    return GroupOmega(z, z_lambda, grads, factors, beta=config.beta, num_train_samples=config.num_train_samples,
                      alpha_b=config.alpha_b, gradient=config.gradient, dtype=work,
                      gradient_dtype=MIXED_DTYPE if work == torch.float64 else None), factors


def _sigma_tol(dtype: torch.dtype) -> float:
    # Relative residual of the top eigenpair of ΔᵀΔ.  The Ritz value's relative error is about its
    # square over the relative gap (1e-10/gap in float64): σ only scales lora_B.
    return 1e-5 if dtype == torch.float64 else 1e-3


class _Subset:
    """The layers ``idx`` of a group as an operator batch (one rank per eigensolve)."""

    def __init__(self, group: GroupOmega, idx: list[int]):
        self.group, self.idx = group, idx
        self.all = len(idx) == group.batch

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.all:
            return x
        full = torch.zeros(self.group.batch, *x.shape[1:], dtype=x.dtype, device=x.device)
        full[self.idx] = x
        return full

    def _pick(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.all else y[self.idx]

    def omega(self, x):
        return self._pick(self.group.omega(self._embed(x)))

    def dense(self, layers: torch.Tensor) -> torch.Tensor:
        return self.group.dense(torch.tensor([self.idx[int(i)] for i in layers]))


def _start_block(group: GroupOmega, solved: dict) -> torch.Tensor:
    """Each layer's leading eigenvectors, ``[b, n, r_min]``, to start the refinement of σ from."""
    r0 = min(solved)
    x0 = torch.empty(group.batch, group.n, r0, dtype=group.dtype, device=group.chol.device)
    for idx, result, _, _ in solved.values():
        x0[idx] = result.eigenvectors[..., :r0].to(x0.dtype)
    return x0


def _eigensolve(group: GroupOmega, sub: _Subset, r: int, solver: str, residual_tol):
    n, dev, b = group.n, group.chol.device, len(sub.idx)
    if solver == "dense":
        result = eigen.smallest_eigenpairs(sub.dense(torch.arange(b)), n, r, b, dtype=group.dtype, device=dev,
                                           tol=residual_tol, dense_below=n)
        return result, torch.zeros(b), 0
    precond, precond_count = group.preconditioner(MIXED_DTYPE if group.dtype == torch.float64 else None)
    floor = group.rounding_floor()[sub.idx]
    tol = eigen._default_tol(group.dtype) if residual_tol is None else residual_tol
    # The implicit products carry rounding of about eps·cond(Zλ) (the dense Ω carries the same
    # when it is formed); asking LOBPCG for less would only send converged layers to the dense
    # fallback.  An explicit residual_tol is taken as given.
    if residual_tol is None:
        tol = torch.clamp(FLOOR_MARGIN * floor, min=tol)
    krylov = all(group.layer_preconditioner[i] == "identity" for i in sub.idx)
    result = eigen.smallest_eigenpairs(sub.omega, n, r, b, dtype=group.dtype, device=dev, tol=tol,
                                       precond=None if krylov else lambda x: sub._pick(precond(sub._embed(x))),
                                       dense=sub.dense, oversample=_oversample(n, r), check_every=_check_every(dev),
                                       norm_iters=1, krylov_columns=KRYLOV_COLUMNS if krylov else 0,
                                       krylov_block=r + KRYLOV_OVERSAMPLE,
                                       x0=sub._pick(group.power_block),
                                       subspace_sine=SUBSPACE_SINE if residual_tol is None else None)
    return result, floor.cpu(), precond_count


def _oversample(n: int, r: int) -> int:
    # Never so wide that the block would pass the solver's dense threshold (n ≤ 4m) where the
    # default block did not: small layers keep their LOBPCG when it is asked for.
    return max(r, min(OVERSAMPLE, (n - 1) // 4 - r))


def _check_every(dev: torch.device) -> int:
    # A convergence test is a host synchronisation: free on the CPU, a pipeline drain on a GPU,
    # where an iteration at 7B widths is milliseconds of work; every other iteration there.
    return 1 if dev.type == "cpu" else 2


def _layer_results(group, idx, names, result, floor, precond_count, b_all, gamma, factors) -> dict[str, Factors]:
    scale = gamma ** -0.5
    out = {}
    for j, (i, name) in enumerate(zip(idx, names)):
        f = factors[i]
        z_cond, y_cond = lora_da.condition_estimate(f)
        out[name] = Factors(result.eigenvectors[j].T.to(group.dtype) * scale, b_all[i] * scale, moves_base=False,
                            diagnostics=LoraDADiagnostics(
            eigenvalues=result.eigenvalues[j].cpu(),
            residual=float(result.residuals[j]),
            residual_floor=float(floor[j]),
            residual_tol=float(result.tol[j]),
            omega_norm=float(result.op_norm[j]),
            eigensolver=result.method,
            eigensolver_iterations=result.iterations,
            eigensolver_converged=bool(result.converged[j]),
            eigensolver_fallback=bool(result.fallback[j]),
            sigma_iterations=group.sigma_iterations,
            preconditioner_factorisations=precond_count,
            damping_z=f.damping_z,
            damping_y=f.damping_y,
            damping_raised=f.damping_raised,
            z_condition_estimate=z_cond,
            y_condition_estimate=y_cond,
            cholesky_dtype=str(group.dtype).replace("torch.", ""),
            sigma=float(group.sigma[i]),
            variance_coef=float(group.variance_coef[i]),
        ))
    return out
