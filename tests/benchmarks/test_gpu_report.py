"""benchmarks/gpu_report.py: the plan's commands exist, and the runner keeps to its budget, kills a
timed-out step with its children, skips what it cannot run and packs what it has after each step."""
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_report  # noqa: E402
from gpu_report import Step, plan, run_report  # noqa: E402


def test_plans_call_existing_scripts_with_flags_they_accept(tmp_path):
    scripts = set()
    for profile in ("lease", "full"):
        for step in plan(profile, tmp_path):
            if step.argv[1] in ("-c", "-m"):
                continue
            script = step.argv[1]
            scripts.add(Path(script).name)
            assert Path(script).is_file(), script
            # argparse checks every option and value (choices, types) before it reaches --help.
            done = subprocess.run([sys.executable, *step.argv[1:], "--help"], capture_output=True, text=True,
                                  cwd=REPO, timeout=120)
            assert done.returncode == 0 and "usage" in done.stdout, (step.name, done.stderr[-2000:])
    assert scripts >= {"overhead.py", "bench_scale.py", "bench_kernels.py", "bench_eigen.py"}


LEASE_ORDER = ["machine", "kernel-tests", "kernels", "native", "gpu-tests", "scale", "overhead", "eigen"]


def test_lease_plan_checks_the_hardware_before_it_measures(tmp_path):
    steps = plan("lease", tmp_path)
    # The kernels (correctness, then speed) and the CUDA tests before the scale solve and the 7B
    # overhead, which builds a 7B model in each of its processes.
    assert [s.name for s in steps] == LEASE_ORDER
    assert [s.name for s in plan("full", tmp_path)][:4] == ["machine", "kernel-tests", "kernels", "native"]
    # Every step's estimate is within its cap, and the steps before the overhead fit the budget.
    assert all(0 < s.estimate <= s.cap_s for s in steps)
    assert sum(s.estimate for s in steps[:LEASE_ORDER.index("overhead")]) <= gpu_report.LEASE_BUDGET_S
    with pytest.raises(ValueError, match="profile"):
        plan("weekend", tmp_path)


def test_dry_run_prints_the_lease_order_and_runs_nothing(tmp_path):
    # As a user runs it: the script alone, no make.
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_report.py"), "--profile", "lease",
                          "--dry-run", "--pack", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "budget 540" in lines[0] and str(tmp_path / "out" / "gpu_report") in lines[0]
    assert [line.split()[0] for line in lines[1:]] == LEASE_ORDER
    assert all(" est " in line and " cap " in line for line in lines[1:])
    assert not (tmp_path / "out").exists()


def test_without_the_library_its_steps_skip_and_the_kernel_steps_run_bare(tmp_path, monkeypatch):
    # A machine with torch and triton only: stand in a module that is missing for transformers/peft.
    monkeypatch.setattr(gpu_report, "LIBRARY", ("no_such_module_xyz",))
    probe = ("import sys; from loradafast import kernels, linalg; "
             "print('library imported:', 'loradafast.api' in sys.modules, 'args:', sys.argv[1:])")
    script = tmp_path / "probe.py"
    script.write_text(probe + "\n")
    steps = [Step("bare-c", _py(probe), 60, bare=True), Step("bare-script", (sys.executable, str(script), "--x", "1"),
                                                               60, bare=True),
             Step("bare-module", (sys.executable, "-m", "pytest", "--version"), 60, bare=True),
             Step("library", _py("print('never')"), 60, needs=gpu_report.LIBRARY)]
    report = tmp_path / "r"
    lines = []
    records = run_report(steps, report, profile="test", budget=None, log=lines.append)
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "skipped: needs no_such_module_xyz"]
    assert "library imported: False" in (report / "bare-c.log").read_text()
    assert "library imported: False args: ['--x', '1']" in (report / "bare-script.log").read_text()
    assert lines[-1].startswith("library: skipped: needs no_such_module_xyz")  # one line says so
    # With the library present the same steps run as written.
    monkeypatch.setattr(gpu_report, "LIBRARY", ("torch",))
    assert gpu_report.command(steps[1]) == steps[1].argv


