"""A method is a plug-in: one module and its registry line.

The toy method below lives in this file alone (its options with a keyword of its own, its
diagnostics with a column, a flag, a plot, a warning, a log line and a certifying number, its
solve and its workspace); registered with one ``monkeypatch.setitem`` on the registry, it runs through
``initialize`` (options, pass, solve, checks, warnings, result), the memory planner and the
report, none of which names it (docs/design.md §7).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import loradafast
from loradafast import planner, report, report_plots
from loradafast.layer_init import LayerDiagnostics, reported
from loradafast.methods import registry
from loradafast.methods.factors import Factors
from loradafast.methods.method import Method, per_layer
from loradafast.options import MethodConfig, check_positive, option
from model_state import ModelState
from tiny import padded_batches, random_sequences, tiny_llama

NAME = "toy-svd"
RANK = 2


@dataclass(kw_only=True)
class ToyConfig(MethodConfig):
    scale: float = option(1.0, "how far lora_A is scaled", keyword="toy_scale")
    flag: bool = option(False, "mark every layer as degraded")
    poison: bool = option(False, "report a non-finite certifying number")

    def __post_init__(self):
        super().__post_init__()
        check_positive("toy_scale", self.scale)


def _toy_plot(fig, data, rows) -> bool:
    fig.subplots().plot([row["toy_norm"] for row in rows])
    return True


@dataclass
class ToyDiagnostics(LayerDiagnostics):
    COLUMNS: ClassVar[tuple[str, ...]] = ("toy_norm", "toy_top", "toy_flagged")
    FLAGS: ClassVar[tuple] = (("toy flag", "toy_flagged", lambda v: v is True),)
    COLUMN_NOTES: ClassVar[str] = "toy_norm: ‖G‖_F"
    PLOTS: ClassVar[tuple] = (("toy.png", _toy_plot),)

    toy_norm: float | None = reported()
    toy_flagged: bool | None = reported()
    toy_singular_values: torch.Tensor | None = reported()

    def certifying_numbers(self) -> list[torch.Tensor]:
        return [torch.tensor([self.toy_norm], dtype=torch.float64)]

    def degradations(self, dtype) -> list[str]:
        return ["toy degraded"] if self.toy_flagged else []

    @classmethod
    def solve_summary(cls, diagnostics) -> str:
        return f", toy flagged on {sum(bool(d.toy_flagged) for d in diagnostics)} layer(s)"

    @classmethod
    def derived_columns(cls, entry: dict) -> dict:
        return {"toy_top": entry["toy_singular_values"][0]}


def _toy(problem, name: str, config: ToyConfig) -> Factors:
    g = problem.G(name, torch.float64)
    _, s, vh = torch.linalg.svd(g, full_matrices=False)
    r = problem.ranks[name]
    norm = math.nan if config.poison else float(g.norm())
    return Factors(config.scale * vh[:r], torch.zeros(g.shape[0], r, dtype=g.dtype), moves_base=False,
                   diagnostics=ToyDiagnostics(toy_norm=norm, toy_flagged=config.flag, toy_singular_values=s[:r]))


WORKSPACE_CALLS = []
TERABYTE = 10 ** 12


def _workspace(memory, layers) -> int:
    """A workspace the plan cannot miss: toy_scale terabytes."""
    WORKSPACE_CALLS.append(memory.options)
    return int(memory.options.scale * TERABYTE)


TOY = Method(NAME, "Toy SVD", ToyConfig, per_layer(_toy), diagnostics=ToyDiagnostics, statistics=frozenset("G"),
             workspace=_workspace)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, NAME, TOY)


def _batches():
    return padded_batches(random_sequences(6), 3)


def _initialize(model, memory_budget=math.inf, **options):
    # No limit by default: the toy's workspace (terabytes) is there for the planner to count.
    return loradafast.initialize(model, _batches(), RANK, method=NAME, progress=False, split_halves=False,
                                 memory_budget=memory_budget, **options)


def test_a_registered_method_runs_through_initialize(toy, caplog):
    WORKSPACE_CALLS.clear()
    with caplog.at_level(logging.INFO, logger="loradafast"):
        result = _initialize(tiny_llama(), toy_scale=3.0, memory_budget="10TB")
    # the plan counted the workspace the method's own options give
    assert WORKSPACE_CALLS and all(c == ToyConfig(scale=3.0) for c in WORKSPACE_CALLS)
    assert 3 * TERABYTE <= result.plan.peak_bytes < 4 * TERABYTE
    assert "toy flagged on 0 layer(s)" in caplog.text
    stats = loradafast.collect(tiny_llama(), _batches(), factors=("G",), progress=False, split_halves=False)
    assert result.method == NAME and result.options["toy_scale"] == 3.0
    for name, layer in result.layers.items():
        _, _, vh = torch.linalg.svd(stats.G(name, torch.float64), full_matrices=False)
        rows = torch.nn.functional.cosine_similarity(layer.lora_A.double(), vh[:RANK], dim=1).abs()
        torch.testing.assert_close(rows, torch.ones(RANK, dtype=torch.float64), rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.lora_A.norm(dim=1).double(), torch.full((RANK,), 3.0, dtype=torch.float64))
        assert isinstance(layer.diagnostics, ToyDiagnostics) and layer.diagnostics.num_tokens == stats.num_tokens


def test_its_options_are_its_own(toy):
    with pytest.raises(ValueError, match="beta do.es. not apply to method 'toy-svd'.*toy_scale"):
        _initialize(tiny_llama(), beta=0.1)
    with pytest.raises(ValueError, match="toy_scale must be > 0"):
        _initialize(tiny_llama(), toy_scale=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'toy_scales'"):
        _initialize(tiny_llama(), toy_scales=1.0)


def test_its_diagnostics_drive_the_checks_and_the_warning(toy):
    model = tiny_llama()
    state = ModelState(model)
    with pytest.raises(FloatingPointError, match="produced non-finite factors"):
        _initialize(model, poison=True)
    state.assert_unchanged()
    with pytest.warns(RuntimeWarning, match="toy degraded: 14 layer"):
        _initialize(tiny_llama(), flag=True)


def test_the_report_shows_its_columns_and_flags(toy, tmp_path):
    result = _initialize(tiny_llama(), flag=True)
    data = report.diagnostics(result)
    rows = report.table_rows(data)
    assert all(row["toy_top"] == data["layers"][row["layer"]]["toy_singular_values"][0] for row in rows)
    assert report.flagged_layers(rows, report.flags_of(data)) == {"toy flag": list(result.layers)}
    report.write_report(result, tmp_path, plots=False)
    header = (tmp_path / report.TABLE_FILE).read_text().splitlines()[0].split(",")
    assert header[:9] == ["layer", "kind", "in", "out", "rank", "toy_norm", "toy_top", "toy_flagged", "norm_A"]
    assert "toy_norm: ‖G‖_F" in (tmp_path / report.MARKDOWN_FILE).read_text()
    assert (tmp_path / report.HTML_FILE).read_text().count("<td class=flag>True</td>") == len(result.layers)


def test_the_planner_counts_its_workspace_with_its_options(toy):
    WORKSPACE_CALLS.clear()
    shapes = [planner.LayerShape(f"l{i}", 64, 32, f"l{i}", RANK) for i in range(3)]
    plan = registry.plan_for_shapes(shapes, memory_budget=math.inf, method=NAME, config=ToyConfig(scale=2.0))
    assert WORKSPACE_CALLS and all(c == ToyConfig(scale=2.0) for c in WORKSPACE_CALLS)
    assert 2 * TERABYTE <= plan.peak_bytes < 3 * TERABYTE


def test_the_report_draws_its_plots(toy):
    pytest.importorskip("matplotlib")
    data = report.diagnostics(_initialize(tiny_llama()))
    assert list(report_plots.figures(data, report.table_rows(data))) == ["toy.png"]


def test_two_methods_may_not_give_one_keyword_to_different_fields(toy, monkeypatch):
    @dataclass(kw_only=True)
    class Clashing(MethodConfig):
        other: float = option(1.0, "a field the keyword toy_scale would also set", keyword="toy_scale")

    monkeypatch.setitem(registry.REGISTRY, "clash", Method("clash", "Clash", Clashing, per_layer(_toy)))
    with pytest.raises(TypeError, match="maps the keyword 'toy_scale' to the field 'other'"):
        registry.known_keywords()
