"""The benchmark harness shared by every script in benchmarks/ and by the micro-suite in benchmarks/micro/.

* the machine: :func:`device_name`, :func:`device_slug`, :func:`environment` (device, versions,
  date, threads, git state);
* timing: :func:`sync`, :func:`timed` (one synchronised call), :func:`time_calls` /
  :func:`median_time` (warm-up, then repeated calls; CUDA events on a GPU);
* memory: :class:`PeakMemory` (CUDA allocator peak, or the sampled resident set size on CPU);
* isolation: :func:`run_child` (one Python child process per measurement, JSON in and out);
* output: :func:`results_path` and :func:`write_json` (``benchmarks/results/<name>_<device>.json``),
  :func:`write_entry`, :func:`read_entries`, :func:`figure_path` and :func:`config_key` for a
  benchmark run in several configurations.

``benchmarks/results/`` holds one file per benchmark and device.  Every script keeps its own CLI
and JSON layout; a script run in several configurations writes each run's record as one entry of
that file, ``{"benchmark", "device_slug", "configurations": {key: record}}``, under the key its
``--config`` flag names (:func:`write_entry`).  The providers a script compares are a dict
``{name: callable}`` timed side by side with :func:`time_providers`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"


# -- the machine ---------------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_slug(device: torch.device | str) -> str:
    """``cpu``, or the GPU's name as a file-name fragment (results/<bench>_<slug>.json)."""
    device = torch.device(device)
    return slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"


def git_state() -> dict:
    """The commit, whether loradafast/ has uncommitted changes, and a digest of its sources."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None

    status = git("status", "--porcelain", "--", "loradafast")
    digest = hashlib.sha256()
    for path in sorted((REPO / "loradafast").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return {"commit": git("rev-parse", "HEAD"), "loradafast_dirty": bool(status),
            "loradafast_source_sha256": digest.hexdigest()}


def environment(device: torch.device | str) -> dict:
    """What every results file records about where and when it was measured."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
    }


# -- timing --------------------------------------------------------------------------------------

def sync(device: torch.device | str | None = None) -> None:
    """Wait for the queued kernels of a CUDA device (no-op on CPU)."""
    if device is None or torch.device(device).type == "cuda":
        if torch.cuda.is_available():
            torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device | str):
    """``(fn(), seconds)`` for one call, synchronised on CUDA before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def time_calls(fn: Callable, device: torch.device | str, *, warmup: int = 1, min_time: float = 0.2,
               min_reps: int = 3, max_reps: int = 200) -> list[float]:
    """Seconds per call of ``fn``, after ``warmup`` untimed calls (compilation, autotuning,
    cuBLAS heuristics): at least ``min_reps`` calls, more until ``min_time`` has passed.
    On CUDA each call is timed with CUDA events, on CPU with ``perf_counter``."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        if device.type == "cuda":
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn()
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable, device: torch.device | str, **kw) -> float:
    """Median seconds per call (:func:`time_calls`)."""
    return statistics.median(time_calls(fn, device, **kw))


def time_providers(providers: dict[str, Callable], device: torch.device | str, **kw) -> dict[str, float]:
    """``{name: median seconds}`` for each provider, timed one after the other on the same inputs."""
    return {name: median_time(fn, device, **kw) for name, fn in providers.items()}


def tflops(flops: float, seconds: float | None) -> float | None:
    return None if seconds is None else flops / seconds / 1e12


# -- memory --------------------------------------------------------------------------------------

def rss_bytes() -> int | None:
    """Resident set size of this process (Linux), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or sampled RSS on CPU.

    On CPU the resident set size is sampled every ``interval`` seconds by a thread (a spike
    shorter than that can be missed); only meaningful in a process of its own (:func:`run_child`),
    so ``sample_cpu=False`` turns it off.  ``peak_delta`` (bytes) and ``how`` are set on exit."""

    def __init__(self, device: str, sample_cpu: bool = True, interval: float = 0.005):
        self.device, self.sample_cpu, self.interval = str(device), sample_cpu, interval
        self.peak_delta = None
        self.how = None

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.how = "torch.cuda.max_memory_allocated − memory_allocated at start"
        elif self.sample_cpu and rss_bytes() is not None:
            self.base = self.peak = rss_bytes()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
            self.how = f"peak RSS of the child process (sampled every {self.interval * 1e3:.0f} ms) − RSS at start"
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_bytes() or 0)
            self.stop.wait(self.interval)

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_delta = torch.cuda.max_memory_allocated() - self.base
        elif self.how is not None:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, rss_bytes() or 0)
            self.peak_delta = self.peak - self.base
        return False


