"""``Cluster``: a controller plus engines, started and stopped together.

    with ipyfarm.Cluster(n=4) as rc:      # embedded controller + 4 engine kernels
        rc[:].apply_sync(os.getpid)

By default the controller runs on a thread of this process; engines are local
child processes that exit when this process dies, however it dies.

``Cluster(restart_engines=True)`` replaces an engine that dies unexpectedly (crashed,
killed, or killed by the controller for a task past its ``time_limit``), at most
``max_restarts`` times within ``restart_window`` seconds; ``cluster.restart_log`` lists
each decision. Engines ended by ``stop_engines_sync``, the cluster's stop, or a clean
exit (code 0: ``rc.shutdown``, SIGTERM) are not replaced.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

from .. import error
from ..controller import events as E
from ..controller.embedded import EmbeddedController
from .base import EngineLauncher, launcher_class
from .launcher import RestartPolicy

__all__ = ["Cluster"]


class Cluster:
    """A controller and its engines (ipyparallel's ``Cluster`` API)."""

    def __init__(self, n: int | None = None, profile: str | None = None,
                 controller: str = "embedded", engines: str = "local",
                 log_level: str = "WARNING", ip: str = "127.0.0.1",
                 heartbeat_period: float = 1.0, heartbeat_timeout: float = 8.0,
                 engine_timeout: float = 60.0, scheme: str = "leastload", hwm: int = 1,
                 restart_engines: bool = False, max_restarts: int = 3,
                 restart_window: float = 60.0, engine_options: dict | None = None,
                 curve: bool | None = None, max_message_bytes: int | None = None,
                 **kwargs: Any):
        if controller != "embedded":
            raise ValueError(f"controller={controller!r}: only 'embedded' runs in-process; "
                             "use `ipyfarm start` for a standalone controller")
        self.engine_launcher_class = launcher_class(engines)  # unknown names fail here
        self.engine_options = dict(engine_options or {})
        if restart_engines and self.engine_launcher_class.backend != "local":
            raise ValueError("restart_engines=True needs local engines; the "
                             f"{self.engine_launcher_class.backend!r} backend cannot restart "
                             "them (its resource manager owns the processes)")
        self.n = n if n is not None else (os.cpu_count() or 1)
        self.profile = profile or "default"
        self.log_level = log_level
        self.ip = ip
        self.engine_timeout = engine_timeout
        from ..controller.schemes import get_scheme

        get_scheme(scheme)  # an unknown name fails here, not on a background thread
        if not isinstance(hwm, int) or hwm < 0:
            raise ValueError(f"hwm must be 0 (no limit) or a positive int, not {hwm!r}")
        self.scheme = scheme
        self.hwm = hwm
        self.restart_engines = bool(restart_engines)
        RestartPolicy(max_restarts, restart_window)  # bad values fail here
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self._hub_kwargs = {"heartbeat_period": heartbeat_period,
                            "heartbeat_timeout": heartbeat_timeout,
                            "scheme": scheme, "hwm": hwm,
                            # CurveZMQ: None = on iff ip is beyond loopback (ipyfarm.curve)
                            "curve": curve}
        if max_message_bytes is not None:  # per frame and per message; default 4 GiB
            self._hub_kwargs["max_message_bytes"] = max_message_bytes
        self.controller: EmbeddedController | None = None
        self.launcher: EngineLauncher | None = None
        self._clients: list[Any] = []
        self._hostname = socket.gethostname()

    def __repr__(self) -> str:
        state = "running" if self.controller is not None else "stopped"
        engines = len(self.launcher.pids) if self.launcher else 0
        return f"<Cluster(profile={self.profile!r}, n={self.n}): {state}, {engines} engines>"

    # ------------------------------------------------------------------ start
    def start_controller_sync(self) -> None:
        if self.controller is not None:
            return
        ctl = EmbeddedController(self.profile, ip=self.ip, **self._hub_kwargs)
        ctl.start()
        ctl.hub.on_kill = self._kill_engine
        ctl.hub.on_shutdown = self._on_hub_shutdown
        self.controller = ctl
        options = dict(self.engine_options, on_exit=self._engine_exited,
                       log_level=self.log_level)
        if self.restart_engines:
            options["restart"] = RestartPolicy(self.max_restarts, self.restart_window)
        self.launcher = self.engine_launcher_class(ctl.file, **options)
        ctl.hub.launcher_info = self.launcher.describe

    @property
    def restart_log(self) -> list[dict]:
        """Each unexpected engine exit and what was done: ``action`` is ``"restarted"``
        (with ``new_pid``) or ``"not restarted"`` (with the ``reason``)."""
        return list(self.launcher.restart_log) if self.launcher is not None else []

    def _engine_exited(self, pid: int, returncode: int, hostname: str | None = None) -> None:
        """A launcher saw an engine process end (``hostname``: where, if not here)."""
        if self.controller is not None:
            self.controller.hub.post(E.EngineProcessExited(
                time.monotonic(), pid, hostname or self._hostname, returncode))

    def _kill_engine(self, engine_id: int, pid: int) -> None:
        if self.launcher is None or self.controller is None:
            return
        record = self.controller.hub.state.engines.get(engine_id)
        self.launcher.kill_engine(pid, record.hostname if record else self._hostname)

    def _on_hub_shutdown(self) -> None:
        self.stop_cluster_sync()

    def start_engines_sync(self, n: int | None = None) -> list[int]:
        """Start ``n`` more engines (default: the cluster's ``n``); returns their pids."""
        self.start_controller_sync()
        assert self.launcher is not None
        return self.launcher.start(self.n if n is None else n)

    def start_cluster_sync(self, n: int | None = None) -> None:
        self.start_controller_sync()
        self.start_engines_sync(n)

    def connect_client_sync(self, **kwargs: Any) -> Any:
        """A Client connected to this cluster's controller."""
        from ..client.client import Client

        if self.controller is None:
            raise error.NoClusterError("this Cluster is not running; call start_cluster_sync()")
        rc = Client(self.controller.connection_info(), cluster=self, **kwargs)
        self._clients.append(rc)
        return rc

    def start_and_connect_sync(self, n: int | None = None, activate: bool = False) -> Any:
        """Start controller and engines, wait until the engines are ready, return a Client."""
        count = self.n if n is None else n
        try:  # engines that fail to start (ssh: host unreachable) stop the controller too
            self.start_cluster_sync(count)
            rc = self.connect_client_sync()
            self._wait_engines(rc, count)
        except BaseException:
            self.stop_cluster_sync()
            raise
        if activate:
            rc.activate()  # %px on a blocking view of all engines
        return rc

    def _wait_engines(self, rc: Any, n: int) -> None:
        deadline = time.monotonic() + self.engine_timeout
        while len(rc.ids) < n:
            if self.launcher is not None and self.launcher.exited:
                codes = list(self.launcher.exited.values())
                raise error.EngineError(
                    f"{len(self.launcher.exited)} engine(s) exited during start-up (exit codes "
                    f"{codes}). Run `python -m ipyfarm.engine --help` to check the engine can "
                    f"start; set Cluster(log_level='DEBUG') for details.{self._launcher_hint()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise error.TimeoutError(
                    f"only {len(rc.ids)} of {n} engines registered within "
                    f"{self.engine_timeout} s; the machine may be overloaded."
                    f"{self._launcher_hint()}")
            try:
                rc.wait_for_engines(n, timeout=min(left, 0.25))
            except error.TimeoutError:
                pass

    def _launcher_hint(self) -> str:
        """The launcher's advice on engines that do not come (a pending Slurm job...)."""
        hint = self.launcher.describe().get("hint") if self.launcher is not None else None
        return f" {hint}." if hint else ""

    # ------------------------------------------------------------------ stop
    def stop_engines_sync(self, engine_ids: Any = None) -> None:
        """Stop some engines (by engine id) or all of them."""
        if self.launcher is None:
            return
        if engine_ids is None:
            self.launcher.stop()
            return
        ids = [engine_ids] if isinstance(engine_ids, int) else list(engine_ids)
        table = self.controller.hub.state.engines if self.controller else {}
        pids = [table[i].pid for i in ids if i in table]
        self.launcher.stop(pids)

    def stop_controller_sync(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def stop_cluster_sync(self) -> None:
        """Stop engines, clients made by this cluster, and the controller."""
        for rc in self._clients:
            rc.close()
        self._clients.clear()
        self.stop_engines_sync()
        self.stop_controller_sync()

    # ------------------------------------------------------------------ async forms
    async def start_controller(self) -> None:
        await asyncio.to_thread(self.start_controller_sync)

    async def start_engines(self, n: int | None = None) -> list[int]:
        return await asyncio.to_thread(self.start_engines_sync, n)

    async def start_cluster(self, n: int | None = None) -> None:
        await asyncio.to_thread(self.start_cluster_sync, n)

    async def connect_client(self, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self.connect_client_sync, **kwargs)

    async def start_and_connect(self, n: int | None = None, activate: bool = False) -> Any:
        return await asyncio.to_thread(self.start_and_connect_sync, n, activate)

    async def stop_engines(self, engine_ids: Any = None) -> None:
        await asyncio.to_thread(self.stop_engines_sync, engine_ids)

    async def stop_cluster(self) -> None:
        await asyncio.to_thread(self.stop_cluster_sync)

    # ------------------------------------------------------------------ context managers
    def __enter__(self) -> Any:
        return self.start_and_connect_sync()

    def __exit__(self, *exc: Any) -> None:
        self.stop_cluster_sync()

    async def __aenter__(self) -> Any:
        return await self.start_and_connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop_cluster()
