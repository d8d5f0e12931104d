"""The ``loradafast`` command (also ``python -m loradafast``): ``init``, ``collect``, ``solve``, ``report``.

Everything runs locally: the model and its tokenizer come from a directory (``save_pretrained``
output, or a Hugging Face cache snapshot), the data from a file.  Progress bars and one summary
line per stage go to stderr; the paths written go to stdout.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DESCRIPTION = """\
Data-aware LoRA initialisation (LoRA-DA and friends) for Hugging Face models, from the command line.

A LoRA adapter normally starts from random A and zero B.  A data-aware initialisation first runs a
few hundred of your training samples through the model once (forward and backward, no update),
and starts the adapter from what those gradients say: training then starts closer to where it
is going.  The result is an ordinary PEFT adapter directory: load it with
PeftModel.from_pretrained(model, DIR, is_trainable=True) and fine-tune as usual.

commands:
  init      the whole thing: model + data -> PEFT adapter directory (start here)
  collect   only the pass over the data: model + data -> statistics file (.safetensors)
  solve     only the solve: statistics file -> PEFT adapter directory (another rank, method
            or option without running the model again)
  report    a per-layer table and plots (PNG, with matplotlib) of an adapter made by init/solve

examples:
  loradafast init --model ./my-llama --data train.jsonl --rank 8 --out ./adapter
  loradafast init --model ./my-llama --data qa.jsonl --prompt-field question --answer-field answer \\
                  --num-train-samples 20000 --out ./adapter --report
  loradafast collect --model ./my-llama --data train.txt --out stats.safetensors
  loradafast solve --stats stats.safetensors --rank 16 --method lora-ga --out ./adapter-ga
  loradafast report ./adapter

Run `loradafast COMMAND --help` for the options of one command.
"""

logger = logging.getLogger("loradafast.cli")


def _methods() -> tuple[str, ...]:
    from .methods.registry import METHODS

    return METHODS


# ---- the parser ------------------------------------------------------------------------------------

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; an option's default shown where it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``loradafast`` command."""
    parser = argparse.ArgumentParser(prog="loradafast", description=DESCRIPTION,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    common = argparse.ArgumentParser(add_help=False)  # the options every command takes
    verbosity = common.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="more log output, tracebacks on errors")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = _HelpFormatter

    init = commands.add_parser("init", parents=[common], formatter_class=fmt,
                               help="model + data -> PEFT adapter directory",
                               description="Run the data through the model once and save the initialised LoRA "
                                           "adapter as a PEFT adapter directory.")
    _model_arguments(init, data_required=False)
    _adapter_arguments(init)
    init.add_argument("--save-stats", metavar="FILE", help="also save the statistics there, for `loradafast solve`")
    init.set_defaults(run=run_init)

    collect = commands.add_parser("collect", parents=[common], formatter_class=fmt,
                                  help="model + data -> statistics file",
                                  description="Run the statistics pass only and save the statistics (one "
                                              "safetensors file) for `loradafast solve`.")
    _model_arguments(collect, data_required=True)
    collect.add_argument("--y-factor", choices=("diag", "full"), default="diag",
                         help="the output-gradient factor Y to collect: its diagonal (as LoRA-DA's official code) "
                              "or the full matrix (the paper's K-FAC; out×out per layer)")
    collect.add_argument("--out", required=True, metavar="FILE", help="the statistics file to write (.safetensors)")
    collect.set_defaults(run=run_collect)

    solve = commands.add_parser("solve", parents=[common], formatter_class=fmt,
                                help="statistics file -> PEFT adapter directory",
                                description="Turn statistics saved by `collect` (or `init --save-stats`) into a "
                                            "PEFT adapter, without running the model.")
    solve.add_argument("--stats", required=True, metavar="FILE", help="statistics file written by `collect`")
    solve.add_argument("--model", metavar="DIR", help="the model directory; needed only by methods that read the "
                                                      "base weights (fisher-subspace)")
    solve.add_argument("--device", default="auto", help="where to solve: auto (cuda if available), cpu, cuda, cuda:1")
    _adapter_arguments(solve)
    solve.set_defaults(run=run_solve)

    report = commands.add_parser("report", parents=[common], formatter_class=fmt,
                                 help="per-layer table and plots of an adapter",
                                 description="Write a per-layer table (layers.csv, report.md) and PNG plots "
                                             "(with matplotlib) of an adapter directory made by init or solve.")
    report.add_argument("directory", metavar="DIR", help="adapter directory written by `loradafast init` or `solve`")
    report.add_argument("--out", metavar="DIR", help="where to write the report (default: DIR/report)")
    report.add_argument("--stats", metavar="FILE", help="the statistics the adapter was solved from: adds Ω's "
                                                        "spectrum beyond the cut (LoRA-DA)")
    report.add_argument("--no-plots", action="store_true", help="tables only")
    report.set_defaults(run=run_report)
    return parser


