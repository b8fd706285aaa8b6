"""Notice when a given process (the engine's parent, the controller host) exits.

On Linux a pidfd makes this instant and free (one blocked thread, no polling); elsewhere
the process is probed once a second. ``on_exit(reason)`` is called once, from the thread.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable

__all__ = ["watch_process"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _wait_pidfd(pid: int) -> bool:
    """Block until ``pid`` exits; False if pidfds are unavailable here."""
    try:
        fd = os.pidfd_open(pid)  # type: ignore[attr-defined]
    except ProcessLookupError:
        return True  # already gone
    except (AttributeError, OSError):
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll():
            pass
    finally:
        os.close(fd)
    return True


def _wait_probe(pid: int, interval: float) -> None:
    original_ppid = os.getppid()
    watching_parent = original_ppid == pid
    while _alive(pid) and not (watching_parent and os.getppid() != original_ppid):
        time.sleep(interval)


def watch_process(pid: int, on_exit: Callable[[str], None], interval: float = 1.0) -> None:
    """Start a daemon thread that calls ``on_exit`` when process ``pid`` is gone."""

    def run() -> None:
        if not _wait_pidfd(pid):
            _wait_probe(pid, interval)
        on_exit(f"its parent process {pid} exited")

    threading.Thread(target=run, name="ipyfarm-parent-watch", daemon=True).start()
