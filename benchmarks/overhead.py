"""Overhead of data-aware LoRA initialisations over one bare forward+backward pass (project issue 7).

    python benchmarks/overhead.py                                   # tiny Llama + SmolLM2-135M, CPU
    python benchmarks/overhead.py --models tiny --repeats 1         # quick check (about a minute)
    python benchmarks/overhead.py --gpu                             # + a Llama-2-7B-shaped model (CUDA only)

Defaults per model (each overridable per model, e.g. ``--samples tiny=64,smollm2=16``):
tiny 32 × 64 tokens, batch 8, 5 repetitions; SmolLM2 16 × 128 tokens, batch 8, 2 repetitions;
Llama-2-7B shape 256 × 1024 tokens, batch 2, 3 repetitions.  On CPU the workers run with
one torch thread (``--threads``): on a small shared machine, OpenMP teams stall at every barrier
when another process takes a core (measured: benchmarks/README.md, "One torch thread on CPU").

Every method runs on the same model, the same samples and the same device, in ONE run of this
script, and the methods are alternated: repetition i runs every method once, in the method order
rotated by i, so drift (other jobs on the machine, thermal state) falls on all of them alike.
By default each (method, repetition) runs in its own child process that builds the model afresh
(the same weights every time), warms up on one short sequence, and then times only the method,
so no method inherits another's allocator state and the peak memory of each can be measured:
``torch.cuda.max_memory_allocated`` on CUDA, on CPU the peak resident set size of the child,
sampled every 5 ms by a thread, minus the resident size just before the method started (a short
spike between two samples can be missed).  ``--inline`` runs everything in this process on a deep
copy of the model (faster; CPU memory is then not measured).

Methods (``--methods``, comma-separated):

* ``floor``: one bare forward+backward over the initialisation samples, in the same batches as the
  data-aware methods: every parameter frozen, the embedding output made a leaf that requires grad
  so that autograd computes the activation gradients of every decoder layer and no weight
  gradient; loss = Σ over sequences of the mean token loss of the sequence (fp32 log-softmax,
  loradafast's loss); ``use_cache=False``.  This is what any data-aware method must at least do.
* ``floor-train``: the training-step floor, the same forward+backward with the weights of the target
  layers requiring grad, so that autograd also computes their weight gradients (accumulated over
  the batches, as G is); what one training step costs, and what any method that needs G
  (LoRA-GA, LoRA-One, LoRA-DA) must at least do (docs/design.md §6.2 gives the FLOP model).
* ``lora-da-diag``, ``lora-da-full``: ``loradafast.get_peft_model(model, loader, LoraConfig,
  method="lora-da", y_factor=...)``; ``lora-ga``, ``lora-one``: the same call with that method (all
  four from one statistics pass + solve + wrap/apply).  Skipped, with a note, when the installed
  loradafast does not offer the method.
* ``peft-lora-ga``: PEFT's own LoRA-GA at its documented settings: ``LoraConfig(init_lora_weights=
  "lora_ga", lora_ga_config=LoraGAConfig())`` (ArB2r, stable scale, γ=16), ``preprocess_loraga``
  with a ``train_step`` that runs ``model(**batch).loss.backward()`` over the same batches, then
  ``get_peft_model``.
* ``peft-eva``: PEFT's EVA at its documented settings: ``LoraConfig(init_lora_weights="eva",
  eva_config=EvaConfig())`` (ρ=2, τ=0.99), ``get_peft_model(..., low_cpu_mem_usage=True)``, then
  ``get_eva_state_dict`` + ``initialize_lora_eva_weights`` (what ``initialize_lora_eva_weights(
  model, dataloader)`` does) over the same batches.  EVA is forward-only and cycles the loader
  until its incremental PCA converges; the number of batches it ran is recorded, and it is
  stopped after ``--eva-max-epochs`` passes over the samples (then recorded as not converged).
* ``official-lora-da``: the official LoRA-DA schedule re-enacted with torch/PEFT calls: batch size
  1; one gradient pass over the samples accumulating the weight gradients of the target layers
  in ``.grad`` (only those weights require grad); then, per group of 8 decoder layers, one more
  forward+backward pass over the samples collecting that group's K-FAC factors with hooks
  (Σxxᵀ per layer, Σg² per output; weight gradients only for that group's target layers, so
  backward stops below the group: a lower bound on a pass with every weight trainable); then per
  layer a dense Ω (explicit inverses) and ``torch.lobpcg(Ω, k=r, largest=False, niter=10)``,
  falling back to ``torch.linalg.eigh`` (and counting it) when lobpcg raises; then the factors
  are written into a ``peft.get_peft_model`` wrapper.  Faithful to the schedule's cost
  structure (1 + ⌈layers/8⌉ passes at batch size 1, per-layer dense solves), not to its numerics.

Reported per method: wall time (median, min, max over repetitions), the split pass / solve /
apply where the method exposes it (loradafast: ``result.timings``; apply = wall − pass − solve,
i.e. wrapping into a PeftModel and filling it), peak memory, and the ratios over both floors of
the same run (``ratio_over_floor``: the input-gradient floor; ``ratio_over_training_floor``).
Results go to ``benchmarks/results/overhead_<device-slug>.json``, one entry per configuration
(``--config KEY``, default ``default``; the file's other entries are kept), and a bar plot of the
ratios (over the input-gradient floor) to ``.png`` beside it, ``overhead_<device-slug>_<KEY>.png``
for an entry other than ``default`` (needs matplotlib, a benchmark-only dependency; skipped with a
message when missing).  A Markdown table is printed at the end.

The parts live in ``benchmarks/_overhead/`` (config, models, methods, official, runner, report);
this file is the command line and the results record.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    config_key,
    cpu_model,
    environment,
    figure_path,
    git_state,
    results_path,
    slug,
    write_entry,
)
from _overhead.config import (  # noqa: E402
    ALL_METHODS,
    ALTERNATION,
    FLOOR,
    FLOOR_TRAIN,
    FLOORS,
    LORA_DA_DEFAULTS,
    LORADAFAST_METHODS,
    METHOD_DESCRIPTIONS,
    MODEL_DEFAULTS,
    MODEL_DESCRIPTIONS,
    OFFICIAL_GROUP,
    TARGETS,
    WARM_UP,
)
from _overhead.report import markdown_table, plot, summarize  # noqa: E402
from _overhead.runner import run_model, worker_main  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated: tiny, smollm2, llama2-7b (default: tiny,smollm2; --gpu adds llama2-7b)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated among {ALL_METHODS}")
    parser.add_argument("--samples", default=None, help="sequences: one number for all models or model=n,...")
    parser.add_argument("--seq-len", default=None, help="tokens per sequence: a number or model=n,...")
    parser.add_argument("--batch-size", default=None, help="batch size (not for the official schedule, always 1)")
    parser.add_argument("--repeats", default=None,
                        help="repetitions: a number or model=n,... (defaults: tiny 5, smollm2 2, llama2-7b 3)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--gpu", action="store_true", help="CUDA run, adds the Llama-2-7B-shaped model")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda with --gpu, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in the workers (default: 1 on CPU, torch's default on CUDA)")
    parser.add_argument("--eva-max-epochs", default=None,
                        help="stop EVA after this many passes over the samples: a number or model=n,... "
                             "(defaults: tiny 25, smollm2 3, llama2-7b 5)")
    parser.add_argument("--inline", action="store_true",
                        help="run in this process on deep copies (no child processes; CPU memory not measured)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per child process")
    parser.add_argument("--config", type=config_key, default="default", metavar="KEY",
                        help="the entry of the results file this run writes (the file's other entries are kept)")
    parser.add_argument("--out", default=None,
                        help="the results file (default benchmarks/results/overhead_<slug>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _parse_per_model(value: str | None, models: list[str], key: str) -> dict:
    out = {m: dict(MODEL_DEFAULTS[m]) for m in models}
    if value is None:
        return out
    for part in value.split(","):
        if "=" in part:
            m, v = part.split("=", 1)
            if m not in out:
                raise SystemExit(f"--{key.replace('_', '-')}: {m!r} is not among --models")
            out[m][key] = int(v)
        else:
            for m in out:
                out[m][key] = int(part)
    return out


def resolve_choices(args, cuda_available: bool) -> tuple[str, list[str], list[str], dict]:
    """Device, models, methods (floor first if missing) and per-model settings, checked."""
    if args.gpu and not cuda_available:
        raise SystemExit("--gpu needs CUDA, and torch.cuda.is_available() is False on this machine")
    device = args.device or ("cuda" if args.gpu else "cpu")
    if device.startswith("cuda") and not cuda_available:
        raise SystemExit("--device cuda needs CUDA")
    models = (args.models.split(",") if args.models else ["tiny", "smollm2"] + (["llama2-7b"] if args.gpu else []))
    for m in models:
        if m not in MODEL_DEFAULTS:
            raise SystemExit(f"unknown model {m!r}; choose among {list(MODEL_DEFAULTS)}")
    if "llama2-7b" in models and not device.startswith("cuda"):
        raise SystemExit("the Llama-2-7B-shaped model is only run on CUDA (--gpu)")
    methods = args.methods.split(",")
    for m in methods:
        if m not in ALL_METHODS:
            raise SystemExit(f"unknown method {m!r}; choose among {ALL_METHODS}")
    for i, floor in enumerate(FLOORS):  # the ratios need both floors, first
        if floor in methods:
            methods.remove(floor)
        methods.insert(i, floor)
    settings = _parse_per_model(args.samples, models, "samples")
    for key, value in (("seq_len", args.seq_len), ("batch_size", args.batch_size),
                       ("eva_max_epochs", args.eva_max_epochs), ("repeats", args.repeats)):
        parsed = _parse_per_model(value, models, key)
        for m in models:
            settings[m][key] = parsed[m][key]
    return device, models, methods, settings


def available_methods(methods: list[str]) -> tuple[list[str], list[dict]]:
    """The methods the installed loradafast and PEFT offer, and why the others are skipped."""
    import peft

    import loradafast

    skipped, available = [], []
    for m in methods:
        if m in LORADAFAST_METHODS and LORADAFAST_METHODS[m][0] not in loradafast.METHODS:
            skipped.append({"method": m, "why": f"loradafast {loradafast.__version__} has no method "
                                                f"{LORADAFAST_METHODS[m][0]!r} (loradafast.METHODS = "
                                                f"{list(loradafast.METHODS)})"})
            continue
        if m == "peft-lora-ga":
            try:
                from peft.tuners.lora import LoraGAConfig, preprocess_loraga  # noqa: F401
            except ImportError as err:
                skipped.append({"method": m, "why": f"peft {peft.__version__} has no LoRA-GA: {err}"})
                continue
        if m == "peft-eva":
            try:
                from peft import EvaConfig, initialize_lora_eva_weights  # noqa: F401
            except ImportError as err:
                skipped.append({"method": m, "why": f"peft {peft.__version__} has no EVA: {err}"})
                continue
        available.append(m)
    for s in skipped:
        log(f"skipped {s['method']}: {s['why']}")
    return available, skipped


def result_header(args, argv, device: str, settings: dict, dtype: str, skipped: list) -> dict:
    """Everything the results record holds before the first run."""
    import peft
    import torch
    import transformers

    import loradafast

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        device_slug = slug(name)
    else:
        name = f"CPU ({cpu_model()}, {os.cpu_count()} logical cores)"
        device_slug = "cpu"
    env = environment(device)
    return {
        "benchmark": "overhead (project issue 7)",
        "date": env["date"],
        "device": name,
        "device_slug": device_slug,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cuda": env["cuda"],
        "python": env["python"],
        "platform": platform.platform(),
        "torch": env["torch"],
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "loradafast": loradafast.__version__,
        "loradafast_methods": list(loradafast.METHODS),
        "git": git_state(),
        "command": " ".join([Path(sys.executable).name, "benchmarks/overhead.py", *(argv or sys.argv[1:])]),
        "settings": {"per_model": settings, "rank": args.rank, "lora_alpha": args.alpha,
                     "target_modules": TARGETS, "dtype": dtype, "device": device,
                     "torch_threads": args.threads or torch.get_num_threads(),
                     "isolation": "inline (deep copies in one process)" if args.inline
                     else "one child process per (method, repetition)",
                     "warm_up": WARM_UP,
                     "alternation": ALTERNATION,
                     "official_group_layers": OFFICIAL_GROUP,
                     "lora_da_defaults": LORA_DA_DEFAULTS},
        "floor": FLOOR,
        "floor_train": FLOOR_TRAIN,
        "method_descriptions": dict(METHOD_DESCRIPTIONS),
        "skipped": skipped,
        "notes": [],
        "models": {},
    }


def save(result: dict, out_path: Path, key: str, device: str, quiet: bool = False) -> None:
    """``result`` as the entry ``key`` of the results file (its other entries are kept)."""
    write_entry(result, out_path, key, benchmark="overhead", device=device, quiet=quiet)


def write_outputs(result: dict, out_path: Path, key: str, device: str) -> None:
    """The JSON entry, the plot beside it (or a note why not), and the Markdown tables on stdout."""
    save(result, out_path, key, device)
    figure = figure_path(out_path, key)
    why_not = plot(result, figure)
    if why_not:
        log(why_not)
        result["notes"].append(why_not)
        save(result, out_path, key, device)
    else:
        log(f"wrote {figure}")
    print()
    for model_name, block in result["models"].items():
        print(markdown_table(model_name, block))
        print()
    if result["skipped"]:
        print("Skipped: " + "; ".join(f"{s['method']} ({s['why']})" for s in result["skipped"]))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.result)
        return
    import torch

    device, models, methods, settings = resolve_choices(args, torch.cuda.is_available())
    methods, skipped = available_methods(methods)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if args.threads is None and not device.startswith("cuda"):
        # On a small shared CPU, OpenMP teams stall at every barrier when another process takes a core;
        # one thread per run keeps the comparison stable (all methods run under the same setting).
        args.threads = 1
    result = result_header(args, argv, device, settings, dtype, skipped)
    out_path = results_path("overhead", device, args.out)
    notes = result["notes"]
    if not device.startswith("cuda"):
        notes.append("CPU run: the issue's targets (LoRA-DA ≤ 1.15× floor, ≤ 0.5× PEFT LoRA-GA, ≤ 0.2× the "
                     "official schedule) are stated for GPU and are not judged from these numbers.")
        if args.inline:
            notes.append("--inline: CPU peak memory not measured (RSS of a shared process is not attributable).")

    spec_common = {"device": device, "dtype": dtype, "rank": args.rank, "alpha": args.alpha, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="loradafast_overhead_") as tmp:
        for model_name in models:
            st = settings[model_name]

            def save_so_far(runs, model_name=model_name):
                # A benchmark killed from outside (a GPU lease's time limit) still leaves every finished run.
                result["models"][model_name] = {"partial": True, "description": MODEL_DESCRIPTIONS[model_name],
                                                "data": "(partial: see the finished model's block)",
                                                "device": result["device"], "dtype": dtype, "rank": args.rank, **st,
                                                "summary": summarize(methods, runs), "runs": runs}
                save(result, out_path, args.config, device, quiet=True)

            info, runs, orders, seconds = run_model(model_name, st, methods, spec_common, Path(tmp),
                                                    inline=args.inline, timeout=args.timeout, log=log,
                                                    on_run=save_so_far)
            block = {"description": info["description"], "data": info["data"], "device": result["device"],
                     "dtype": dtype, "rank": args.rank, **st,
                     "num_parameters": None, "order_per_repetition": orders,
                     "benchmark_wall_s": seconds,
                     "summary": summarize(methods, runs), "runs": runs}
            block["num_parameters"] = next((r["num_parameters"] for rs in runs.values() for r in rs
                                            if r.get("num_parameters")), None)
            result["models"][model_name] = block
            gc.collect()

    result["git_at_end"] = git_state()
    if result["git_at_end"]["loradafast_source_sha256"] != result["git"]["loradafast_source_sha256"]:
        notes.append("the loradafast sources changed while this benchmark ran (see git / git_at_end): "
                     "runs may have measured different code")
    write_outputs(result, out_path, args.config, device)
    failed = sum(not r.get("ok") for block in result["models"].values() for rs in block["runs"].values() for r in rs)
    if failed:
        log(f"{failed} run(s) failed: see their 'error' in {out_path}")
        sys.exit(1)


if __name__ == "__main__":
    main()
