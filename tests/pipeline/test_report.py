"""The report: on an adapter saved from Python, at hundreds of layers (plots grouped by module type,
each residual beside its tolerance, series told apart by colour and marker), and as an HTML page."""
import json

import pytest

import loradafast
from loradafast import cli, plots, report, report_plots
from tiny import padded_batches, random_sequences, tiny_llama

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
BLOCKS = 30  # 30 × 7 = 210 layers, as SmolLM2-135M


def synthetic(blocks: int = BLOCKS, rank: int = 4) -> dict:
    """Diagnostics data as report.diagnostics writes them, for ``blocks`` × 7 layers and an lm_head;
    every value distinct, so that a plot that mixes layers up shows in its data."""
    layers = {}
    names = [f"model.layers.{b}.{m}" for b in range(blocks) for m in MODULES] + ["lm_head"]
    for i, name in enumerate(names):
        layers[name] = {
            "kind": "linear", "in": 64, "out": 64, "rank": rank, "norm_A": 1.0, "norm_B": 0.0,
            "residual": 1e-9 * (1 + i), "residual_tol": 1e-8 * (1 + i % 5), "residual_floor": 1e-11 * (1 + i),
            "omega_norm": 2.0, "eigensolver_converged": i != 5, "eigensolver_fallback": i == 7,
            "damping_raised": i == 3, "z_condition_estimate": 10.0 + i, "y_condition_estimate": 100.0 + i,
            "sigma": 0.1 + i, "split_half_overlap": 0.5 + (i % 10) / 20, "random_overlap": rank / 64,
            "eigenvalues": [0.1 * k + 0.001 * i for k in range(rank)],
            "omega_spectrum": [0.1 * k + 0.001 * i for k in range(3 * rank)],
        }
    return {"format": "loradafast.diagnostics", "format_version": report.FORMAT_VERSION, "method": "lora-da",
            "rank": rank, "lora_alpha": 8, "base_model_name_or_path": "synthetic", "options": {}, "timings": {},
            "layers": layers}


# ---- a report of every adapter --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stats():
    return loradafast.collect(tiny_llama(), padded_batches(random_sequences(6), 3), progress=False)


@pytest.mark.parametrize("method, convert", [("lora-da", None), ("lora-ga", True)])
def test_report_of_an_adapter_saved_from_python(stats, tmp_path, method, convert):
    weights = {n: m.weight.detach() for n, m in tiny_llama().named_modules() if n in stats.layers}
    result = loradafast.solve(stats, 2, method=method, weights=weights if method == "lora-ga" else None,
                              progress=False)
    adapter = result.save(tmp_path / "adapter", convert_to_lora=convert)
    assert (adapter / report.DIAGNOSTICS_FILE).exists()
    assert cli.main(["report", str(adapter), "--out", str(tmp_path / "rep")]) == 0
    out = tmp_path / "rep"
    rows = (out / report.TABLE_FILE).read_text().splitlines()
    assert len(rows) == 1 + len(result.layers)
    for name in (report.MARKDOWN_FILE, report.HTML_FILE):
        assert f"{method}, rank 2, {len(result.layers)} layers" in (out / name).read_text()
    if _has_matplotlib():
        assert (out / "sigma.png" if method == "lora-da" else out / "singular_values.png").exists()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_directory_without_diagnostics_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="result.save"):
        report.load_diagnostics(tmp_path)


# ---- plots at 210 layers -----------------------------------------------------------------------------

def test_series_styles_are_distinct_in_colour_and_marker():
    for count in (7, 12, 30, 90):
        styles = plots.series_styles(count)
        assert len(set(styles)) == count
        assert all(a[0] != b[0] and a[1] != b[1] for a, b in zip(styles, styles[1:]))
    assert len({c for c, _ in plots.series_styles(12)}) == 10  # 12 series: colours repeat, pairs do not


