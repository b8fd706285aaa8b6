"""The controller's pure state machine: ``handle(event) -> list[Command]``.

No sockets, threads or clocks here: every time comes in on the event, every
effect goes out as a command, so each rule is tested by feeding events::

    RegistrationRequested ─► ConnectEngine, ReplyRegistration, NotifyClients (+ dispatches)
    TaskSubmitted         ─► DispatchTask                 (direct, or balanced with a free slot)
                          └► FailTask                     (no such engine, impossible dependency)
                          └► (nothing yet)                (queued: waits for a slot or dependencies)
    ReplyArrived          ─► DeliverResult (+ dispatches of queued work)
                          └► DispatchTask elsewhere       (retry, or UnmetDependency)
    EngineProcessExited / EngineUnregistered / heartbeat silence (TimerFired)
                          ─► FailTask or re-dispatch for each task it held, DisconnectEngine
    TimerFired            ─► FailTask(DependencyTimeout)  (waited past its ``timeout``)
                          └► SendControl(signal_request SIGINT)  (ran past its ``time_limit``)
                          └► KillEngine + FailTask(TaskTimeout)  (did not stop within the grace)

Task states: pending ─► ok | error | aborted. Load-balanced tasks are placed by the
cluster's scheme (:mod:`.schemes`) on engines with fewer than ``hwm`` outstanding tasks
(``hwm=0``: no limit).
"""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter, deque
from typing import Any

from . import commands as C
from . import events as E
from .db import MemoryTaskDB, TaskRecord
from .engines import EngineState, describe_exit
from .jobs import RUNNING, Job
from .limits import INTERRUPTED, KILLED, RunLimits
from .schemes import get_scheme
from .scheduling import Scheduling, dep_ids, remove_engine
from .views import StateViews

UNMET = "UnmetDependency"
#: past this many live engines, the heartbeat period asked of engines (and the timeout
#: they get) grows in proportion to their count, so that together they beat no more
#: often than this many would at the configured period (1,024 engines at 1 s: 4 s)
BEATING_ENGINES = 256
# one string object for each task type, not one per record
_MSG_TYPES = {t: t for t in ("apply_request", "execute_request")}


