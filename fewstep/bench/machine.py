"""What a benchmark ran on: one description of the machine for every benchmark and the demo.

A leaf module: it imports only the standard library and torch (diffusers' version is read
without importing diffusers), so any benchmark, script or the demo can use it without cycles.
"""
from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata

import torch

__all__ = ["machine_info", "machine_line"]


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        return name


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: str | torch.device | None = None) -> dict:
    """The machine as a JSON-able dict: cpu, cores, torch threads, library versions, platform,
    UTC date and time, load average at the call (the machine is shared: read numbers with it),
    and the accelerator's name when ``device`` is a CUDA device."""
    dev = torch.device(device) if device is not None else None
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not available on every platform
        load = None
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"cpu": _cpu_name(), "machine": platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": _version("diffusers"), "python": platform.python_version(),
            "platform": platform.platform(), "date": now.isoformat(timespec="seconds"),
            "day": now.strftime("%Y-%m-%d"), "load_average_at_start": load,
            "device": str(dev) if dev is not None else "cpu",
            "cuda": torch.cuda.get_device_name(dev) if dev is not None and dev.type == "cuda" else None}


def machine_line(info: dict | None = None) -> str:
    """One line for a report: 'x86_64 (CPU name), 2 torch threads, torch 2.x'."""
    m = machine_info() if info is None else info
    where = m["cuda"] or m["cpu"]
    return f"{m['machine']} ({where}), {m['torch_threads']} torch thread(s), torch {m['torch']}"
