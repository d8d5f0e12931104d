"""Samples from files, tokenized and batched for the statistics pass (what the CLI reads).

:func:`read_samples` reads text records from

* a JSON Lines file (``.jsonl``; one object per line) or a ``.json`` file holding a list of objects:
  the text of each record is its ``text_field``, or ``prompt_field`` + ``answer_field`` (the loss is
  then taken on the answer only, as a fine-tuning run on prompt/answer pairs would);
* a plain text file (any other suffix): one sample per non-empty line;
* a directory written by ``datasets``' ``save_to_disk`` (needs the ``datasets`` package), with
  the same field options (``split`` picks one split of a ``DatasetDict``);
* a Hugging Face dataset name (``owner/name``) that is not a local path, streamed with
  ``datasets.load_dataset`` where the network allows (``config``, ``split``); a failure is one
  ``ValueError`` that says what to do.

A record may also hold a chat, a list of ``{"role", "content"}`` messages (TRL's conversational
format, under ``messages`` or the field ``Fields.messages`` names): it is rendered with the
tokenizer's chat template, and the loss is on the whole conversation, as TRL's default.

:func:`tokenized_batches` turns them into right-padded dict batches (``input_ids``,
``attention_mask``, ``labels`` with -100 on the prompt and on padding) of at most ``max_length``
tokens, which any loradafast function takes as its loader.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100
CHAT_FIELD = "messages"  # TRL's name for a conversation's list of messages
# A Hub dataset name: "name" or "owner/name".  A path with a file suffix is a missing file.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = {".jsonl", ".json", ".txt", ".csv", ".tsv", ".parquet", ".arrow", ".md"}


@dataclass
class Sample:
    """One text record: the text the loss is taken on, after an optional prompt that it is not; or
    a chat (``messages``), whose text the tokenizer's chat template makes."""

    text: str
    prompt: str = ""
    messages: list | None = None
    where: str = ""  # the record's place in the data, for messages about it


@dataclass
class Fields:
    """Which fields of a JSON record or dataset row hold the text (or the prompt and the answer)."""

    text: str = "text"
    prompt: str | None = None
    answer: str | None = None
    messages: str | None = None  # the field of a chat; None: "messages" where the text field is absent

    def __post_init__(self):
        if (self.prompt is None) != (self.answer is None):
            raise ValueError("give both --prompt-field and --answer-field, or neither (then --text-field is read)")
        if self.messages is not None and self.prompt is not None:
            raise ValueError("give --messages-field or --prompt-field with --answer-field, not both")

    def sample(self, record, where: str) -> Sample:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with fields, got {type(record).__name__}")
        if self.messages is not None or (self.prompt is None and self.text not in record
                                         and isinstance(record.get(CHAT_FIELD), list)):
            return _chat_sample(record, self.messages or CHAT_FIELD, where)
        wanted = [self.prompt, self.answer] if self.prompt is not None else [self.text]
        missing = [f for f in wanted if f not in record]
        if missing:
            raise ValueError(f"{where}: no field {missing[0]!r}; the record has {sorted(record)}. Choose the field "
                             "with --text-field, --prompt-field and --answer-field, or --messages-field (a chat)")
        if self.prompt is not None:
            return Sample(str(record[self.answer]), str(record[self.prompt]), where=where)
        return Sample(str(record[self.text]), where=where)


def _chat_sample(record: dict, field: str, where: str) -> Sample:
    messages = record.get(field)
    if field not in record:
        raise ValueError(f"{where}: no field {field!r}; the record has {sorted(record)}. Choose the chat's field "
                         "with --messages-field")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError(f"{where}: {field!r} must be a non-empty list of messages, each an object with 'role' and "
                         "'content' (TRL's conversational format)")
    return Sample("", messages=messages, where=where)


def read_samples(path, fields: Fields | None = None, *, split: str = "train",
                 config: str | None = None) -> Iterator[Sample]:
    """The samples of ``path`` in file order, read lazily (see the module docstring for formats);
    ``config`` names the configuration of a Hub dataset."""
    fields = fields or Fields()
    name, path = str(path), Path(path)
    if path.is_dir():
        yield from _dataset_samples(path, fields, split)
    elif not path.exists() and is_hub_dataset_name(name):
        for number, row in enumerate(_hub_rows(name, split, config)):
            yield fields.sample(row, f"{name} row {number}")
    elif not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield fields.sample(_json(line, f"{path}:{number}"), f"{path}:{number}")
    elif path.suffix == ".json":
        records = _json(path.read_text(encoding="utf-8"), str(path))
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a list of objects (or use a .jsonl file, one object per line)")
        for number, record in enumerate(records):
            yield fields.sample(record, f"{path}[{number}]")
    else:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield Sample(line.rstrip("\n"))


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None


