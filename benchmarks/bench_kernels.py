"""Benchmark the statistics-pass kernels; write JSON to benchmarks/results/.

    python benchmarks/bench_kernels.py            # full grid on CUDA, --quick grid on CPU
    python benchmarks/bench_kernels.py --quick    # small sizes anywhere
    python benchmarks/bench_kernels.py --size lease   # on CUDA: the 7B widths only (gpu_report's lease)

K-FAC accumulation ``acc += xᵀx`` (bf16 in, fp32 accumulate), d ∈ {576, 1536, 4096, 11008} ×
tokens ∈ {2k, 8k, 32k}, three implementations:

* ``triton``: :func:`loradafast.kernels.kfac_accumulate` (lower-triangle tiles only, fp32 RMW);
* ``mm_out_dtype``: ``acc.add_(torch.mm(xᵀ, x, out_dtype=torch.float32))``, the cuBLAS baseline
  of docs/design.md §6 (CUDA only: the ``out_dtype`` overload has no CPU kernel);
* ``fp32_upcast``: ``acc.addmm_(x.float().T, x.float())``, what the reference does.

FLOP convention: every K-FAC implementation is credited with the same **useful FLOPs = 2·d²·T**,
those of the full product xᵀx, whatever it executes (the triangle kernel executes about
d·(d + block)·T). Effective TFLOP/s are therefore comparable across implementations and the ratio
of two of them is the speed-up; the triangle kernel can exceed the device's measured bf16 matmul
rate, which is reported beside (square bf16 GEMM, 2·n³ FLOPs).

Also: the pair kernel (layer input and output gradient in one launch) against two launches, and
G accumulation (cuBLAS fp32-out vs Triton vs upcast).  The solve's Ω products are timed by
benchmarks/bench_solve.py and benchmarks/micro/bench_solve_stages.py.

On CPU only the PyTorch paths are timed (Triton would run in its interpreter, which measures
Python, not the kernel); the JSON says so under ``triton_timed``.

Results: ``benchmarks/results/kernels_<device>.json``, one entry per configuration (``--config KEY``,
default ``default``; the file's other entries are kept).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_key, environment, median_time, results_path, tflops, write_entry  # noqa: E402

from loradafast import kernels  # noqa: E402
from loradafast.kernels import dispatch  # noqa: E402


def bench(fn, device: torch.device) -> float:
    """Median seconds per call after one untimed warm-up call per provider and shape (the
    harness's :func:`median_time`). For the Triton providers that call is where the autotuner
    compiles and times the configs left by ``kfac_triton._prune`` for the shape's key, so no timed
    call includes tuning; the timings also go to Triton's disk cache (``cache_results``), which a
    later process, such as each child of benchmarks/overhead.py, reads instead of re-tuning."""
    return median_time(fn, device, min_time=0.2, max_reps=200)


def matmul_rate(device: torch.device, n: int) -> dict:
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    t = bench(lambda: a @ b, device)
    return {"n": n, "seconds": t, "tflops": tflops(2 * n ** 3, t)}


def bf16_tokens(tokens: int, width: int, device) -> torch.Tensor:
    """``[tokens, width]`` random bf16 rows: layer inputs or output gradients as the pass sees them."""
    return torch.randn(tokens, width, device=device).to(torch.bfloat16)


def time_row(row: dict, providers: dict, device, flops: float | None = None) -> dict:
    """Each provider timed on the same inputs, into ``row[name]`` (seconds, and TFLOP/s of ``flops``)."""
    for name, fn in providers.items():
        t = bench(fn, device)
        row[name] = {"seconds": t} if flops is None else {"seconds": t, "tflops": tflops(flops, t)}
    return row


def kfac_providers(acc, x, mask, on_cuda: bool) -> dict:
    """``acc += xᵀx`` (masked tokens skipped where the provider takes a mask)."""
    providers = {
        "fp32_upcast": lambda: acc.addmm_(x.float().T, x.float()),
        "reference": lambda: kernels.kfac_accumulate(acc, x, mask, impl="reference"),
    }
    if on_cuda and dispatch._has_out_dtype(x.device):  # torch < 2.8 lacks the overload
        providers["mm_out_dtype"] = lambda: acc.add_(torch.mm(x.T, x, out_dtype=torch.float32))
    if on_cuda:
        providers["triton"] = lambda: kernels.kfac_accumulate(acc, x, mask, impl="triton")
    return providers


def bench_kfac(device, dims, token_counts, on_cuda) -> list[dict]:
    rows = []
    for d in dims:
        acc = torch.zeros(d, d, device=device)
        for tokens in token_counts:
            x = bf16_tokens(tokens, d, device)
            mask = torch.ones(tokens, dtype=torch.bool, device=device)
            mask[-tokens // 8:] = False  # a padded tail, as the collect pass sees
            flops = 2.0 * d * d * tokens
            row = time_row({"d": d, "tokens": tokens, "useful_flops": flops}, kfac_providers(acc, x, mask, on_cuda),
                           device, flops)
            if "mm_out_dtype" in row:
                row["speedup_triton_vs_mm_out_dtype"] = row["mm_out_dtype"]["seconds"] / row["triton"]["seconds"]
            if on_cuda:
                row["speedup_triton_vs_fp32_upcast"] = row["fp32_upcast"]["seconds"] / row["triton"]["seconds"]
            rows.append(row)
            print(f"kfac d={d:6d} T={tokens:6d} " + " ".join(
                f"{k}={v['tflops']:.2f}TF" for k, v in row.items() if isinstance(v, dict)), flush=True)
    return rows


def bench_pair(device, pairs, tokens, on_cuda) -> list[dict]:
    rows = []
    for dx, dg in pairs:
        x, g = bf16_tokens(tokens, dx, device), bf16_tokens(tokens, dg, device)
        ax, ag = torch.zeros(dx, dx, device=device), torch.zeros(dg, dg, device=device)
        flops = 2.0 * (dx * dx + dg * dg) * tokens
        impl = "triton" if on_cuda else "reference"
        providers = {
            "pair": lambda: kernels.kfac_accumulate_pair(ax, x, ag, g, impl=impl),
            "two_calls": lambda: (kernels.kfac_accumulate(ax, x, impl=impl), kernels.kfac_accumulate(ag, g, impl=impl)),
        }
        row = time_row({"dx": dx, "dg": dg, "tokens": tokens, "useful_flops": flops, "impl": impl}, providers,
                       device, flops)
        rows.append(row)
        print(f"pair dx={dx} dg={dg} T={tokens} pair={row['pair']['seconds']*1e3:.3f}ms "
              f"two={row['two_calls']['seconds']*1e3:.3f}ms", flush=True)
    return rows


def gradient_providers(acc, g, x, on_cuda: bool) -> dict:
    """``acc += gᵀx`` (the gradient G)."""
    providers = {"fp32_upcast": lambda: kernels.gradient_accumulate(acc, g, x, impl="reference")}
    if on_cuda:
        providers["cublas_out_dtype"] = lambda: dispatch._gradient_accumulate_cublas(acc, g, x, None)
        providers["triton"] = lambda: kernels.gradient_accumulate(acc, g, x, impl="triton")
    return providers


def bench_gradient(device, shapes, tokens, on_cuda) -> list[dict]:
    rows = []
    for out, inp in shapes:
        g, x = bf16_tokens(tokens, out, device), bf16_tokens(tokens, inp, device)
        acc = torch.zeros(out, inp, device=device)
        flops = 2.0 * out * inp * tokens
        row = time_row({"out": out, "in": inp, "tokens": tokens, "useful_flops": flops},
                       gradient_providers(acc, g, x, on_cuda), device, flops)
        rows.append(row)
        print(f"grad {out}x{inp} T={tokens} " + " ".join(
            f"{k}={v['tflops']:.2f}TF" for k, v in row.items() if isinstance(v, dict)), flush=True)
    return rows


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("quick", "lease", "full"), default=None,
                        help="quick: small sizes (the default without CUDA); lease: the 7B widths only, at "
                             "8192 tokens (minutes on a GPU); full: 576 to 11008 wide, up to 32768 tokens "
                             "(the default with CUDA)")
    parser.add_argument("--quick", action="store_true", help="the same as --size quick")
    parser.add_argument("--config", type=config_key, default="default", metavar="KEY",
                        help="the entry of the results file this run writes (the file's other entries are kept)")
    parser.add_argument("--out", type=Path, help="the results file (default benchmarks/results/kernels_<device>.json)")
    args = parser.parse_args(argv)

    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    size = "quick" if args.quick or not on_cuda else (args.size or "full")
    quick = size == "quick"
    if quick:
        dims, token_counts = [64, 256, 576], [512, 2048]
        pairs, grad_shapes, mm_n = [(256, 576)], [(576, 256), (576, 576)], 1024
        aux_tokens = 2048
    elif size == "lease":
        dims, token_counts = [4096, 11008], [8192]
        pairs, grad_shapes, mm_n = [(4096, 11008)], [(4096, 4096), (11008, 4096)], 8192
        aux_tokens = 8192
    else:
        dims, token_counts = [576, 1536, 4096, 11008], [2048, 8192, 32768]
        pairs = [(576, 576), (576, 1536), (1536, 4096), (4096, 11008)]
        grad_shapes = [(576, 576), (1536, 576), (4096, 4096), (11008, 4096)]
        mm_n, aux_tokens = 8192, 8192

    env = environment(device)
    result = {
        "device": env["device"],
        "device_slug": env["device_slug"],
        "date": env["date"],
        "python": env["python"],
        "torch": env["torch"],
        "triton": env["triton"] if dispatch.triton_available() else None,
        "cuda": env["cuda"],
        "cpu_threads": env["threads"],
        "quick": quick,
        "size": size,
        "triton_timed": on_cuda,
        "notes": ([] if on_cuda else [
            "CPU run: only the PyTorch paths are timed. The Triton kernels run on CPU only in the "
            "interpreter (TRITON_INTERPRET=1), which measures Python, so no Triton numbers here.",
            "torch.mm(..., out_dtype=torch.float32) has no CPU kernel: mm_out_dtype is absent.",
        ]),
        "flop_convention": "useful FLOPs = 2*d^2*T for every K-FAC implementation (the full x^T x), "
                           "whatever it executes; TFLOP/s = useful FLOPs / time, so ratios are speed-ups "
                           "and the triangle kernel may exceed the square-GEMM rate.",
        "bf16_matmul": matmul_rate(device, mm_n),
    }
    print(f"device {result['device']}: bf16 matmul {result['bf16_matmul']['tflops']:.2f} TFLOP/s", flush=True)
    path = results_path("kernels", device, args.out)
    sections = {"kfac": lambda: bench_kfac(device, dims, token_counts, on_cuda),
                "kfac_pair": lambda: bench_pair(device, pairs, aux_tokens, on_cuda),
                "gradient": lambda: bench_gradient(device, grad_shapes, aux_tokens, on_cuda)}
    for section, run in sections.items():
        result[section] = run()
        # a run cut off from outside keeps the finished sections
        write_entry(result, path, args.config, benchmark="kernels", device=device, quiet=True)
    return write_entry(result, path, args.config, benchmark="kernels", device=device)


if __name__ == "__main__":
    main()
