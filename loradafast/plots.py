"""What the report's plots share (:mod:`loradafast.report_plots` and the methods' own plots, which
each method's diagnostics class lists in ``PLOTS``): styles, the block axis, one line per module
type, panels, spectra.  matplotlib is imported by the functions that draw, never here.

A model has hundreds of target layers but only a handful of module types (``q_proj``, ``down_proj``,
...) repeated over its blocks, so every plot puts the block on the x-axis and gives each module
type its own line (per-layer quantities) or its own panel (per-layer spectra): a layer is found by
its block and its type, not by a label among hundreds.  Lines that share an axis get distinct
colours *and* markers (:func:`series_styles`), so they stay apart in print and for colour-blind
readers.  A plot is ``plot(fig, data, rows) -> bool``: it draws into the empty matplotlib
``Figure`` ``fig`` from the report's data and table rows, and says whether the data allowed it.
"""
from __future__ import annotations

import math

# matplotlib's tab10 colours, spelt out so that styles can be assigned (and tested) without it.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
# Nine markers against ten colours: coprime counts, so the (colour, marker) pairs repeat only after 90 series.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<")
PANEL_COLUMNS = 4
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


def number(value) -> float:
    """A plottable float: NaN (a gap) for what is missing, not a number, or not positive on a log axis."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return math.nan
    return float(value)


def has(rows: list[dict], *keys: str) -> bool:
    return any(not math.isnan(number(r.get(k))) for r in rows for k in keys)


def block_axis(ax, groups) -> None:
    """x: the block; integer ticks, and a word for the layers outside the blocks."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    outside = any(b == NO_BLOCK for members in groups.values() for b, _ in members)
    ax.set_xlabel("block" + (f" ({NO_BLOCK}: outside the numbered blocks)" if outside else ""))


def lines_per_module(ax, groups, key: str, *, label_prefix: str = "") -> dict[str, tuple[str, str]]:
    """One line per module type of ``key`` against the block; returns each type's (colour, marker)."""
    styles = dict(zip(groups, series_styles(len(groups))))
    for module, members in groups.items():
        colour, marker = styles[module]
        ax.plot([b for b, _ in members], [number(r.get(key)) for _, r in members], marker=marker, color=colour,
                linewidth=0.8, markersize=4, label=label_prefix + module)
    ax.set_yscale("log")
    block_axis(ax, groups)
    return styles


def legend_outside(ax, count: int) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if count <= 12 else 2,
              borderaxespad=0.0)


def figure_legend(fig) -> None:
    """One legend below the panels, of every label some panel drew (the residual's colour and marker
    are the first panel's: the others differ by module type only)."""
    seen = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=len(seen), fontsize=7)


def panels(fig, count: int, *, sharey: bool = True):
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


def spectra_panels(fig, data, key: str, *, log: bool):
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
    axes = panels(fig, len(groups))
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


def singular_values(key: str, what: str):
    """The plot of the kept singular values stored under ``key`` (the ``what``'s: "weight",
    "gradient G"), one panel per module type."""
    def plot(fig, data, rows) -> bool:
        axes = spectra_panels(fig, data, key, log=True)
        if axes is None:
            return False
        axes[0].set_ylabel("singular value")
        fig.suptitle(f"kept singular values of the {what}", fontsize=10)
        return True
    return plot
