"""A per-layer report of a solve, to look at rather than read: a table and plots on disk.

:func:`write_report` (also ``InitResult.report(dir)`` and ``loradafast report DIR``) writes into a
directory:

* ``loradafast_diagnostics.json``: every layer's diagnostics as plain data (what the other files
  are drawn from; ``loradafast report DIR`` redraws them from it alone);
* ``layers.csv`` and ``report.md``: one row per layer (shapes, σ = ‖Δ‖₂, the kept eigenvalues of Ω,
  the eigen-residual and its rounding floor, the eigensolver and whether it fell back to dense
  ``eigh``, the damping used and whether it was raised, the condition estimates of Zλ and Yλ,
  the norms of the factors); ``report.md`` adds a summary and the plots;
* PNG plots when matplotlib is installed (``pip install 'loradafast[report]'``; without it the
  tables are still written and the report says so): σ per layer, eigen-residuals against their
  floor, condition estimates with the layers whose damping was raised marked, the kept part of
  Ω's spectrum per layer, and, when the statistics are given, Ω's spectrum around the cut (the
  eigenvalues on both sides of the r-th, showing the gap the initialisation relies on).

Non-LoRA-DA methods get the columns their diagnostics have (singular values for PiSSA/MiLoRA,
the gradient's for LoRA-GA/LoRA-One).
"""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import torch

from . import distributed

logger = logging.getLogger(__name__)
logger.addFilter(distributed.MAIN_RANK_ONLY)

DIAGNOSTICS_FILE = "loradafast_diagnostics.json"
TABLE_FILE = "layers.csv"
MARKDOWN_FILE = "report.md"
FORMAT_VERSION = 1
# Ω is formed densely per layer for the spectrum around the cut: O(n³) each, so only up to this width.
SPECTRUM_MAX_WIDTH = 2048
# Columns of the table, in order; a column no layer has is left out.
COLUMNS = ("layer", "kind", "in", "out", "rank", "sigma", "lambda_1", "lambda_r", "lambda_r+1", "residual",
           "residual_tol", "residual_floor", "omega_norm", "eigensolver", "iterations", "converged", "fallback",
           "damping_z", "damping_y", "damping_raised", "z_condition", "y_condition", "cholesky_dtype", "variance_coef",
           "input_group", "s_1", "s_r", "energy_fraction", "split_half_overlap", "split_half_sine", "random_overlap",
           "norm_A", "norm_B")
_RENAMED = {"eigensolver_iterations": "iterations", "eigensolver_converged": "converged",
            "eigensolver_fallback": "fallback", "z_condition_estimate": "z_condition",
            "y_condition_estimate": "y_condition"}
_SCALARS = ("residual", "residual_tol", "residual_floor", "omega_norm", "eigensolver", "eigensolver_iterations",
            "eigensolver_converged", "eigensolver_fallback", "damping_z", "damping_y", "damping_raised",
            "z_condition_estimate", "y_condition_estimate", "cholesky_dtype", "sigma", "variance_coef",
            "input_group", "energy_fraction", "num_tokens", "num_sequences", "split_half_overlap", "split_half_sine",
            "random_overlap")


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
    for key in _SCALARS:
        value = getattr(d, key, None)
        if value is not None:
            entry[key] = _plain(value)
    for key in ("eigenvalues", "singular_values", "gradient_singular_values"):
        value = getattr(d, key, None)
        if value is not None:
            entry[key] = [float(v) for v in torch.as_tensor(value).reshape(-1).tolist()]
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
    """For a LoRA-DA result and the statistics it was solved from: per layer of input width up to
    ``max_width``, the ``3r`` smallest eigenvalues of the dense Ω (ascending; the first r are the
    kept ones), recomputed with the result's options.  Empty for other methods."""
    if result.method != "lora-da":
        return {}
    config = result.config if result.config is not None else _lora_da_config(result.options)
    return _spectra({name: layer.rank for name, layer in result.layers.items()}, config, stats, max_width)


def add_spectra(data: dict, stats, *, max_width: int = SPECTRUM_MAX_WIDTH) -> dict:
    """:func:`omega_spectra` for diagnostics loaded with :func:`load_diagnostics`, added in place."""
    if data["method"] == "lora-da":
        ranks = {name: entry["rank"] for name, entry in data["layers"].items()}
        for name, values in _spectra(ranks, _lora_da_config(data["options"]), stats, max_width).items():
            data["layers"][name]["omega_spectrum"] = values
    return data


def _spectra(ranks: dict[str, int], config, stats, max_width: int) -> dict[str, list[float]]:
    from .methods import lora_da

    out = {}
    for name, rank in ranks.items():
        s = stats.layers.get(name)
        if s is None or s.in_features > max_width:
            continue
        factors = lora_da.damped_factors(stats.Z(name, config.dtype), stats.Y(name, config.dtype), config.damping,
                                         config.damping_mode)
        terms = lora_da.omega_terms(stats.G(name, config.dtype), factors, beta=config.beta,
                                    num_train_samples=config.num_train_samples, alpha_b=config.alpha_b,
                                    gradient=config.gradient)
        out[name] = [float(v) for v in torch.linalg.eigvalsh(terms.dense())[: 3 * rank].tolist()]
    return out


