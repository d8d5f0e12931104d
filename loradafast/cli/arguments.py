"""The option groups the commands share (model, data, adapter, PEFT's LoraConfig), and what their
values mean once parsed."""
from __future__ import annotations

import argparse

from .argument_types import dropout, layer_pattern, positive_int, positive_number, regex

PEFT_DEFAULT_ALPHA = 8  # LoraConfig's own default lora_alpha


def _methods() -> tuple[str, ...]:
    from ..methods.registry import METHODS

    return METHODS


def _default_method() -> str:
    from ..methods.registry import DEFAULT_METHOD

    return DEFAULT_METHOD


def _default_record():
    from ..methods.registry import REGISTRY

    return REGISTRY[_default_method()]


def _listed(keep) -> str:
    """The names of the registry's methods that ``keep(record)`` selects, for help texts."""
    from ..methods.registry import REGISTRY

    return ", ".join(name for name, record in REGISTRY.items() if keep(record))


def _option_default(record, option: str):
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(record.config)}.get(option)


def model_arguments(p: argparse.ArgumentParser) -> None:
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
    targets.add_argument("--target-regex", type=regex, metavar="REGEX",
                         help="the layers to adapt as one regular expression that matches a layer's whole path, as "
                              "PEFT's target_modules string, e.g. '.*\\.(q_proj|v_proj)'")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the model's dtype for the pass (auto: bfloat16 on a GPU that has it, else float32); "
                        "the statistics are accumulated in float32 either way")


def data_arguments(p: argparse.ArgumentParser, *, data_required: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=data_required, metavar="PATH",
                   help="training samples: .jsonl (one JSON object per line), .json (a list of objects), a plain "
                        "text file (one sample per line), a directory saved by datasets' save_to_disk, or a "
                        "Hugging Face dataset name where the network allows"
                        + ("" if data_required else
                           f"; not needed by the weight-only methods {_listed(lambda m: not m.data_aware)}"))
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
    g.add_argument("--max-samples", type=positive_int, default=256, metavar="N",
                   help="sequences used for the statistics")
    g.add_argument("--max-length", type=positive_int, default=512, metavar="TOKENS",
                   help="tokens per sequence at most (longer ones are cut)")
    g.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="sequences per forward/backward (memory only: the statistics do not depend on it)")
    g.add_argument("--no-split-halves", action="store_true",
                   help="keep no sums of every second batch: no split-half stability diagnostic (saves memory: it "
                        "is on by default where three times the statistics fit the device's free memory)")


def adapter_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--out", required=True, metavar="DIR", help="the adapter directory to write")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the adapter in an --out that already holds one (its old report/ is removed)")
    g.add_argument("--rank", type=positive_int, default=8, metavar="R", help="the LoRA rank r")
    g.add_argument("--method", default=_default_method(), choices=_methods(),
                   help=f"the initialisation: {_listed(lambda m: m.data_aware)} (data-aware); "
                        f"{_listed(lambda m: not m.data_aware)} (weights only)")
    g.add_argument("--lora-alpha", type=positive_number, metavar="ALPHA",
                   help=f"PEFT's lora_alpha (default: PEFT's, {PEFT_DEFAULT_ALPHA})")
    g.add_argument("--num-train-samples", type=positive_int, metavar="N",
                   help=f"{_listed(lambda m: _option_default(m, 'num_train_samples') is not None)}: the size of "
                        "the fine-tuning set you will train on (N in the LoRA-DA paper; default "
                        f"{_option_default(_default_record(), 'num_train_samples')}). It weighs the variance term: "
                        "set it to your data set's size")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the method, e.g. beta=0.05, gamma=256, damping_mode=relative, "
                        "eigensolver=lobpcg (repeatable; an unknown KEY lists the method's options)")
    g.add_argument("--residual-base", action="store_true",
                   help=f"methods that move the base weight ({_listed(lambda m: m.moves_base)}): save the "
                        "rank-r adapter for the residual base W - s·B·A (rebuild it with "
                        "loradafast.apply_base_update) instead of the default rank-2r adapter for the unmodified "
                        "base")
    g.add_argument("--report", action="store_true", help="also write the report (tables and plots) into OUT/report")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def peft_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PEFT's LoraConfig (saved in adapter_config.json)")
    g.add_argument("--use-rslora", action="store_true",
                   help="rank-stabilised scaling lora_alpha/√r (PEFT's use_rslora)")
    g.add_argument("--lora-dropout", type=dropout, default=0.0, metavar="P",
                   help="PEFT's lora_dropout, for the training that follows (the initialisation does not use it)")
    g.add_argument("--rank-pattern", type=layer_pattern("rank"), action="append", default=[], metavar="KEY=R",
                   help="another rank for the layers whose path ends in KEY (a regex, as PEFT's rank_pattern), "
                        "e.g. 'v_proj=16' or 'layers\\.0\\..*=4'; repeatable, or one JSON object "
                        "'{\"v_proj\": 16}'")
    g.add_argument("--alpha-pattern", type=layer_pattern("alpha"), action="append", default=[], metavar="KEY=ALPHA",
                   help="another lora_alpha for the layers whose path ends in KEY (PEFT's alpha_pattern), as "
                        "--rank-pattern")


def target_modules_of(args):
    """PEFT's ``target_modules``: a list of names, a regex string, "all-linear", or None."""
    if getattr(args, "target_regex", None) is not None:
        return args.target_regex
    value = getattr(args, "target_modules", None)
    names = [name.strip() for name in value.split(",") if name.strip()] if value else []
    if names == ["all-linear"]:
        return "all-linear"
    return names or None


def merged_patterns(patterns: list[dict]) -> dict:
    """The values of a repeated ``--rank-pattern`` or ``--alpha-pattern``, as one dict."""
    return {key: value for pattern in patterns for key, value in pattern.items()}
