"""The ``loradafast`` command (also ``python -m loradafast``): ``init``, ``collect``, ``solve``, ``report``.

The model and its tokenizer come from a directory (``save_pretrained`` output, or a Hugging Face
cache snapshot) or, where the network allows, a Hub model id; the data from a file, a saved
dataset, or a Hub dataset name.  Progress bars and one summary line per stage go to stderr; the
paths written go to stdout.

Every argument is checked before the statistics pass, as the Python API does: a mistake costs
seconds, not a pass over the data, and leaves the user's files as they were.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import re
import shutil
import sys
import uuid
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
  loradafast init --model ./my-chat-model --data chats.jsonl --rank 16 --lora-alpha 32 --use-rslora \\
                  --target-regex '.*\\.(q_proj|v_proj)' --rank-pattern 'v_proj=8' --out ./adapter
  loradafast collect --model ./my-llama --data train.txt --out stats.safetensors
  loradafast solve --stats stats.safetensors --rank 16 --method lora-ga --out ./adapter-ga
  loradafast report ./adapter

Run `loradafast COMMAND --help` for the options of one command.
"""

logger = logging.getLogger("loradafast.cli")

REPORT_DIR = "report"  # inside an adapter directory: describes that adapter only
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's own default lora_alpha

SOLVE_DTYPES = ("float64", "float32")


def _methods() -> tuple[str, ...]:
    from .methods.registry import METHODS

    return METHODS


def _default_method() -> str:
    from .methods.registry import DEFAULT_METHOD

    return DEFAULT_METHOD


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
    for add in (_init_parser, _collect_parser, _solve_parser, _report_parser):
        add(commands, common)
    return parser


def _init_parser(commands, common) -> None:
    init = commands.add_parser("init", parents=[common], formatter_class=_HelpFormatter,
                               help="model + data -> PEFT adapter directory",
                               description="Run the data through the model once and save the initialised LoRA "
                                           "adapter as a PEFT adapter directory.  Every argument is checked "
                                           "before the pass.")
    _model_arguments(init)
    _data_arguments(init, data_required=False)
    _adapter_arguments(init)
    _peft_arguments(init)
    init.add_argument("--memory-budget", type=_memory_budget, metavar="SIZE",
                      help="bytes the statistics and the solve may use, e.g. 40GB or 512MiB (default: the device's "
                           "free memory less 10 %%); where they do not fit at once, the layers are split over several "
                           "passes over the data, with the same result")
    init.add_argument("--save-stats", metavar="FILE",
                      help="also save the statistics there, for `loradafast solve` (its directory is created; "
                           "they hold what the method reads: lora-ga and lora-one G only)")
    init.set_defaults(run=run_init)


def _collect_parser(commands, common) -> None:
    collect = commands.add_parser("collect", parents=[common], formatter_class=_HelpFormatter,
                                  help="model + data -> statistics file",
                                  description="Run the statistics pass only and save the statistics (one "
                                              "safetensors file) for `loradafast solve`.")
    _model_arguments(collect)
    _data_arguments(collect, data_required=True)
    collect.add_argument("--y-factor", choices=("diag", "full"), default="diag",
                         help="the output-gradient factor Y to collect: its diagonal (as LoRA-DA's official code) "
                              "or the full matrix (the paper's K-FAC; out×out per layer)")
    collect.add_argument("--out", required=True, metavar="FILE", help="the statistics file to write (.safetensors)")
    collect.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    collect.set_defaults(run=run_collect)


def _solve_parser(commands, common) -> None:
    solve = commands.add_parser("solve", parents=[common], formatter_class=_HelpFormatter,
                                help="statistics file -> PEFT adapter directory",
                                description="Turn statistics saved by `collect` (or `init --save-stats`) into a "
                                            "PEFT adapter, without running the model.")
    solve.add_argument("--stats", required=True, metavar="FILE", help="statistics file written by `collect`")
    solve.add_argument("--model", metavar="DIR", help="the model directory; needed only by methods that read the "
                                                      "base weights (fisher-subspace)")
    solve.add_argument("--trust-remote-code", action="store_true",
                       help="let transformers run the model's own Python code (only for models you trust)")
    solve.add_argument("--device", default="auto", help="where to solve: auto (cuda if available), cpu, cuda, cuda:1")
    _adapter_arguments(solve)
    _peft_arguments(solve)
    solve.set_defaults(run=run_solve)


