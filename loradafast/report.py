"""A per-layer report of a solve, to look at rather than read: a table and plots on disk.

:func:`write_report` (also ``InitResult.report(dir)`` and ``loradafast report DIR``) writes into a
directory:

* ``loradafast_diagnostics.json``: every layer's diagnostics as plain data (what the other files
  are drawn from; ``loradafast report DIR`` redraws them from it alone);
* ``layers.csv`` and ``report.md``: one row per layer (shapes, σ = ‖Δ‖₂, the kept eigenvalues of Ω,
  the eigen-residual and its rounding floor, the eigensolver and whether it fell back to dense
  ``eigh``, the damping used and whether it was raised, the condition estimates of Zλ and Yλ,
  the norms of the factors); ``report.md`` adds a summary and the plots, and ``report.html`` is
  the same page for a browser (one file, no script; the layers worth a look highlighted);
* PNG plots when matplotlib is installed (``pip install 'loradafast[report]'``; without it the
  tables are still written and the report says so), the block on the x-axis and one line or panel
  per module type, so that hundreds of layers stay legible (:mod:`loradafast.report_plots`): σ per
  layer, eigen-residuals beside their acceptance tolerance and floor, condition estimates with the
  layers whose damping was raised marked, the kept part of Ω's spectrum per layer, and, when the
  statistics are given, Ω's spectrum around the cut (the eigenvalues on both sides of the r-th,
  showing the gap the initialisation relies on).

Each method's diagnostics class says which of its fields the report keeps, its columns, how they
are derived, what it flags and what it draws (:class:`~loradafast.layer_init.LayerDiagnostics`):
the description above is LoRA-DA's; PiSSA/MiLoRA show the kept singular values, LoRA-GA/LoRA-One
the gradient's.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from pathlib import Path

import torch

from . import distributed
from .methods.registry import REGISTRY, diagnostics_of

logger = logging.getLogger(__name__)
logger.addFilter(distributed.MAIN_RANK_ONLY)

DIAGNOSTICS_FILE = "loradafast_diagnostics.json"
TABLE_FILE = "layers.csv"
MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"
FORMAT_VERSION = 1
# Ω is formed densely per layer for the spectrum around the cut: O(n³) each, so only up to this width.
SPECTRUM_MAX_WIDTH = 2048
# The table's columns, in order: these, the method's own (its diagnostics class's COLUMNS), then
# the split-half ones and the factors' norms; a column no layer has is left out.
SHAPE_COLUMNS = ("layer", "kind", "in", "out", "rank")
LAST_COLUMNS = ("split_half_overlap", "split_half_sine", "random_overlap", "norm_A", "norm_B")


# ---- from a result to plain data -------------------------------------------------------------------

def diagnostics(result, *, stats=None) -> dict:
    """Everything the report shows, as JSON-ready data: the run, and one entry per layer."""
    spectra = omega_spectra(result, stats) if stats is not None else {}
    layers = {name: _layer_entry(layer, spectra.get(name)) for name, layer in result.layers.items()}
    return {
        "format": "loradafast.diagnostics", "format_version": FORMAT_VERSION,
        "method": result.method, "rank": result.rank, "lora_alpha": result.lora_alpha,
        "base_model_name_or_path": result.base_model_name_or_path,
        "options": {k: _plain(v) for k, v in result.options.items()},
        "timings": {k: _plain(v) for k, v in result.timings.items()},
        "layers": layers,
    }


def _layer_entry(layer, spectrum) -> dict:
    d = layer.diagnostics
    entry = {"kind": layer.kind, "in": int(layer.lora_A.shape[1]), "out": int(layer.lora_B.shape[0]),
             "rank": layer.rank, "norm_A": float(layer.lora_A.float().norm()),
             "norm_B": float(layer.lora_B.float().norm())}
    for f in dataclasses.fields(d):
        value = getattr(d, f.name)
        if not f.metadata.get("report") or value is None:
            continue
        if torch.is_tensor(value) and value.ndim > 0:
            entry[f.name] = [float(v) for v in value.reshape(-1).tolist()]
        else:
            entry[f.name] = _plain(value)
    if spectrum is not None:
        entry["omega_spectrum"] = spectrum
    return entry


def _plain(value):
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if torch.is_tensor(value) and value.numel() == 1:
        return _plain(value.item())
    return str(value)


def omega_spectra(result, stats, *, max_width: int = SPECTRUM_MAX_WIDTH) -> dict[str, list[float]]:
    """For a result and the statistics it was solved from: per layer of input width up to
    ``max_width``, the smallest eigenvalues of the matrix whose eigenvectors the method keeps
    (LoRA-DA: the ``3r`` smallest of the dense Ω, the first r the kept ones), recomputed with the
    result's options.  Empty for a method without one (its record's ``spectra``)."""
    spectra = _spectra_of(result.method)
    if spectra is None:
        return {}
    options = result.config if result.config is not None else result.options
    return spectra({name: layer.rank for name, layer in result.layers.items()}, options, stats, max_width)


def add_spectra(data: dict, stats, *, max_width: int = SPECTRUM_MAX_WIDTH) -> dict:
    """:func:`omega_spectra` for diagnostics loaded with :func:`load_diagnostics`, added in place."""
    spectra = _spectra_of(data["method"])
    if spectra is not None:
        ranks = {name: entry["rank"] for name, entry in data["layers"].items()}
        for name, values in spectra(ranks, data["options"], stats, max_width).items():
            data["layers"][name]["omega_spectrum"] = values
    return data


def _spectra_of(method: str):
    record = REGISTRY.get(method)
    return None if record is None else record.spectra


def columns_of(data: dict) -> tuple[str, ...]:
    """Every column the table of ``data`` may have, in order."""
    return SHAPE_COLUMNS + diagnostics_of(data.get("method")).COLUMNS + LAST_COLUMNS


# ---- files ----------------------------------------------------------------------------------------

def save_diagnostics(result, directory, *, stats=None) -> Path:
    """``loradafast_diagnostics.json`` in ``directory`` (created): what :func:`write_report` draws."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / DIAGNOSTICS_FILE
    path.write_text(json.dumps(diagnostics(result, stats=stats), indent=1))
    return path