# -- isolation -----------------------------------------------------------------------------------

def run_child(script: Path | str, spec: dict, workdir: Path, tag: str, *, timeout: float,
              threads: int | None = None) -> dict:
    """Run ``python script --worker SPEC --result RESULT`` in a child process and return the JSON
    it wrote to RESULT; on a timeout, a non-zero exit or a missing result, ``{"ok": False,
    "error": ...}``.  The child sees the repository on ``PYTHONPATH`` and, with ``threads``,
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set before torch is imported."""
    spec_path, result_path = workdir / f"spec_{tag}.json", workdir / f"result_{tag}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", str(spec_path), "--result", str(result_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"child process timed out after {timeout:.0f}s"}
    if proc.returncode != 0 or not result_path.exists():
        return {"ok": False, "error": f"child process exited with {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(result_path.read_text())


# -- output --------------------------------------------------------------------------------------

def results_path(name: str, device: torch.device | str, out: str | Path | None = None) -> Path:
    """``out`` if given, else ``benchmarks/results/<name>_<device-slug>.json``.  ``out`` may not name
    another file directly under ``benchmarks/results/``: it holds one file per benchmark and device,
    and another configuration is another entry of that file (:func:`write_entry`)."""
    path = RESULTS / f"{name}_{device_slug(device)}.json"
    if not out:
        return path
    out = Path(out)
    if out.resolve().parent == RESULTS.resolve() and out.name != path.name:
        raise SystemExit(f"--out {out}: benchmarks/results/ holds one file per benchmark and device, here "
                         f"{path.name}; name the configuration with --config KEY where the script has it")
    return out


ENTRIES = "configurations"  # the key of a results file's entries (write_entry)
_KEY = re.compile(r"[a-z0-9][a-z0-9_]*")


def config_key(text: str) -> str:
    """The ``type`` of a script's ``--config`` flag: an entry's key, checked before the run."""
    if not _KEY.fullmatch(text):
        raise ValueError(f"configuration key {text!r}: lower-case letters, digits and '_' only")
    return text


def read_entries(path: Path | str) -> dict:
    """``{key: record}`` of the results file ``path`` (:func:`write_entry`); ``{}`` where there is no
    file, or where it is a single record of the former layout (which :func:`write_entry` replaces)."""
    path = Path(path)
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data[ENTRIES] if isinstance(data, dict) and isinstance(data.get(ENTRIES), dict) else {}


def write_entry(record: dict, path: Path | str, key: str = "default", *, benchmark: str,
                device: torch.device | str, indent: int = 2, quiet: bool = False) -> Path:
    """Write ``record`` as the entry ``key`` of the results file ``path`` of ``benchmark`` on
    ``device``: the file is read, that entry replaced (or added after the others), the others kept
    as they are, and the whole written aside and renamed (:func:`write_json`).  The file:
    ``{"benchmark": name, "device_slug": slug, "configurations": {key: record, ...}}``; each record
    keeps its own device, versions and date."""
    path, slug_, key = Path(path), device_slug(device), config_key(key)
    entries = {}
    if path.exists():
        data = json.loads(path.read_text())
        if not (isinstance(data, dict) and isinstance(data.get(ENTRIES), dict)):
            print(f"{path}: a single record of the former layout, replaced by a file of configurations")
        elif (data.get("benchmark"), data.get("device_slug")) != (benchmark, slug_):
            raise ValueError(f"{path} holds {data.get('benchmark')!r} on {data.get('device_slug')!r}, "
                             f"not {benchmark!r} on {slug_!r}")
        else:
            entries = data[ENTRIES]
    entries[key] = record
    return write_json({"benchmark": benchmark, "device_slug": slug_, ENTRIES: entries}, path, indent=indent,
                      quiet=quiet)


def figure_path(path: Path | str, key: str = "default", suffix: str = ".png") -> Path:
    """The figure of entry ``key`` of the results file ``path``: ``<stem>.png`` for ``default``,
    ``<stem>_<key>.png`` for another (results/stability_cpu.png, stability_cpu_split_chunks.png)."""
    path = Path(path)
    return path.with_suffix(suffix) if key == "default" else path.with_name(f"{path.stem}_{key}{suffix}")


def write_json(record: dict, path: Path | str, *, indent: int = 2, quiet: bool = False) -> Path:
    """Written aside and renamed, so that a process killed while writing leaves the previous file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=indent, default=str) + "\n")
    partial.replace(path)
    if not quiet:
        print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is not installed
    (plots are optional: every figure they show is in the JSON)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