def _report_parser(commands, common) -> None:
    report = commands.add_parser("report", parents=[common], formatter_class=_HelpFormatter,
                                 help="per-layer table and plots of an adapter",
                                 description="Write a per-layer table (layers.csv, report.md) and PNG plots "
                                             "(with matplotlib) of an adapter directory made by init or solve.")
    report.add_argument("directory", metavar="DIR", help="adapter directory written by `loradafast init` or `solve`")
    report.add_argument("--out", metavar="DIR", help="where to write the report (default: DIR/report)")
    report.add_argument("--stats", metavar="FILE", help="the statistics the adapter was solved from: adds Ω's "
                                                        "spectrum beyond the cut (LoRA-DA)")
    report.add_argument("--no-plots", action="store_true", help="tables only")
    report.set_defaults(run=run_report)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="DIR",
                   help="a local model directory (save_pretrained output) with its tokenizer, or a Hugging Face "
                        "model id where the network allows")
    g.add_argument("--tokenizer", metavar="DIR", help="the tokenizer's directory (or id), if not the model's")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the model's own Python code (models whose architecture is not in "
                        "transformers; only for models you trust)")
    targets = g.add_mutually_exclusive_group()
    targets.add_argument("--target-modules", metavar="NAMES",
                         help="comma-separated layer names or suffixes to adapt, as PEFT's target_modules list, or "
                              "all-linear (default: every linear layer but the output layer)")
    targets.add_argument("--target-regex", type=_regex, metavar="REGEX",
                         help="the layers to adapt as one regular expression that matches a layer's whole path, as "
                              "PEFT's target_modules string, e.g. '.*\\.(q_proj|v_proj)'")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the model's dtype for the pass (auto: bfloat16 on a GPU that has it, else float32); "
                        "the statistics are accumulated in float32 either way")


def _data_arguments(p: argparse.ArgumentParser, *, data_required: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=data_required, metavar="PATH",
                   help="training samples: .jsonl (one JSON object per line), .json (a list of objects), a plain "
                        "text file (one sample per line), a directory saved by datasets' save_to_disk, or a "
                        "Hugging Face dataset name where the network allows"
                        + ("" if data_required else "; not needed by the weight-only methods lora, pissa, milora"))
    g.add_argument("--text-field", default="text", metavar="FIELD",
                   help="the field holding the text (JSON and datasets)")
    g.add_argument("--prompt-field", metavar="FIELD",
                   help="with --answer-field: prompt/answer pairs, the loss on the answer only")
    g.add_argument("--answer-field", metavar="FIELD", help="see --prompt-field")
    g.add_argument("--messages-field", metavar="FIELD",
                   help="the field holding a chat, a list of {role, content} messages as TRL takes them, rendered "
                        "with the tokenizer's chat template (read without this option from records that have a "
                        "'messages' list and no --text-field)")
    g.add_argument("--split", default="train", help="the split of a saved DatasetDict or a Hub dataset")
    g.add_argument("--data-config", metavar="NAME", help="the configuration of a Hub dataset (e.g. main)")
    g.add_argument("--max-samples", type=_positive_int, default=256, metavar="N",
                   help="sequences used for the statistics")
    g.add_argument("--max-length", type=_positive_int, default=512, metavar="TOKENS",
                   help="tokens per sequence at most (longer ones are cut)")
    g.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                   help="sequences per forward/backward (memory only: the statistics do not depend on it)")
    g.add_argument("--no-split-halves", action="store_true",
                   help="keep no sums of every second batch: no split-half stability diagnostic (saves memory: it "
                        "is on by default where three times the statistics fit the device's free memory)")


