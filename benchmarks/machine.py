"""What machine a benchmark ran on, and how busy it was: recorded in every benchmark's JSON."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """CPU, cores, torch threads, versions, time and ``os.getloadavg()`` (1, 5, 15 min) now."""
    return {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def load_line(before: dict) -> str:
    """One line for the printed report: the load average at the start and now."""
    now = [round(v, 2) for v in os.getloadavg()]
    return f"load average (1/5/15 min): {before['load_average']} at start, {now} at end; {before['cpus']} cores"
