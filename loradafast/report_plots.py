"""The report's PNG plots (:mod:`loradafast.report`), drawn with matplotlib when it is installed.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly: no pyplot, so no
global state, no backend switch and no window, whatever the caller's matplotlib setup.
"""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

MISSING = "matplotlib is not installed, so no plots were drawn (pip install 'loradafast[report]')"
# Layers drawn individually in the spectrum plots; beyond this, an evenly spaced selection.
MAX_SPECTRUM_LINES = 12


def draw(data: dict, rows: list[dict], directory: Path) -> tuple[list[str], str | None]:
    """Every plot the data allows, as PNG files in ``directory``; returns (file names, note)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("report: %s; the table is written", MISSING)
        return [], MISSING

    def figure(height: float = 3.6):
        fig = Figure(figsize=(max(6.0, min(16.0, 0.18 * len(rows) + 4)), height), layout="constrained")
        FigureCanvasAgg(fig)
        return fig

    images = []
    for name, plot in (("sigma.png", _sigma), ("residuals.png", _residuals), ("conditioning.png", _conditioning),
                       ("spectrum.png", _spectrum), ("singular_values.png", _singular_values),
                       ("split_half.png", _split_half)):
        fig = figure()
        if plot(fig, data, rows):
            fig.savefig(directory / name, dpi=110)
            images.append(name)
    return images, None


def _positions(ax, rows: list[dict]) -> list[int]:
    xs = list(range(len(rows)))
    ax.set_xticks(xs)
    ax.set_xticklabels([_short(r["layer"]) for r in rows], rotation=90, fontsize=6)
    ax.set_xlabel("layer")
    return xs


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``3.q_proj``: the part that tells layers apart."""
    parts = name.split(".")
    digits = [p for p in parts if p.isdigit()]
    return f"{digits[-1]}.{parts[-1]}" if digits else parts[-1]


def _values(rows: list[dict], key: str) -> list[float | None]:
    return [r.get(key) if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) else None
            for r in rows]


def _sigma(fig, data, rows) -> bool:
    sigma = _values(rows, "sigma")
    if all(v is None for v in sigma):
        return False
    ax = fig.subplots()
    xs = _positions(ax, rows)
    ax.bar(xs, [v or 0.0 for v in sigma], color="tab:blue")
    ax.set_yscale("log")
    ax.set_ylabel("σ = ‖Δ‖₂")
    ax.set_title(f"{data['method']}: scale of the natural-gradient estimate per layer")
    return True


def _residuals(fig, data, rows) -> bool:
    res = _values(rows, "residual")
    if all(v is None for v in res):
        return False
    ax = fig.subplots()
    xs = _positions(ax, rows)
    ax.semilogy(xs, [v if v else float("nan") for v in res], "o", label="‖ΩX − XΛ‖_F / ‖Ω‖₂")
    floor = _values(rows, "residual_floor")
    if any(floor):
        ax.semilogy(xs, [v if v else float("nan") for v in floor], "_", color="gray", markersize=10,
                    label="rounding floor of the Ω products")
    bad = [x for x, r in zip(xs, rows) if r.get("fallback") or r.get("converged") is False]
    if bad:
        ax.semilogy(bad, [res[x] or float("nan") for x in bad], "x", color="tab:red", markersize=9,
                    label="fell back to dense eigh / above tolerance")
    ax.set_ylabel("eigen-residual")
    ax.set_title("Eigensolver residual per layer")
    ax.legend(fontsize=7)
    return True


def _conditioning(fig, data, rows) -> bool:
    z, y = _values(rows, "z_condition"), _values(rows, "y_condition")
    if all(v is None for v in z + y):
        return False
    ax = fig.subplots()
    xs = _positions(ax, rows)
    ax.semilogy(xs, [v or float("nan") for v in z], "o", label="cond(Zλ) (lower bound)")
    ax.semilogy(xs, [v or float("nan") for v in y], "s", fillstyle="none", label="cond(Yλ) (lower bound)")
    raised = [x for x, r in zip(xs, rows) if r.get("damping_raised")]
    for x in raised:
        ax.axvline(x, color="tab:red", alpha=0.3)
    if raised:
        ax.plot([], [], color="tab:red", alpha=0.3, label="damping raised")
    ax.set_ylabel("condition estimate")
    ax.set_title("Conditioning of the damped K-FAC factors")
    ax.legend(fontsize=7)
    return True


def _chosen(names: list[str]) -> list[str]:
    if len(names) <= MAX_SPECTRUM_LINES:
        return names
    step = (len(names) - 1) / (MAX_SPECTRUM_LINES - 1)
    return [names[round(i * step)] for i in range(MAX_SPECTRUM_LINES)]


def _spectrum(fig, data, rows) -> bool:
    """Ω's eigenvalues around the cut (with the statistics), else the kept ones, each layer's
    divided by ‖Ω‖₂ so that layers of different scale share one axis."""
    layers = data["layers"]
    key = "omega_spectrum" if any("omega_spectrum" in e for e in layers.values()) else "eigenvalues"
    names = [n for n, e in layers.items() if e.get(key)]
    if not names:
        return False
    ax = fig.subplots()
    rank = None
    for name in _chosen(names):
        entry = layers[name]
        scale = entry.get("omega_norm") or max(abs(v) for v in entry[key]) or 1.0
        values = [v / scale for v in entry[key]]
        ax.plot(range(1, len(values) + 1), values, ".-", linewidth=0.8, label=_short(name))
        rank = entry["rank"]
    if key == "omega_spectrum" and rank is not None:
        ax.axvline(rank + 0.5, color="black", linestyle="--", linewidth=0.8)
        ax.text(rank + 0.6, ax.get_ylim()[1], " cut (r)", va="top", fontsize=7)
    ax.set_xlabel("eigenvalue index (ascending)")
    ax.set_ylabel("λ(Ω) / ‖Ω‖₂")
    ax.set_title("Ω's spectrum around the cut" if key == "omega_spectrum"
                 else "Ω's kept eigenvalues (pass the statistics for the spectrum beyond the cut)")
    ax.legend(fontsize=6, ncol=2)
    return True


def _singular_values(fig, data, rows) -> bool:
    layers = data["layers"]
    key = next((k for k in ("singular_values", "gradient_singular_values")
                if any(e.get(k) for e in layers.values())), None)
    if key is None:
        return False
    ax = fig.subplots()
    for name in _chosen([n for n, e in layers.items() if e.get(key)]):
        values = layers[name][key]
        ax.semilogy(range(1, len(values) + 1), values, ".-", linewidth=0.8, label=_short(name))
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title("kept singular values of the " + ("weight" if key == "singular_values" else "gradient G"))
    ax.legend(fontsize=6, ncol=2)
    return True


def _block_and_module(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj`` → (3, "self_attn.q_proj"); (None, name) without a block number."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return int(parts[i]), ".".join(parts[i + 1:]) or parts[-1]
    return None, name


def _split_half(fig, data, rows) -> bool:
    """The split-half overlap as a heat-map of block × module (legible at hundreds of layers)."""
    cells = {}
    for r in rows:
        value = r.get("split_half_overlap")
        if isinstance(value, float):
            cells[_block_and_module(r["layer"])] = value
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
