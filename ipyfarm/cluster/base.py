"""The engine-launcher interface, and the table of backends.

A launcher starts engines for one controller (whose connection file it is given) and
answers for the processes it started, in ``subprocess.Popen``'s vocabulary:

- ``start(n)``: start ``n`` more engines; returns the handles of what it started (local
  process ids: one per engine for ``local``, one ``mpiexec`` for ``mpi``, one ``ssh`` per
  engine for ``ssh``, one ``sbatch`` job id for ``slurm``);
- ``poll()``: ``{handle: returncode or None}`` of what is still tracked;
- ``wait(timeout)``: True once everything it started has ended;
- ``signal(sig, handles=None)``: deliver a signal (to all, or to some handles);
- ``stop(handles=None, timeout=5)``: end them (politely, then by force); returns when gone;
- ``kill_engine(pid, hostname)``: end one engine process that the controller found stuck
  (a task past its ``time_limit``); False when this launcher cannot reach it;
- ``describe()``: a JSON-able dict for ``ipyfarm list`` and the dashboard (``backend``, and
  whatever the backend knows: job id and state, hosts, the command it ran).

Backends are chosen by name (``Cluster(engines="mpi")``, ``ipyfarm start --engines mpi``);
:func:`launcher_class` imports the module only when a backend is asked for. Each backend
module keeps its command lines and batch scripts in pure functions, tested against golden
strings, apart from the class that runs them.
"""

from __future__ import annotations

import abc
import importlib
from pathlib import Path
from typing import Any, Callable

__all__ = ["BACKENDS", "EngineLauncher", "launcher_class"]

#: backend name -> "module:Class", imported on first use
BACKENDS: dict[str, str] = {
    "local": "ipyfarm.cluster.launcher:LocalEngineLauncher",
    "mpi": "ipyfarm.cluster.mpi:MPIEngineLauncher",
    "ssh": "ipyfarm.cluster.ssh:SSHEngineLauncher",
    "slurm": "ipyfarm.cluster.slurm:SlurmEngineLauncher",
}


class EngineLauncher(abc.ABC):
    """Starts engines for the controller of ``controller_file``; see the module doc."""

    backend: str = "?"

    def __init__(self, controller_file: str | Path, *,
                 on_exit: Callable[[int, int], None] | None = None,
                 log_level: str = "WARNING", log_dir: str | Path | None = None,
                 **options: Any):
        if options:
            raise TypeError(f"the {self.backend!r} engine launcher takes no option(s) "
                            f"{sorted(options)}")
        self.controller_file = str(controller_file)
        self.on_exit = on_exit
        self.log_level = log_level
        self.log_dir = Path(log_dir) if log_dir else None
        #: handle -> return code of what has ended
        self.exited: dict[int, int] = {}
        #: restart decisions (only the local backend restarts engines)
        self.restart_log: list[dict] = []

    @abc.abstractmethod
    def start(self, n: int) -> list[int]: ...

    @abc.abstractmethod
    def poll(self) -> dict[int, int | None]: ...

    @abc.abstractmethod
    def signal(self, sig: int, handles: list[int] | None = None) -> None: ...

    @abc.abstractmethod
    def stop(self, handles: list[int] | None = None, timeout: float = 5.0) -> None: ...

    @property
    def pids(self) -> list[int]:
        """Handles of what is still running (local process ids for the local backend)."""
        return [h for h, rc in self.poll().items() if rc is None]

    def wait(self, timeout: float | None = None) -> bool:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pids:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def kill_engine(self, pid: int, hostname: str) -> bool:
        """End one stuck engine; the default reaches only this host's processes."""
        import os
        import signal
        import socket

        if hostname != socket.gethostname():
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "running": len(self.pids)}


def launcher_class(engines: str | type) -> type:
    """The launcher class for a backend name (or a launcher class, returned as is)."""
    if isinstance(engines, type):
        return engines
    try:
        target = BACKENDS[engines]
    except KeyError:
        raise ValueError(f"engines={engines!r} is not a launcher backend; choose one of "
                         f"{sorted(BACKENDS)}") from None
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"the {engines!r} engine launcher is not available in this "
                         f"installation ({e})") from e