def _dataset_samples(path: Path, fields: Fields, split: str) -> Iterator[Sample]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} is a directory; reading a saved dataset needs the `datasets` package "
                          "(pip install datasets), or give a .jsonl or .txt file") from None
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{path} has the splits {sorted(data)}, not {split!r}; choose one with --split")
        data = data[split]
    for number, row in enumerate(data):
        yield fields.sample(row, f"{path} row {number}")


def is_hub_dataset_name(name: str) -> bool:
    """Whether ``name``, not a local path, reads as a Hub dataset name (``owner/name``) rather than
    a mistyped file (a file suffix, ``./``, an absolute path)."""
    return _HUB_NAME.fullmatch(name) is not None and Path(name).suffix.lower() not in _FILE_SUFFIXES


def _hub_rows(name: str, split: str, config: str | None):
    """The rows of Hub dataset ``name``, streamed (the pass reads a few hundred: no download of the
    rest); any failure of the Hub (network, name, configuration, split) as one ValueError."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"--data {name}: no such file; reading it as a Hugging Face dataset needs the `datasets` "
                          "package (pip install datasets)") from None
    try:
        yield from datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - the Hub's errors vary; one line says what to do
        text = str(exc).strip()
        detail = text.splitlines()[0] if text else type(exc).__name__
        raise ValueError(f"--data {name}: no such file, and reading it as a Hugging Face dataset failed: {detail}; "
                         "give a local .jsonl/.json/.txt file or save_to_disk directory, or check the name, "
                         "--data-config, --split and the network") from exc


def tokenized_batches(samples, tokenizer, *, batch_size: int = 8, max_length: int = 512,
                      max_samples: int | None = 256) -> list[dict]:
    """Right-padded batches of the first ``max_samples`` samples that have a token to predict (a
    labelled token after the first; others teach nothing), each cut to ``max_length`` tokens."""
    for label, value in (("batch_size", batch_size), ("max_length", max_length), ("max_samples", max_samples)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{label} must be a whole number of 1 or more, got {value!r}")
    rows = []
    for sample in samples:
        if max_samples is not None and len(rows) >= max_samples:
            break
        row = _encode(sample, tokenizer, max_length)
        if row is not None:
            rows.append(row)
    if not rows:
        raise ValueError("no sample has two or more tokens to learn from; check the data file and the field options")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return [_collate(rows[i:i + batch_size], pad) for i in range(0, len(rows), batch_size)]


def _encode(sample: Sample, tokenizer, max_length: int):
    if sample.messages is not None:
        ids = _chat_ids(sample, tokenizer, max_length)
        labels = list(ids)
    elif sample.prompt:
        prompt = tokenizer(sample.prompt)["input_ids"]
        answer = tokenizer(sample.text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            answer = answer + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
    else:
        ids = tokenizer(sample.text, truncation=True, max_length=max_length)["input_ids"]
        labels = list(ids)
    # The causal-LM loss predicts token t from the ones before it: the first labelled token only counts
    # when something precedes it.
    if sum(label != IGNORE_INDEX for label in labels[1:]) < 1 or len(ids) < 2:
        return None
    return ids, labels


def _chat_ids(sample: Sample, tokenizer, max_length: int) -> list[int]:
    """The chat rendered by the tokenizer's template, then tokenized without added special tokens
    (the template writes its own, as TRL's conversational data are)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{sample.where}: a chat (a list of messages) is rendered with the tokenizer's chat template, "
                         "and this tokenizer has none; give the tokenizer of a chat model with --tokenizer, or the "
                         "data as text (--text-field) or prompt/answer pairs (--prompt-field, --answer-field)")
    try:
        text = tokenizer.apply_chat_template(sample.messages, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template raises what its author chose (jinja errors, ...)
        raise ValueError(f"{sample.where}: the tokenizer's chat template refused this chat: {exc}") from exc
    return tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]


def _collate(rows: list[tuple[list[int], list[int]]], pad: int) -> dict:
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
