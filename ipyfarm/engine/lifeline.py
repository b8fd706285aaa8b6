"""Notice when a given process (the engine's parent, the controller host) exits.

On Linux a pidfd makes this instant and free (one blocked thread, no polling); elsewhere
the process is probed once a second. ``on_exit(reason)`` is called once, from the thread.

An engine started over ssh reads the controller's connection info as one line from stdin
(:func:`read_stdin_line`) and then watches stdin (:func:`watch_stdin`): the launcher keeps
the pipe open, so end-of-file means it closed it or its ssh session is gone.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable

__all__ = ["read_stdin_line", "watch_process", "watch_stdin"]


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


#: the longest line :func:`read_stdin_line` accepts (a controller's info is ~1 kB)
MAX_STDIN_LINE = 1 << 20


def read_stdin_line(fd: int = 0) -> str:
    """One line from ``fd``, read unbuffered (nothing past the newline is consumed)."""
    data = bytearray()
    while not data.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            if not data:
                raise ValueError("stdin was closed before the controller info arrived")
            break
        data += byte
        if len(data) > MAX_STDIN_LINE:
            raise ValueError(f"no newline within the first {MAX_STDIN_LINE} bytes of stdin")
    return data.decode()


def watch_stdin(on_eof: Callable[[], None], fd: int = 0) -> None:
    """Start a daemon thread that calls ``on_eof()`` once ``fd`` reaches end-of-file
    (whatever arrives before that is read and dropped)."""

    def run() -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        on_eof()

    threading.Thread(target=run, name="ipyfarm-stdin-watch", daemon=True).start()
