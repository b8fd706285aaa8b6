"""A standalone controller process: the hub in the main thread, plus local engines.

``ipyfarm start -n 4`` runs :func:`run_standalone`; SIGTERM or SIGINT (or a
client's ``shutdown(hub=True)``) stops its engines, closes (flushes) the task
database, removes the connection file and exits.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import paths
from ..error import IPyFarmError
from ..cluster.base import launcher_class
from ..cluster.launcher import RestartPolicy
from . import events as E
from .db import MemoryTaskDB
from .hub import Hub
from .sqlitedb import SQLiteTaskDB
from .state import ControllerState

log = logging.getLogger("ipyfarm.controller")


DB_KINDS = ("memory", "sqlite")
DEFAULT_SCHEME = "leastload"
DEFAULT_HWM = 1


def db_path(profile: str = "default") -> Path:
    """Where ``--db sqlite`` keeps the task database of ``profile``."""
    return paths.runtime_dir() / f"ipyfarm-{profile}.sqlite"


def open_db(kind: str = "memory", profile: str = "default",
            db_file: str | os.PathLike | None = None) -> MemoryTaskDB | SQLiteTaskDB:
    """The task database named by ``--db`` / ``--db-file``."""
    offset = time.time() - time.monotonic()
    if kind == "memory" and db_file is None:
        return MemoryTaskDB(clock_offset=offset)
    if kind not in DB_KINDS:
        raise ValueError(f"unknown task database kind {kind!r}; choose one of {DB_KINDS}")
    return SQLiteTaskDB(db_file if db_file is not None else db_path(profile),
                        clock_offset=offset)


def make_state(heartbeat_period: float, heartbeat_timeout: float, db: Any,
               scheme: str = DEFAULT_SCHEME, hwm: int = DEFAULT_HWM) -> ControllerState:
    """A ControllerState with ``scheme``/``hwm`` where this build's state accepts them.

    The signature check lets this run before and after ControllerState gains its
    ``scheme``/``hwm`` parameters; once they have landed it can pass them directly.
    """
    accepted = inspect.signature(ControllerState).parameters
    extra: dict[str, Any] = {}
    for name, value, default in (("scheme", scheme, DEFAULT_SCHEME), ("hwm", hwm, DEFAULT_HWM)):
        if name in accepted:
            extra[name] = value
        elif value != default:
            raise ValueError(
                f"--{name} {value} was given but this controller's state machine has no "
                f"{name!r} option yet; leave --{name} at its default ({default})"
            )
    return ControllerState(heartbeat_period, heartbeat_timeout, db=db, **extra)


def run_standalone(n: int = 0, profile: str = "default", ip: str = "127.0.0.1",
                   log_level: str = "WARNING", heartbeat_period: float = 1.0,
                   heartbeat_timeout: float = 8.0, db: str = "memory",
                   db_file: str | None = None, scheme: str = DEFAULT_SCHEME,
                   hwm: int = DEFAULT_HWM, restart_engines: bool = False,
                   engines: str = "local", engine_options: dict | None = None,
                   curve: bool | None = None) -> int:
    """Serve until stopped; returns the process exit status. ``curve``: CurveZMQ
    encryption (None: on iff ``ip`` is beyond loopback; see ipyfarm.curve)."""
    logging.basicConfig(level=log_level, format="[ipyfarm %(levelname)s] %(message)s")
    file = paths.cluster_file(profile)
    if file.exists():
        old = paths.read_json(file)
        if paths.pid_alive(int(old.get("pid", -1))):
            print(f"ipyfarm: a cluster of profile {profile!r} already runs (pid {old['pid']}). "
                  f"Stop it first with `ipyfarm stop --profile {profile}`.", file=sys.stderr)
            return 1
    try:
        task_db = open_db(db, profile, db_file)
    except (OSError, ValueError, IPyFarmError) as e:
        print(f"ipyfarm: cannot open the task database: {e}", file=sys.stderr)
        return 1
    try:
        try:
            state = make_state(heartbeat_period, heartbeat_timeout, task_db, scheme, hwm)
        except ValueError as e:
            print(f"ipyfarm: {e}", file=sys.stderr)
            return 1
        hub = Hub(ip=ip, heartbeat_period=heartbeat_period,
                  heartbeat_timeout=heartbeat_timeout, state=state, curve=curve)
        return _serve(hub, n, profile, file, log_level, restart_engines, engines,
                      engine_options or {})
    finally:
        task_db_close(task_db)


def task_db_close(db: Any) -> None:
    """Flush and close a persistent task database (the memory one has nothing to do)."""
    close = getattr(db, "close", None)
    if close is not None:
        close()


def _serve(hub: Hub, n: int, profile: str, file: Path, log_level: str,
           restart_engines: bool = False, engines: str = "local",
           engine_options: dict | None = None) -> int:
    info = hub.connection_info()
    info.update(profile=profile, embedded=False, n=n, engines=engines,
                created=datetime.now(timezone.utc).isoformat())
    hostname = socket.gethostname()
    options = dict(engine_options or {})
    if restart_engines:
        options["restart"] = RestartPolicy()
    launcher = launcher_class(engines)(
        file, log_dir=paths.runtime_dir() / f"ipyfarm-{profile}-logs", log_level=log_level,
        on_exit=lambda pid, rc, host=None: hub.post(E.EngineProcessExited(
            time.monotonic(), pid, host or hostname, rc)),  # host: the ssh backend's
        **options)
    paths.write_secure_json(file, info)
    hub.launcher_info = launcher.describe

    def kill(engine_id: int, pid: int) -> None:
        record = hub.state.engines.get(engine_id)
        launcher.kill_engine(pid, record.hostname if record else hostname)

    hub.on_kill = kill
    hub.on_shutdown = hub.stop

    def on_signal(signum: int, frame: Any) -> None:
        hub.stop(timeout=0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if n:
        launcher.start(n)
    try:
        hub.run()
    finally:
        launcher.stop(timeout=3)
        try:
            if paths.read_json(file).get("client") == info["client"]:
                file.unlink()
        except (OSError, ValueError):
            pass
    return 0
