"""The report's PNG plots (:mod:`loradafast.report`), drawn with matplotlib when it is installed:
the method's own (its diagnostics class's ``PLOTS``), then the split-half heat-map every
data-aware method has.  The helpers they share are in :mod:`loradafast.plots`.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly: no pyplot, so no
global state, no backend switch and no window, whatever the caller's matplotlib setup.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

from .methods.registry import diagnostics_of
from .plots import block_and_module

logger = logging.getLogger(__name__)

MISSING = "matplotlib is not installed, so no plots were drawn (pip install 'loradafast[report]')"
DPI = 90


def draw(data: dict, rows: list[dict], directory: Path) -> tuple[list[str], str | None]:
    """Every plot the data allows, as PNG files in ``directory``; returns (file names, note)."""
    try:
        drawn = figures(data, rows)
    except ImportError:
        logger.warning("report: %s; the table is written", MISSING)
        return [], MISSING
    for name, fig in drawn.items():
        save_png(fig, directory / name)
    return list(drawn), None


def save_png(fig, path: Path) -> None:
    """``fig`` as a 256-colour palette PNG: a plot has few colours besides the antialiasing, so it
    looks the same at a third of the bytes (a report is meant to be kept and committed)."""
    from PIL import Image  # a dependency of matplotlib itself

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def figures(data: dict, rows: list[dict]) -> dict:
    """The plots the data allows, by file name, as matplotlib ``Figure`` objects (not saved);
    ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = {}
    for name, plot in diagnostics_of(data.get("method")).PLOTS + PLOTS:
        fig = Figure(figsize=(9.0, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        if plot(fig, data, rows):
            drawn[name] = fig
    return drawn


def _split_half(fig, data, rows) -> bool:
    """The split-half overlap as a heat-map of block × module."""
    cells = {}
    for r in rows:
        value = r.get("split_half_overlap")
        if isinstance(value, float):
            cells[block_and_module(r["layer"])] = value
    if not cells:
        return False
    blocks = sorted({b for b, _ in cells}, key=lambda b: -1 if b is None else b)
    modules = list(dict.fromkeys(m for _, m in cells))
    grid = [[cells.get((b, m), float("nan")) for b in blocks] for m in modules]
    fig.set_size_inches(max(6.0, min(16.0, 0.3 * len(blocks) + 3)), max(2.5, 0.35 * len(modules) + 1.5))
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels(["-" if b is None else str(b) for b in blocks], fontsize=6)
    ax.set_yticks(range(len(modules)))
    ax.set_yticklabels(modules, fontsize=7)
    ax.set_xlabel("block")
    randoms = [r["random_overlap"] for r in rows if isinstance(r.get("random_overlap"), float)]
    baseline = f"; unrelated subspaces: {min(randoms):.1%}-{max(randoms):.1%}" if randoms else ""
    ax.set_title(f"{data['method']}: subspace shared by two halves of the data{baseline}", fontsize=9)
    fig.colorbar(image, ax=ax, label="split-half overlap")
    return True


# The plots every report may have, after the method's own.
PLOTS = (("split_half.png", _split_half),)
