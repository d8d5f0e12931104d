"""The overhead benchmark's pieces that must hold before a GPU run: the Triton kernels are tuned
for the real model's widths and batch sizes outside the timed region, and the floors' FLOP model."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from _overhead import runner  # noqa: E402
from _overhead.models import build_model, make_batches  # noqa: E402


def test_kernel_warm_up_covers_every_width_batch_size_and_mask(monkeypatch):
    from loradafast import kernels

    calls = []

    def spy(name):
        def record(*args):  # (acc, x, mask), (z, x, y, g, mask), (acc, g, x, mask): tokens in args[1]
            calls.append((name, args[1].shape[0], args[-1] is not None))
        return record

    ops = [("kfac_accumulate", "kfac"), ("kfac_accumulate_pair", "pair"), ("gradient_accumulate", "gradient")]
    for op, name in ops:
        monkeypatch.setattr(kernels, op, spy(name))
    model = build_model({"model": "tiny", "device": "cpu", "dtype": "float32", "seq_len": 16})
    ids = torch.randint(0, 512, (5, 16), generator=torch.Generator().manual_seed(0))
    batches = make_batches(ids, 2, "cpu")  # 2 + 2 + 1 sequences: 32 and 16 tokens
    runner.warm_up_kernels(model, batches, "cpu")
    assert calls == []  # on CPU nothing is tuned
    runner.warm_up_kernels(model, batches, "cpu", force=True)
    widths, tokens = runner.kernel_warm_up_shapes(model, batches)
    assert widths == {(64, 64), (64, 128), (128, 64)} and tokens == [16, 32]
    for name in ("kfac", "pair", "gradient"):
        seen = {(t, m) for n, t, m in calls if n == name}
        assert seen == {(16, False), (16, True), (32, False), (32, True)}, (name, seen)
    assert len([c for c in calls if c[0] == "kfac"]) == 2 * len(widths) * 2 * 2


def test_every_method_is_reported_against_both_floors():
    from _overhead.report import markdown_table, summarize

    walls = {"floor": [1.0, 2.0], "floor-train": [1.5, 3.0], "lora-da-diag": [1.8, 3.3]}
    runs = {m: [{"ok": True, "repetition": i, "wall_s": w} for i, w in enumerate(ws)] for m, ws in walls.items()}
    summary = summarize(list(walls), runs)
    da = summary["lora-da-diag"]
    assert da["ratio_over_floor"] == pytest.approx(2.55 / 1.5)
    assert da["ratio_over_training_floor"] == pytest.approx(2.55 / 2.25)
    assert da["ratio_over_training_floor_paired"]["min"] == pytest.approx(1.1)
    assert summary["floor"]["ratio_over_training_floor"] == pytest.approx(1.5 / 2.25)
    table = markdown_table("m", {"summary": summary, "description": "d", "data": "x", "batch_size": 1, "rank": 8,
                                 "device": "cpu", "repeats": 2})
    assert "ratio over training floor" in table
    assert "| lora-da-diag | 2.55 (1.8–3.3) | 1.70× (1.65–1.80) | 1.13×" in table


def test_both_floors_are_always_run_first():
    import overhead

    args = overhead.argparse.Namespace(gpu=False, device="cpu", models="tiny", methods="lora-ga,floor-train",
                                       samples=None, seq_len=None, batch_size=None, eva_max_epochs=None,
                                       repeats=None)
    _, _, methods, _ = overhead.resolve_choices(args, cuda_available=False)
    assert methods == ["floor", "floor-train", "lora-ga"]


def test_a_run_cut_off_midway_leaves_every_finished_run_on_disk(tmp_path, monkeypatch):
    import json

    import overhead

    def fake_child(spec, workdir, timeout):
        if spec["method"] != "floor":
            raise KeyboardInterrupt  # what a lease's time limit does to the benchmark, in effect
        return {"method": "floor", "ok": True, "wall_s": 1.25, "pass_s": None, "solve_s": None,
                "apply_s": None, "peak_mem_delta_bytes": 0}

    monkeypatch.setattr(runner, "run_in_child", fake_child)
    out = tmp_path / "overhead.json"
    with pytest.raises(KeyboardInterrupt):
        overhead.main(["--models", "tiny", "--methods", "floor,floor-train,lora-ga", "--repeats", "1",
                       "--out", str(out)])
    data = json.loads(out.read_text())  # the run's entry of the results file (_common.write_entry)
    assert (data["benchmark"], data["device_slug"], list(data["configurations"])) == ("overhead", "cpu", ["default"])
    block = data["configurations"]["default"]["models"]["tiny"]
    assert block["partial"] is True
    assert [r["wall_s"] for r in block["runs"]["floor"]] == [1.25] and block["runs"]["floor-train"] == []
    assert block["summary"]["floor"]["wall_s"]["median"] == 1.25
    assert not list(tmp_path.glob("*.partial"))
    from _overhead.report import markdown_table

    assert "| floor | 1.25 |" in markdown_table("tiny", block)