def _lora_da_config(options: dict):
    """The :class:`~loradafast.LoraDAConfig` of recorded options (``InitResult.options``)."""
    import dataclasses

    from .options import LoraDAConfig

    fields = {f.name for f in dataclasses.fields(LoraDAConfig)} - {"dtype"}
    kept = {k: v for k, v in options.items() if k in fields}
    return LoraDAConfig(**kept, dtype=getattr(torch, str(options.get("dtype", "float64")).replace("torch.", "")))


# ---- files ----------------------------------------------------------------------------------------

def save_diagnostics(result, directory, *, stats=None) -> Path:
    """``loradafast_diagnostics.json`` in ``directory`` (created): what :func:`write_report` draws."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / DIAGNOSTICS_FILE
    path.write_text(json.dumps(diagnostics(result, stats=stats), indent=1))
    return path


def load_diagnostics(directory) -> dict:
    """The diagnostics saved in ``directory`` (an adapter directory written by the CLI, or a report)."""
    path = Path(directory)
    path = path if path.is_file() else path / DIAGNOSTICS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: `loradafast init` and `loradafast solve` write it beside the adapter, and "
            "result.report(dir) writes it from Python"
        )
    data = json.loads(path.read_text())
    if data.get("format") != "loradafast.diagnostics":
        raise ValueError(f"{path} is not a loradafast diagnostics file")
    return data


def write_report(result_or_data, directory, *, stats=None, plots: bool = True) -> Path:
    """The report of an :class:`~loradafast.InitResult` (or of the data :func:`load_diagnostics`
    returns) in ``directory``; returns the path of ``report.md``."""
    data = result_or_data if isinstance(result_or_data, dict) else diagnostics(result_or_data, stats=stats)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / DIAGNOSTICS_FILE).write_text(json.dumps(data, indent=1))
    rows = table_rows(data)
    columns = [c for c in COLUMNS if any(c in row for row in rows)]
    with open(directory / TABLE_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    images, note = [], None
    if plots:
        from . import report_plots

        images, note = report_plots.draw(data, rows, directory)
    path = directory / MARKDOWN_FILE
    path.write_text(_markdown(data, rows, columns, images, note))
    logger.info("report: %d layers, table %s%s", len(rows), directory / TABLE_FILE,
                f", {len(images)} plot(s)" if images else f" ({note})" if note else "")
    return path


def table_rows(data: dict) -> list[dict]:
    """One flat row per layer (the CSV's), from the diagnostics data."""
    rows = []
    for name, entry in data["layers"].items():
        row = {"layer": name}
        for key, value in entry.items():
            if isinstance(value, list):
                continue
            row[_RENAMED.get(key, key)] = value
        ev, spectrum = entry.get("eigenvalues"), entry.get("omega_spectrum")
        if ev:
            row["lambda_1"], row["lambda_r"] = ev[0], ev[-1]
        if spectrum and len(spectrum) > entry["rank"]:
            row["lambda_r+1"] = spectrum[entry["rank"]]
        sv = entry.get("singular_values") or entry.get("gradient_singular_values")
        if sv:
            row["s_1"], row["s_r"] = sv[0], sv[-1]
        rows.append(row)
    return rows


def flagged_layers(rows: list[dict]) -> dict[str, list[str]]:
    """What deserves a look: layers whose eigensolve fell back or missed its tolerance, whose
    damping was raised."""
    flags = {"eigensolver fell back to dense eigh": "fallback", "damping raised": "damping_raised"}
    out = {label: [r["layer"] for r in rows if r.get(key) is True] for label, key in flags.items()}
    out["eigen-residual above tolerance"] = [r["layer"] for r in rows if r.get("converged") is False]
    out["subspace not supported by the data (split-half overlap below 50 %)"] = [
        r["layer"] for r in rows if isinstance(r.get("split_half_overlap"), float) and r["split_half_overlap"] < 0.5]
    return {k: v for k, v in out.items() if v}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def _markdown(data: dict, rows: list[dict], columns: list[str], images: list[str], note: str | None) -> str:
    timings = ", ".join(f"{k} {v:.2f}" for k, v in data.get("timings", {}).items() if isinstance(v, (int, float)))
    lines = [f"# loradafast report: {data['method']}, rank {data['rank']}, {len(rows)} layers", ""]
    if data.get("base_model_name_or_path"):
        lines.append(f"Model: `{data['base_model_name_or_path']}`.  ")
    if timings:
        lines.append(f"Times (s): {timings}.  ")
    flagged = flagged_layers(rows)
    lines.append("Flagged layers: " + ("none." if not flagged else "; ".join(
        f"{label}: {len(names)} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
        for label, names in flagged.items())))
    lines.append("")
    if note:
        lines += [f"_Plots: {note}._", ""]
    for image in images:
        lines += [f"![{Path(image).stem}]({image})", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    lines += ["", "Columns: σ = ‖Δ‖₂; λ_1, λ_r: the smallest and the r-th eigenvalue of Ω (kept); λ_r+1: the "
              "first one not kept (with the statistics); residual: ‖ΩX − XΛ‖_F / ‖Ω‖₂ and its rounding floor; "
              "z/y_condition: lower bounds on cond(Zλ), cond(Yλ); s_1, s_r: the largest and the r-th kept "
              "singular value; split_half_overlap: the share of the span that the subspaces solved from the even and "
              "from the odd batches have in common (1: the same; random_overlap = r/in: unrelated), split_half_sine: "
              "the sine of their largest principal angle; norm_A, norm_B: Frobenius norms of the factors.", ""]
    return "\n".join(lines)
