"""Pure reads of the controller's state: engine tables, queue status, the dashboard's
snapshot, history, records, and the invariants the tests check after every event.

:class:`~ipyfarm.controller.state.ControllerState` mixes this in (``self`` is the state);
kept apart so :mod:`.state` holds only the rules that change it.
"""

from __future__ import annotations

from typing import Any

from .db import PENDING, TaskRecord
from .jobs import RUNNING

__all__ = ["StateFields", "StateViews"]


class StateFields:
    """The attributes of :class:`~ipyfarm.controller.state.ControllerState` that its
    mixins (:class:`StateViews`, :class:`~ipyfarm.controller.scheduling.Scheduling`) use,
    declared once for readers and type checkers."""

    engines: dict
    pending: dict
    ready: Any
    waiting: dict
    db: Any
    hwm: int
    finished: Any
    scheme: Any
    scheme_name: str
    rng: Any
    limits: Any
    _live: list
    _roomy: dict
    _roomy_sorted: list | None
    _heaped: bool
    _by_load: list
    _dependents: dict
    _deadlines: list
    _dispatches: int
    _now: float


class StateViews(StateFields):
    """Read-only views of :class:`~ipyfarm.controller.state.ControllerState` (a mixin)."""

    def live_ids(self) -> list[int]:
        return [e.engine_id for e in self._live]  # sorted, whatever the registration order

    def engine_table(self) -> dict[str, dict]:
        return {str(i): e.public() for i, e in self.engines.items() if e.alive}

    def queue_status(self, targets: list[int] | None = None, verbose: bool = False) -> dict:
        """Per engine: direct tasks queued (``queue``), balanced ones (``tasks``), finished.

        ``unassigned``: balanced tasks not on any engine yet. ``verbose`` lists msg_ids.
        """
        ids = targets if targets is not None else self.live_ids()
        out: dict[Any, Any] = {}
        for engine_id in ids:
            eng = self.engines.get(engine_id)
            if eng is None:
                continue
            mux = [m for m, q in eng.outstanding.items() if q == "mux"]
            tasks = [m for m, q in eng.outstanding.items() if q == "task"]
            if verbose:
                completed: Any = [r.msg_id for r in self.db
                                  if r.engine_id == engine_id and r.done]
                out[engine_id] = {"queue": mux, "completed": completed, "tasks": tasks}
            else:
                out[engine_id] = {"queue": len(mux), "completed": eng.completed,
                                  "tasks": len(tasks)}
        unassigned = [j.msg_id for j in self.ready] + list(self.waiting)
        out["unassigned"] = unassigned if verbose else len(unassigned)
        return out

    def status_snapshot(self) -> dict:
        """What a dashboard shows: engines with their load and counts, task totals.

        ``dispatched`` and ``finished`` only grow: a viewer turns their change between
        two snapshots into a rate.
        """
        engines = []
        for e in self.engines.values():
            state = "dead" if not e.alive else ("busy" if e.outstanding else "idle")
            engines.append({
                "engine_id": e.engine_id, "hostname": e.hostname, "pid": e.pid,
                "state": state, "queue": len(e.outstanding), "completed": e.completed,
                "failed": e.failed, "rss": e.rss, "lost_reason": e.lost_reason})
        running = sum(len(e.outstanding) for e in self._live)
        return {
            "engines": engines,
            "tasks": {"running": running, "queued": len(self.ready),
                      "waiting": len(self.waiting), "ok": self.finished["ok"],
                      "error": self.finished["error"], "aborted": self.finished["aborted"]},
            "dispatched": self._dispatches,
            "finished": sum(self.finished.values()),
            "scheme": self.scheme_name,
            "hwm": self.hwm,
            "now": self._now,
        }

    def history(self) -> list[str]:
        return [r.msg_id for r in self.db]

    def record(self, msg_id: str) -> TaskRecord | None:
        return self.db.get(msg_id)

    def check_invariants(self) -> None:
        """Raise AssertionError if bookkeeping disagrees (switched on in tests)."""
        running = {}
        for eng in self.engines.values():
            for msg_id in eng.outstanding:
                assert msg_id in self.pending, (eng.engine_id, msg_id)
                running[msg_id] = eng.engine_id
            if not eng.alive:
                assert not eng.outstanding, eng.engine_id
        roomy = {e.engine_id for e in self._live if not self.hwm or e.load < self.hwm}
        assert set(self._roomy) == roomy, (sorted(self._roomy), sorted(roomy))
        if self._roomy_sorted is not None:
            assert [e.engine_id for e in self._roomy_sorted] == sorted(roomy)
        if self._heaped:
            entries = set(self._by_load)
            for e in self._roomy.values():
                assert (e.load, e.last_used, e.engine_id) in entries, e.engine_id
        queued = {j.msg_id for j in self.ready}
        for msg_id, job in self.pending.items():
            assert job.rec.status == PENDING, (msg_id, job.rec.status)
            where = [msg_id in running, msg_id in queued, msg_id in self.waiting]
            assert sum(where) == 1, (msg_id, job.phase, where)
            if job.phase == RUNNING:
                assert running[msg_id] == job.rec.engine_id, msg_id
        for job in self.ready:
            assert self.pending.get(job.msg_id) is job, job.msg_id
        for msg_id, job in self.pending.items():
            if job.limit_stage is not None:  # only an engine's running task is on the clock
                assert job.phase == RUNNING, (msg_id, job.phase, job.limit_stage)
                eng = self.engines[job.rec.engine_id]
                assert next(iter(eng.outstanding)) == msg_id, (msg_id, job.limit_stage)
