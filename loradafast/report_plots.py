"""The report's PNG plots (:mod:`loradafast.report`), drawn with matplotlib when it is installed.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly: no pyplot, so no
global state, no backend switch and no window, whatever the caller's matplotlib setup.

A model has hundreds of target layers but only a handful of module types (``q_proj``, ``down_proj``,
...) repeated over its blocks, so every plot puts the block on the x-axis and gives each module
type its own line (per-layer quantities) or its own panel (per-layer spectra): a layer is found by
its block and its type, not by a label among hundreds.  Lines that share an axis get distinct
colours *and* markers (:func:`series_styles`), so they stay apart in print and for colour-blind
readers.
"""
from __future__ import annotations

import io
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

MISSING = "matplotlib is not installed, so no plots were drawn (pip install 'loradafast[report]')"
# matplotlib's tab10 colours, spelt out so that styles can be assigned (and tested) without it.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
# Nine markers against ten colours: coprime counts, so the (colour, marker) pairs repeat only after 90 series.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<")
PANEL_COLUMNS = 4
DPI = 90
# The block axis of layers outside the numbered blocks (an lm_head, a lone projection).
NO_BLOCK = -1


def series_styles(count: int) -> list[tuple[str, str]]:
    """(colour, marker) for ``count`` series on one axis: distinct pairs up to 90 series, and
    neighbours in the list differ in both."""
    return [(COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]) for i in range(count)]


