"""The controller's pure state machine: ``handle(event) -> list[Command]``.

No sockets, threads or clocks here: every time comes in on the event, every
effect goes out as a command, so each rule is tested by feeding events::

    RegistrationRequested ─► ConnectEngine, ReplyRegistration, NotifyClients
    TaskSubmitted         ─► DispatchTask            (engine known and alive)
                          └► FailTask                (no such engine / engine dead)
    ReplyArrived          ─► DeliverResult
    EngineProcessExited / EngineUnregistered / heartbeat silence (TimerFired)
                          ─► FailTask for each task it held, DisconnectEngine, NotifyClients

Task states: pending ─► ok | error | aborted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import commands as C
from . import events as E
from .db import PENDING, MemoryTaskDB, TaskRecord


@dataclass(slots=True)
class EngineState:
    engine_id: int
    uuid: str
    ident: bytes
    pid: int
    hostname: str
    info: dict
    registered: float
    last_beat: float
    alive: bool = True
    outstanding: dict = field(default_factory=dict)  # msg_id -> None, in submit order
    completed: int = 0
    failed: int = 0
    lost_reason: str = ""

    def public(self) -> dict:
        return {
            "engine_id": self.engine_id,
            "uuid": self.uuid,
            "pid": self.pid,
            "hostname": self.hostname,
            "connection_file": self.info.get("connection_file"),
            "connection_info": self.info.get("connection_info", {}),
            "properties": self.info.get("properties", {}),
        }


def describe_exit(returncode: int) -> str:
    """Human words for a process exit status (negative = killed by a signal)."""
    if returncode < 0:
        import signal as _signal

        try:
            name = _signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (killed: out of memory, or by a user/launcher?)" if returncode == -9 else ""
        return f"exit code {returncode}, {name}{hint}"
    return f"exit code {returncode}"


class ControllerState:
    """Engines, tasks and their records; all decisions of the controller."""

    def __init__(
        self,
        heartbeat_period: float = 1.0,
        heartbeat_timeout: float = 10.0,
        db: MemoryTaskDB | None = None,
    ):
        self.heartbeat_period = heartbeat_period
        self.heartbeat_timeout = heartbeat_timeout
        self.db = db if db is not None else MemoryTaskDB()
        self.engines: dict[int, EngineState] = {}
        self._by_uuid: dict[str, int] = {}
        self._next_engine_id = 0
        self.clients: dict[bytes, float] = {}
        self.pending: dict[str, TaskRecord] = {}  # msg_id -> record, until done

    # ------------------------------------------------------------------ dispatch
    def handle(self, event: E.Event) -> list[C.Command]:
        method = getattr(self, "_on_" + type(event).__name__)
        return method(event)

    # ------------------------------------------------------------------ engines
    def _on_RegistrationRequested(self, ev: E.RegistrationRequested) -> list[C.Command]:
        known = self._by_uuid.get(ev.uuid)
        if known is not None and self.engines[known].alive:
            eng = self.engines[known]
            eng.ident = ev.ident
            eng.last_beat = ev.now
            return [C.ReplyRegistration(ev.ident, self._registration_reply(eng))]
        engine_id = self._next_engine_id
        self._next_engine_id += 1
        eng = EngineState(
            engine_id=engine_id,
            uuid=ev.uuid,
            ident=ev.ident,
            pid=int(ev.info.get("pid", -1)),
            hostname=str(ev.info.get("hostname", "")),
            info=ev.info,
            registered=ev.now,
            last_beat=ev.now,
        )
        self.engines[engine_id] = eng
        self._by_uuid[ev.uuid] = engine_id
        return [
            C.ConnectEngine(engine_id, ev.info),
            C.ReplyRegistration(ev.ident, self._registration_reply(eng)),
            C.NotifyClients(
                "registration_notification", {"engine_id": engine_id, "info": eng.public()}
            ),
        ]

    def _registration_reply(self, eng: EngineState) -> dict:
        return {
            "status": "ok",
            "engine_id": eng.engine_id,
            "heartbeat_period": self.heartbeat_period,
        }

    def _on_HeartbeatReceived(self, ev: E.HeartbeatReceived) -> list[C.Command]:
        engine_id = self._by_uuid.get(ev.uuid)
        if engine_id is None or not self.engines[engine_id].alive:
            return [C.ReplyHeartbeat(ev.ident, known=False)]
        self.engines[engine_id].last_beat = ev.now
        return [C.ReplyHeartbeat(ev.ident, known=True)]

    def _on_EngineUnregistered(self, ev: E.EngineUnregistered) -> list[C.Command]:
        engine_id = self._by_uuid.get(ev.uuid)
        if engine_id is None:
            return []
        return self._lose_engine(engine_id, "it shut down")

    def _on_EngineProcessExited(self, ev: E.EngineProcessExited) -> list[C.Command]:
        for eng in self.engines.values():
            if eng.alive and eng.pid == ev.pid and eng.hostname == ev.hostname:
                return self._lose_engine(
                    eng.engine_id, f"its process exited ({describe_exit(ev.returncode)})"
                )
        return []

    def _on_TimerFired(self, ev: E.TimerFired) -> list[C.Command]:
        out: list[C.Command] = []
        for eng in list(self.engines.values()):
            silent = ev.now - eng.last_beat
            if eng.alive and silent > self.heartbeat_timeout:
                out += self._lose_engine(
                    eng.engine_id, f"it sent no heartbeat for {silent:.1f} s (hung or unreachable)"
                )
                out.append(C.KillEngine(eng.engine_id, eng.pid))
        return out

    def _lose_engine(self, engine_id: int, reason: str) -> list[C.Command]:
        eng = self.engines[engine_id]
        if not eng.alive:
            return []
        eng.alive = False
        eng.lost_reason = reason
        out: list[C.Command] = []
        for msg_id in list(eng.outstanding):
            rec = self.pending.pop(msg_id, None)
            if rec is None:
                continue
            rec.status = "error"
            eng.failed += 1
            out.append(
                C.FailTask(
                    rec.client_ident,
                    msg_id,
                    rec.msg_type,
                    engine_id,
                    "EngineError",
                    f"engine {engine_id} died while running task {msg_id}: {reason}. "
                    "The task did not finish; its result is lost.",
                )
            )
        eng.outstanding.clear()
        out.append(C.DisconnectEngine(engine_id))
        out.append(
            C.NotifyClients(
                "unregistration_notification", {"engine_id": engine_id, "reason": reason}
            )
        )
        return out

    # ------------------------------------------------------------------ clients
    def _on_ClientConnected(self, ev: E.ClientConnected) -> list[C.Command]:
        self.clients[ev.ident] = ev.now
        return []

    def _on_ClientDisconnected(self, ev: E.ClientDisconnected) -> list[C.Command]:
        self.clients.pop(ev.ident, None)
        return []

    # ------------------------------------------------------------------ tasks
    def _on_TaskSubmitted(self, ev: E.TaskSubmitted) -> list[C.Command]:
        self.clients.setdefault(ev.client_ident, ev.now)
        rec = TaskRecord(ev.msg_id, ev.msg_type, ev.client_ident, ev.engine_id, ev.now, ev.label)
        self.db.add(rec)
        eng = self.engines.get(ev.engine_id) if ev.engine_id is not None else None
        if eng is None or not eng.alive:
            rec.status = "error"
            if ev.engine_id is None:
                why = "no engine was named (load-balanced tasks are not supported here)"
            elif eng is None:
                why = f"there is no engine {ev.engine_id}; known engines: {self.live_ids()}"
            else:
                why = f"engine {ev.engine_id} is dead ({eng.lost_reason})"
            return [
                C.FailTask(ev.client_ident, ev.msg_id, ev.msg_type, ev.engine_id,
                           "EngineError", f"task {ev.msg_id} was not run: {why}")
            ]
        self.pending[ev.msg_id] = rec
        eng.outstanding[ev.msg_id] = None
        return [C.DispatchTask(eng.engine_id, ev.msg_id, ev.client_ident, ev.frames)]

    def _on_ReplyArrived(self, ev: E.ReplyArrived) -> list[C.Command]:
        rec = self.pending.pop(ev.msg_id, None)
        if rec is None:
            # a reply for a task already failed (engine declared lost) or unknown: drop it
            return []
        rec.status = ev.status
        rec.started = ev.started
        rec.completed = ev.completed
        rec.received = ev.now
        eng = self.engines.get(ev.engine_id)
        if eng is not None:
            eng.outstanding.pop(ev.msg_id, None)
            if ev.status == "ok":
                eng.completed += 1
            else:
                eng.failed += 1
        self.db.store_result(rec, ev.frames, ev.nbytes)
        return [C.DeliverResult(rec.client_ident, ev.msg_id, ev.frames)]

    def _on_AbortRequested(self, ev: E.AbortRequested) -> list[C.Command]:
        targets = ev.targets if ev.targets is not None else self.live_ids()
        out: list[C.Command] = []
        for engine_id in targets:
            eng = self.engines.get(engine_id)
            if eng is None or not eng.alive:
                continue
            if ev.msg_ids is None:
                ids = list(eng.outstanding)
            else:
                ids = [m for m in ev.msg_ids if m in eng.outstanding]
            if ids:
                out.append(C.SendControl(engine_id, "abort_request", {"msg_ids": ids}))
        return out

    def _on_PurgeRequested(self, ev: E.PurgeRequested) -> list[C.Command]:
        if ev.msg_ids == "all":
            self.db.purge(None, ev.engine_ids or None)
        else:
            self.db.purge(list(ev.msg_ids), ev.engine_ids)
        return []

    # ------------------------------------------------------------------ queries (pure reads)
    def live_ids(self) -> list[int]:
        return [i for i, e in self.engines.items() if e.alive]

    def engine_table(self) -> dict[str, dict]:
        return {str(i): e.public() for i, e in self.engines.items() if e.alive}

    def queue_status(self, targets: list[int] | None = None, verbose: bool = False) -> dict:
        ids = targets if targets is not None else self.live_ids()
        out: dict[Any, Any] = {}
        for engine_id in ids:
            eng = self.engines.get(engine_id)
            if eng is None:
                continue
            queue: Any = list(eng.outstanding) if verbose else len(eng.outstanding)
            completed: Any = eng.completed
            if verbose:
                completed = [
                    r.msg_id for r in self.db if r.engine_id == engine_id and r.done
                ]
            out[engine_id] = {"queue": queue, "completed": completed, "tasks": 0}
        out["unassigned"] = 0
        return out

    def history(self) -> list[str]:
        return [r.msg_id for r in self.db]

    def record(self, msg_id: str) -> TaskRecord | None:
        return self.db.get(msg_id)

    def check_invariants(self) -> None:
        """Raise AssertionError if bookkeeping disagrees (switched on in tests)."""
        for msg_id, rec in self.pending.items():
            assert rec.status == PENDING, (msg_id, rec.status)
            assert rec.engine_id in self.engines, msg_id
            assert msg_id in self.engines[rec.engine_id].outstanding, msg_id
        for eng in self.engines.values():
            for msg_id in eng.outstanding:
                assert msg_id in self.pending, (eng.engine_id, msg_id)
            if not eng.alive:
                assert not eng.outstanding, eng.engine_id
