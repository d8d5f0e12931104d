"""LoRA-DA's plots in the report (its diagnostics class lists them in ``PLOTS``): σ per layer, the
eigen-residuals beside their tolerance and floor, the conditioning of the damped factors, and Ω's
spectrum."""
from __future__ import annotations

from ...plots import (block_axis, figure_legend, has, legend_outside, lines_per_module, module_groups, number,
                      panels, series_styles, spectra_panels)


def sigma(fig, data, rows) -> bool:
    if not has(rows, "sigma"):
        return False
    groups = module_groups(rows)
    ax = fig.subplots()
    lines_per_module(ax, groups, "sigma")
    ax.set_ylabel("σ = ‖Δ‖₂")
    ax.set_title(f"{data['method']}: scale of the natural-gradient estimate per layer")
    legend_outside(ax, len(groups))
    return True


def residuals(fig, data, rows) -> bool:
    """One panel per module type: each layer's residual, with the tolerance it was accepted against
    and the rounding floor at the same block, and the layers that fell back or missed it marked."""
    if not has(rows, "residual"):
        return False
    groups = module_groups(rows)
    styles = dict(zip(groups, series_styles(len(groups))))
    for ax, (module, members) in zip(panels(fig, len(groups)), groups.items()):
        blocks = [b for b, _ in members]
        colour, marker = styles[module]
        ax.semilogy(blocks, [number(r.get("residual")) for _, r in members], marker, color=colour, markersize=4,
                    label="residual ‖ΩX − XΛ‖_F / ‖Ω‖₂")
        if has([r for _, r in members], "residual_tol"):
            ax.semilogy(blocks, [number(r.get("residual_tol")) for _, r in members], "_", color="black",
                        markersize=9, markeredgewidth=1.5, label="its acceptance tolerance")
        if has([r for _, r in members], "residual_floor"):
            ax.semilogy(blocks, [number(r.get("residual_floor")) for _, r in members], ".", color="gray",
                        markersize=3, label="rounding floor of the Ω products")
        bad = [(b, r) for b, r in members if r.get("fallback") is True or r.get("converged") is False]
        if bad:
            ax.semilogy([b for b, _ in bad], [number(r.get("residual")) for _, r in bad], "x", color="red",
                        markersize=9, label="fell back to dense eigh / above tolerance")
        ax.set_title(module, fontsize=9)
        block_axis(ax, {module: members})
    figure_legend(fig)
    fig.suptitle("Eigensolver residual per layer (accepted where the dot is below its bar)", fontsize=10)
    return True


def conditioning(fig, data, rows) -> bool:
    if not has(rows, "z_condition", "y_condition"):
        return False
    groups = module_groups(rows)
    fig.set_size_inches(12.0, 3.8)
    axes = fig.subplots(1, 2, sharex=True)
    for ax, key, label in ((axes[0], "z_condition", "cond(Zλ), input side"),
                           (axes[1], "y_condition", "cond(Yλ), output side")):
        lines_per_module(ax, groups, key)
        raised = [(b, r) for members in groups.values() for b, r in members if r.get("damping_raised") is True]
        if raised:
            ax.plot([b for b, _ in raised], [number(r.get(key)) for _, r in raised], "o", markersize=11,
                    markerfacecolor="none", markeredgecolor="red", label="damping raised")
        ax.set_title(label + " (lower bound)", fontsize=9)
    axes[0].set_ylabel("condition estimate")
    legend_outside(axes[1], len(groups) + 1)
    fig.suptitle("Conditioning of the damped K-FAC factors (layers that read the same input share Zλ, "
                 "so their lines coincide)", fontsize=10)
    return True


def spectrum(fig, data, rows) -> bool:
    """Ω's eigenvalues around the cut (with the statistics), else the kept ones."""
    around = any("omega_spectrum" in e for e in data["layers"].values())
    axes = spectra_panels(fig, data, "omega_spectrum" if around else "eigenvalues", log=False)
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