class ControllerState(Scheduling, StateViews):
    """Engines, tasks and their records; all decisions of the controller."""

    def __init__(
        self,
        heartbeat_period: float = 1.0,
        heartbeat_timeout: float = 8.0,
        db: MemoryTaskDB | None = None,
        scheme: str = "leastload",
        hwm: int = 1,
        seed: int | None = None,
        limit_grace: float = 1.0,
    ):
        """``limit_grace``: the least time a task interrupted for its ``time_limit`` gets
        to stop before its engine is killed (it gets ``max(limit_grace, 0.1*time_limit)``).
        """
        if hwm < 0:
            raise ValueError(f"hwm must be 0 (no limit) or a positive count, not {hwm}")
        self.heartbeat_period = heartbeat_period
        self.heartbeat_timeout = heartbeat_timeout
        self.beating_engines = BEATING_ENGINES
        self.db = db if db is not None else MemoryTaskDB()
        self.scheme_name = scheme
        self.scheme = get_scheme(scheme)
        self.hwm = hwm
        self.poison_kills = 3  # a task that took down this many engines is not rerun
        self.rng = random.Random(seed)
        self.engines: dict[int, EngineState] = {}
        self._by_uuid: dict[str, int] = {}
        self._next_engine_id = 0
        self.clients: dict[bytes, float] = {}
        self.pending: dict[str, Job] = {}  # msg_id -> job, until done
        self.ready: deque[Job] = deque()  # balanced, dependencies met, waiting for a slot
        self.waiting: dict[str, Job] = {}  # balanced, dependencies or a fitting engine unmet
        self._dependents: dict[str, set[str]] = {}  # msg_id -> waiting msg_ids naming it
        self._deadlines: list[tuple[float, str]] = []  # heap of waiting jobs' deadlines
        self.limits = RunLimits(limit_grace)  # running jobs' time-limit deadlines
        self._live: list[EngineState] = []  # alive engines, in id order
        # alive engines with room for another balanced task (fewer than hwm outstanding):
        # kept up to date so a decision does not walk every engine of a large cluster
        self._roomy: dict[int, EngineState] = {}
        self._roomy_sorted: list[EngineState] | None = None  # _roomy in id order, cached
        # leastload (the default) picks from a heap of (load, last_used, engine_id) of the
        # engines with room, O(log n) a decision; entries an engine outgrew are skipped
        self._by_load: list[tuple[int, int, int]] = []
        self._heaped = scheme == "leastload"
        self._idents: dict[bytes, bytes] = {}  # client identities, shared by their records
        self._handlers = {cls: getattr(self, "_on_" + cls.__name__)
                          for cls in vars(E).values()
                          if isinstance(cls, type) and issubclass(cls, E.Event)
                          and hasattr(self, "_on_" + cls.__name__)}
        self._dispatches = 0
        self.finished: Counter = Counter()  # tasks ended, by status, since the start
        self._now = 0.0

    # ------------------------------------------------------------------ dispatch
    def handle(self, event: E.Event) -> list[C.Command]:
        self._now = event.now
        return self._handlers[type(event)](event)

    # ------------------------------------------------------------------ engines
    def _on_RegistrationRequested(self, ev: E.RegistrationRequested) -> list[C.Command]:
        known = self._by_uuid.get(ev.uuid)
        if known is not None and self.engines[known].alive:
            eng = self.engines[known]
            eng.ident = ev.ident
            eng.last_beat = ev.now
            return [C.ReplyRegistration(ev.ident, self._registration_reply(eng))]
        engine_id = self._new_engine_id(ev.info.get("requested_id"))
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
        rss = ev.info.get("rss")  # the engine's memory at registration, until heartbeats
        if isinstance(rss, int) and not isinstance(rss, bool):
            eng.rss = rss
        self.engines[engine_id] = eng
        self._by_uuid[ev.uuid] = engine_id
        bisect.insort(self._live, eng, key=lambda e: e.engine_id)  # kept in id order
        self._room(eng)
        out: list[C.Command] = [
            C.ConnectEngine(engine_id, ev.info),
            C.ReplyRegistration(ev.ident, self._registration_reply(eng)),
            C.NotifyClients(
                "registration_notification", {"engine_id": engine_id, "info": eng.public()}
            ),
        ]
        self._revisit_waiting(out)
        self._schedule(out)
        return out

    def _new_engine_id(self, requested: Any) -> int:
        """``requested`` (an MPI engine's rank) if no engine ever had it, else the lowest
        id never used: ids are never reused, so old task records stay unambiguous."""
        if (isinstance(requested, int) and not isinstance(requested, bool)
                and requested >= 0 and requested not in self.engines):
            return requested
        while self._next_engine_id in self.engines:
            self._next_engine_id += 1
        self._next_engine_id += 1
        return self._next_engine_id - 1

    def _registration_reply(self, eng: EngineState) -> dict:
        eng.beat_factor = eng.limit_factor = factor = self.beat_factor()
        return {
            "status": "ok",
            "engine_id": eng.engine_id,
            "heartbeat_period": self.heartbeat_period * factor,
        }

    def beat_factor(self) -> float:
        """How many times the configured heartbeat period and timeout engines get now:
        1 up to ``beating_engines`` (BEATING_ENGINES) live engines, then in proportion
        to their count (in quarter steps), so that the controller's share of heartbeat
        work stays that of that many engines, however many there are."""
        n, most = len(self._live), self.beating_engines
        return 1.0 if n <= most else math.ceil(4 * n / most) / 4

    def _on_HeartbeatReceived(self, ev: E.HeartbeatReceived) -> list[C.Command]:
        engine_id = self._by_uuid.get(ev.uuid)
        if engine_id is None or not self.engines[engine_id].alive:
            return [C.ReplyHeartbeat(ev.ident, known=False)]
        eng = self.engines[engine_id]
        eng.last_beat = ev.now
        if ev.rss is not None:
            eng.rss = ev.rss
        factor = self.beat_factor()
        if factor != eng.beat_factor:
            # it beats at the old period until this reply reaches it: judged by the
            # longer of the two until then
            eng.limit_factor = max(factor, eng.beat_factor)
            eng.beat_factor = factor
        else:
            eng.limit_factor = factor
        return [C.ReplyHeartbeat(ev.ident, known=True,
                                 period=self.heartbeat_period * factor)]

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
            if eng.alive and silent > self.heartbeat_timeout * eng.limit_factor:
                out += self._lose_engine(
                    eng.engine_id, f"it sent no heartbeat for {silent:.1f} s (hung or unreachable)"
                )
                out.append(C.KillEngine(eng.engine_id, eng.pid))
        self._enforce_limits(ev.now, out)
        self._expire_deadlines(ev.now, out)
        return out

    def _enforce_limits(self, now: float, out: list) -> None:
        """Interrupt tasks past their ``time_limit``; kill engines that did not stop them."""
        for job in self.limits.due(now, self.pending.get):
            eng = self.engines[job.rec.engine_id]
            if job.limit_stage != INTERRUPTED:
                self.limits.interrupted(job, now)
                out.append(C.SendControl(eng.engine_id, "signal_request", {"signum": 2}))
                continue
            job.limit_stage = KILLED
            out.append(C.KillEngine(eng.engine_id, eng.pid))
            out += self._lose_engine(
                eng.engine_id, f"it was killed because task {job.msg_id} ran past its "
                f"time limit of {job.time_limit:g} s and did not stop when interrupted")

    def _timeout_text(self, job: Job, engine_id: int, how: str) -> str:
        started = job.limit_started if job.limit_started is not None else self._now
        at = (job.interrupted_at if job.interrupted_at is not None else self._now) - started
        return (f"task {job.msg_id} ran longer than its time limit of {job.time_limit:g} s on "
                f"engine {engine_id}: it was interrupted (SIGINT) at {at:.1f} s and {how}. "
                "A task over its time limit is not rerun, whatever its retries.")

    def _lose_engine(self, engine_id: int, reason: str) -> list[C.Command]:
        eng = self.engines[engine_id]
        if not eng.alive:
            return []
        eng.alive = False
        eng.lost_reason = reason
        remove_engine(self._live, eng)
        if self._roomy.pop(engine_id, None) is not None:
            self._roomy_sorted = None
        out: list[C.Command] = []
        lost = list(eng.outstanding)
        eng.outstanding.clear()
        for msg_id in lost:
            job = self.pending.get(msg_id)
            if job is None:
                continue
            eng.failed += 1
            if job.limit_stage in (INTERRUPTED, KILLED):
                if job.limit_stage == KILLED:
                    grace = self.limits.grace(job.time_limit or 0.0)
                    how = (f"did not stop within the {grace:g} s grace period, so engine "
                           f"{engine_id} (pid {eng.pid}) was killed; other tasks it held "
                           "follow the rules for an engine that died")
                else:
                    how = f"then engine {engine_id} died ({reason})"
                self._fail(job, "TaskTimeout", self._timeout_text(job, engine_id, how), out)
                continue
            job.kills += 1
            if job.kills >= self.poison_kills:
                self._fail(job, "EngineError",
                           f"task {msg_id} was running on {job.kills} engines that died "
                           f"(the last: engine {engine_id}, {reason}); it is likely what "
                           "kills them, so it is not rerun again whatever its retries.", out)
                continue
            if job.balanced and job.engine_retries > 0:
                job.engine_retries -= 1
                job.tried.add(engine_id)
                self._requeue(job)
                continue
            hint = (" Set retries=1 (or engine_retries=1) on a load-balanced view to rerun "
                    "such tasks elsewhere.") if job.balanced else ""
            self._fail(job, "EngineError",
                       f"engine {engine_id} died while running task {msg_id}: {reason}. "
                       f"The task did not finish; its result is lost.{hint}", out)
        out.append(C.DisconnectEngine(engine_id))
        out.append(
            C.NotifyClients(
                "unregistration_notification", {"engine_id": engine_id, "reason": reason}
            )
        )
        # tasks bound to this engine (targets, follow) may now have nowhere to go
        self._revisit_ready(out)
        self._revisit_waiting(out)
        self._schedule(out)
        return out

    # ------------------------------------------------------------------ clients
    def _on_ClientConnected(self, ev: E.ClientConnected) -> list[C.Command]:
        self.clients[ev.ident] = ev.now
        return []

    def _on_ClientDisconnected(self, ev: E.ClientDisconnected) -> list[C.Command]:
        self.clients.pop(ev.ident, None)
        return []

    # ------------------------------------------------------------------ tasks in
    def _on_TaskSubmitted(self, ev: E.TaskSubmitted) -> list[C.Command]:
        client = self._idents.setdefault(ev.client_ident, ev.client_ident)  # one per client
        self.clients.setdefault(client, ev.now)
        balanced = ev.engine_id is None
        rec = TaskRecord(ev.msg_id, _MSG_TYPES.get(ev.msg_type, ev.msg_type), client,
                         ev.engine_id, ev.now, ev.label,
                         queue="task" if balanced else "mux", submitted_date=ev.date)
        self.db.add(rec)
        if ev.resubmit_of is not None:
            old = self.db.get(ev.resubmit_of)
            if old is not None:
                old.resubmitted = ev.msg_id
                self.db.finish(old)  # a persistent DB writes the link
        retries = max(0, int(ev.retries or 0))
        job = Job(rec, ev.frames, _nbytes(ev.frames), retries=retries,
                  engine_retries=retries if ev.engine_retries is None else ev.engine_retries)
        if ev.time_limit is not None and ev.time_limit > 0:
            job.time_limit = ev.time_limit
        self.pending[ev.msg_id] = job
        out: list[C.Command] = []
        if not balanced:
            eng = self.engines.get(ev.engine_id)  # type: ignore[arg-type]
            if eng is None or not eng.alive:
                if eng is None:
                    why = f"there is no engine {ev.engine_id}; known engines: {self.live_ids()}"
                else:
                    why = f"engine {ev.engine_id} is dead ({eng.lost_reason})"
                self._fail(job, "EngineError", f"task {ev.msg_id} was not run: {why}", out)
                return out
            self._dispatch(job, eng, out)
            return out
        job.after, job.follow = ev.after, ev.follow
        job.targets = frozenset(ev.targets) if ev.targets is not None else None
        job.placement = ev.placement
        if ev.timeout is not None and ev.timeout > 0:
            job.timeout = ev.timeout
            job.deadline = ev.now + ev.timeout
        deps = dep_ids(job) if ev.after is not None or ev.follow is not None else ()
        if ev.msg_id in deps:
            self._fail(job, "InvalidDependency", f"task {ev.msg_id} depends on itself", out)
            return out
        unknown = sorted(m for m in deps if m not in self.pending and m not in self.db)
        if unknown:
            self._fail(job, "InvalidDependency",
                       f"task {ev.msg_id} depends on tasks the controller has no record of: "
                       f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}. They may have "
                       "been purged (purge_results), or belong to another cluster.", out)
            return out
        self._consider(job, out)
        self._schedule(out)
        return out

    # ------------------------------------------------------------------ tasks out
    def _finish(self, job: Job, status: str, out: list) -> None:
        """Book-keeping shared by every way a task ends."""
        rec = job.rec
        self.pending.pop(rec.msg_id, None)
        self.waiting.pop(rec.msg_id, None)
        rec.status = status
        self.finished[status] += 1
        self.db.store_request(rec, job.frames, job.nbytes)
        self.db.finish(rec)
        self._release_dependents(rec.msg_id, out)

    def _fail(self, job: Job, ename: str, evalue: str, out: list,
              status: str = "error") -> None:
        rec = job.rec
        rec.ename, rec.evalue = ename, evalue
        rec.received = self._now
        out.append(C.FailTask(rec.client_ident, rec.msg_id, rec.msg_type, rec.engine_id,
                              ename, evalue, status))
        self._finish(job, status, out)

    def _on_ReplyArrived(self, ev: E.ReplyArrived) -> list[C.Command]:
        job = self.pending.get(ev.msg_id)
        eng = self.engines.get(ev.engine_id)
        if eng is not None and ev.properties is not None:
            eng.info["properties"] = ev.properties
        if job is None or eng is None or ev.msg_id not in eng.outstanding:
            # a reply for a task already failed (engine declared lost) or unknown: drop it
            return []
        del eng.outstanding[ev.msg_id]
        if eng.alive and (self.hwm == 0 or len(eng.outstanding) < self.hwm):
            self._room(eng)
        if eng.outstanding:
            self._arm_next(eng)
        out: list[C.Command] = []
        if job.limit_stage == INTERRUPTED and ev.status == "error":
            # stopped by our interrupt (KeyboardInterrupt, or whatever it raised then)
            job.rec.started, job.rec.completed = ev.started, ev.completed
            self._fail(job, "TaskTimeout", self._timeout_text(
                job, ev.engine_id, f"stopped ({ev.ename or 'error'})"), out)
            eng.failed += 1
            self._schedule(out)
            return out
        if job.balanced and ev.status == "error":
            if ev.ename == UNMET:
                job.blacklist.add(ev.engine_id)
                self._requeue(job)
                self._schedule(out)
                return out
            if job.retries > 0:
                job.retries -= 1
                job.tried.add(ev.engine_id)
                eng.failed += 1
                self._requeue(job)
                self._schedule(out)
                return out
        rec = job.rec
        rec.started = ev.started
        rec.completed = ev.completed
        rec.received = ev.now
        if ev.status == "ok":
            eng.completed += 1
        else:
            eng.failed += 1
            rec.ename, rec.evalue = ev.ename, ev.evalue
        self.db.store_result(rec, ev.frames, ev.nbytes)
        out.append(C.DeliverResult(rec.client_ident, ev.msg_id, ev.frames, ev.decoded))
        self._finish(job, ev.status, out)
        if ev.properties is not None:
            self._revisit_waiting(out)
        self._schedule(out)
        return out

    def _on_AbortRequested(self, ev: E.AbortRequested) -> list[C.Command]:
        out: list[C.Command] = []
        wanted = None if ev.msg_ids is None else set(ev.msg_ids)
        if ev.targets is None:
            # queued balanced work is answered "aborted" here; it never reaches an engine
            for job in [*self.waiting.values(), *self.ready]:
                if self.pending.get(job.msg_id) is job and job.phase != RUNNING and (
                        wanted is None or job.msg_id in wanted):
                    self._fail(job, "TaskAborted", f"task {job.msg_id} was aborted before it "
                               "ran", out, status="aborted")
            self.ready = deque(j for j in self.ready if self.pending.get(j.msg_id) is j)
        targets = ev.targets if ev.targets is not None else self.live_ids()
        for engine_id in targets:
            eng = self.engines.get(engine_id)
            if eng is None or not eng.alive:
                continue
            if wanted is None:
                ids = list(eng.outstanding)
            else:
                ids = [m for m in eng.outstanding if m in wanted]
            if ids:
                out.append(C.SendControl(engine_id, "abort_request", {"msg_ids": ids}))
        return out

    def _on_PurgeRequested(self, ev: E.PurgeRequested) -> list[C.Command]:
        if ev.msg_ids == "all":
            self.db.purge(None, ev.engine_ids or None)
        else:
            self.db.purge(list(ev.msg_ids), ev.engine_ids)
        return []


def _nbytes(frames: Any) -> int:
    return sum(len(f) for f in frames) if frames else 0


__all__ = ["ControllerState", "EngineState", "describe_exit"]