def _model_arguments(p: argparse.ArgumentParser, *, data_required: bool) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, metavar="DIR",
                   help="a local model directory (save_pretrained output) with its tokenizer")
    g.add_argument("--tokenizer", metavar="DIR", help="the tokenizer's directory, if not the model's")
    g.add_argument("--data", required=data_required, metavar="PATH",
                   help="training samples: .jsonl (one JSON object per line), .json (a list of objects), a plain "
                        "text file (one sample per line), or a directory saved by datasets' save_to_disk"
                        + ("" if data_required else "; not needed by the weight-only methods lora, pissa, milora"))
    g.add_argument("--text-field", default="text", metavar="FIELD",
                   help="the field holding the text (JSON and datasets)")
    g.add_argument("--prompt-field", metavar="FIELD",
                   help="with --answer-field: prompt/answer pairs, the loss on the answer only")
    g.add_argument("--answer-field", metavar="FIELD", help="see --prompt-field")
    g.add_argument("--split", default="train", help="the split of a saved DatasetDict")
    g.add_argument("--max-samples", type=int, default=256, metavar="N",
                   help="sequences used for the statistics")
    g.add_argument("--max-length", type=int, default=512, metavar="TOKENS",
                   help="tokens per sequence at most (longer ones are cut)")
    g.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="sequences per forward/backward (memory only: the statistics do not depend on it)")
    g.add_argument("--no-split-halves", action="store_true",
                   help="keep no sums of every second batch: no split-half stability diagnostic (saves memory: it "
                        "is on by default where three times the statistics fit the device's free memory)")
    g.add_argument("--target-modules", metavar="NAMES",
                   help="comma-separated layer names or suffixes to adapt, as PEFT's target_modules "
                        "(default: every linear layer of the decoder blocks)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the model's dtype for the pass (auto: bfloat16 on a GPU that has it, else float32); "
                        "the statistics are accumulated in float32 either way")


def _adapter_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--out", required=True, metavar="DIR", help="the adapter directory to write")
    g.add_argument("--rank", type=int, default=8, metavar="R", help="the LoRA rank r")
    g.add_argument("--method", default="lora-da", choices=_methods(),
                   help="the initialisation: lora-da (LoRA-DA, arXiv 2510.24561), lora-ga, lora-one, "
                        "fisher-subspace (data-aware); lora (PEFT's default), pissa, milora (weights only)")
    g.add_argument("--lora-alpha", type=float, metavar="ALPHA", help="PEFT's lora_alpha (default: PEFT's, 8)")
    g.add_argument("--num-train-samples", type=int, metavar="N",
                   help="lora-da: the size of the fine-tuning set you will train on (N in the paper; default "
                        "100000). It weighs the variance term: set it to your data set's size")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the method, e.g. beta=0.05, gamma=256, damping_mode=relative, "
                        "eigensolver=lobpcg (repeatable; see loradafast.initialize's documentation)")
    g.add_argument("--residual-base", action="store_true",
                   help="methods that move the base weight (pissa, milora, lora-ga, fisher-subspace): save the "
                        "rank-r adapter for the residual base W - s·B·A (rebuild it with "
                        "loradafast.apply_base_update) instead of the default rank-2r adapter for the unmodified "
                        "base")
    g.add_argument("--report", action="store_true", help="also write the report (tables and plots) into OUT/report")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---- helpers -------------------------------------------------------------------------------------------

