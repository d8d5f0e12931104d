"""How much memory a device has free: read by the planner (the default budget) and by the solve
(how many same-shaped input groups it stacks into one batch)."""
from __future__ import annotations

import torch


def host_memory() -> tuple[int | None, int | None]:
    """(available, total) bytes of host RAM, or (None, None) where neither psutil nor
    ``/proc/meminfo`` tells."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return None, None


def free_memory(device) -> tuple[int | None, int | None]:
    """(free, total) bytes of ``device``.  On CUDA the allocator's cached but unused blocks count as
    free; on CPU the kernel's ``MemAvailable``; elsewhere (None, None)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total
    if device.type == "cpu":
        return host_memory()
    return None, None
