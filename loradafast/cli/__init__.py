"""The ``loradafast`` command (also ``python -m loradafast``): ``init``, ``collect``, ``solve``, ``report``.

The model and its tokenizer come from a directory (``save_pretrained`` output, or a Hugging Face
cache snapshot) or, where the network allows, a Hub model id; the data from a file, a saved
dataset, or a Hub dataset name.  Progress bars and one summary line per stage go to stderr; the
paths written go to stdout.

Every argument is checked before the statistics pass, as the Python API does: a mistake costs
seconds, not a pass over the data, and leaves the user's files as they were.
"""
from __future__ import annotations

import logging
import sys

from .parser import build_parser


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
