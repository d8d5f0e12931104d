"""The argument parser of the ``loradafast`` command: its description, one subparser per command."""
from __future__ import annotations

import argparse

from ..options import Y_FACTORS
from .argument_types import memory_budget
from .arguments import adapter_arguments, data_arguments, model_arguments, peft_arguments
from .collect_command import run_collect
from .init_command import run_init
from .report_command import run_report
from .solve_command import run_solve

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
    model_arguments(init)
    data_arguments(init, data_required=False)
    adapter_arguments(init)
    peft_arguments(init)
    init.add_argument("--memory-budget", type=memory_budget, metavar="SIZE",
                      help="bytes the statistics and the solve may use, e.g. 40GB or 512MiB (default: the device's "
                           "free memory less 10 %%); where they do not fit at once, the layers are split over several "
                           "passes over the data, with the same result")
    init.add_argument("--save-stats", metavar="FILE",
                      help="also save the statistics there, for `loradafast solve` (its directory is created; "
                           "they hold what the method reads: G alone for the methods that read the gradient alone)")
    init.set_defaults(run=run_init)


def _collect_parser(commands, common) -> None:
    collect = commands.add_parser("collect", parents=[common], formatter_class=_HelpFormatter,
                                  help="model + data -> statistics file",
                                  description="Run the statistics pass only and save the statistics (one "
                                              "safetensors file) for `loradafast solve`.")
    model_arguments(collect)
    data_arguments(collect, data_required=True)
    collect.add_argument("--y-factor", choices=Y_FACTORS, default="diag",
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
                                                      f"base weights ({', '.join(_weight_readers())})")
    solve.add_argument("--trust-remote-code", action="store_true",
                       help="let transformers run the model's own Python code (only for models you trust)")
    solve.add_argument("--device", default="auto", help="where to solve: auto (cuda if available), cpu, cuda, cuda:1")
    adapter_arguments(solve)
    peft_arguments(solve)
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


def _version() -> str:
    from .. import __version__

    return __version__


def _weight_readers() -> list[str]:
    from ..methods.registry import REGISTRY

    return [name for name, record in REGISTRY.items() if record.needs_weights]

