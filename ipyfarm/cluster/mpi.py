"""Engines started by ``mpiexec``: one MPI world of ``n`` engines per ``start(n)``.

::

    MPIEngineLauncher.start(4)
      └─ mpiexec -n 4 [switches] python -m ipyfarm.engine --controller-file F --mpi
           ├─ rank 0 ─┐  each rank joins COMM_WORLD (mpi4py), registers with
           ├─ rank 1  │  mpi_rank / mpi_size and asks for engine id == rank
           └─ ...    ─┘

The handle of a world is the pid of its ``mpiexec``. A watcher thread finds the rank
processes (``mpiexec``'s descendants running ``ipyfarm.engine``) so that ``signal`` and
``kill_engine`` reach them, and so that no rank outlives its world: when ``mpiexec`` ends,
ranks still alive are killed and each is reported through ``on_exit(rank_pid, code)``.

A second ``start(n)`` runs a second ``mpiexec``: a separate ``COMM_WORLD`` whose ranks
count from 0 again; their ids are taken, so those engines get the lowest free ids. MPI
cannot lose one rank of a running world: ``mpiexec`` (Open MPI) ends the whole world when
one rank dies, so stopping or killing one engine ends all the engines of its world.

Command lines come from pure functions (:func:`mpiexec_command`,
:func:`mpi_engine_command`, :func:`mpi_flavor`), tested against golden strings.
"""

from __future__ import annotations

import collections
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import psutil

from .base import EngineLauncher
from .launcher import engine_command

__all__ = ["MPIEngineLauncher", "MPIExecNotFound", "mpi_engine_command", "mpi_flavor",
           "mpiexec_command", "physical_cores"]

log = logging.getLogger("ipyfarm.cluster")

#: lines of ``mpiexec``'s output kept per world for error messages
TAIL_LINES = 40


class MPIExecNotFound(FileNotFoundError):
    """No ``mpiexec`` to run; the message says what to install or pass."""


# ---------------------------------------------------------------------- pure builders
def mpi_flavor(version_text: str) -> str:
    """``"openmpi"``, ``"mpich"`` or ``"unknown"`` from ``mpiexec --version``'s output."""
    text = version_text.lower()
    if "open mpi" in text or "openrte" in text or "open-mpi" in text:
        return "openmpi"
    if "hydra" in text or "mpich" in text or "intel(r) mpi" in text:
        return "mpich"
    return "unknown"


def mpi_engine_command(controller_file: str | Path, parent_pid: int | None = None,
                       log_level: str = "WARNING", python: str = sys.executable) -> list[str]:
    """The command each rank runs: an engine that joins the MPI world (``--mpi``)."""
    return engine_command(controller_file, parent_pid, log_level, python) + ["--mpi"]


def mpiexec_command(n: int, engine_cmd: Sequence[str], mpiexec: str = "mpiexec",
                    mpi_args: Sequence[str] = (), as_root: bool = False,
                    oversubscribe: bool = False, bind_to: str | None = "none",
                    flavor: str = "openmpi") -> list[str]:
    """The ``mpiexec`` command line that starts ``n`` ranks of ``engine_cmd``.

    Open MPI's switches are added only for Open MPI (``flavor``): ``--allow-run-as-root``
    when ``as_root`` (it refuses to run as root otherwise), ``--oversubscribe`` (more ranks
    than cores), ``--bind-to`` (``none`` by default: engines are interactive and several
    worlds share the cores). ``mpi_args`` go last, before the program, as given.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"an MPI world needs n >= 1 engines, not {n!r}")
    cmd = [mpiexec, "-n", str(n)]
    if flavor == "openmpi":
        if as_root:
            cmd.append("--allow-run-as-root")
        if oversubscribe:
            cmd.append("--oversubscribe")
        if bind_to:
            cmd += ["--bind-to", bind_to]
    return cmd + list(mpi_args) + list(engine_cmd)


def physical_cores() -> int:
    """Cores as Open MPI counts its default slots (physical cores, not hardware threads)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _as_args(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) for v in value):
        return [str(v) for v in value]
    raise TypeError(f"{name} must be a list of strings or one string of switches, "
                    f"not {value!r}")


# ---------------------------------------------------------------------- the driver
@dataclass
class _World:
    """One ``mpiexec`` and what is known of its ranks."""

    proc: subprocess.Popen
    n: int
    command: list[str]
    ranks: dict[int, psutil.Process] = field(default_factory=dict)  # pid -> rank process
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    stopping: bool = False


