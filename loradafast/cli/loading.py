"""The model, its tokenizer and the data, as the options name them: loaded on the device and in the
dtype asked for, a failure said in one line."""
from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger("loradafast.cli")


def resolve_device(name: str):
    """The torch device of ``--device`` (auto: cuda if available, else cpu)."""
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

    device = resolve_device(args.device)
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
    from ..data import Fields, read_samples, tokenized_batches

    max_length = args.max_length
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and 0 < context < max_length:
        max_length = context
    fields = Fields(args.text_field, args.prompt_field, args.answer_field, args.messages_field)
    samples = read_samples(args.data, fields, split=args.split, config=args.data_config)
    return tokenized_batches(samples, tokenizer, batch_size=args.batch_size, max_length=max_length,
                             max_samples=args.max_samples)