def _adapter_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--out", required=True, metavar="DIR", help="the adapter directory to write")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the adapter in an --out that already holds one (its old report/ is removed)")
    g.add_argument("--rank", type=_positive_int, default=8, metavar="R", help="the LoRA rank r")
    g.add_argument("--method", default=_default_method(), choices=_methods(),
                   help="the initialisation: lora-da (LoRA-DA, arXiv 2510.24561), lora-ga, lora-one, "
                        "fisher-subspace (data-aware); lora (PEFT's default), pissa, milora (weights only)")
    g.add_argument("--lora-alpha", type=_positive_number, metavar="ALPHA",
                   help=f"PEFT's lora_alpha (default: PEFT's, {PEFT_DEFAULT_ALPHA})")
    g.add_argument("--num-train-samples", type=_positive_int, metavar="N",
                   help="lora-da: the size of the fine-tuning set you will train on (N in the paper; default "
                        "100000). It weighs the variance term: set it to your data set's size")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the method, e.g. beta=0.05, gamma=256, damping_mode=relative, "
                        "eigensolver=lobpcg (repeatable; an unknown KEY lists the method's options)")
    g.add_argument("--residual-base", action="store_true",
                   help="methods that move the base weight (pissa, milora, lora-ga, fisher-subspace): save the "
                        "rank-r adapter for the residual base W - s·B·A (rebuild it with "
                        "loradafast.apply_base_update) instead of the default rank-2r adapter for the unmodified "
                        "base")
    g.add_argument("--report", action="store_true", help="also write the report (tables and plots) into OUT/report")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _peft_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PEFT's LoraConfig (saved in adapter_config.json)")
    g.add_argument("--use-rslora", action="store_true",
                   help="rank-stabilised scaling lora_alpha/√r (PEFT's use_rslora)")
    g.add_argument("--lora-dropout", type=_dropout, default=0.0, metavar="P",
                   help="PEFT's lora_dropout, for the training that follows (the initialisation does not use it)")
    g.add_argument("--rank-pattern", type=_pattern("rank"), action="append", default=[], metavar="KEY=R",
                   help="another rank for the layers whose path ends in KEY (a regex, as PEFT's rank_pattern), "
                        "e.g. 'v_proj=16' or 'layers\\.0\\..*=4'; repeatable, or one JSON object "
                        "'{\"v_proj\": 16}'")
    g.add_argument("--alpha-pattern", type=_pattern("alpha"), action="append", default=[], metavar="KEY=ALPHA",
                   help="another lora_alpha for the layers whose path ends in KEY (PEFT's alpha_pattern), as "
                        "--rank-pattern")


# ---- argument types: a bad value ends in argparse's usage message, before anything loads ---------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _positive_number(text) -> int | float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number greater than 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {text!r}")
    return int(value) if value.is_integer() else value  # PEFT writes an integer alpha as one


def _dropout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and less than 1, got {text!r}")
    return value


