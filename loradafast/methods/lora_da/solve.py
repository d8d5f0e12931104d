"""LoRA-DA for every layer at once: the input groups of the same shape, across all blocks of
the model, as one batch (docs/design.md §4, §6).

The layers that read the same input (q, k, v; gate, up) share ``Zλ``: an input group.  Groups of
the same shape (width, output widths, ranks) are stacked, so a model of any depth is solved as a
few batches (q/k/v, o, gate/up, down for a Llama block): one batched factorisation per batch, one
batched eigensolve per rank, σ, the preconditioner and ``lora_B`` batched the same way, and the
diagnostics read to the host once per batch.  Where a batch's workspace would not fit in
:data:`STACK_MEMORY_FRACTION` of the free memory, it is solved in chunks of groups.  The
iterative path applies Ω implicitly (:mod:`.operator`): ``O((n² + n·out)·k)`` per product
and no per-layer ``O(n³)`` work.  The dense path materialises Ω per layer (``O(n³)``), which on
CPU is still the faster choice for small widths.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from ...device_memory import free_memory
from ...linalg import eigen
from ...linalg.dense import damped_cholesky_stack, damping_for_each
from ...planner import LayerShape, MemoryModel
from ...progress import track
from ...statistics.sums import Statistics
from ..factors import Factors
from .config import LoraDAConfig
from .diagnostics import LoraDADiagnostics
from .operator import GroupOmega, StackFactors

# eigensolver="auto" on CPU: dense eigh of the materialised Ω (O(n³) per layer) up to width
# CPU_DENSE_MAX_N, except for ranks up to CPU_ITERATIVE_MAX_RANK from width CPU_ITERATIVE_MIN_N
# on; the iterative path (block Lanczos / LOBPCG, O(n²) per product) above, where it measured
# faster (benchmarks/README.md, "Solver constants").  On CUDA "auto" is always iterative.
CPU_DENSE_MAX_N = 2048
CPU_ITERATIVE_MAX_RANK = 32
CPU_ITERATIVE_MIN_N = 512
# Mixed precision of the float64 solve: the products with G (an fp32 sum) and the preconditioner
# in this dtype, the solves with Zλ, whose conditioning needs float64, in float64.  None (the
# default): everything in the working dtype, since the mixed solve missed the 1e-4 subspace goal.
MIXED_DTYPE: torch.dtype | None = None
# How far above the measured rounding of the implicit Ω products LOBPCG's default tolerance sits.
FLOOR_MARGIN = 30.0
# LOBPCG block beyond r: a product with G reads all of G whatever the number of columns, so extra
# columns cost little while each speeds convergence.
OVERSAMPLE = 24
# Where every layer's preconditioner is the identity (the variance term is negligible), block
# Lanczos runs before LOBPCG (linalg/eigen.py), in blocks of r + KRYLOV_OVERSAMPLE columns with a
# basis of up to KRYLOV_COLUMNS (2·768·n numbers per layer beside the n² of the factor): fewer,
# narrower products than LOBPCG for the same residual.
KRYLOV_OVERSAMPLE = 8
KRYLOV_COLUMNS = 768
# A layer is converged where its residual meets the tolerance (default: 1e-10 in float64, or
# 30× the rounding floor), or where Davis–Kahan bounds its subspace's sine to the exact one by the
# option ``subspace_sine`` (residual·‖Ω‖₂/gap, the gap θ_{r+1} − θ_r from the Ritz values).
# A batch's workspace may take this fraction of the device's free memory; beyond it the batch is
# solved in chunks of input groups (the statistics it reads are already resident).
STACK_MEMORY_FRACTION = 0.5
# On CUDA, Zλ⁻¹ is formed once per group and applied by GEMM: two triangular solves with a few
# dozen right-hand sides run far below the GPU's GEMM rate.  On CPU the triangular solves win
# (and keep the products' rounding at eps·cond(Zλ) without an explicit inverse).
EXPLICIT_INVERSE_DEVICES = ("cuda",)
# At most this many input groups per batch, by device type (absent: no limit).  A batch iterates
# until its slowest layer converges, and one layer that needs a preconditioner takes the whole
# batch off block Lanczos; on a CPU, where a launch costs nothing, that made SmolLM2's solve
# slower than one group at a time (benchmarks/README.md, "Batched solve"), so the CPU keeps
# solving group by group until the batch can shed its converged layers.
MAX_STACK_GROUPS = {"cpu": 1}
# The eigensolve starts from the block σ's power steps end with (GroupOmega.estimate_sigma),
# r + KRYLOV_OVERSAMPLE columns wide, instead of a random one: fewer iterations where the
# variance term is small.


def solve_lora_da(stats: Statistics, ranks: dict[str, int], config: LoraDAConfig, *,
                  device=None, workspace_budget: int | None = None) -> dict[str, Factors]:
    """The LoRA-DA factors (``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``, diagnostics) of the
    layers in ``ranks``: the input groups of one shape solved as one batch (module docstring).
    ``workspace_budget``: bytes a batch's workspace may take (None: a share of the free memory)."""
    out: dict[str, Factors] = {}
    batches = [(chunk, dev) for shape, groups, dev in _stacks(stats, ranks, device)
               for chunk in _chunks(shape, groups, config, dev, stats.y_factor, workspace_budget)]
    for groups, dev in track(batches, total=sum(len(groups) for groups, _ in batches), unit="group",
                             desc="loradafast: LoRA-DA solve", weight=lambda batch: len(batch[0])):
        out.update(_solve_stack(stats, groups, ranks, config, dev))
    return {name: out[name] for name in ranks}