def _version() -> str:
    from . import __version__

    return __version__


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def parse_option(text: str):
    """``KEY=VALUE`` → (key, value), the value read as a number, bool or None where it is one."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--option takes KEY=VALUE, got {text!r}")
    value = value.strip()
    lowered = value.lower()
    if lowered in ("none", "null"):
        return key.strip(), None
    if lowered in ("true", "false"):
        return key.strip(), lowered == "true"
    for cast in (int, float):
        try:
            return key.strip(), cast(value)
        except ValueError:
            pass
    return key.strip(), value


def _method_options(args) -> dict:
    options = dict(parse_option(o) for o in args.option)
    if args.num_train_samples is not None:
        options["num_train_samples"] = args.num_train_samples
    if "dtype" in options or "solve_dtype" in options:
        import torch

        value = options.pop("dtype", options.pop("solve_dtype", None))
        options["dtype"] = getattr(torch, str(value).replace("torch.", ""))
    return options


def load_model(args):
    """The model of ``--model`` on ``--device`` in ``--dtype``, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    path = Path(args.model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: not a directory; give a local model directory (save_pretrained "
                                "output or a downloaded snapshot)")
    logger.info("loading %s (%s, %s)", path, str(dtype).replace("torch.", ""), device)
    model = AutoModelForCausalLM.from_pretrained(str(path), **{_dtype_keyword(): dtype})
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer or path))
    return model, tokenizer


def _dtype_keyword() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_batches(args, tokenizer, model=None) -> list[dict]:
    """``--data`` read, tokenized and batched as the pass takes it."""
    from .data import Fields, read_samples, tokenized_batches

    max_length = args.max_length
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and 0 < context < max_length:
        max_length = context
    fields = Fields(args.text_field, args.prompt_field, args.answer_field)
    return tokenized_batches(read_samples(args.data, fields, split=args.split), tokenizer,
                             batch_size=args.batch_size, max_length=max_length, max_samples=args.max_samples)


def _target_modules(args):
    value = getattr(args, "target_modules", None)
    return [name.strip() for name in value.split(",") if name.strip()] if value else None


def _weights(model, target_modules):
    from .targets import find_targets

    targets = find_targets(model, target_modules)
    return {t.name: t.weight_out_in().detach() for t in targets}, {t.name: t.kind for t in targets}


def _save(result, args, stats=None) -> Path:
    """The adapter directory, its diagnostics, and the report when asked for."""
    from .report import save_diagnostics, write_report

    convert = (not args.residual_base) if result.moves_base else None
    out = result.save(args.out, convert_to_lora=convert)
    save_diagnostics(result, out)
    logger.info("adapter written to %s (load it with peft.PeftModel.from_pretrained(model, %r, is_trainable=True))",
                out, str(out))
    if result.moves_base:
        logger.info("%s moves the base weight: the adapter is %s", result.method,
                    "for the residual base W - s·B·A (build it with loradafast.apply_base_update(model, dir))"
                    if args.residual_base else "the rank-2r conversion for the unmodified base model")
    if args.report:
        write_report(result, out / "report", stats=stats)
    else:
        logger.info("per-layer table and plots: loradafast report %s", out)
    return out


# ---- the commands --------------------------------------------------------------------------------------

