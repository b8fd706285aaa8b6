"""A standalone controller process: the hub in the main thread, plus local engines.

``ipyfarm start -n 4`` runs :func:`run_standalone`; SIGTERM or SIGINT (or a
client's ``shutdown(hub=True)``) stops its engines, removes the connection file
and exits.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from datetime import datetime, timezone
from typing import Any

from .. import paths
from ..cluster.launcher import LocalEngineLauncher
from . import events as E
from .hub import Hub

log = logging.getLogger("ipyfarm.controller")


def run_standalone(n: int = 0, profile: str = "default", ip: str = "127.0.0.1",
                   log_level: str = "WARNING", heartbeat_period: float = 1.0,
                   heartbeat_timeout: float = 10.0) -> int:
    """Serve until stopped; returns the process exit status."""
    logging.basicConfig(level=log_level, format="[ipyfarm %(levelname)s] %(message)s")
    hub = Hub(ip=ip, heartbeat_period=heartbeat_period, heartbeat_timeout=heartbeat_timeout)
    file = paths.cluster_file(profile)
    if file.exists():
        old = paths.read_json(file)
        if paths.pid_alive(int(old.get("pid", -1))):
            print(f"ipyfarm: a cluster of profile {profile!r} already runs (pid {old['pid']}). "
                  f"Stop it first with `ipyfarm stop --profile {profile}`.", file=sys.stderr)
            return 1
    info = hub.connection_info()
    info.update(profile=profile, embedded=False, n=n,
                created=datetime.now(timezone.utc).isoformat())
    paths.write_secure_json(file, info)
    hostname = socket.gethostname()
    launcher = LocalEngineLauncher(
        file, log_dir=paths.runtime_dir() / f"ipyfarm-{profile}-logs", log_level=log_level,
        on_exit=lambda pid, rc: hub.post(E.EngineProcessExited(time.monotonic(), pid,
                                                               hostname, rc)))

    def kill(engine_id: int, pid: int) -> None:
        if pid in launcher.pids:
            launcher.signal(signal.SIGKILL, [pid])

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
