"""Compile every launch the Triton kernels' host functions make, for sm_90, without a GPU.

Run as a script (``python tests/kernels/sm90_compile.py OUT.json``) with ``TRITON_INTERPRET`` unset,
so that the kernel modules take their GPU configs and tiles. Each host function (``kfac_accumulate``
…) is called on small CPU tensors of the widths and dtypes that reach each tile size and dot
precision, with its kernel replaced by a recorder; each recorded launch is then compiled, once per
config the kernel's autotune pruner keeps, through ``triton.compile`` with a CUDA sm_90 target, the
arguments specialised as Triton's launcher would (ints equal to 1 as constants, 16-aligned pointers
and ints as divisible by 16). ptxas runs inside that compile; the registers, the stack frame (where
spills go) and the static shared memory are read from the cubin with cuobjdump, the dynamic shared
memory from the compile's metadata, so a second run served from Triton's cache reads the same.
Writes a JSON list, one record per compile.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = ("cuda", 90, 32)

OPS = {
    "kfac_triton": ("_kfac_kernel", "kfac_accumulate"),
    "kfac_pair_triton": ("_kfac_pair_kernel", "kfac_accumulate_pair"),
    "gradient_triton": ("_gradient_kernel", "gradient_accumulate"),
}
# 16-bit operands (fp16 takes bf16's path: no upcast, no precision, the same configs); fp32: exact
# (`ieee`) and TF32 (torch's float32 matmul precision decides).
OPERANDS = [("bfloat16", "highest"), ("float32", "highest"), ("float32", "high")]


def _calls(torch):
    """(fp32 matmul precision, module, args, kwargs) of host calls that reach every tile size (widths
    below and above 1024), precision and epilogue (split_k 2: atomics), with a token mask (the
    unmasked launch is the same less one load). Meta tensors: the host functions read shapes,
    strides and dtypes only."""
    def empty(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    tokens = 1000
    for dtype_name, fp32_precision in OPERANDS:
        dtype = getattr(torch, dtype_name)
        for width in (512, 4096):
            x, g = empty(tokens, width, dtype=dtype), empty(tokens, width * 3 // 2, dtype=dtype)
            mask = empty(tokens, dtype=torch.bool)
            for split in (1, 2):
                kw = {"split_k": split}
                yield fp32_precision, "kfac_triton", (empty(width, width), x, mask), kw
                yield fp32_precision, "kfac_pair_triton", (empty(width, width), x, empty(g.shape[1], g.shape[1]), g,
                                                           mask), kw
                yield fp32_precision, "gradient_triton", (empty(g.shape[1], width), g, x, mask), kw
    # Activations that are column slices of wider tensors: no 16-byte alignment, odd row strides
    # (CPU tensors: a meta tensor's address is always 0). At 128 x 128 tiles, where registers are tightest.
    for dtype_name, fp32_precision in (("bfloat16", "highest"), ("float32", "high")):
        dtype = getattr(torch, dtype_name)
        x = torch.empty(tokens, 4100, dtype=dtype)[:, 3:4099]
        g = torch.empty(tokens, 6150, dtype=dtype)[:, 5:6149]
        mask, kw = torch.ones(tokens, dtype=torch.bool), {"split_k": 2}
        yield fp32_precision, "kfac_triton", (empty(4096, 4096), x, mask), kw
        yield fp32_precision, "kfac_pair_triton", (empty(4096, 4096), x, empty(6144, 6144), g, mask), kw
        yield fp32_precision, "gradient_triton", (empty(6144, 4096), g, x, mask), kw


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _specialise(fn, values: dict) -> tuple[dict, dict, list]:
    """Signature, constants and the 16-divisible arguments, as Triton's launcher derives them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    signature, constants, divisible = {}, {}, []
    for i, p in enumerate(fn.params):
        value = values[p.name]
        if p.is_constexpr:
            kind, attr = "constexpr", None
        else:
            kind, attr = native_specialize_impl(CUDABackend, value, p.is_const, not p.do_not_specialize,
                                                not p.do_not_specialize_on_alignment)
        signature[p.name] = kind
        if kind == "constexpr":
            constants[p.name] = value
        if attr == "D":
            divisible.append(i)
    return signature, constants, divisible


def jobs() -> list[dict]:
    """Every distinct compile: the recorded launches times the configs each kernel keeps."""
    import torch

    from loradafast.kernels import triton_common

    assert not triton_common.INTERPRET, "run with TRITON_INTERPRET unset"
    seen, out = set(), []
    for precision, module_name, args, kwargs in _calls(torch):
        module = importlib.import_module(f"loradafast.kernels.{module_name}")
        kernel_attr, host = OPS[module_name]
        kernel = getattr(module, kernel_attr)
        recorder = _Recorder()
        setattr(module, kernel_attr, recorder)
        torch.set_float32_matmul_precision(precision)
        try:
            getattr(module, host)(*args, **kwargs)
        finally:
            setattr(module, kernel_attr, kernel)
        (launch_args, launch_kwargs), = recorder.launches
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # the JITFunction under an Autotuner
        bound = dict(zip(fn.arg_names, launch_args))
        bound.update({k: v for k, v in launch_kwargs.items() if k in fn.arg_names})
        if hasattr(kernel, "configs"):  # autotuned: the configs its pruner keeps for this launch
            kept = kernel.early_config_prune(kernel.configs, dict(bound), **bound)
            variants = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in kept]
        else:
            variants = [({}, launch_kwargs["num_warps"], launch_kwargs["num_stages"])]
        for extra, warps, stages in variants:
            values = {**bound, **extra}
            values.update({p.name: p.default for p in fn.params if p.name not in values and p.has_default})
            signature, constants, divisible = _specialise(fn, values)
            job = {"module": module_name, "kernel": kernel_attr, "signature": signature, "constants": constants,
                   "divisible": divisible, "num_warps": warps, "num_stages": stages}
            # One compile per kernel, constants, config and alignment of the pointers and strides:
            # launches that differ only in which counts (tokens, tiles) happen to be multiples of 16
            # compile to near-identical code.
            aligned = [i for i in divisible if fn.arg_names[i].endswith("_ptr") or fn.arg_names[i].startswith("s")]
            key = json.dumps({**job, "divisible": aligned}, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                out.append(job)
    return out


def compile_one(job: dict) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(f"loradafast.kernels.{job['module']}")
    kernel = getattr(module, job["kernel"])
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    attrs = {(i,): [["tt.divisibility", 16]] for i in job["divisible"]}
    source = ASTSource(fn, job["signature"], constexprs=job["constants"], attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget(*TARGET),
                              options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.split("Function", 1)[1]))
    constexprs = {k: v for k, v in job["constants"].items() if k.isupper()}
    return {"kernel": job["kernel"], "constexprs": constexprs, "num_warps": job["num_warps"],
            "num_stages": job["num_stages"], "operand": job["signature"].get("x_ptr"),
            "divisible": len(job["divisible"]),
            "registers": int(found["REG"]), "stack_bytes": int(found["STACK"]), "local_bytes": int(found["LOCAL"]),
            "shared_bytes": int(compiled.metadata.shared) + int(found["SHARED"])}


def main(argv: list[str]) -> int:
    todo = jobs()
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(compile_one, todo))
    Path(argv[0]).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
