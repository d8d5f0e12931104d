"""Every autotune config the Triton kernels keep fits an H100 (sm_90): compiled for sm_90 without a
GPU, through Triton's compile API and ptxas, no config spills registers and none needs more shared
memory than a block may have (227 KB).

The compiles run in a child process without ``TRITON_INTERPRET`` (tests/kernels/sm90_compile.py says
what is compiled and how); they need Triton's CUDA backend with its ptxas and cuobjdump, and are
skipped where those are missing. The first run compiles about a hundred kernels (minutes on two cores);
Triton's cache serves a second run in seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPILE = Path(__file__).resolve().parent / "sm90_compile.py"  # the child process's script
SM90_SHARED_MEMORY = 232448  # bytes a block may opt into on sm_90
KERNELS = {"_kfac_kernel", "_kfac_pair_kernel", "_gradient_kernel"}

pytestmark = pytest.mark.slow


def _missing_backend() -> str | None:
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas

        tools = [get_ptxas(90).path, knobs.nvidia.cuobjdump.path]
    except Exception as exc:  # noqa: BLE001 - any failure means: no CUDA backend here
        return f"Triton's CUDA backend is unavailable: {type(exc).__name__}: {exc}"
    absent = [t for t in tools if not (t and os.access(t, os.X_OK))]
    return f"not found: {absent}" if absent else None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    pytest.importorskip("triton")
    reason = _missing_backend()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("sm90") / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the GPU's configs and tiles
    proc = subprocess.run([sys.executable, str(COMPILE), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text())


def _name(r: dict) -> str:
    c = r["constexprs"]
    return (f"{r['kernel']} {r['operand']} BLOCK {c['BLOCK']} BLOCK_K {c['BLOCK_K']} "
            f"{c.get('DOT_PRECISION')} atomic={c.get('ATOMIC')} warps {r['num_warps']} stages {r['num_stages']}")


def test_every_kept_config_compiles_for_sm90_without_spills(compiled):
    assert {r["kernel"] for r in compiled} == KERNELS
    print(f"\ncompiled {len(compiled)} kernel configs for sm_90: "
          f"{max(r['registers'] for r in compiled)} registers at most, "
          f"{max(r['shared_bytes'] for r in compiled)} bytes of shared memory at most")
    spills = [f"{_name(r)}: {r['stack_bytes']} B stack, {r['local_bytes']} B local" for r in compiled
              if r["stack_bytes"] or r["local_bytes"]]
    assert not spills, "\n".join(spills)
    over = [f"{_name(r)}: {r['shared_bytes']} B" for r in compiled if r["shared_bytes"] > SM90_SHARED_MEMORY]
    assert not over, "\n".join(over)


def test_the_shared_memory_model_bounds_the_compiles(compiled):
    # The pruner decides with the model before anything is compiled: it must never under-count.
    from loradafast.kernels import triton_common

    assert triton_common.SHARED_MEMORY_LIMIT == SM90_SHARED_MEMORY
    under = []
    for r in compiled:
        c = r["constexprs"]
        branches = 2 if r["kernel"] == "_kfac_pair_kernel" else 1
        operand_bytes = 2 if c["DOT_PRECISION"] is None else 4
        model = triton_common.tile_shared_bytes(c["BLOCK"], c["BLOCK_K"], r["num_stages"], operand_bytes, branches)
        if model < r["shared_bytes"]:
            under.append(f"{_name(r)}: model {model} B < compiled {r['shared_bytes']} B")
    assert not under, "\n".join(under)