def _memory_budget(text: str) -> str:
    from .planner import parse_bytes

    try:
        parse_bytes(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text  # initialize() parses it again, as it does every budget


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression ({exc})") from None
    return text


def pattern_matches(key: str, name: str) -> bool:
    """Whether a ``rank_pattern``/``alpha_pattern`` key selects layer ``name``: PEFT's rule
    (``peft.utils.other.get_pattern_key``), the key a regex for the end of the path."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _pattern(kind: str):
    """The type of ``--rank-pattern`` (``kind`` "rank") or ``--alpha-pattern`` ("alpha"): ``KEY=VALUE``
    or a JSON object of them, as a dict."""
    def parse(text: str) -> dict:
        entries = _pattern_entries(text)
        for key in entries:
            _regex(rf"(.*\.)?({key})$")
        number = _positive_int if kind == "rank" else _positive_number
        try:
            return {key: number(str(value)) for key, value in entries.items()}
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{kind}s {exc}") from None
    return parse


def _pattern_entries(text: str) -> dict:
    text = text.strip()
    if text.startswith("{"):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}); write KEY=VALUE, or an object such as "
                                             "'{\"v_proj\": 16}'") from None
        if not entries or not all(isinstance(v, (int, float, str)) and not isinstance(v, bool)
                                  for v in entries.values()):
            raise argparse.ArgumentTypeError(f"expected a JSON object of layer keys and numbers, got {text!r}")
        return entries
    key, sep, value = text.rpartition("=")  # the value is a number: a key's regex may hold '='
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (KEY: a layer name or regex), got {text!r}")
    return {key.strip(): value.strip()}


# ---- method options ----------------------------------------------------------------------------------

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


def option_names(record) -> dict:
    """The ``--option`` keys of a method (the keywords of ``initialize``, ``dtype`` for the solve
    precision) → their defaults."""
    from .options import option_help

    return {key: default for key, (default, _) in option_help(record.config).items()}


def options_help(record) -> str:
    """One line per option of ``record``'s method: ``KEY=DEFAULT  help`` (the help of its options class)."""
    from .options import option_help

    rows = [(f"{key}={_shown(default)}", text) for key, (default, text) in option_help(record.config).items()]
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"  {left:<{width}}  {text}" for left, text in rows)


def _shown(value) -> str:
    if value is None:
        return "none"
    return str(value).replace("torch.", "")


def method_config(record, args):
    """The method's options object, built from ``--option`` and ``--num-train-samples``: an unknown
    key or a bad value fails here, before the model is loaded."""
    from .methods.registry import build_config

    given, flags = {}, {}
    for text in args.option:
        key, value = parse_option(text)
        key = "dtype" if key == "solve_dtype" else key
        given[key], flags[key] = value, f"--option {key}"
    if getattr(args, "num_train_samples", None) is not None:
        given["num_train_samples"], flags["num_train_samples"] = args.num_train_samples, "--num-train-samples"
    names = option_names(record)
    for key in given:
        if key not in names:
            raise ValueError(_unknown_option(record, flags[key], key))
    if "dtype" in given:
        given["dtype"] = _solve_dtype(given["dtype"])
    try:
        return build_config(record, None, given)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{', '.join(flags.values())}: {exc}") from None


def _unknown_option(record, flag: str, key: str) -> str:
    from .methods.registry import REGISTRY

    owners = [m.name for m in REGISTRY.values() if key in option_names(m)]
    if owners:
        why = f"is an option of {', '.join(owners)}, not of method {record.name!r} ({record.title})"
    else:
        close = difflib.get_close_matches(key, list(option_names(record)), n=1)
        why = f"is not an option of method {record.name!r} ({record.title})" + (
            f" (did you mean {close[0]!r}?)" if close else "")
    return f"{flag}: {key!r} {why}. Its options (--option KEY=VALUE):\n{options_help(record)}"


def _solve_dtype(value):
    import torch

    name = str(value).replace("torch.", "")
    if name not in SOLVE_DTYPES:
        raise ValueError(f"--option dtype: the solve runs in {' or '.join(SOLVE_DTYPES)}, got {value!r}")
    return getattr(torch, name)


# ---- output paths: checked before the pass, written after it, never half-written ---------------------

def check_out_directory(out: Path, overwrite: bool) -> None:
    """``--out`` can take the adapter: a new directory, an empty one, or (``--overwrite``) one
    whose adapter is to be replaced."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give the path of a directory to write the adapter into")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            held = "an adapter" if (out / "adapter_config.json").exists() else "files"
            raise ValueError(f"--out {out} already holds {held}; choose a new directory, or pass --overwrite to "
                             f"replace the adapter there (its old {REPORT_DIR}/ is removed with it)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out}: no permission to write in it; choose another directory")
    check_creatable(out, "--out")


def check_new_file(path: Path, flag: str, overwrite: bool) -> None:
    """``path`` can take a file: no directory there, no file unless ``overwrite``, and a place
    to create it."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path, e.g. {path / 'stats.safetensors'}")
    if path.exists() and not overwrite:
        raise ValueError(f"{flag} {path} already exists; choose another file, or pass --overwrite to replace it")
    check_creatable(path, flag)


