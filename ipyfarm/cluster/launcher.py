"""Local engine processes: start, poll, signal, stop (``Popen``'s vocabulary).

A watcher thread polls the children and reports each exit (with its code) to a
callback, so the controller learns of a dead engine within ``poll_interval``.

With a :class:`RestartPolicy`, an engine that exits *unexpectedly* is replaced by a new
one: not one that ``stop()`` ended, not one that exited with code 0 (a clean
``shutdown_request`` or SIGTERM), and not after the policy's crash-loop limit is hit.
Each decision is appended to ``restart_log``.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from .base import EngineLauncher

__all__ = ["LocalEngineLauncher", "RestartPolicy", "engine_command", "engine_connection_file"]

log = logging.getLogger("ipyfarm.cluster")


class RestartPolicy:
    """Crash-loop limit: at most ``max_restarts`` restarts within any ``window`` seconds.

    Once a restart would exceed it, restarting stops for good (``gave_up`` says why):
    engines that die this often are likely to keep dying. Pure: times come in as
    arguments.
    """

    def __init__(self, max_restarts: int = 3, window: float = 60.0):
        if not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be a count >= 0, not {max_restarts!r}")
        if not window > 0:
            raise ValueError(f"restart_window must be seconds > 0, not {window!r}")
        self.max_restarts = max_restarts
        self.window = window
        self._times: collections.deque[float] = collections.deque()
        self.gave_up: str | None = None

    def allow(self, now: float) -> bool:
        """May an engine that died at ``now`` be restarted? (Counts the restart if so.)"""
        if self.gave_up is not None:
            return False
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            self.gave_up = (f"{len(self._times)} engines were restarted within the last "
                            f"{self.window:g} s (max_restarts={self.max_restarts}): a crash "
                            "loop, so dead engines are no longer restarted")
            return False
        self._times.append(now)
        return True


def engine_command(controller_file: str | Path, parent_pid: int | None = None,
                   log_level: str = "WARNING", python: str = sys.executable,
                   engine_uuid: str | None = None) -> list[str]:
    """The command line that starts one engine for the controller in ``controller_file``."""
    level = {"WARNING": "WARN"}.get(log_level.upper(), log_level.upper())
    cmd = [python, "-m", "ipyfarm.engine", "--controller-file", str(controller_file),
           "--log-level", level]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    if engine_uuid is not None:
        cmd += ["--engine-uuid", engine_uuid]
    return cmd


def engine_connection_file(engine_uuid: str) -> Path:
    """Where a local engine with ``engine_uuid`` writes its connection file."""
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(jupyter_runtime_dir()) / f"ipyfarm-engine-{engine_uuid}.json"


class LocalEngineLauncher(EngineLauncher):
    """Engines as child processes of this process (the ``local`` backend)."""

    backend = "local"

    def __init__(self, controller_file: str | Path, log_dir: str | Path | None = None,
                 on_exit: Callable[[int, int], None] | None = None,
                 poll_interval: float = 0.2, log_level: str = "WARNING",
                 restart: RestartPolicy | None = None):
        super().__init__(controller_file, on_exit=on_exit, log_level=log_level,
                         log_dir=log_dir)
        self.poll_interval = poll_interval
        self.procs: dict[int, subprocess.Popen] = {}
        self.restart = restart
        self._stopped: set[int] = set()  # pids that stop() was asked to end
        self.hostname = socket.gethostname()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._files: dict[int, Path] = {}  # pid -> the engine's connection file

    def start(self, n: int) -> list[int]:
        """Start ``n`` engines; returns their pids."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        pids = []
        for _ in range(n):
            engine_uuid = str(uuid.uuid4())
            cmd = engine_command(self.controller_file, os.getpid(), self.log_level,
                                 engine_uuid=engine_uuid)
            out = subprocess.DEVNULL
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / f"engine-{time.time_ns()}.log", "ab")  # noqa: SIM115
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT if out is not subprocess.DEVNULL
                                    else subprocess.DEVNULL, env=env, start_new_session=True)
            if out is not subprocess.DEVNULL:
                out.close()
            with self._lock:
                stopping = self._stopping.is_set()
                if not stopping:
                    self.procs[proc.pid] = proc
                    self._files[proc.pid] = engine_connection_file(engine_uuid)
            if stopping:  # stop() ran meanwhile (a restart racing the cluster's stop)
                proc.kill()
                proc.wait(5)
                engine_connection_file(engine_uuid).unlink(missing_ok=True)
                continue
            pids.append(proc.pid)
        self._ensure_watcher()
        return pids

    def _ensure_watcher(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, name="ipyfarm-launcher",
                                             daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                procs = list(self.procs.items())
            for pid, proc in procs:
                rc = proc.poll()
                if rc is not None:
                    with self._lock:
                        if self.procs.pop(pid, None) is None:
                            continue  # stop() took it and reported it
                        self.exited[pid] = rc
                    self._remove_file(pid)
                    if self.on_exit is not None and not self._stopping.is_set():
                        self.on_exit(pid, rc)
                    if self.restart is not None and not self._stopping.is_set():
                        self._maybe_restart(pid, rc)
            if not procs and not self.procs:
                time.sleep(self.poll_interval)
                continue
            self._stopping.wait(self.poll_interval)

    def _remove_file(self, pid: int) -> None:
        """An engine that exited cleanly removed its connection file itself; one that was
        killed (SIGKILL, the OOM killer) could not: remove what it left."""
        with self._lock:
            path = self._files.pop(pid, None)
        if path is not None:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("could not remove the connection file %s of engine process "
                            "%d: %s", path, pid, e)

    def _maybe_restart(self, pid: int, returncode: int) -> None:
        with self._lock:
            if pid in self._stopped or returncode == 0:
                return  # stopped on purpose
        assert self.restart is not None
        entry = {"time": time.time(), "pid": pid, "returncode": returncode}
        if self.restart.allow(time.monotonic()):
            new = self.start(1)
            entry.update(action="restarted", new_pid=new[0] if new else None)
            log.warning("engine process %d exited (code %d); started %s in its place",
                        pid, returncode, new)
        else:
            entry.update(action="not restarted", reason=self.restart.gave_up)
            log.warning("engine process %d exited (code %d) and was not restarted: %s",
                        pid, returncode, self.restart.gave_up)
        self.restart_log.append(entry)

    def kill_engine(self, pid: int, hostname: str) -> bool:
        if pid not in self.pids:
            return False
        self.signal(signal.SIGKILL, [pid])
        return True

    def poll(self) -> dict[int, int | None]:
        with self._lock:
            return {pid: p.poll() for pid, p in self.procs.items()}

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return list(self.procs)

    def signal(self, sig: int, pids: list[int] | None = None) -> None:
        for pid in pids if pids is not None else self.pids:
            proc = self.procs.get(pid)
            if proc is not None and proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def stop(self, pids: list[int] | None = None, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; waits for every process."""
        if pids is None:
            self._stopping.set()  # first: no restart starts after the targets are known
        with self._lock:
            targets = list(self.procs) if pids is None else [p for p in pids if p in self.procs]
            self._stopped.update(targets)
        self.signal(signal.SIGTERM, targets)
        deadline = time.monotonic() + timeout
        for pid in targets:
            proc = self.procs.get(pid)
            if proc is None:
                continue
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            with self._lock:
                mine = self.procs.pop(pid, None) is not None  # else the watcher reported it
                self.exited[pid] = proc.returncode
            self._remove_file(pid)
            if mine and self.on_exit is not None and not self._stopping.is_set():
                self.on_exit(pid, proc.returncode)