class MPIEngineLauncher(EngineLauncher):
    """Engines as the ranks of ``mpiexec`` runs (the ``mpi`` backend).

    Options (``Cluster(engine_options={...})``, ``ipyfarm start --engine-opt KEY=VALUE``):
    ``mpiexec`` (program or path), ``mpi_args`` (extra switches, a list or one string),
    ``oversubscribe`` (None: on when ``n`` exceeds the physical cores), ``bind_to``
    (``"none"``; None leaves Open MPI's default binding), ``python`` (the ranks'
    interpreter), ``watch_parent`` (ranks exit when this process dies; turn off when
    ``mpi_args`` place ranks on other hosts).
    """

    backend = "mpi"

    def __init__(self, controller_file: str | Path, *,
                 on_exit: Callable[[int, int], None] | None = None,
                 log_level: str = "WARNING", log_dir: str | Path | None = None,
                 mpiexec: str = "mpiexec", mpi_args: Any = (),
                 oversubscribe: bool | None = None, bind_to: str | None = "none",
                 python: str = sys.executable, watch_parent: bool = True,
                 poll_interval: float = 0.2, **unknown: Any):
        super().__init__(controller_file, on_exit=on_exit, log_level=log_level,
                         log_dir=log_dir, **unknown)  # unknown options: a clear TypeError
        self.mpiexec = str(mpiexec)
        self.mpi_args = _as_args(mpi_args, "mpi_args")
        if oversubscribe is not None and not isinstance(oversubscribe, bool):
            raise TypeError(f"oversubscribe must be true, false or None (automatic), "
                            f"not {oversubscribe!r}")
        self.oversubscribe = oversubscribe
        self.bind_to = bind_to or None
        self.python = str(python)
        self.watch_parent = bool(watch_parent)
        self.poll_interval = poll_interval
        self.hostname = socket.gethostname()
        self.worlds: dict[int, _World] = {}
        self._flavor: str | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    # ---- start ------------------------------------------------------------------------
    def _mpiexec_path(self) -> str:
        path = shutil.which(self.mpiexec)
        if path is None:
            raise MPIExecNotFound(
                f"cannot start MPI engines: {self.mpiexec!r} was not found (PATH="
                f"{os.environ.get('PATH', '')}). Likely cause: no MPI is installed on this "
                "host. What to do: install one (Debian/Ubuntu: `apt-get install openmpi-bin "
                "libopenmpi-dev`, then `pip install mpi4py`), or pass its path with "
                "engine_options={'mpiexec': '/path/to/mpiexec'} (ipyfarm start: "
                "--engine-opt mpiexec=/path/to/mpiexec).")
        return path

    def flavor(self, path: str) -> str:
        """The MPI behind ``path`` (asked once, through ``mpiexec --version``)."""
        if self._flavor is None:
            try:
                out = subprocess.run([path, "--version"], capture_output=True, text=True,
                                     timeout=30, stdin=subprocess.DEVNULL)
                self._flavor = mpi_flavor(out.stdout + out.stderr)
            except (OSError, subprocess.TimeoutExpired):
                self._flavor = "unknown"
        return self._flavor

    def command(self, n: int) -> list[str]:
        """The full command line ``start(n)`` runs."""
        path = self._mpiexec_path()
        oversubscribe = (n > physical_cores() if self.oversubscribe is None
                         else self.oversubscribe)
        ranks = mpi_engine_command(self.controller_file,
                                   os.getpid() if self.watch_parent else None,
                                   self.log_level, self.python)
        return mpiexec_command(n, ranks, path, self.mpi_args, as_root=os.geteuid() == 0,
                               oversubscribe=oversubscribe, bind_to=self.bind_to,
                               flavor=self.flavor(path))

    def start(self, n: int) -> list[int]:
        """Start one ``mpiexec`` of ``n`` engines; returns ``[its pid]``."""
        cmd = self.command(n)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        world = _World(proc, n, cmd)
        self._start_reader(world)
        with self._lock:
            self._stopping.clear()  # a start after a full stop reports exits again
            self.worlds[proc.pid] = world
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                 name="ipyfarm-mpi-launcher")
                self._watcher.start()
        log.info("started %d MPI engines: %s", n, shlex.join(cmd))
        return [proc.pid]

    def _start_reader(self, world: _World) -> None:
        """Keep the tail of ``mpiexec``'s output (and the whole of it in ``log_dir``)."""
        sink: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            sink = open(self.log_dir / f"mpiexec-{world.proc.pid}.log", "ab")  # noqa: SIM115

        def read() -> None:
            assert world.proc.stdout is not None
            try:
                for line in world.proc.stdout:
                    world.tail.append(line.decode(errors="replace").rstrip())
                    if sink is not None:
                        sink.write(line)
                        sink.flush()
            finally:
                world.proc.stdout.close()
                if sink is not None:
                    sink.close()

        threading.Thread(target=read, name="ipyfarm-mpiexec-output", daemon=True).start()

    # ---- watching ---------------------------------------------------------------------
    @staticmethod
    def _find_ranks(world: _World) -> None:
        """Add ``mpiexec``'s descendants that run an engine to ``world.ranks``."""
        try:
            children = psutil.Process(world.proc.pid).children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:
                if child.pid not in world.ranks and "ipyfarm.engine" in child.cmdline():
                    world.ranks[child.pid] = child
            except psutil.Error:
                continue

    def _watch(self) -> None:
        """Runs while there are worlds: finds their ranks, notices their ends."""
        while True:
            with self._lock:
                worlds = list(self.worlds.values())
                if not worlds:
                    self._watcher = None
                    return
            for world in worlds:
                if world.stopping:
                    continue
                if len(world.ranks) < world.n:
                    self._find_ranks(world)
                if world.proc.poll() is not None:
                    self._world_ended(world)
            time.sleep(self.poll_interval)

    def _world_ended(self, world: _World) -> None:
        """``mpiexec`` exited by itself: end its leftover ranks, report every rank."""
        with self._lock:
            if self.worlds.pop(world.proc.pid, None) is None:
                return  # stop() took it
            code = world.proc.returncode
            self.exited[world.proc.pid] = code
        _end_processes(world, 0.0)
        if code != 0:
            log.warning("mpiexec %d exited with code %d; its last output:\n%s",
                        world.proc.pid, code, "\n".join(world.tail) or "(none)")
        if self.on_exit is not None and not self._stopping.is_set():
            for pid in sorted(world.ranks):
                self.on_exit(pid, code)

    # ---- Popen vocabulary -------------------------------------------------------------
    def poll(self) -> dict[int, int | None]:
        with self._lock:
            return {pid: w.proc.poll() for pid, w in self.worlds.items()}

    def _worlds_of(self, handles: list[int] | None) -> list[_World]:
        """The worlds named by ``handles`` (an ``mpiexec`` pid, or any of its ranks)."""
        with self._lock:
            worlds = list(self.worlds.values())
        if handles is None:
            return worlds
        wanted = set(handles)
        return [w for w in worlds if w.proc.pid in wanted or wanted & w.ranks.keys()]

    def signal(self, sig: int, handles: list[int] | None = None) -> None:
        """Deliver ``sig`` to the ranks (not to ``mpiexec``, which would abort the world
        on SIGINT); ranks not found yet are reached through ``mpiexec``."""
        for world in self._worlds_of(handles):
            self._find_ranks(world)
            if not world.ranks:
                world.proc.send_signal(sig)
            for proc in list(world.ranks.values()):
                try:
                    proc.send_signal(sig)  # psutil checks the pid was not reused
                except psutil.Error:
                    pass

    def kill_engine(self, pid: int, hostname: str) -> bool:
        """SIGKILL one rank (its ``mpiexec`` then ends the rest of that world)."""
        for world in self._worlds_of(None):
            self._find_ranks(world)
        worlds = self._worlds_of([pid])
        if hostname != self.hostname or not worlds or pid not in worlds[0].ranks:
            return False
        try:
            worlds[0].ranks[pid].kill()
        except psutil.Error:
            return False
        return True

    def stop(self, handles: list[int] | None = None, timeout: float = 5.0) -> None:
        """End whole worlds (``handles`` may name ``mpiexec`` or any rank); returns once
        every rank is gone.

        SIGTERM goes to the ranks first (an engine exits cleanly on it, all ranks together,
        so MPI finalises and ``mpiexec`` exits 0 in a fraction of a second); after half of
        ``timeout`` to ``mpiexec`` too (Open MPI passes it on, also to ranks not found
        yet; it takes ~2 s; sent at once when not all ranks were found); after
        ``timeout``, SIGKILL to ranks and ``mpiexec``.
        """
        if handles is None:
            self._stopping.set()
        worlds = self._worlds_of(handles)
        for world in worlds:
            world.stopping = True
            self._find_ranks(world)
        self.signal(signal.SIGTERM, [w.proc.pid for w in worlds])
        for world in worlds:
            if len(world.ranks) < world.n:  # some not found yet (starting): mpiexec finds them
                world.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for world in worlds:
            try:
                world.proc.wait(max(0.0, deadline - timeout / 2 - time.monotonic()))
            except subprocess.TimeoutExpired:
                if world.proc.poll() is None:
                    world.proc.send_signal(signal.SIGTERM)
            try:
                world.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("mpiexec %d did not stop within %g s of SIGTERM; killing it and "
                            "its ranks", world.proc.pid, timeout)
                _end_processes(world, 0.0)
                world.proc.kill()
                world.proc.wait(10)
            _end_processes(world, max(1.0, deadline - time.monotonic()))
            with self._lock:
                mine = self.worlds.pop(world.proc.pid, None) is not None
                self.exited[world.proc.pid] = world.proc.returncode
            if mine and self.on_exit is not None and not self._stopping.is_set():
                for pid in sorted(world.ranks):
                    self.on_exit(pid, world.proc.returncode)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            worlds = list(self.worlds.values())
        ranks = sum(len(w.ranks) for w in worlds)
        return {
            "backend": self.backend,
            "running": ranks,
            "state": f"{len(worlds)} mpiexec, {ranks} ranks",
            "worlds": [{"pid": w.proc.pid, "n": w.n, "ranks": sorted(w.ranks),
                        "command": shlex.join(w.command)} for w in worlds],
        }


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s; the processes still running (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _end_processes(world: _World, grace: float) -> None:
    """Wait up to ``grace`` s for the world's ranks to exit, then SIGKILL what is left."""
    alive = _wait_gone(list(world.ranks.values()), grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue
    left = _wait_gone(alive, 5.0)
    if left:
        log.warning("MPI ranks %s survived SIGKILL", [p.pid for p in left])
