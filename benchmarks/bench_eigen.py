"""Benchmark the batched eigensolver (loradafast.linalg.eigen) against looped dense eigh and torch.lobpcg.

Operators are LoRA-DA Initialization Guidance Matrices ``Ω = c·Zλ⁻¹ − Δ̂ᵀΔ̂`` built from synthetic
statistics with a rank-deficient Z (the hard case: spread ~c/λ, most-negative wanted eigenvalues).

GPU (the design target): a slice of Llama-2-7B's 224 operators (24 of width 4096, 4 of width 11008;
the whole model's float64 work space does not fit one GPU), r ∈ {8, 64}.
CPU: 64 of width 256 and 16 of width 512, r ∈ {8, 32}.  Reported per configuration: wall time
of ours (one batched solve per width, structured operator + :func:`omega_preconditioner`, all
set-up included), of ``torch.linalg.eigh`` looped over the layers, and of
``torch.lobpcg(k=r, largest=False, niter=10)`` looped (the official LoRA-DA code); speed-up
ratios; and the worst sine of the largest principal angle to float64 eigh for each.
The Rayleigh–Ritz section times the native small eigensolver against torch.linalg.eigh.

    python benchmarks/bench_eigen.py            # writes benchmarks/results/eigen_<device>.json

Results: ``benchmarks/results/eigen_<device>.json``, one entry per configuration (``--config KEY``,
default ``default``; the file's other entries are kept).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_key, environment, results_path, timed, write_entry  # noqa: E402

from loradafast.linalg import eigen  # noqa: E402
from loradafast.linalg import native as _native  # noqa: E402

F64 = torch.float64


def make_group(batch, n, out, tokens, device, seed, lam=1e-6, beta=0.03, num=100_000):
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = 1000.0 * torch.logspace(0, -1, n, dtype=F64, device=device)
    z = torch.empty(batch, n, n, dtype=F64, device=device)
    grad = torch.empty(batch, out, n, dtype=F64, device=device)
    y = torch.empty(batch, out, dtype=F64, device=device)
    for b in range(batch):  # one layer at a time keeps the token matrices small
        x = torch.randn(tokens, n, generator=gen, dtype=F64, device=device) * scale
        g = torch.randn(tokens, out, generator=gen, dtype=F64, device=device)
        z[b] = x.T @ x / tokens
        grad[b] = g.T @ x / tokens
        y[b] = (g * g).mean(0)
    z_lambda = z + lam * torch.eye(n, dtype=F64, device=device)
    chol = torch.linalg.cholesky(z_lambda)
    y_lambda = y + lam
    delta = -torch.cholesky_solve(grad.mT, chol).mT / y_lambda[..., None]
    sigma = torch.linalg.matrix_norm(delta, ord=2)
    delta_hat = delta / sigma[:, None, None]
    c = beta * (1.0 / y_lambda).sum(-1) / (num * sigma**2)
    return z_lambda, chol, c, delta_hat


# Live float64 [batch, n, n] tensors at the peak of one group: make_group holds z, grad, z_lambda,
# chol, delta and delta_hat at once; bench_group keeps z_lambda, chol, delta_hat, omega and the
# dense reference's eigenvectors (5) while dense_omega's temporaries, the preconditioner's
# (s·Zλ + cI and its Cholesky factor) or the symmetrised copy of the dense run are alive.
# tests/statistics/test_memory_peaks.py tracks the live bytes of a small group: 9.3 slots at n = 64 (where
# the [tokens, n] samples still count); 10 bounds it.
PEAK_SLOTS = 10


def peak_bytes(batch: int, n: int) -> int:
    """Estimated peak device memory of one group: :data:`PEAK_SLOTS` float64 ``[batch, n, n]``."""
    return PEAK_SLOTS * batch * n * n * 8


def check_memory(groups, budget_bytes: int) -> None:
    """Refuse to start a group that would not fit (a group is freed before the next one)."""
    for batch, n, _out, _tokens in groups:
        if peak_bytes(batch, n) > budget_bytes:
            raise SystemExit(f"group of {batch} layers of width {n} needs ≈ {peak_bytes(batch, n) / 2**30:.1f} GiB "
                             f"> the budget of {budget_bytes / 2**30:.1f} GiB (--memory-gib)")


# (layers, n, out, tokens < n).  On CUDA a slice of Llama-2-7B's 192 + 32 layers (the whole model
# would need ~8 float64 [192, 4096, 4096] tensors of 26 GB each); times scale per layer. Peak by
# peak_bytes: 24 × 4096² → 32.2 GB, 4 × 11008² → 38.8 GB, within an 80 GB GPU.
GPU_GROUPS = [(24, 4096, 4096, 2048), (4, 11008, 4096, 4096)]
CPU_GROUPS = [(64, 256, 256, 192), (16, 512, 256, 384)]
GPU_RAYLEIGH_RITZ = ((24, 48, 96, 192, 384), 224)  # sizes, batch
LEASE_GROUPS = [(4, 4096, 4096, 2048)]  # gpu_report's lease profile: one 4096-wide slice
LEASE_RAYLEIGH_RITZ = ((24, 48, 96), 224)
CPU_RAYLEIGH_RITZ = ((24, 48, 72, 96, 144, 192, 288, 384), 32)


def dense_omega(chol, c, delta_hat):
    omega = c[:, None, None] * torch.cholesky_inverse(chol) - delta_hat.mT @ delta_hat
    return 0.5 * (omega + omega.mT)


def bench_group(z_lambda, chol, c, delta_hat, r, device, run_lobpcg):
    batch, n = z_lambda.shape[0], z_lambda.shape[-1]
    omega = dense_omega(chol, c, delta_hat)
    (ref_values, ref_vectors), t_eigh = timed(
        lambda: [torch.stack(t) for t in zip(*[torch.linalg.eigh(omega[b]) for b in range(batch)])], device)
    ref = ref_vectors[..., :r]
    gaps = ref_values[:, r] - ref_values[:, r - 1]

    def ours():
        def apply(x):
            return c[:, None, None] * torch.cholesky_solve(x, chol) - delta_hat.mT @ (delta_hat @ x)

        pre = eigen.omega_preconditioner(z_lambda, c)
        return eigen.smallest_eigenpairs(apply, n, r, batch, device=device, precond=pre, dense=omega)

    res, t_ours = timed(ours, device)
    row = {
        "batch": batch, "n": n, "r": r,
        "min_gap_r": float(gaps.min()), "max_abs_eigenvalue": float(ref_values.abs().amax()),
        "ours_s": t_ours, "ours_method": res.method, "ours_iterations": res.iterations,
        "ours_fallback_layers": int(res.fallback.sum()),
        "ours_max_sine": float(eigen.subspace_sine(res.eigenvectors, ref).max()),
        "ours_max_residual": float(res.residuals.max()),
        "eigh_loop_s": t_eigh,
        "speedup_vs_eigh_loop": t_eigh / t_ours,
    }
    if run_lobpcg:
        def lobpcg_loop():
            torch.manual_seed(0)
            out = []
            for b in range(batch):
                try:
                    _, x = torch.lobpcg(omega[b], k=r, largest=False, niter=10)
                    out.append(torch.linalg.qr(x)[0])
                except Exception:  # noqa: BLE001 - a failure is a result here
                    out.append(None)
            return out

        vecs, t_lobpcg = timed(lobpcg_loop, device)
        sines = [float(eigen.subspace_sine(v, ref[b])) if v is not None else float("nan") for b, v in enumerate(vecs)]
        row.update({
            "torch_lobpcg_niter10_loop_s": t_lobpcg,
            "torch_lobpcg_failed_layers": sum(v is None for v in vecs),
            "torch_lobpcg_max_sine": max(s for s in sines if s == s) if any(s == s for s in sines) else None,
            "speedup_vs_torch_lobpcg": t_lobpcg / t_ours,
        })
    # Ours without the preconditioner (what a generic callable gets), for reference.
    res_plain, t_plain = timed(lambda: eigen.smallest_eigenpairs(omega, r=r, max_iter=100), device)
    row.update({
        "ours_no_precond_s": t_plain,
        "ours_no_precond_fallback_layers": int(res_plain.fallback.sum()),
        "ours_no_precond_max_sine": float(eigen.subspace_sine(res_plain.eigenvectors, ref).max()),
    })
    return row


def bench_rayleigh_ritz(device, sizes, batch, repeats=3):
    rows = []
    for n in sizes:
        a = torch.randn(batch, n, n, dtype=F64, device=device)
        a = a + a.mT
        row = {"batch": batch, "n": n}
        impls = {"torch_linalg_eigh": torch.linalg.eigh}
        if _native.available() and (device.type == "cpu" or _native.load().has_cuda()):
            impls["native"] = _native.eigh
        for name, fn in impls.items():
            fn(a)
            best = min(timed(lambda: fn(a), device)[1] for _ in range(repeats))
            row[f"{name}_ms"] = best * 1e3
        rows.append(row)
        print(row, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-lobpcg", action="store_true", help="skip the looped torch.lobpcg baseline")
    parser.add_argument("--lease", action="store_true",
                        help="on CUDA: one group of four 4096-wide operators, rank 8 (gpu_report's lease profile)")
    parser.add_argument("--config", type=config_key, default="default", metavar="KEY",
                        help="the entry of the results file this run writes (the file's other entries are kept)")
    parser.add_argument("--out", default=None, help="the results file (default benchmarks/results/eigen_<device>.json)")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="device memory budget (default: free CUDA memory less 10%%; none on CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)

    if device.type == "cuda" and args.lease:
        groups, ranks, (rr_sizes, rr_batch) = LEASE_GROUPS, (8,), LEASE_RAYLEIGH_RITZ
    elif device.type == "cuda":
        groups, ranks, (rr_sizes, rr_batch) = GPU_GROUPS, (8, 64), GPU_RAYLEIGH_RITZ
    else:
        groups, ranks, (rr_sizes, rr_batch) = CPU_GROUPS, (8, 32), CPU_RAYLEIGH_RITZ

    if args.memory_gib is not None:
        check_memory(groups, int(args.memory_gib * 2**30))
    elif device.type == "cuda":
        check_memory(groups, int(0.9 * torch.cuda.mem_get_info(device)[0]))
    _native.load()  # build outside the timings
    z_lambda, chol, c, delta_hat = make_group(2, 96, 32, 64, device, seed=99)  # warm-up: first-call costs
    bench_group(z_lambda, chol, c, delta_hat, 4, device, False)
    env = environment(device)
    results = []
    report = {
        "benchmark": "bench_eigen",
        "device": env["device"],
        "device_type": device.type,
        "threads": env["threads"],
        "torch": env["torch"],
        "python": env["python"],
        "date": env["date"],
        "native_available": _native.available(),
        "lease": bool(args.lease and device.type == "cuda"),
        "groups": results,
    }
    path = results_path("eigen", device, args.out)
    for i, (batch, n, out, tokens) in enumerate(groups):
        z_lambda, chol, c, delta_hat = make_group(batch, n, out, tokens, device, seed=i)
        for r in ranks:
            row = bench_group(z_lambda, chol, c, delta_hat, r, device, not args.no_lobpcg)
            print(json.dumps(row), flush=True)
            results.append(row)
            # a run cut off from outside keeps the finished rows
            write_entry(report, path, args.config, benchmark="eigen", device=device, quiet=True)
        del z_lambda, chol, c, delta_hat

    report["totals_s"] = {k: sum(row[k] for row in results if k in row) for k in
                          ("ours_s", "eigh_loop_s", "torch_lobpcg_niter10_loop_s")}
    report["rayleigh_ritz"] = bench_rayleigh_ritz(device, rr_sizes, rr_batch)
    write_entry(report, path, args.config, benchmark="eigen", device=device)


if __name__ == "__main__":
    main()
