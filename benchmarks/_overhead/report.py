"""Summary statistics over repetitions, the Markdown table and the bar plot of the overhead results."""
from __future__ import annotations

import statistics
from pathlib import Path

from _common import pyplot

from .config import LORADAFAST_METHODS


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _ratios(s: dict, ok: list[dict], floor_runs: dict, suffix: str) -> None:
    """``ratio_over_<suffix>`` (median over median) and its per-repetition pairs, into ``s``."""
    floor_median = _stats([r["wall_s"] for r in floor_runs.values()])
    if floor_median and s["wall_s"]:
        s[f"ratio_over_{suffix}"] = s["wall_s"]["median"] / floor_median["median"]
        paired = [r["wall_s"] / floor_runs[r["repetition"]]["wall_s"] for r in ok if r["repetition"] in floor_runs]
        s[f"ratio_over_{suffix}_paired"] = _stats(paired)  # per repetition: method / floor of that repetition


def summarize(methods: list[str], runs: dict[str, list[dict]]) -> dict:
    """Per method: run counts, errors, time and memory statistics, and the ratios over the
    input-gradient floor (``ratio_over_floor``) and the training-step floor
    (``ratio_over_training_floor``)."""
    floor_runs = {r["repetition"]: r for r in runs.get("floor", []) if r.get("ok")}
    train_runs = {r["repetition"]: r for r in runs.get("floor-train", []) if r.get("ok")}
    floor_median = _stats([r["wall_s"] for r in floor_runs.values()])
    out = {}
    for m in methods:
        ok = [r for r in runs.get(m, []) if r.get("ok")]
        s = {"ok_runs": len(ok), "failed_runs": len(runs.get(m, [])) - len(ok)}
        errors = sorted({r["error"] for r in runs.get(m, []) if not r.get("ok")})
        if errors:
            s["errors"] = errors
        capped = [r for r in runs.get(m, []) if r.get("capped")]
        if capped:
            s["capped_wall_s"] = _stats([r["wall_s"] for r in capped])
            s["cap_passes"] = capped[0].get("cap_passes")
            if floor_median:
                s["capped_ratio_over_floor"] = s["capped_wall_s"]["median"] / floor_median["median"]
        for key in ("wall_s", "pass_s", "solve_s", "apply_s", "peak_mem_delta_bytes"):
            s[key] = _stats([r.get(key) for r in ok])
        _ratios(s, ok, floor_runs, "floor")
        _ratios(s, ok, train_runs, "training_floor")
        out[m] = s
    return out


def _fmt_s(st):
    if st is None:
        return "—"
    if st["n"] == 1:
        return f"{st['median']:.3g}"
    return f"{st['median']:.3g} ({st['min']:.3g}–{st['max']:.3g})"


def _fmt_mem(st):
    if st is None:
        return "—"
    return f"{st['median'] / 2**20:.0f} MiB"


def _fmt_ratio(s: dict, key: str) -> str:
    if s.get(key) is None:
        return "—"
    text = f"{s[key]:.2f}×"
    p = s.get(f"{key}_paired")
    if p and p["n"] > 1:
        text += f" ({p['min']:.2f}–{p['max']:.2f})"
    return text


def markdown_table(model: str, block: dict) -> str:
    summary = block["summary"]
    lines = [f"**{model}** — {block['description']}; {block['data']}; batch size {block['batch_size']} "
             f"(official schedule: 1); rank {block['rank']}; {block['device']}; {block['repeats']} repetition(s)",
             "",
             "| method | wall s, median (min–max) | ratio over floor | ratio over training floor | pass s | solve s "
             "| apply s | peak mem Δ |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, s in summary.items():
        if s["wall_s"] is None:
            if s.get("capped_wall_s"):
                c = s["capped_wall_s"]
                ratio = f"≥ {s['capped_ratio_over_floor']:.2f}×" if s.get("capped_ratio_over_floor") else "—"
                lines.append(f"| {m} | ≥ {_fmt_s(c)} (stopped at the cap of {s['cap_passes']} passes, not "
                             f"converged) | {ratio} | — | — | — | — | — |")
                continue
            why = "; ".join(s.get("errors", [])) or "not run"
            lines.append(f"| {m} | failed: {why[:150]} | — | — | — | — | — | — |")
            continue
        ratio = "1.00" if m == "floor" else _fmt_ratio(s, "ratio_over_floor")
        train = "1.00" if m == "floor-train" else _fmt_ratio(s, "ratio_over_training_floor")
        lines.append(f"| {m} | {_fmt_s(s['wall_s'])} | {ratio} | {train} | {_fmt_s(s['pass_s'])} | "
                     f"{_fmt_s(s['solve_s'])} | {_fmt_s(s['apply_s'])} | {_fmt_mem(s['peak_mem_delta_bytes'])} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str | None:
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    import matplotlib.ticker  # noqa: F401 - used through matplotlib.ticker below
    models = list(result["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        summary = result["models"][model]["summary"]
        names, values, lo, hi, capped = [], [], [], [], []
        for m, s in summary.items():
            ratio = s.get("ratio_over_floor")
            if ratio is None and s.get("capped_ratio_over_floor") is not None:
                names.append(m + " (≥, capped)")
                values.append(s["capped_ratio_over_floor"])
                lo.append(0.0)
                hi.append(0.0)
                capped.append(True)
                continue
            if ratio is None:
                continue
            names.append(m)
            values.append(ratio)
            p = s.get("ratio_over_floor_paired") or {"min": ratio, "max": ratio}
            lo.append(max(0.0, ratio - p["min"]))
            hi.append(max(0.0, p["max"] - ratio))
            capped.append(False)
        base = [n.split(" ")[0] for n in names]
        colors = ["#777777" if n == "floor" else "#1f77b4" if n in LORADAFAST_METHODS else "#d62728" for n in base]
        bars = ax.bar(range(len(names)), values, yerr=[lo, hi], color=colors, capsize=3)
        for bar, c in zip(bars, capped):
            if c:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("wall time / floor")
        ax.set_yscale("log")
        fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        block = result["models"][model]
        ax.set_title(f"{model}: {block['samples']}×{block['seq_len']} tokens, {block['repeats']} rep.", fontsize=9)
        for i, v in enumerate(values):
            ax.text(i, v + hi[i], f"{'≥' if capped[i] else ''}{v:.2f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"Initialisation wall time over one forward+backward (the floor), {result['device']}\n"
                 "median over repetitions; whiskers: per-repetition range of method/floor; blue: loradafast",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
