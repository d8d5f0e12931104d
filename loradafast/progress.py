"""Progress bars for the two long stages, the statistics pass and the solve.

Both are tqdm bars on stderr that vanish when done (``leave=False``); what stays is one log line
per stage on the ``loradafast`` logger.  The pass counts sequences, with a total only where it can
be known before the loop (:func:`pass_total`); the solve counts the units a method solves (input
groups for LoRA-DA, layers otherwise) and is shown only inside :func:`solve_progress` (turned on
by ``initialize(..., progress=True)`` and ``solve(..., progress=True)``).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator

_SOLVE_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("loradafast_solve_progress", default=False)


def pass_total(loader, max_samples: int | None) -> int | None:
    """How many sequences the pass will see, where that is known before it starts.

    A ``torch.utils.data.DataLoader`` over a sized dataset: the dataset's size (without the last
    incomplete batch under ``drop_last``); a list or other sized loader of tensors or dict batches:
    the sum of their first dimensions; anything else (a generator, an iterable dataset): unknown
    (None), and the bar shows a count and a rate.  ``max_samples`` caps the total.
    """
    total = _loader_sequences(loader)
    if total is None:
        return None
    return total if max_samples is None else min(total, max_samples)


def _loader_sequences(loader) -> int | None:
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and getattr(loader, "batch_size", None) is not None:
        try:
            size = len(dataset)
            batches = len(loader)
        except TypeError:  # an IterableDataset
            return None
        return min(size, batches * loader.batch_size) if getattr(loader, "drop_last", False) else size
    if isinstance(loader, (list, tuple)):
        sizes = [_batch_size(batch) for batch in loader]
        return None if any(s is None for s in sizes) else sum(sizes)
    return None


def _batch_size(batch) -> int | None:
    """The number of sequences in one batch as a loader yields it, without normalising it."""
    import torch

    if isinstance(batch, dict):
        batch = batch.get("input_ids")
    elif isinstance(batch, (list, tuple)) and len(batch) == 1:
        batch = batch[0]
    if torch.is_tensor(batch):
        return 1 if batch.dim() == 1 else int(batch.shape[0])
    return None


def pass_bar(loader, max_samples: int | None, enabled: bool):
    """The pass's bar (None when ``enabled`` is False); :func:`finish_bar` closes it."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=pass_total(loader, max_samples), unit="seq", desc="loradafast: statistics pass", leave=False)


def finish_bar(bar) -> None:
    """Close ``bar``, its total made what was counted (an estimate or an early stop is corrected)."""
    if bar is None:
        return
    if bar.total is not None and bar.n != bar.total:
        bar.total = bar.n
        bar.refresh()
    bar.close()


@contextlib.contextmanager
def solve_progress(enabled: bool):
    """Within this block, :func:`track` shows a bar (a context variable: threads and nested solves
    see their own setting)."""
    token = _SOLVE_PROGRESS.set(bool(enabled))
    try:
        yield
    finally:
        _SOLVE_PROGRESS.reset(token)


def track(items: Iterable, *, total: int | None = None, desc: str = "loradafast: solve",
          unit: str = "layer", weight=None) -> Iterator:
    """``items`` as they are, through a bar when :func:`solve_progress` asked for one.  ``weight``:
    how many units each item counts for (a batch of several input groups advances the bar by its
    groups), ``total`` then in those units."""
    if not _SOLVE_PROGRESS.get():
        yield from items
        return
    from tqdm.auto import tqdm

    if weight is None:
        if total is None and hasattr(items, "__len__"):
            total = len(items)
        with tqdm(items, total=total, desc=desc, unit=unit, leave=False) as bar:
            yield from bar
        return
    with tqdm(total=total, desc=desc, unit=unit, leave=False) as bar:
        for item in items:
            yield item
            bar.update(weight(item))
