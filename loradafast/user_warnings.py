"""Warnings that point at the user's line: the first frame of the call stack outside this package,
wherever in it the warning arose (a fixed ``stacklevel`` names a line of ours as soon as the call
path changes: one entry point calls the solve through more frames than another)."""
from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the innermost caller outside loradafast
    (or to our own script's line, where loradafast runs as ``python -m``: the demo, the CLI)."""
    depth, frame = 1, sys._getframe(1)
    while frame is not None and _ours(frame):
        depth, frame = depth + 1, frame.f_back
    warnings.warn(message, category, stacklevel=depth + 1)


def _ours(frame) -> bool:
    return (os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE)
            and frame.f_globals.get("__name__") != "__main__")
