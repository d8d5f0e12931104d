"""What every benchmark records about the machine it ran on."""
from __future__ import annotations

import platform
import re
from pathlib import Path

import torch


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


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_slug(device: torch.device) -> str:
    """``cpu``, or the GPU's name as a file-name fragment (results/<bench>_<slug>.json)."""
    device = torch.device(device)
    return slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