def test_pack_puts_everything_under_one_folder(tmp_path, monkeypatch):
    seen = {}

    def fake_run_report(steps, report, **kw):
        outs = [a for s in steps for a in s.argv if a.endswith(".json")]
        seen.update(report=report, pack_to=kw["pack_to"], outs=outs)
        report.mkdir(parents=True, exist_ok=True)
        return []

    monkeypatch.setattr(gpu_report, "run_report", fake_run_report)
    gpu_report.main(["--profile", "lease", "--pack", str(tmp_path / "out")])
    assert seen["report"] == tmp_path / "out" / "gpu_report" and seen["pack_to"] == tmp_path / "out"
    assert seen["outs"] and all(Path(o).parent == seen["report"] for o in seen["outs"])


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_runner_budget_timeout_skip_and_pack(tmp_path):
    started, marker = tmp_path / "grandchild_started", tmp_path / "grandchild_survived"
    grandchild = (f"import time, pathlib; pathlib.Path({str(started)!r}).write_text('x'); time.sleep(2.5); "
                  f"pathlib.Path({str(marker)!r}).write_text('x')")
    steps = [
        Step("ok", _py("print('fine')"), 5, what="prints"),
        Step("fails", _py("import sys; print('boom'); sys.exit(3)"), 5),
        Step("hangs", _py(f"import pathlib, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                          f"{grandchild!r}]); time.sleep(60)"), 1.5),
        Step("needs", _py("print('never')"), 30, needs=("no_such_module_xyz",)),
        Step("late", _py("print('never')"), 30),  # 30 s cap, about 6 s left: under MIN_STEP_S
    ]
    report, dest = tmp_path / "report", tmp_path / "out"
    start = time.perf_counter()
    records = run_report(steps, report, profile="test", budget=8.0, pack_to=dest, log=lambda _: None)
    assert time.perf_counter() - start < 8.0
    status = {r["name"]: r["status"] for r in records}
    assert status == {"ok": "ok", "fails": "failed", "hangs": "timed out",
                      "needs": "skipped: needs no_such_module_xyz", "late": "skipped: budget spent"}
    assert [r["rc"] for r in records] == [0, 3, 124, None, None]
    time.sleep(3.0)
    assert started.exists(), "the grandchild never started: the kill was not tested"
    assert not marker.exists(), "the timed-out step's child process outlived it"
    with tarfile.open(dest / "gpu_report.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"gpu_report/ok.log", "gpu_report/fails.log", "gpu_report/steps.json", "gpu_report/summary.md"} <= names
        assert b"boom" in tar.extractfile("gpu_report/fails.log").read()
    summary = (dest / "gpu_report_summary.md").read_text()
    assert all(f"| {name} |" in summary for name in status) and "fine" in summary
    assert sorted(p.name for p in dest.iterdir()) == ["gpu_report.tar.gz", "gpu_report_summary.md"]


def test_a_failed_native_build_is_not_retried_by_later_steps(tmp_path):
    show = _py("import os; print('no-native=' + os.environ.get('LORADAFAST_NO_NATIVE', 'unset') + "
               "' extra=' + os.environ.get('GPU_REPORT_TEST', 'unset'))")
    steps = [Step("before", show, 10), Step("native", _py("import sys; sys.exit(1)"), 10),
             Step("after", show, 10, env=(("GPU_REPORT_TEST", "yes"),))]
    report = tmp_path / "r"
    records = run_report(steps, report, profile="test", budget=None, log=lambda _: None)
    assert [r["status"] for r in records] == ["ok", "failed", "ok"]
    assert "no-native=unset extra=unset" in (report / "before.log").read_text()
    assert "no-native=1 extra=yes" in (report / "after.log").read_text()


def test_steps_selects_a_subset_in_the_profile_order(tmp_path, capsys):
    argv = ["--profile", "lease", "--dry-run", "--report", str(tmp_path / "r")]
    assert gpu_report.main(argv + ["--steps", "eigen,native"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == ["native", "eigen"]
    with pytest.raises(SystemExit):
        gpu_report.main(argv + ["--steps", "native,weekend"])


def test_without_its_step_the_native_build_is_left_out(tmp_path, monkeypatch):
    seen = {}

    def fake_run_report(steps, report, **kw):
        report.mkdir(parents=True, exist_ok=True)
        seen.update(kw)
        return []

    monkeypatch.setattr(gpu_report, "run_report", fake_run_report)
    argv = ["--profile", "lease", "--report", str(tmp_path / "r")]
    gpu_report.main(argv + ["--steps", "kernels,eigen"])
    assert seen["env"] == {"LORADAFAST_NO_NATIVE": "1"}
    gpu_report.main(argv + ["--steps", "native,eigen"])
    assert seen["env"] == {}