def test_module_groups_put_each_type_in_block_order():
    rows = report.table_rows(synthetic())
    rows.reverse()  # the grouping, not the input order, sorts by block
    groups = plots.module_groups(rows)
    assert set(groups) == {*MODULES, "lm_head"}
    for module in MODULES:
        assert [b for b, _ in groups[module]] == list(range(BLOCKS))
        assert all(r["layer"] == f"model.layers.{b}.{module}" for b, r in groups[module])
    assert [b for b, _ in groups["lm_head"]] == [plots.NO_BLOCK]


@pytest.fixture(scope="module")
def figures():
    pytest.importorskip("matplotlib")
    data = synthetic()
    return data, report_plots.figures(data, report.table_rows(data))


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]


def test_per_layer_plots_have_one_distinct_series_per_module_type(figures):
    _, drawn = figures
    assert set(drawn) == {"sigma.png", "residuals.png", "conditioning.png", "spectrum.png", "split_half.png"}
    ax = drawn["sigma.png"].axes[0]
    lines = [line for line in ax.get_lines() if line.get_label() in (*MODULES, "lm_head")]
    assert len(lines) == len(MODULES) + 1
    assert len({(line.get_color(), line.get_marker()) for line in lines}) == len(lines)
    assert ax.get_xlabel().startswith("block")
    q = next(line for line in lines if line.get_label() == "self_attn.q_proj")
    assert list(q.get_xdata()) == list(range(BLOCKS))
    assert q.get_ydata()[1] == pytest.approx(0.1 + len(MODULES))  # block 1's q_proj is the 8th layer
    for ax in drawn["conditioning.png"].axes[:2]:
        assert any(line.get_label() == "damping raised" for line in ax.get_lines())


def test_residual_panels_draw_each_layer_tolerance_beside_its_residual(figures):
    data, drawn = figures
    panels = _panels(drawn["residuals.png"])
    assert [ax.get_title() for ax in panels] == [*MODULES, "lm_head"]
    for ax in panels:
        by_label = {line.get_label(): line for line in ax.get_lines()}
        residual, tol = by_label["residual ‖ΩX − XΛ‖_F / ‖Ω‖₂"], by_label["its acceptance tolerance"]
        assert list(residual.get_xdata()) == list(tol.get_xdata())  # at the same block
        names = [f"model.layers.{b}.{ax.get_title()}" for b in residual.get_xdata()] \
            if ax.get_title() != "lm_head" else ["lm_head"]
        assert list(tol.get_ydata()) == [data["layers"][n]["residual_tol"] for n in names]
        assert list(residual.get_ydata()) == [data["layers"][n]["residual"] for n in names]
        assert ax.get_xlabel().startswith("block") and ax.get_yscale() == "log"
    flagged = [line for ax in panels for line in ax.get_lines() if line.get_label().startswith("fell back")]
    assert sum(len(line.get_xdata()) for line in flagged) == 2  # layer 5 missed its tolerance, layer 7 fell back


def test_spectrum_has_a_panel_per_module_type_with_every_layer(figures):
    _, drawn = figures
    panels = _panels(drawn["spectrum.png"])
    assert [ax.get_title() for ax in panels] == [*MODULES, "lm_head"]
    assert [len(ax.get_lines()) for ax in panels] == [BLOCKS + 1] * len(MODULES) + [2]  # + the cut line


def test_report_files_at_210_layers(tmp_path):
    data = synthetic()
    path = report.write_report(data, tmp_path)
    html = (tmp_path / report.HTML_FILE).read_text()
    assert html.count("<tr") == 1 + len(data["layers"])
    assert html.count("<td class=flag>") == 3  # missed tolerance, fell back, damping raised
    assert "<td class=flag>False</td>" in html  # converged: False
    assert json.loads((tmp_path / report.DIAGNOSTICS_FILE).read_text())["layers"] == data["layers"]
    if _has_matplotlib():
        for name in ("sigma.png", "residuals.png", "spectrum.png"):
            assert f'<img src="{name}"' in html and f"({name})" in path.read_text()
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