# LOBPCG iterations assumed by the cost model (docs/design.md §4.7 measures 10-40 at 7B widths).
COST_ITERATIONS = 30


def planned_workspace(m: MemoryModel, layers: list[LayerShape]) -> int:
    """One input group's solve as the memory planner counts it: :func:`workspace_bytes` in the
    plan's solve dtype, dense where the solve would be."""
    n, rank = layers[0].in_features, max(s.rank for s in layers)
    return workspace_bytes(n, [s.out_features for s in layers], rank, itemsize=m.d, full_y=m.y_factor == "full",
                           dense=planned_dense(m, n, rank))


def planned_dense(m: MemoryModel, n: int, rank: int) -> bool:
    """Whether the solve takes a group of width ``n`` densely (as it and eigen decide)."""
    if n <= 4 * (rank + max(rank, 8)):  # eigen.smallest_eigenpairs: the basis would be most of the space
        return True
    solver = m.options.eigensolver if isinstance(m.options, LoraDAConfig) else LoraDAConfig().eigensolver
    if solver == "auto":
        return auto_is_dense(m.device_type, n, rank)
    return solver == "dense"


def solve_cost(layers: list[LayerShape]) -> float:
    """Estimated FLOPs of solving one input group, from the shapes alone: one Cholesky of Zλ
    (``n³/3``) plus, per layer and LOBPCG iteration, a few products with Zλ⁻¹ and G on a block of
    ``3m`` columns (``m = r + max(r, 24)``).  It decides who solves what, not how long."""
    n = layers[0].in_features
    cost = n ** 3 / 3
    for s in layers:
        block = 3 * (s.rank + max(s.rank, OVERSAMPLE))
        cost += COST_ITERATIONS * 4 * (n * n + n * s.out_features) * block
    return float(cost)


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