def check_creatable(path: Path, flag: str) -> None:
    """``path`` can be created after the pass: its nearest existing ancestor is a directory the
    user may write in (the missing directories between are created then)."""
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: no permission to write in {existing}; choose another path")


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (None: it exists)."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


@contextlib.contextmanager
def replacing(out: Path):
    """A fresh directory beside ``out`` to write into.  On success its files replace ``out``'s and
    ``out``'s old report is removed (it described the old adapter); on failure it is removed, with
    any directory made for it, and ``out`` is as it was."""
    created = _first_missing(out.parent)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir(parents=True)
    try:
        yield staging
        _install(staging, out)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    stale = out / REPORT_DIR
    if stale.is_dir() and not stale.is_symlink():
        shutil.rmtree(stale)
    for entry in staging.iterdir():
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)


def save_statistics(stats, path: Path) -> None:
    """``stats`` written to ``path`` whole or not at all (a failed write leaves any old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        stats.save(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# ---- model and data ------------------------------------------------------------------------------------

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


def load_model(args):
    """The model of ``--model`` on ``--device`` in ``--dtype``, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    logger.info("loading %s (%s, %s)", args.model, str(dtype).replace("torch.", ""), device)
    model = from_pretrained(AutoModelForCausalLM, args.model, "--model", args, **{_dtype_keyword(): dtype})
    model.to(device).eval()
    tokenizer = from_pretrained(AutoTokenizer, args.tokenizer or args.model,
                                "--tokenizer" if args.tokenizer else "--model", args)
    return model, tokenizer