def load_diagnostics(directory) -> dict:
    """The diagnostics saved in ``directory`` (an adapter directory written by ``result.save`` or the
    CLI, or a report)."""
    path = Path(directory)
    path = path if path.is_file() else path / DIAGNOSTICS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: result.save(dir), `loradafast init` and `loradafast solve` write it beside "
            "the adapter, and result.report(dir) writes it with the report; a directory from "
            "PeftModel.save_pretrained has none"
        )
    data = json.loads(path.read_text())
    if data.get("format") != "loradafast.diagnostics":
        raise ValueError(f"{path} is not a loradafast diagnostics file")
    return data


def write_report(result_or_data, directory, *, stats=None, plots: bool = True) -> Path:
    """The report of an :class:`~loradafast.InitResult` (or of the data :func:`load_diagnostics`
    returns) in ``directory``; returns the path of ``report.md`` (``report.html`` is beside it)."""
    data = result_or_data if isinstance(result_or_data, dict) else diagnostics(result_or_data, stats=stats)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / DIAGNOSTICS_FILE).write_text(json.dumps(data, indent=1))
    rows = table_rows(data)
    columns = [c for c in columns_of(data) if any(c in row for row in rows)]
    with open(directory / TABLE_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    images, note = [], None
    if plots:
        from . import report_plots

        images, note = report_plots.draw(data, rows, directory)
    (directory / HTML_FILE).write_text(_html(data, rows, columns, images, note))
    path = directory / MARKDOWN_FILE
    path.write_text(_markdown(data, rows, columns, images, note))
    logger.info("report: %d layers, table %s%s", len(rows), directory / TABLE_FILE,
                f", {len(images)} plot(s)" if images else f" ({note})" if note else "")
    return path


def table_rows(data: dict) -> list[dict]:
    """One flat row per layer (the CSV's), from the diagnostics data."""
    kind = diagnostics_of(data.get("method"))
    rows = []
    for name, entry in data["layers"].items():
        row = {"layer": name}
        for key, value in entry.items():
            if not isinstance(value, list):
                row[kind.RENAMED.get(key, key)] = value
        row.update(kind.derived_columns(entry))
        rows.append(row)
    return rows


# What deserves a look whatever the method, as (label, the table's column, the test of its value);
# a method's diagnostics class adds its own (FLAGS).  The summary lists the layers, the HTML page
# marks the cells.
FLAGS = (
    ("subspace not supported by the data (split-half overlap below 50 %)", "split_half_overlap",
     lambda v: isinstance(v, float) and v < 0.5),
)


def flags_of(data: dict) -> tuple:
    return diagnostics_of(data.get("method")).FLAGS + FLAGS


def flagged_layers(rows: list[dict], flags: tuple = FLAGS) -> dict[str, list[str]]:
    """What deserves a look (``flags``, :func:`flags_of` a report's data): e.g. layers whose
    eigensolve fell back or missed its tolerance, whose damping was raised, whose subspace two
    halves of the data do not agree on."""
    out = {label: [r["layer"] for r in rows if test(r.get(column))] for label, column, test in flags}
    return {k: v for k, v in out.items() if v}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


COLUMN_NOTES = (
    "split_half_overlap: the share of the span that the subspaces solved from the even and from the odd batches "
    "have in common (1: the same; random_overlap = r/in: unrelated), split_half_sine: the sine of their largest "
    "principal angle; norm_A, norm_B: Frobenius norms of the factors.")


def column_notes(data: dict) -> str:
    """What the columns mean: the method's own, then the ones every report has."""
    own = diagnostics_of(data.get("method")).COLUMN_NOTES
    return "Columns: " + (f"{own}; " if own else "") + COLUMN_NOTES


def _headline(data: dict, rows: list[dict]) -> tuple[str, list[str]]:
    """The title, the summary lines and the flagged layers that both report pages open with."""
    title = f"loradafast report: {data['method']}, rank {data['rank']}, {len(rows)} layers"
    timings = ", ".join(f"{k} {v:.2f}" for k, v in data.get("timings", {}).items() if isinstance(v, (int, float)))
    lines = [f"Model: {data['base_model_name_or_path']}."] if data.get("base_model_name_or_path") else []
    if timings:
        lines.append(f"Times (s): {timings}.")
    flagged = flagged_layers(rows, flags_of(data))
    lines.append("Flagged layers: " + ("none." if not flagged else "; ".join(
        f"{label}: {len(names)} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
        for label, names in flagged.items())))
    return title, lines


def _markdown(data: dict, rows: list[dict], columns: list[str], images: list[str], note: str | None) -> str:
    title, summary = _headline(data, rows)
    lines = [f"# {title}", ""] + [line + "  " for line in summary] + [""]
    if note:
        lines += [f"_Plots: {note}._", ""]
    for image in images:
        lines += [f"![{Path(image).stem}]({image})", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    lines += ["", column_notes(data), ""]
    return "\n".join(lines)


_STYLE = ("body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}"
          "table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:2px 6px;"
          "text-align:right}th{position:sticky;top:0;background:#eee}td:first-child{text-align:left}"
          "td.flag{background:#fcc;font-weight:bold}img{max-width:100%;display:block;margin:1em 0}")


def _html(data: dict, rows: list[dict], columns: list[str], images: list[str], note: str | None) -> str:
    """The same report as one HTML page (no script, no external resource): the plots beside it by
    relative name, and the cells that flag a layer (:data:`FLAGS`) highlighted."""
    from html import escape

    title, summary = _headline(data, rows)
    tests = {column: test for _, column, test in flags_of(data)}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>"]
    parts += [f"<p>{escape(line)}</p>" for line in summary]
    if note:
        parts.append(f"<p><em>Plots: {escape(note)}.</em></p>")
    parts += [f'<img src="{escape(image)}" alt="{escape(Path(image).stem)}">' for image in images]
    parts.append("<table><thead><tr>" + "".join(f"<th>{escape(c)}</th>" for c in columns) + "</tr></thead><tbody>")
    for row in rows:
        flagged = {c for c in columns if c in tests and tests[c](row.get(c))}
        parts.append("<tr>" + "".join(f"<td{' class=flag' if c in flagged else ''}>{escape(_fmt(row.get(c)))}</td>"
                                      for c in columns) + "</tr>")
    parts += ["</tbody></table>", f"<p>{escape(column_notes(data))}</p>", "</body></html>", ""]
    return "\n".join(parts)
