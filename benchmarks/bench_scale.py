"""The LoRA-DA solve of one Llama-2-7B-shaped block against the forward+backward of that block.

    python benchmarks/bench_scale.py                       # CPU proxy: widths ×1/4, ×1/2, ×1, 1 thread
    python benchmarks/bench_scale.py --scales 0.25 --dense # also the float64 dense solve, for sin θ
    python benchmarks/bench_scale.py --device cuda         # the same on a GPU
    python benchmarks/bench_scale.py --blocks 4 --spectra decay,tokens,flat   # 4 blocks, solved as one batch
    python benchmarks/bench_scale.py --scales 1 --config full_width      # another entry of the results file

One block: q, k, v, o 4096×4096; gate, up 4096→11008; down 11008→4096 (×scale), rank 8.  The
statistics are synthetic, in two spectra:

* ``decay``: Z with eigenvalues decaying from 1 to 1e-6 over min(n, 2048) random directions (the
  rest of Z is zero, as with fewer tokens than inputs); G and Y random (the issue's set-up).
* ``tokens``: Z and G from 2,048 synthetic tokens whose inputs have that spectrum, so that G lies
  in the row space of Z as real gradients do.
* ``flat``: Δ without low-rank structure, the hard case for the eigensolve: Z full rank with
  eigenvalues from 1 to 0.1, G Gaussian, Y's diagonal spread over three decades.

``--blocks N`` stacks N blocks of that shape (block ``b`` drawn from seed ``b``), solved together
as the solve batches them; the ratio is then to N forward+backwards.  Each solve is also run once
more under an op counter, untimed: aten ops and host synchronisations (as tests/syncs.py defines
them).  ``--fp32-effect``: how far rounding the sums to fp32 (what collect() keeps) moves each
layer's subspace (dense float64 solves from float64 and from fp32 sums; O(n³), small scales).

Side by side in one run: ``loradafast.solve`` (per-stage times from the diagnostics) and one
forward+backward of a transformers ``LlamaDecoderLayer`` over 2,048 tokens (input gradients
only; what the statistics pass does per block), the best of ``--repeats`` timed right before and
right after each spectrum's solves; the ratio is to the mean of the two.  The goal (issue "Large models") is a ratio
≤ 3 with the subspace within sin θ ≤ 1e-4 of the float64 dense solve.
Results: ``benchmarks/results/scale_<device>.json``, one entry per configuration: ``--config KEY``
(default ``default``; ``fp32_effect`` with ``--fp32-effect``) names the entry this run writes, and
the file's other entries are kept.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import loradafast  # noqa: E402
from loradafast.linalg import native as _native  # noqa: E402
from loradafast.linalg.eigen import span_sine  # noqa: E402
from loradafast.methods.lora_da import solve as lora_da_solve  # noqa: E402
from loradafast.statistics import LayerStats, Statistics  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_key, environment, results_path, sync, timed, write_entry  # noqa: E402

HIDDEN, INTERMEDIATE, TOKENS = 4096, 11008, 2048
# name: (in, out, input group)
BLOCK = {"q": ("h", "h", "attn"), "k": ("h", "h", "attn"), "v": ("h", "h", "attn"), "o": ("h", "h", "o"),
         "gate": ("h", "i", "mlp"), "up": ("h", "i", "mlp"), "down": ("i", "h", "down")}


def synthetic_stats(hidden: int, inter: int, spectrum: str, device, seed: int = 0, blocks: int = 1,
                    sums_dtype: torch.dtype = torch.float32) -> Statistics:
    """Sums over TOKENS tokens, as collect() leaves them (fp32; ``sums_dtype`` float64 to measure
    what that rounding does), for ``blocks`` blocks (block ``b`` from seed ``seed + b``)."""
    if blocks > 1:
        parts = [synthetic_stats(hidden, inter, spectrum, device, seed + b, 1, sums_dtype) for b in range(blocks)]
        layers = {f"b{b}.{n}": LayerStats(f"b{b}.{n}", s.in_features, s.out_features, s.g_sum, s.y_sum,
                                          f"b{b}.{s.input_group}") for b, part in enumerate(parts)
                  for n, s in part.layers.items()}
        z_sums = {f"b{b}.{k}": z for b, part in enumerate(parts) for k, z in part.z_sums.items()}
        return Statistics(layers, z_sums, TOKENS, TOKENS // 1024 * 8, "diag", {})
    g = torch.Generator(device=device).manual_seed(seed)
    dims = {"h": hidden, "i": inter}

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float64, generator=g)

    inputs, z_sums, layers = {}, {}, {}
    for name, (fin, fout, key) in BLOCK.items():
        n, out = dims[fin], dims[fout]
        if spectrum == "flat":
            if key not in z_sums:
                spec = torch.logspace(0, -1, n, device=device, dtype=torch.float64)
                z_sums[key] = torch.diag(spec * TOKENS).to(sums_dtype)
            spread = torch.logspace(0, -3, out, device=device, dtype=torch.float64)
            spread = spread[torch.randperm(out, generator=torch.Generator().manual_seed(seed)).to(device)]
            layers[name] = LayerStats(name, n, out, (randn(out, n) * 1e-3 * TOKENS).to(sums_dtype),
                                      (spread * 1e-4 * TOKENS).to(sums_dtype), key)
            continue
        if key not in inputs:
            k = min(n, 2048)
            spec = torch.logspace(0, -6, k, device=device, dtype=torch.float64)
            basis, _ = torch.linalg.qr(randn(n, k))
            if spectrum == "decay":
                z_sums[key] = (((basis * spec) @ basis.T) * TOKENS).to(sums_dtype)
            else:  # tokens with that covariance
                x = (randn(TOKENS, k) * spec.sqrt()) @ basis.T
                inputs[key] = x
                z_sums[key] = (x.T @ x).to(sums_dtype)
            inputs.setdefault(key, None)
        if spectrum == "decay":
            g_sum = (randn(out, n) * 1e-3 * TOKENS).to(sums_dtype)
            y_sum = torch.rand(out, device=device, dtype=torch.float64, generator=g) * 1e-4 * TOKENS + 1e-8
        else:
            grads = randn(TOKENS, out) * 1e-2
            g_sum = (grads.T @ inputs[key]).to(sums_dtype)
            y_sum = (grads * grads).sum(0)
        layers[name] = LayerStats(name, n, out, g_sum, y_sum.to(sums_dtype), key)
    return Statistics(layers, z_sums, TOKENS, TOKENS // 1024 * 8, "diag", {})


def block_forward_backward(hidden: int, inter: int, device):
    """One forward+backward of a Llama block over TOKENS tokens, as a callable (warmed up)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    heads = max(1, hidden // 128)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=heads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = LlamaDecoderLayer(cfg, 0).to(device, dtype)
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, TOKENS // 2, hidden, device=device, dtype=dtype, requires_grad=True)
    pos = torch.arange(TOKENS // 2, device=device)[None].expand(2, -1)
    pe = LlamaRotaryEmbedding(cfg).to(device)(x, pos)

    def run():
        out = layer(x, position_embeddings=pe)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        x.grad = None

    run()  # warm-up
    return run


def _working_dtype(name: str) -> tuple[torch.dtype, str, torch.dtype | None]:
    """``solve_once``'s (dtype, eigensolver, mixed) for a ``--dtypes`` entry."""
    if name == "mixed":
        return torch.float64, "auto", torch.float32
    return getattr(torch, name), "auto", None


def solve_once(stats, device, dtype, eigensolver="auto", mixed=None):
    lora_da_solve.MIXED_DTYPE = mixed
    try:
        return _solve_once(stats, device, dtype, eigensolver)
    finally:
        lora_da_solve.MIXED_DTYPE = None


def _solve_once(stats, device, dtype, eigensolver):
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, total = timed(lambda: loradafast.solve(stats, 8, dtype=dtype, device=device,
                                                       eigensolver=eigensolver), device)
    stages: dict[str, float] = {}
    # A batch's stage times are shared by all its layers: counted once per batch.
    batches = {tuple(sorted(layer.diagnostics.get("group_times_s", {}).items())) for layer in result.layers.values()}
    for times in batches:
        for k, v in times:
            stages[k] = stages.get(k, 0.0) + v
    per_layer = {name: {k: layer.diagnostics.get(k) for k in (
        "eigensolver", "eigensolver_iterations", "eigensolver_fallback", "residual", "residual_tol", "residual_floor",
        "sigma_iterations", "preconditioner_factorisations", "z_condition_estimate")}
        for name, layer in result.layers.items()}
    iterations = [layer.diagnostics.get("eigensolver_iterations") or 0 for layer in result.layers.values()]
    return result, {"seconds": total, "stages_s": stages, "layers": per_layer, "batches": len(batches),
                    "max_eigensolver_iterations": max(iterations),
                    "warnings": [str(w.message).splitlines()[0] for w in caught],
                    "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}


def counted_solve(stats, device, dtype, eigensolver="auto", mixed=None) -> dict:
    """Aten ops and host synchronisations of one more (untimed) solve."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from syncs import OpCounter, SyncCounter

    ops = OpCounter()
    syncs = SyncCounter()
    with warnings.catch_warnings(), ops, syncs:
        warnings.simplefilter("ignore")
        solve_once(stats, device, dtype, eigensolver, mixed)
    return {"aten_ops": ops.total, "host_syncs": syncs.total}


def fp32_effect(hidden: int, inter: int, spectrum: str, device, scale: float) -> dict:
    """sin θ between each layer's subspace solved (dense, float64) from float64 sums and from the
    same sums rounded to fp32, as collect() keeps them."""
    exact = synthetic_stats(hidden, inter, spectrum, device, sums_dtype=torch.float64)
    rounded = synthetic_stats(hidden, inter, spectrum, device, sums_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = loradafast.solve(exact, 8, eigensolver="dense", device=device)
        b = loradafast.solve(rounded, 8, eigensolver="dense", device=device)
    sines = {n: span_sine(a.layers[n].lora_A.T, b.layers[n].lora_A.T) for n in a.layers}
    return {"scale": scale, "hidden": hidden, "intermediate": inter, "spectrum": spectrum, "sin_theta_fp32_sums": sines,
            "z_condition_estimate": {n: a.layers[n].diagnostics["z_condition_estimate"] for n in a.layers}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scales", default="0.25,0.5,1")
    ap.add_argument("--spectra", default="decay,tokens")
    ap.add_argument("--dtypes", default="float64",
                    help="working dtypes; 'mixed' is float64 with float32 products with G and preconditioner")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: as the issue measured)")
    ap.add_argument("--dense", action="store_true", help="also the float64 dense solve, for sin θ (O(n³))")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dense-max-n", type=int, default=None, help="override lora_da_solve.CPU_DENSE_MAX_N")
    ap.add_argument("--blocks", type=int, default=1, help="a stack of N identically shaped blocks, solved together")
    ap.add_argument("--no-count", action="store_true", help="skip the untimed counted solve (ops, syncs)")
    ap.add_argument("--fp32-effect", action="store_true",
                    help="only measure how far fp32 sums move each subspace (dense float64 solves)")
    ap.add_argument("--config", type=config_key, default=None, metavar="KEY",
                    help="the entry of the results file this run writes (default: 'default', "
                         "'fp32_effect' with --fp32-effect); the file's other entries are kept")
    ap.add_argument("--out", default=None, help="the results file (default benchmarks/results/scale_<device>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.dense_max_n is not None:
        lora_da_solve.CPU_DENSE_MAX_N = args.dense_max_n
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    _native.load()  # build (or load) the native eigensolver outside the timings: it can take a minute
    # One small untimed solve per working dtype: the first timed solve must not pay for lazy
    # initialisation (cuBLAS/cuSOLVER handles, kernel loading on CUDA; first-call costs on CPU).
    warm_up = synthetic_stats(64, 172, "tokens", device)
    for dtype_name in args.dtypes.split(","):
        solve_once(warm_up, device, *_working_dtype(dtype_name))
    runs = []
    env = environment(device)
    record = {
        "benchmark": "bench_scale", "date": datetime.date.today().isoformat(), "device": env["device"],
        "threads": env["threads"] if device.type == "cpu" else None,
        "torch": env["torch"], "python": env["python"], "rank": 8, "tokens": TOKENS,
        "cpu_dense_max_n": lora_da_solve.CPU_DENSE_MAX_N, "runs": runs,
    }
    record["blocks"] = args.blocks
    path = results_path("scale", device, args.out)
    key = args.config or ("fp32_effect" if args.fp32_effect else "default")

    def save(quiet: bool = True) -> None:  # a run cut off from outside keeps what it measured
        write_entry(record, path, key, benchmark="scale", device=device, indent=1, quiet=quiet)
    if args.fp32_effect:
        record["benchmark"] = "bench_scale --fp32-effect"
        for scale in [float(s) for s in args.scales.split(",")]:
            for spectrum in args.spectra.split(","):
                runs.append(fp32_effect(int(HIDDEN * scale), int(INTERMEDIATE * scale), spectrum, device, scale))
                print(runs[-1], flush=True)
                save()
        save(quiet=False)
        return
    for scale in [float(s) for s in args.scales.split(",")]:
        hidden, inter = int(HIDDEN * scale), int(INTERMEDIATE * scale)
        block = block_forward_backward(hidden, inter, device)

        def fwd_bwd() -> float:
            return min(timed(block, device)[1] for _ in range(args.repeats))
        for spectrum in args.spectra.split(","):
            # Timed right before and right after the solves it is compared with: this machine's
            # speed drifts by tens of percent over minutes.
            before = fwd_bwd()
            print(f"scale {scale}: block fwd+bwd over {TOKENS} tokens {before:.2f}s", flush=True)
            stats = synthetic_stats(hidden, inter, spectrum, device, blocks=args.blocks)
            reference = None
            if args.dense:
                reference, ref_info = solve_once(stats, device, torch.float64, "dense")
                print(f"  {spectrum} dense float64: {ref_info['seconds']:.1f}s", flush=True)
            for dtype_name in args.dtypes.split(","):
                result, info = solve_once(stats, device, *_working_dtype(dtype_name))
                if reference is not None:
                    info["sin_theta_vs_dense_f64"] = {
                        n: span_sine(result.layers[n].lora_A.T, reference.layers[n].lora_A.T) for n in result.layers}
                    info["dense_f64_seconds"] = ref_info["seconds"]
                info.update(scale=scale, hidden=hidden, intermediate=inter, spectrum=spectrum, dtype=dtype_name,
                            blocks=args.blocks)
                if not args.no_count:
                    info.update(counted_solve(stats, device, *_working_dtype(dtype_name)))
                sines = info.get("sin_theta_vs_dense_f64")
                print(f"  {spectrum} {dtype_name}: solve {info['seconds']:.1f}s "
                      f"= {info['seconds'] / (args.blocks * before):.2f}× the fwd+bwd before (per block); "
                      f"{info.get('aten_ops')} ops, {info.get('host_syncs')} syncs, "
                      f"{info['max_eigensolver_iterations']} iterations at most; "
                      f"stages {({k: round(v, 2) for k, v in info['stages_s'].items()})}"
                      + (f"; max sin θ {max(sines.values()):.1e}" if sines else ""), flush=True)
                runs.append(info)
            after = fwd_bwd()
            fb = 0.5 * (before + after)
            print(f"  block fwd+bwd after: {after:.2f}s (ratios against the mean, {fb:.2f}s)", flush=True)
            for info in runs[len(runs) - len(args.dtypes.split(",")):]:
                info.update(block_fwd_bwd_s=fb, block_fwd_bwd_before_after_s=[before, after],
                            ratio=info["seconds"] / (args.blocks * fb))
            record["load_average"] = list(os.getloadavg())
            save()  # after each spectrum
    save(quiet=False)


if __name__ == "__main__":
    main()