# A Hub id: "name" or "owner/name"; anything else that is not a directory is a mistyped path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def from_pretrained(auto, source: str, flag: str, args, **kwargs):
    """``auto.from_pretrained(source)`` with ``--trust-remote-code``; a failure as one line that
    says what to do (a missing path, the Hub out of reach, code that needs the opt-in)."""
    path = Path(source)
    local = path.is_dir()
    if not local and (path.exists() or _HUB_ID.fullmatch(source) is None or source.startswith(".")):
        raise FileNotFoundError(f"{flag} {source}: not a directory; give a local model directory (save_pretrained "
                                "output or a downloaded snapshot) or a Hugging Face model id")
    try:
        return auto.from_pretrained(source, trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
                                    **kwargs)
    except Exception as exc:  # noqa: BLE001 - the Hub's and transformers' errors vary; one line says what to do
        # Out of memory, a missing package, a torch failure: not a wrong argument, said as they are.
        if isinstance(exc, (ImportError, MemoryError, RuntimeError)) or (
                local and not isinstance(exc, (OSError, ValueError, KeyError))):
            raise
        detail = _first_line(exc)
        if "trust_remote_code" in str(exc):
            hint = "if you trust the code that model ships, pass --trust-remote-code"
        elif local and "Tokenizer" in auto.__name__:
            hint = "the directory needs the tokenizer's files; give the tokenizer's directory with --tokenizer"
        elif local:
            hint = "check that it is a save_pretrained directory of a causal language model"
        else:
            hint = ("check the id and the network, or give a local directory (HF_HUB_OFFLINE=1 reads the local cache "
                    "only)")
        where = "" if local else " is not a local directory, and loading it from the Hugging Face Hub failed"
        raise ValueError(f"{flag} {source}{where}: {detail}; {hint}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    fields = Fields(args.text_field, args.prompt_field, args.answer_field, args.messages_field)
    samples = read_samples(args.data, fields, split=args.split, config=args.data_config)
    return tokenized_batches(samples, tokenizer, batch_size=args.batch_size, max_length=max_length,
                             max_samples=args.max_samples)


def _target_modules(args):
    """PEFT's ``target_modules``: a list of names, a regex string, "all-linear", or None."""
    if getattr(args, "target_regex", None) is not None:
        return args.target_regex
    value = getattr(args, "target_modules", None)
    names = [name.strip() for name in value.split(",") if name.strip()] if value else []
    if names == ["all-linear"]:
        return "all-linear"
    return names or None


def check_layer_selection(model, args, patterns: dict) -> None:
    """Every ``--target-modules`` entry names a layer, ``--target-regex`` matches one, and every
    ``--rank-pattern``/``--alpha-pattern`` key selects a target layer: PEFT would silently ignore a typo."""
    from .targets import find_targets

    linear = [t.name for t in find_targets(model, None, allow_quantized=True)]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    example = (linear or ["model.layers.0.self_attn.q_proj"])[0]
    selection = _target_modules(args)
    if isinstance(selection, str) and selection != "all-linear":
        if not find_targets(model, selection, allow_quantized=True):
            raise ValueError(f"--target-regex {selection!r} matches no linear layer; it must match a layer's whole "
                             f"path, such as {example!r} (e.g. '.*\\.(q_proj|v_proj)')")
    for entry in selection if isinstance(selection, list) else []:
        if not find_targets(model, [entry], allow_quantized=True):
            raise ValueError(f"--target-modules: {entry!r} names no linear layer{_did_you_mean(entry, leaves)}; "
                             f"a name matches a layer's path or its end: {', '.join(leaves)}")
    targets = [t.name for t in find_targets(model, selection, allow_quantized=True)]
    for flag, pattern in patterns.items():
        for key in pattern:
            if not any(pattern_matches(key, name) for name in targets):
                raise ValueError(f"{flag}: {key!r} selects no target layer{_did_you_mean(key, leaves)}; a key is a "
                                 f"regex for the end of a layer's path, such as {example!r}")


def _did_you_mean(key: str, names) -> str:
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _weights(model, target_modules):
    from .targets import find_targets

    targets = find_targets(model, target_modules)
    return {t.name: t.weight_out_in().detach() for t in targets}, {t.name: t.kind for t in targets}


# ---- init: everything checked, then the pass --------------------------------------------------------

@dataclasses.dataclass
class InitPlan:
    """What ``init`` settled before loading the model: the method, its options object, the patterns."""

    record: object  # the method's registry record
    config: object  # its options (a MethodConfig)
    rank_pattern: dict
    alpha_pattern: dict


def run_init(args) -> Path:
    """``loradafast init``: model + data → adapter directory.  Every argument is checked before the
    statistics pass; the adapter directory is written only once the solve has succeeded."""
    plan = plan_init(args)
    model, tokenizer = load_model(args)
    peft_model = wrapped(model, args, plan)
    batches = None
    if plan.record.data_aware:
        batches = load_batches(args, tokenizer, model)
    elif args.data:
        logger.info("%s uses the weights only: --data is not read", args.method)
    result, stats = initialised(peft_model, batches, args, plan)
    return _save(result, args, stats)


def plan_init(args) -> InitPlan:
    """The checks that need no model: method and options, output paths, option combinations."""
    from .methods.registry import get_method

    record = get_method(args.method)
    if record.data_aware and not args.data:
        raise ValueError(f"method {args.method!r} is data-aware: give the training samples with --data")
    if args.save_stats and not record.data_aware:
        raise ValueError(f"--save-stats: method {args.method!r} uses the weights only and runs no statistics pass; "
                         "drop --save-stats, or choose a data-aware method")
    if args.save_stats and args.memory_budget is not None:
        raise ValueError("--save-stats needs every layer's statistics at once, which --memory-budget may split over "
                         "several passes; give only one of them")
    if record.data_aware:
        check_data_source(args.data)
    config = method_config(record, args)
    check_out_directory(Path(args.out), args.overwrite)
    if args.save_stats:
        check_new_file(Path(args.save_stats), "--save-stats", args.overwrite)
    return InitPlan(record, config, _merged(args.rank_pattern), _merged(args.alpha_pattern))


def check_data_source(source: str) -> None:
    """``--data`` exists, or reads as a Hub dataset name: a mistyped path fails before the model loads."""
    from .data import is_hub_dataset_name

    if not Path(source).exists() and not is_hub_dataset_name(source):
        raise FileNotFoundError(f"--data {source}: no such file or directory; give a .jsonl, .json or text file, a "
                                "save_to_disk directory, or a Hugging Face dataset name (owner/name)")


def _merged(patterns: list[dict]) -> dict:
    return {key: value for pattern in patterns for key, value in pattern.items()}


def wrapped(model, args, plan: InitPlan):
    """``model`` with PEFT's LoRA layers of the adapter asked for, every layer's rank checked: the
    LoraConfig is PEFT's own, so its target and pattern rules are PEFT's, and ``result.save``
    writes it (lora_dropout and all) into adapter_config.json."""
    import peft

    from .statistics.collector import is_causal_lm
    from .targets import find_targets, short_target_modules

    check_layer_selection(model, args, {"--rank-pattern": plan.rank_pattern, "--alpha-pattern": plan.alpha_pattern})
    targets = _target_modules(args)
    if targets is None or targets == "all-linear":
        # loradafast's default (every linear layer but the output layer), not PEFT's per-model one, by
        # leaf name: PEFT's own "all-linear" would write every layer's full path into the config.
        targets = short_target_modules(model, find_targets(model, None, allow_quantized=True))
    config = peft.LoraConfig(
        r=args.rank, lora_alpha=PEFT_DEFAULT_ALPHA if args.lora_alpha is None else args.lora_alpha,
        lora_dropout=args.lora_dropout, use_rslora=args.use_rslora, target_modules=targets,
        rank_pattern=plan.rank_pattern, alpha_pattern=plan.alpha_pattern,
        task_type="CAUSAL_LM" if is_causal_lm(model) else None)
    peft_model = peft.get_peft_model(model, config)
    check_ranks(peft_model, plan.record)
    return peft_model


def check_ranks(peft_model, record) -> None:
    """Every target layer takes its rank (and a quantized one, the method): what the pass would
    otherwise find out only at the solve."""
    from .api import check_weights_readable
    from .options import check_rank
    from .targets import find_targets

    targets = find_targets(peft_model, allow_quantized=True)
    for t in targets:
        try:
            check_rank(t.name, t.rank, t.in_features, t.out_features, record)
        except ValueError as exc:
            fits = min(min(u.in_features, u.out_features) for u in targets) // record.rank_factor
            raise ValueError(f"{exc}. Every target layer takes --rank {fits} or less; --rank-pattern sets single "
                             "layers, --target-modules or --target-regex leaves layers out") from None
    check_weights_readable(targets, record)


def initialised(peft_model, batches, args, plan: InitPlan):
    """The result (and, with ``--save-stats``, the statistics): by ``initialize``, whose memory plan
    may split the pass; with ``--save-stats`` one pass that keeps every layer's statistics."""
    from . import initialize
    from .statistics import collect

    progress = not (args.no_progress or args.quiet)
    split_halves = False if args.no_split_halves else None
    kw = dict(method=args.method, config=plan.config, progress=progress, max_samples=args.max_samples,
              split_halves=split_halves)
    if not args.save_stats:
        return initialize(peft_model, batches, memory_budget=args.memory_budget, **kw), None
    stats = collect(peft_model, batches, y_factor=getattr(plan.config, "y_factor", None) or "diag",
                    factors=plan.record.statistics, max_samples=args.max_samples, progress=progress,
                    split_halves=split_halves)
    path = Path(args.save_stats)
    save_statistics(stats, path)
    logger.info("statistics (%s) written to %s", "".join(sorted(stats.factors)), path)
    result = initialize(peft_model, None, stats=stats, **kw)
    result.timings = {**result.timings, "pass_s": stats.meta.get("pass_seconds", 0.0)}
    return result, stats


def _save(result, args, stats=None) -> Path:
    """The adapter directory, its diagnostics, and the report when asked for, written whole or not at all."""
    from .report import write_report

    out = Path(args.out)
    convert = (not args.residual_base) if result.moves_base else None
    with replacing(out) as staging:
        result.save(staging, convert_to_lora=convert)  # the diagnostics too
        if args.report:
            write_report(result, staging / REPORT_DIR, stats=stats)
    logger.info("adapter written to %s (load it with peft.PeftModel.from_pretrained(model, %r, is_trainable=True))",
                out, str(out))
    if result.moves_base:
        logger.info("%s moves the base weight: the adapter is %s", result.method,
                    "for the residual base W - s·B·A (build it with loradafast.apply_base_update(model, dir))"
                    if args.residual_base else "the rank-2r conversion for the unmodified base model")
    if not args.report:
        logger.info("per-layer table and plots: loradafast report %s", out)
    return out


# ---- the other commands ---------------------------------------------------------------------------

def run_collect(args) -> Path:
    """``loradafast collect``: model + data → statistics file."""
    from .statistics import collect

    out = Path(args.out)
    check_new_file(out, "--out", args.overwrite)
    check_data_source(args.data)
    model, tokenizer = load_model(args)
    check_layer_selection(model, args, {})
    batches = load_batches(args, tokenizer, model)
    stats = collect(model, batches, target_modules=_target_modules(args), y_factor=args.y_factor,
                    max_samples=args.max_samples, progress=not args.quiet,
                    split_halves=False if args.no_split_halves else None)
    save_statistics(stats, out)
    logger.info("statistics written to %s; make adapters from them with: loradafast solve --stats %s --rank 8 "
                "--out DIR", out, out)
    return out


def run_solve(args) -> Path:
    """``loradafast solve``: statistics file → adapter directory."""
    from . import solve
    from .methods.registry import get_method
    from .statistics import Statistics

    record = get_method(args.method)
    config = method_config(record, args)
    check_out_directory(Path(args.out), args.overwrite)
    if record.needs_weights and not args.model:
        raise ValueError(f"method {args.method!r} reads the base weights: give the model directory with --model")
    stats = Statistics.load(args.stats)
    logger.info("loaded %r", stats)
    ranks = per_layer(_merged(args.rank_pattern), stats.layers, "--rank-pattern")
    alphas = per_layer(_merged(args.alpha_pattern), stats.layers, "--alpha-pattern")
    weights = kinds = None
    if record.needs_weights:
        from transformers import AutoModelForCausalLM

        model = from_pretrained(AutoModelForCausalLM, args.model, "--model", args)
        weights, kinds = _weights(model, stats.meta.get("target_modules"))
    result = solve(stats, args.rank, method=args.method, config=config, weights=weights, kinds=kinds, ranks=ranks,
                   lora_alpha=args.lora_alpha, alphas=alphas, use_rslora=args.use_rslora,
                   device=_device(args.device), progress=not (args.no_progress or args.quiet))
    result.lora_dropout = args.lora_dropout  # written into adapter_config.json by result.save
    return _save(result, args, stats)


def per_layer(pattern: dict, names, flag: str) -> dict:
    """A PEFT ``rank_pattern``/``alpha_pattern`` as per-layer values of the layers ``names``: each
    takes the value of the first key that selects it (PEFT's order); a key that selects none raises."""
    names = list(names)
    for key in pattern:
        if not any(pattern_matches(key, name) for name in names):
            leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
            raise ValueError(f"{flag}: {key!r} selects no layer of the statistics{_did_you_mean(key, leaves)}; a "
                             f"key is a regex for the end of a layer's path, such as {names[0]!r}")
    chosen = {name: next((key for key in pattern if pattern_matches(key, name)), None) for name in names}
    return {name: pattern[key] for name, key in chosen.items() if key is not None}


def run_report(args) -> Path:
    """``loradafast report``: adapter directory → tables and plots."""
    from .report import add_spectra, load_diagnostics, write_report

    data = load_diagnostics(args.directory)
    if args.stats:
        from .statistics import Statistics

        add_spectra(data, Statistics.load(args.stats))
    out = Path(args.out) if args.out else Path(args.directory) / REPORT_DIR
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
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as exc:
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
