"""What an engine tells the controller about its host: cheap to compute, no subprocesses.

``engine_properties()`` -> ``{hostname, pid, cpu_count, memory_total, gpu_count}``; the
scheduler places tasks on them. GPUs are counted from ``CUDA_VISIBLE_DEVICES`` when set,
else from ``/dev/nvidia<N>`` device files (no ``nvidia-smi`` call: it takes seconds).
"""

from __future__ import annotations

import os
import re
import socket

__all__ = ["engine_properties"]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # CPUs this process may actually use
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _memory_total() -> int:
    """Physical memory in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def _gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if "-1" in ids:  # "-1" hides every device from that point on
            ids = ids[: ids.index("-1")]
        return len(ids)
    try:
        return sum(1 for name in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", name))
    except OSError:
        return 0


def engine_properties() -> dict:
    """The host facts an engine registers with."""
    return {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "cpu_count": _cpu_count(),
        "memory_total": _memory_total(),
        "gpu_count": _gpu_count(),
    }