def block_and_module(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj`` → (3, "self_attn.q_proj"); (None, name) without a block number."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return int(parts[i]), ".".join(parts[i + 1:]) or parts[-1]
    return None, name


def module_groups(rows: list[dict]) -> dict[str, list[tuple[int, dict]]]:
    """The rows by module type (the name after the block number), types in order of first
    appearance, each type's rows as (block, row) in block order (:data:`NO_BLOCK` where none)."""
    groups: dict[str, list[tuple[int, dict]]] = {}
    for row in rows:
        block, module = block_and_module(row["layer"])
        groups.setdefault(module, []).append((NO_BLOCK if block is None else block, row))
    return {module: sorted(members, key=lambda m: m[0]) for module, members in groups.items()}


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
    for name, plot in PLOTS:
        fig = Figure(figsize=(9.0, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        if plot(fig, data, rows):
            drawn[name] = fig
    return drawn


# ---- helpers ------------------------------------------------------------------------------------------

def _number(value) -> float:
    """A plottable float: NaN (a gap) for what is missing, not a number, or not positive on a log axis."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return math.nan
    return float(value)


def _has(rows: list[dict], *keys: str) -> bool:
    return any(not math.isnan(_number(r.get(k))) for r in rows for k in keys)


def _block_axis(ax, groups) -> None:
    """x: the block; integer ticks, and a word for the layers outside the blocks."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    outside = any(b == NO_BLOCK for members in groups.values() for b, _ in members)
    ax.set_xlabel("block" + (f" ({NO_BLOCK}: outside the numbered blocks)" if outside else ""))


def _lines_per_module(ax, groups, key: str, *, label_prefix: str = "") -> dict[str, tuple[str, str]]:
    """One line per module type of ``key`` against the block; returns each type's (colour, marker)."""
    styles = dict(zip(groups, series_styles(len(groups))))
    for module, members in groups.items():
        colour, marker = styles[module]
        ax.plot([b for b, _ in members], [_number(r.get(key)) for _, r in members], marker=marker, color=colour,
                linewidth=0.8, markersize=4, label=label_prefix + module)
    ax.set_yscale("log")
    _block_axis(ax, groups)
    return styles


def _legend_outside(ax, count: int) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if count <= 12 else 2,
              borderaxespad=0.0)


def _figure_legend(fig) -> None:
    """One legend below the panels, of every label some panel drew (the residual's colour and marker
    are the first panel's: the others differ by module type only)."""
    seen = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=len(seen), fontsize=7)


def _panels(fig, count: int, *, sharey: bool = True):
    """A grid of ``count`` panels sharing the x-axis, every one keeping its own x tick labels."""
    cols = min(count, PANEL_COLUMNS)
    rows = math.ceil(count / cols)
    fig.set_size_inches(min(16.0, 3.4 * cols + 1.2), 2.4 * rows + 1.0)
    axes = fig.subplots(rows, cols, sharex=True, sharey=sharey, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    for ax in axes[:count]:
        ax.xaxis.set_tick_params(labelbottom=True)  # a panel above an empty cell is a bottom panel
    return axes[:count]


# ---- the plots ----------------------------------------------------------------------------------------

def _sigma(fig, data, rows) -> bool:
    if not _has(rows, "sigma"):
        return False
    groups = module_groups(rows)
    ax = fig.subplots()
    _lines_per_module(ax, groups, "sigma")
    ax.set_ylabel("σ = ‖Δ‖₂")
    ax.set_title(f"{data['method']}: scale of the natural-gradient estimate per layer")
    _legend_outside(ax, len(groups))
    return True


def _residuals(fig, data, rows) -> bool:
    """One panel per module type: each layer's residual, with the tolerance it was accepted against
    and the rounding floor at the same block, and the layers that fell back or missed it marked."""
    if not _has(rows, "residual"):
        return False
    groups = module_groups(rows)
    styles = dict(zip(groups, series_styles(len(groups))))
    for ax, (module, members) in zip(_panels(fig, len(groups)), groups.items()):
        blocks = [b for b, _ in members]
        colour, marker = styles[module]
        ax.semilogy(blocks, [_number(r.get("residual")) for _, r in members], marker, color=colour, markersize=4,
                    label="residual ‖ΩX − XΛ‖_F / ‖Ω‖₂")
        if _has([r for _, r in members], "residual_tol"):
            ax.semilogy(blocks, [_number(r.get("residual_tol")) for _, r in members], "_", color="black",
                        markersize=9, markeredgewidth=1.5, label="its acceptance tolerance")
        if _has([r for _, r in members], "residual_floor"):
            ax.semilogy(blocks, [_number(r.get("residual_floor")) for _, r in members], ".", color="gray",
                        markersize=3, label="rounding floor of the Ω products")
        bad = [(b, r) for b, r in members if r.get("fallback") is True or r.get("converged") is False]
        if bad:
            ax.semilogy([b for b, _ in bad], [_number(r.get("residual")) for _, r in bad], "x", color="red",
                        markersize=9, label="fell back to dense eigh / above tolerance")
        ax.set_title(module, fontsize=9)
        _block_axis(ax, {module: members})
    _figure_legend(fig)
    fig.suptitle("Eigensolver residual per layer (accepted where the dot is below its bar)", fontsize=10)
    return True


def _conditioning(fig, data, rows) -> bool:
    if not _has(rows, "z_condition", "y_condition"):
        return False
    groups = module_groups(rows)
    fig.set_size_inches(12.0, 3.8)
    axes = fig.subplots(1, 2, sharex=True)
    for ax, key, label in ((axes[0], "z_condition", "cond(Zλ), input side"),
                           (axes[1], "y_condition", "cond(Yλ), output side")):
        _lines_per_module(ax, groups, key)
        raised = [(b, r) for members in groups.values() for b, r in members if r.get("damping_raised") is True]
        if raised:
            ax.plot([b for b, _ in raised], [_number(r.get(key)) for _, r in raised], "o", markersize=11,
                    markerfacecolor="none", markeredgecolor="red", label="damping raised")
        ax.set_title(label + " (lower bound)", fontsize=9)
    axes[0].set_ylabel("condition estimate")
    _legend_outside(axes[1], len(groups) + 1)
    fig.suptitle("Conditioning of the damped K-FAC factors (layers that read the same input share Zλ, "
                 "so their lines coincide)", fontsize=10)
    return True


def _spectra_panels(fig, data, key: str, *, log: bool):
    """One panel per module type with every layer's ``key`` list as a line, coloured by block
    depth (a colour bar, not a legend: tens of lines per panel); returns the panels, None without data."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rows = [{"layer": name} for name, entry in data["layers"].items() if entry.get(key)]
    if not rows:
        return None
    groups = module_groups(rows)
    blocks = [b for members in groups.values() for b, _ in members]
    norm = Normalize(min(blocks), max(max(blocks), min(blocks) + 1))
    cmap = colormaps["viridis"]
    axes = _panels(fig, len(groups))
    for ax, (module, members) in zip(axes, groups.items()):
        for block, row in members:
            entry = data["layers"][row["layer"]]
            values = entry[key]
            if not log:  # eigenvalues: each layer's over ‖Ω‖₂, so that layers of different scale share an axis
                scale = entry.get("omega_norm") or max(abs(v) for v in values) or 1.0
                values = [v / scale for v in values]
            ax.plot(range(1, len(values) + 1), values, "-", color=cmap(norm(block)), linewidth=0.9)
        ax.set_yscale("log" if log else "linear")
        ax.set_title(module, fontsize=9)
        ax.set_xlabel("index")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label="block", shrink=0.9)
    return axes


def _spectrum(fig, data, rows) -> bool:
    """Ω's eigenvalues around the cut (with the statistics), else the kept ones."""
    around = any("omega_spectrum" in e for e in data["layers"].values())
    axes = _spectra_panels(fig, data, "omega_spectrum" if around else "eigenvalues", log=False)
    if axes is None:
        return False
    rank = data.get("rank")
    for ax in axes:
        if around and isinstance(rank, int):
            ax.axvline(rank + 0.5, color="black", linestyle="--", linewidth=0.8)
    axes[0].set_ylabel("λ(Ω) / ‖Ω‖₂")
    fig.suptitle(f"Ω's spectrum around the cut (dashed: kept | not kept, r = {rank})" if around
                 else "Ω's kept eigenvalues (pass the statistics for the spectrum beyond the cut)", fontsize=10)
    return True


def _singular_values(fig, data, rows) -> bool:
    key = next((k for k in ("singular_values", "gradient_singular_values")
                if any(e.get(k) for e in data["layers"].values())), None)
    axes = None if key is None else _spectra_panels(fig, data, key, log=True)
    if axes is None:
        return False
    axes[0].set_ylabel("singular value")
    fig.suptitle("kept singular values of the " + ("weight" if key == "singular_values" else "gradient G"),
                 fontsize=10)
    return True


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


PLOTS = (("sigma.png", _sigma), ("residuals.png", _residuals), ("conditioning.png", _conditioning),
         ("spectrum.png", _spectrum), ("singular_values.png", _singular_values), ("split_half.png", _split_half))