def run_init(args) -> Path:
    """``loradafast init``: model + data → adapter directory."""
    from . import initialize, solve
    from .methods.registry import get_method
    from .statistics import collect

    record = get_method(args.method)
    options = _method_options(args)
    if record.data_aware and not args.data:
        raise ValueError(f"method {args.method!r} is data-aware: give the training samples with --data")
    model, tokenizer = load_model(args)
    targets = _target_modules(args)
    progress = not (args.no_progress or args.quiet)
    stats = None
    if not record.data_aware:
        if "dtype" in options:
            options["solve_dtype"] = options.pop("dtype")
        result = initialize(model, None, args.rank, method=args.method, target_modules=targets,
                            lora_alpha=args.lora_alpha, progress=progress, **options)
    else:
        batches = load_batches(args, tokenizer, model)
        stats = collect(model, batches, target_modules=targets, y_factor=options.get("y_factor") or "diag",
                        max_samples=args.max_samples, progress=progress,
                        split_halves=False if args.no_split_halves else None)
        if args.save_stats:
            stats.save(args.save_stats)
            logger.info("statistics written to %s", args.save_stats)
        weights, kinds = _weights(model, targets) if record.needs_weights else (None, None)
        result = solve(stats, args.rank, method=args.method, weights=weights, kinds=kinds,
                       lora_alpha=args.lora_alpha, progress=progress, **options)
        result.timings = {"pass_s": stats.meta.get("pass_seconds", 0.0), **result.timings}
    return _save(result, args, stats)


def run_collect(args) -> Path:
    """``loradafast collect``: model + data → statistics file."""
    from .statistics import collect

    model, tokenizer = load_model(args)
    batches = load_batches(args, tokenizer, model)
    stats = collect(model, batches, target_modules=_target_modules(args), y_factor=args.y_factor,
                    max_samples=args.max_samples, progress=not args.quiet,
                    split_halves=False if args.no_split_halves else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.save(out)
    logger.info("statistics written to %s; make adapters from them with: loradafast solve --stats %s --rank 8 "
                "--out DIR", out, out)
    return out


def run_solve(args) -> Path:
    """``loradafast solve``: statistics file → adapter directory."""
    from . import solve
    from .methods.registry import get_method
    from .statistics import Statistics

    record = get_method(args.method)
    stats = Statistics.load(args.stats)
    logger.info("loaded %r", stats)
    weights = kinds = None
    if record.needs_weights:
        if not args.model:
            raise ValueError(f"method {args.method!r} reads the base weights: give the model directory with --model")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model)
        weights, kinds = _weights(model, stats.meta.get("target_modules"))
    result = solve(stats, args.rank, method=args.method, weights=weights, kinds=kinds, lora_alpha=args.lora_alpha,
                   device=_device(args.device), progress=not (args.no_progress or args.quiet),
                   **_method_options(args))
    return _save(result, args, stats)


def run_report(args) -> Path:
    """``loradafast report``: adapter directory → tables and plots."""
    from .report import add_spectra, load_diagnostics, write_report

    data = load_diagnostics(args.directory)
    if args.stats:
        from .statistics import Statistics

        add_spectra(data, Statistics.load(args.stats))
    out = Path(args.out) if args.out else Path(args.directory) / "report"
    return write_report(data, out, plots=not args.no_plots)


# ---- entry point -------------------------------------------------------------------------------------

def _configure_logging(args):
    """Log records of loradafast (and warnings) to stderr at the chosen level; returns the undo."""
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("loradafast: %(message)s"))
    saved = []
    for name in ("loradafast", "py.warnings"):
        log = logging.getLogger(name)
        saved.append((log, log.level, log.propagate))
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False
    logging.captureWarnings(True)

    def undo():  # main() may run inside another program (or a test): leave logging as it was
        logging.captureWarnings(False)
        for log, old_level, old_propagate in saved:
            log.removeHandler(handler)
            log.setLevel(old_level)
            log.propagate = old_propagate

    return undo


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    undo = _configure_logging(args)
    try:
        path = args.run(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"loradafast {args.command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        undo()
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
