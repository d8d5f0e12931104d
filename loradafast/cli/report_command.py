"""``loradafast report``: adapter directory → per-layer tables and plots."""
from __future__ import annotations

from pathlib import Path

from .output import REPORT_DIR


def run_report(args) -> Path:
    """``loradafast report``: adapter directory → tables and plots."""
    from ..report import add_spectra, load_diagnostics, write_report

    data = load_diagnostics(args.directory)
    if args.stats:
        from ..statistics import Statistics

        add_spectra(data, Statistics.load(args.stats))
    out = Path(args.out) if args.out else Path(args.directory) / REPORT_DIR
    return write_report(data, out, plots=not args.no_plots)
