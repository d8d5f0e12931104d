"""Output paths: checked before the pass, written after it, never half-written (the adapter
directory, its report, the statistics file)."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path

logger = logging.getLogger("loradafast.cli")

REPORT_DIR = "report"  # inside an adapter directory: describes that adapter only


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


def save_adapter(result, args, stats=None) -> Path:
    """The adapter directory, its diagnostics, and the report when asked for, written whole or not at all."""
    from ..report import write_report

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