def _stacks(stats: Statistics, ranks: dict[str, int], device) -> list[tuple[tuple, list, torch.device]]:
    """The input groups by shape (width; each position's output width and rank) and device: each
    entry one batch of groups whose layers line up position by position."""
    stacks: dict[tuple, list[tuple[str, list[str]]]] = defaultdict(list)
    for key, names in _input_groups(stats, ranks).items():
        dev = torch.device(device) if device is not None else stats.layers[names[0]].g_sum.device
        shape = (stats.layers[names[0]].in_features,
                 tuple((stats.layers[k].out_features, ranks[k]) for k in names), str(dev))
        stacks[shape].append((key, names))
    return [(shape, groups, torch.device(shape[-1])) for shape, groups in stacks.items()]


def workspace_bytes(n: int, outs: list[int], rank: int, *, itemsize: int, full_y: bool, dense: bool) -> int:
    """One input group's solve: the float64 Z, its damped copies and Cholesky factor, every layer's
    G and Y factor, then either the dense Ω of every layer and their ``eigh``, or one
    preconditioner factor per layer (the worst case of the clustering, three more ``n × n`` while
    one is built) and the LOBPCG blocks or block Lanczos's basis, whichever is larger.  LOBPCG's
    dense fallback for a layer that misses its tolerance (about ``6 n²`` more) is not reserved: it
    is the exception, and at the widths where memory is short it would be far too slow anyway.
    The planner reserves it per pass; the solve sizes its batches by it."""
    d, b = itemsize, len(outs)
    n2 = d * n * n
    grads = d * n * sum(outs)
    y_factors = d * (sum(o * o for o in outs) if full_y else sum(outs))
    factor = max(5 * n2, 3 * n2 + grads + d * n * max(outs)) + y_factors + (4 * d * max(outs) ** 2 if full_y else 0)
    steady = 2 * n2 + grads + y_factors
    if dense:
        return max(factor, steady + (2 * b + 4) * n2 + 3 * d * n * max(outs))
    block = 3 * (rank + oversample(n, rank))  # LOBPCG's [X, W, P]
    krylov = min(KRYLOV_COLUMNS, n // 2)  # block Lanczos's basis and image, freed before LOBPCG starts
    return max(factor, steady + (b + 3) * n2 + max(12 * b * n * block, 2 * b * n * krylov + b * krylov * krylov) * d)


def _chunks(shape: tuple, groups: list[tuple[str, list[str]]], config: LoraDAConfig, dev: torch.device,
            y_factor: str | None, workspace_budget: int | None = None) -> list[list[tuple[str, list[str]]]]:
    """``groups`` in chunks of at most :data:`MAX_STACK_GROUPS` groups whose stacked workspace fits
    :data:`STACK_MEMORY_FRACTION` of the free memory and the ``workspace_budget`` (at least one
    group per chunk: a group that does not fit is the planner's to refuse)."""
    free, _ = free_memory(dev)
    limits = [int(STACK_MEMORY_FRACTION * free)] if free is not None else []
    limits += [workspace_budget] if workspace_budget is not None else []
    size = len(groups)
    if limits:
        n, positions = shape[0], shape[1]
        rank = max(r for _, r in positions)
        solver = config.eigensolver
        dense = solver == "dense" or (solver == "auto" and auto_is_dense(dev.type, n, rank))
        per_group = workspace_bytes(n, [out for out, _ in positions], rank, itemsize=8,
                                    full_y=y_factor == "full", dense=dense)
        size = min(limits) // max(per_group, 1)
    size = max(1, min(size, MAX_STACK_GROUPS.get(dev.type, size)))
    return [groups[i:i + size] for i in range(0, len(groups), size)]


def _solve_stack(stats, groups: list[tuple[str, list[str]]], ranks, config: LoraDAConfig, dev) -> dict[str, Factors]:
    """Factor every group's Zλ at once, eigensolve per rank, make σ exact, then form every lora_B."""
    times: dict[str, float] = {}
    first = groups[0][1]
    p = len(first)
    names = [k for _, members in groups for k in members]  # layer b·p + j: position j of group b
    start_columns = max(ranks[k] for k in first) + KRYLOV_OVERSAMPLE
    group = _stack_operator(stats, groups, config, dev, times, start_columns)
    solved, precond = [], None  # solved: (layers, EigenResult, rounding floor, factorisations)
    for r in sorted({ranks[k] for k in first}):
        idx = [b * p + j for b in range(len(groups)) for j, k in enumerate(first) if ranks[k] == r]
        solver = config.eigensolver
        if solver == "auto":
            solver = "dense" if auto_is_dense(dev.type, group.n, r) else "lobpcg"
        with _timed(times, "eigen_s", dev):
            if solver == "dense":
                solved.append((idx, *_eigensolve(group, _Subset(group, idx), r, solver, config, None)))
                continue
            # Built once for every rank and part: the preconditioner and the products' rounding floor.
            precond = precond or (*group.preconditioner(MIXED_DTYPE if group.dtype == torch.float64 else None),
                                  group.rounding_floor())
            # One batch for the whole stack: a part of it would still cost products for every layer.
            solved.append((idx, *_eigensolve(group, _Subset(group, idx), r, solver, config, precond)))
    _refine_sigma(group, solved, times, dev)
    diagnostics = _stack_diagnostics(group)
    out = {}
    for idx, result, floor, precond_count in solved:
        with _timed(times, "lora_b_s", dev):
            b_all = group.lora_b(_Subset(group, idx)._embed(result.eigenvectors.to(group.dtype)))
        out.update(_layer_results(group, idx, names, result, floor, precond_count, b_all, config, diagnostics))
    for key, members in groups:  # stage times of the whole batch, shared by its layers
        for name in members:
            out[name].diagnostics.input_group = key
            out[name].diagnostics.group_times_s = dict(times)
            out[name].diagnostics.batch_groups = len(groups)
    return out


def _refine_sigma(group: GroupOmega, solved: dict, times: dict, dev) -> None:
    """σ made exact from the eigenvectors; the eigenvalues, found with the rough σ, rescaled."""
    rough = group.sigma.clone()
    with _timed(times, "sigma_s", dev):
        group.refine_sigma(_start_block(group, solved), tol=_sigma_tol(group.dtype), check_every=_check_every(dev))
    rescale = (rough / group.sigma) ** 2  # the eigensolve saw Ω with the rough σ
    for idx, result, _, _ in solved:
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


def _stack_operator(stats, groups, config: LoraDAConfig, dev, times, start_columns: int = 8) -> GroupOmega:
    with _timed(times, "factor_s", dev):
        group = GroupOmega(_stack_factors(stats, groups, config, dev), _stacked_gradients(stats, groups, config, dev),
                           beta=config.beta, num_train_samples=config.num_train_samples, alpha_b=config.alpha_b,
                           gradient=config.gradient, explicit_inverse=dev.type in EXPLICIT_INVERSE_DEVICES)
        if group.dtype == torch.float64 and MIXED_DTYPE is not None:
            group.gradient_dtype = MIXED_DTYPE
            group.g = [g.to(MIXED_DTYPE) for g in group.g]
    with _timed(times, "sigma_s", dev):
        group.estimate_sigma(k=min(group.n, start_columns))
    names = [k for _, members in groups for k in members]
    bad = [k for k, s in zip(names, group.sigma.tolist()) if not (s > 0 and s < float("inf"))]
    if bad:
        raise FloatingPointError(
            f"the gradient estimate of {bad} is zero or not finite, so it defines no direction; the layer "
            "does not influence the loss on these samples (exclude it, or use more samples)"
        )
    return group


def _stacked(stats, factor: str, groups, j: int | None, dtype, dev) -> torch.Tensor:
    """``factor`` of position ``j`` (None: the group's first layer, for Z) of every group, stacked."""
    return stats.stack(factor, [members[0 if j is None else j] for _, members in groups], dtype, dev)


def _stacked_gradients(stats, groups, config: LoraDAConfig, dev) -> list[torch.Tensor]:
    return [_stacked(stats, "G", groups, j, config.dtype, dev) for j in range(len(groups[0][1]))]


def _stack_factors(stats, groups, config: LoraDAConfig, dev) -> StackFactors:
    """Every group's damped ``Zλ`` and every layer's damped ``Yλ``, factorised in batches
    (:func:`..linalg.dense.damped_cholesky_stack`: raised damping only where a factor needs it)."""
    dtype, damping, mode = config.dtype, config.damping, config.damping_mode
    z = _stacked(stats, "Z", groups, None, dtype, dev)
    z_lam = damping_for_each(z, damping, mode)
    z_chol, work, z_used = damped_cholesky_stack(z, z_lam)
    positions = range(len(groups[0][1]))
    ys = [_stacked(stats, "Y", groups, j, dtype, dev) for j in positions]
    y_lam = [damping_for_each(y, damping, mode) for y in ys]
    y_inverse_diag = y_chol = None
    if ys[0].dim() == 2:  # diagonal Y
        damped = [y + lam.to(y.dtype).unsqueeze(-1) for y, lam in zip(ys, y_lam)]
        if not bool(torch.stack([(d > 0).all() for d in damped]).all()):
            raise torch.linalg.LinAlgError("the damped output factor Y has non-positive entries; increase damping")
        y_used = y_lam
    else:
        factored = [damped_cholesky_stack(y, lam) for y, lam in zip(ys, y_lam)]
        if any(used == torch.float64 for _, used, _ in factored):
            work = torch.float64  # one working precision for the batch: the highest any factor needed
        y_chol = [chol.to(work) for chol, _, _ in factored]
        y_used = [lam for _, _, lam in factored]
    if ys[0].dim() == 2:
        y_inverse_diag = [(1.0 / d).to(work) for d in damped]
    # Zλ for the preconditioner, made in place from Z, which is not needed any more.
    z_lambda = z.to(work)
    z_lambda.diagonal(dim1=-2, dim2=-1).add_(z_used.to(work).unsqueeze(-1))
    y_used = torch.stack(y_used, 1)
    return StackFactors(z_chol.to(work), z_lambda, z_used, z_used != z_lam, y_inverse_diag, y_chol, y_used,
                        y_used != torch.stack(y_lam, 1), work)


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


def _start_block(group: GroupOmega, solved: list) -> torch.Tensor:
    """Each layer's leading eigenvectors, ``[b, n, r_min]``, to start the refinement of σ from."""
    r0 = min(result.eigenvectors.shape[-1] for _, result, _, _ in solved)
    x0 = torch.empty(group.batch, group.n, r0, dtype=group.dtype, device=group.chol.device)
    for idx, result, _, _ in solved:
        x0[idx] = result.eigenvectors[..., :r0].to(x0.dtype)
    return x0


def _eigensolve(group: GroupOmega, sub: _Subset, r: int, solver: str, config: LoraDAConfig, preconditioner):
    n, dev, b, residual_tol = group.n, group.chol.device, len(sub.idx), config.residual_tol
    if solver == "dense":
        result = eigen.smallest_eigenpairs(sub.dense(torch.arange(b)), n, r, b, dtype=group.dtype, device=dev,
                                           tol=residual_tol, dense_below=n)
        return result, torch.zeros(b), 0
    precond, precond_count, floor = preconditioner
    floor = floor[sub.idx]
    tol = eigen.default_tol(group.dtype) if residual_tol is None else residual_tol
    # The implicit products carry rounding of about eps·cond(Zλ) (the dense Ω carries the same
    # when it is formed); asking LOBPCG for less would only send converged layers to the dense
    # fallback.  An explicit residual_tol is taken as given.
    if residual_tol is None:
        tol = torch.clamp(FLOOR_MARGIN * floor, min=tol)
    krylov = all(group.layer_preconditioner[i] == "identity" for i in sub.idx)
    result = eigen.smallest_eigenpairs(sub.omega, n, r, b, dtype=group.dtype, device=dev, tol=tol,
                                       precond=None if krylov else lambda x: sub._pick(precond(sub._embed(x))),
                                       dense=sub.dense, oversample=oversample(n, r), check_every=_check_every(dev),
                                       norm_iters=1, krylov_columns=KRYLOV_COLUMNS if krylov else 0,
                                       krylov_block=r + KRYLOV_OVERSAMPLE,
                                       x0=sub._pick(group.power_block),
                                       subspace_sine=config.subspace_sine if residual_tol is None else None)
    return result, floor, precond_count


def oversample(n: int, r: int) -> int:
    # Never so wide that the block would pass the solver's dense threshold (n ≤ 4m) where the
    # default block did not: small layers keep their LOBPCG when it is asked for.
    return max(r, min(OVERSAMPLE, (n - 1) // 4 - r))


def _check_every(dev: torch.device) -> int:
    # A convergence test is a host synchronisation: free on the CPU, a pipeline drain on a GPU,
    # where an iteration at 7B widths is milliseconds of work; every other iteration there.
    return 1 if dev.type == "cpu" else 2


def _stack_diagnostics(group: GroupOmega) -> dict[str, list]:
    """Every layer's scalar diagnostics of the batch, read to the host in one go, by layer."""
    f = group.factors
    p = group.positions
    z_cond, y_cond = f.condition_estimates()
    values = {
        "sigma": group.sigma, "variance_coef": group.variance_coef,
        "damping_z": f.z_damping.repeat_interleave(p), "damping_y": f.y_damping.reshape(-1),
        "damping_raised": f.z_raised.repeat_interleave(p) | f.y_raised.reshape(-1),
        "z_condition_estimate": z_cond, "y_condition_estimate": y_cond,
    }
    flat = torch.cat([v.to(torch.float64).reshape(-1) for v in values.values()]).tolist()
    out, at = {}, 0
    for key in values:
        out[key] = flat[at:at + group.batch]
        at += group.batch
    out["damping_raised"] = [bool(v) for v in out["damping_raised"]]
    return out


def _layer_results(group: GroupOmega, idx, names, result, floor, precond_count, b_all, config: LoraDAConfig,
                   diagnostics: dict[str, list]) -> dict[str, Factors]:
    scale = config.gamma ** -0.5
    p = group.positions
    lora_a = (result.eigenvectors.mT.to(group.dtype) * scale).unbind(0)
    lora_b = [(b * scale).unbind(0) for b in b_all]
    eigenvalues = result.eigenvalues.cpu().unbind(0)
    per_solve = torch.stack([result.residuals.to(torch.float64), floor.to(result.residuals.device, torch.float64),
                             result.tol.to(result.residuals.device, torch.float64), result.op_norm.to(torch.float64),
                             result.converged.to(torch.float64), result.fallback.to(torch.float64)]).tolist()
    dtype = str(group.dtype).replace("torch.", "")
    out = {}
    for j, i in enumerate(idx):
        residual, layer_floor, tol, op_norm, converged, fallback = (row[j] for row in per_solve)
        d = {key: values[i] for key, values in diagnostics.items()}
        block, position = divmod(i, p)
        out[names[i]] = Factors(lora_a[j], lora_b[position][block], moves_base=False, diagnostics=LoraDADiagnostics(
            eigenvalues=eigenvalues[j], residual=residual, residual_floor=layer_floor, residual_tol=tol,
            omega_norm=op_norm, eigensolver=result.method, eigensolver_iterations=result.iterations,
            eigensolver_converged=bool(converged), eigensolver_fallback=bool(fallback),
            subspace_sine_target=config.subspace_sine if config.residual_tol is None and result.method != "dense"
            else None,
            sigma_iterations=group.sigma_iterations, preconditioner_factorisations=precond_count,
            cholesky_dtype=dtype, **d))
    return out
