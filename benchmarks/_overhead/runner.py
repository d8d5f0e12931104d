"""One timed run (warm-up, peak memory, errors recorded), the child-process worker, and the
alternation of methods over repetitions for one model."""
from __future__ import annotations

import copy
import gc
import json
import os
import time
import traceback
from pathlib import Path

import torch
from _common import PeakMemory, run_child, sync

from .config import TARGETS
from .methods import EvaCapReached, run_method
from .models import build_model, make_batches, prepare_model_data, save_lora_factors, warm_up

SCRIPT = Path(__file__).resolve().parents[1] / "overhead.py"  # the worker is the script itself (--worker)


def timed_run(name, model, ids, spec, *, sample_cpu_memory: bool) -> dict:
    """Warm up, then time ``name`` once; returns the record of this run."""
    device = spec["device"]
    batches = make_batches(ids, spec["batch_size"], device)
    warm_up(model, ids, device)
    warm_up_kernels(model, batches, device)
    gc.collect()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    record = {"method": name, "load_avg_1min_at_start": load,
              "num_parameters": sum(p.numel() for p in model.parameters())}
    mem = PeakMemory(device, sample_cpu_memory)
    started = time.perf_counter()
    try:
        with mem:
            sync(device)
            started = time.perf_counter()
            parts = run_method(name, model, batches, spec)
            sync(device)
            wall = time.perf_counter() - started
        record.update(ok=True, wall_s=wall, pass_s=parts.get("pass_s"), solve_s=parts.get("solve_s"),
                      apply_s=parts.get("apply_s"), extra=parts.get("extra", {}))
    except EvaCapReached as err:
        record.update(ok=False, capped=True, cap_passes=spec["eva_max_epochs"],
                      wall_s=time.perf_counter() - started, error=str(err))
    except torch.OutOfMemoryError as err:
        record.update(ok=False, error=f"out of memory: {str(err).splitlines()[0]}")
    except Exception as err:  # noqa: BLE001 - recorded, the benchmark goes on
        record.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-2000:])
    record["peak_mem_delta_bytes"] = mem.peak_delta if record.get("ok") else None
    record["peak_mem_how"] = mem.how
    if record.get("ok") and spec.get("factors_dir"):  # after the timed region (bench_loraga.py compares them)
        path = Path(spec["factors_dir"]) / f"{name}_{spec.get('repetition', 0)}.pt"
        save_lora_factors(model, path)
        record["factors_path"] = str(path)
    return record


def kernel_warm_up_shapes(model, batches) -> tuple[set, list]:
    """The ``(in, out)`` widths of the target layers and the distinct token counts of the batches:
    what keys the Triton kernels' autotuning (width, tile, split over tokens, mask)."""
    widths = {(m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS}
    return widths, sorted({b["input_ids"].numel() for b in batches})


def warm_up_kernels(model, batches, device, *, force: bool = False) -> None:
    """Run the statistics kernels once per target width, batch size and mask case, untimed, so that
    Triton's autotuning (a few milliseconds per config and shape, re-read from its disk cache in a
    later process) stays out of the timed region: the tiny warm-up model has other widths. On CPU
    the kernels are the PyTorch references and nothing is tuned (``force`` runs it anyway)."""
    if torch.device(device).type != "cuda" and not force:
        return
    from loradafast import kernels

    widths, token_counts = kernel_warm_up_shapes(model, batches)
    dtype = next(model.parameters()).dtype
    for tokens in token_counts:
        for mask in (None, torch.ones(tokens, dtype=torch.bool, device=device)):
            for d_in, d_out in sorted(widths):
                x = torch.randn(tokens, d_in, device=device, dtype=dtype)
                g = torch.randn(tokens, d_out, device=device, dtype=dtype)
                z, y = torch.zeros(d_in, d_in, device=device), torch.zeros(d_out, d_out, device=device)
                kernels.kfac_accumulate(z, x, mask)
                kernels.kfac_accumulate(y, g, mask)
                kernels.kfac_accumulate_pair(z, x, y, g, mask)
                kernels.gradient_accumulate(torch.zeros(d_out, d_in, device=device), g, x, mask)
    sync(device)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def warm_up_method(name: str, spec: dict) -> None:
    """Run ``name`` once on a throwaway tiny Llama (2 sequences × 16 tokens), untimed: imports,
    lazy initialisation and first-call costs (LAPACK, SVD, PEFT wrapping) stay out of the timing."""
    warm = dict(spec, model="tiny", samples=2, seq_len=16, batch_size=2, eva_max_epochs=2)
    model = build_model(warm)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    try:
        run_method(name, model, make_batches(ids, 2, spec["device"]), warm)
    except Exception:  # noqa: BLE001 - a warm-up only (EVA may hit its cap here)
        pass
    del model
    gc.collect()
    if torch.device(spec["device"]).type == "cuda":
        torch.cuda.empty_cache()


def worker_main(spec_path: str, result_path: str) -> None:
    """The child process: warm up, build the model afresh, time one method, write its record."""
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    warm_up_method(spec["method"], spec)
    ids = torch.load(spec["ids_path"])
    model = build_model(spec)
    record = timed_run(spec["method"], model, ids, spec, sample_cpu_memory=True)
    Path(result_path).write_text(json.dumps(record))


def run_in_child(spec: dict, workdir: Path, timeout: float) -> dict:
    tag = f"{spec['model']}_{spec['method']}_{spec['repetition']}"
    record = run_child(SCRIPT, spec, workdir, tag, timeout=timeout, threads=spec.get("threads"))
    record.setdefault("method", spec["method"])
    return record


def run_model(model_name: str, settings: dict, methods: list[str], spec_common: dict, workdir: Path, *,
              inline: bool, timeout: float, log, on_run=None) -> tuple[dict, dict, list, float]:
    """Every method ``settings['repeats']`` times on one model, alternated.  Returns the model's
    data description, the runs per method, the method order of each repetition, and the seconds.
    ``on_run(runs)``, if given, is called after every run (to save what has been measured so far)."""
    log(f"[{model_name}] preparing {settings['samples']}×{settings['seq_len']} tokens, "
        f"batch size {settings['batch_size']}")
    info = prepare_model_data(model_name, settings, workdir, log)
    spec_base = {"model": model_name, **spec_common, "model_dir": info.get("model_dir"),
                 "ids_path": info["ids_path"], **settings}
    inline_model = inline_ids = None
    if inline:
        inline_model = build_model(spec_base)
        inline_ids = torch.load(info["ids_path"])
        if spec_common["threads"]:
            torch.set_num_threads(spec_common["threads"])
        for m in methods:
            warm_up_method(m, spec_base)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    orders = []
    started = time.perf_counter()
    for rep in range(settings["repeats"]):
        order = methods[rep % len(methods):] + methods[:rep % len(methods)]
        orders.append(order)
        for m in order:
            spec = dict(spec_base, method=m, repetition=rep)
            if inline:
                record = timed_run(m, copy.deepcopy(inline_model), inline_ids, spec, sample_cpu_memory=False)
            else:
                record = run_in_child(spec, workdir, timeout)
            record["repetition"] = rep
            runs[m].append(record)
            status = f"{record['wall_s']:.2f}s" if record.get("ok") else f"FAILED: {record['error'][:200]}"
            log(f"[{model_name}] rep {rep + 1}/{settings['repeats']} {m:<17} {status}")
            if on_run is not None:
                on_run(runs)
    del inline_model
    return info, runs, orders, time.perf_counter() - started
