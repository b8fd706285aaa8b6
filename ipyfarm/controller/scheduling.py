"""Where a task goes next: the controller state machine's placement and queueing rules.

:class:`~ipyfarm.controller.state.ControllerState` mixes this in (``self`` is the state).
A load-balanced task waits for its dependencies or a fitting engine (``waiting``), then
for an engine with room (``ready``); :meth:`Scheduling._schedule` hands ready tasks to
engines chosen by the cluster's scheme, keeping the set (and, for leastload, the heap) of
engines with room up to date. Direct tasks queue on their engine. Pure like the rest of
the state machine: decisions come out as commands.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any

from . import commands as C
from .dependencies import UNREACHABLE, WAITING
from .engines import EngineState
from .jobs import READY, RUNNING, Job
from .jobs import WAITING as PHASE_WAITING
from .placement import candidates, unreachable_text
from .views import StateFields

__all__ = ["Scheduling", "dep_ids", "remove_engine"]


class Scheduling(StateFields):
    """Placement and queueing rules of the state machine (a mixin)."""

    def _outcome(self, msg_id: str) -> str:
        if msg_id in self.pending:
            return "pending"
        rec = self.db.get(msg_id)
        if rec is None:
            return "failed"  # purged while we waited: treat as not succeeded
        return "ok" if rec.status == "ok" else "failed"

    def _engine_of(self, msg_id: str) -> Any:
        rec = self.db.get(msg_id)
        return None if rec is None else rec.engine_id

    def _consider(self, job: Job, out: list) -> None:
        """Check a balanced job's dependencies and candidates: queue it, park it or fail it."""
        verdicts = []
        if job.after is not None:
            verdicts.append(("after", job.after.evaluate(self._outcome)))
        follow_engines = None
        if job.follow is not None:
            verdict, follow_engines = job.follow.follow_engines(self._outcome, self._engine_of)
            verdicts.append(("follow", verdict))
        for kind, verdict in verdicts:
            if verdict == UNREACHABLE:
                spec = job.after if kind == "after" else job.follow
                self._fail(job, "ImpossibleDependency", unreachable_text(job, kind, spec), out)
                return
        if any(v == WAITING for _, v in verdicts):
            self._park(job)
            return
        if not job.constrained:
            fits: list = self._live
            why = None
        else:
            fits, why = self._candidates(job, follow_engines)
        if fits:
            job.phase = READY
            self.waiting.pop(job.msg_id, None)
            self.ready.append(job)
            return
        if why is None or job.deadline is not None:
            self._park(job)  # no engine yet, or a timeout to wait for one that fits
            return
        self._fail(job, "ImpossibleDependency", f"task {job.msg_id} cannot run: {why}", out)

    def _candidates(self, job: Job, follow_engines: set | None = None
                    ) -> tuple[list[EngineState], str | None]:
        if job.follow is not None and follow_engines is None:
            follow_engines = job.follow.locations(self._outcome, self._engine_of)
        return candidates(job, self._live, follow_engines)

    def _park(self, job: Job) -> None:
        job.phase = PHASE_WAITING
        self.waiting[job.msg_id] = job
        for dep in dep_ids(job):
            if dep in self.pending:
                self._dependents.setdefault(dep, set()).add(job.msg_id)
        if job.deadline is not None and not job.timed:
            job.timed = True
            heapq.heappush(self._deadlines, (job.deadline, job.msg_id))

    def _requeue(self, job: Job) -> None:
        """Back to the front of the queue (a retry or an UnmetDependency)."""
        job.phase = READY
        job.rec.engine_id = None
        self.limits.disarm(job)
        self.ready.appendleft(job)

    def _schedule(self, out: list) -> None:
        """Dispatch ready jobs, oldest first, while engines have room."""
        if not self.ready:
            return
        kept: list[Job] = []
        roomy: list | None = None  # made when a decision needs the list of candidates
        while self.ready:
            if not self._roomy:
                break
            job = self.ready.popleft()
            if self.pending.get(job.msg_id) is not job:
                continue  # finished meanwhile (aborted)
            if self._heaped and not job.constrained and not job.tried:
                eng = self._least_loaded()
                self._dispatch(job, eng, out)
                if roomy is not None and eng.engine_id not in self._roomy:
                    remove_engine(roomy, eng)
                continue
            if roomy is None:
                # in id order, as the schemes expect (ties, seeded random picks)
                if self._roomy_sorted is None:
                    self._roomy_sorted = sorted(self._roomy.values(), key=_engine_id)
                roomy = list(self._roomy_sorted)
            if job.constrained:
                fits, why = self._candidates(job)
                if not fits:
                    if why is None or job.deadline is not None:
                        self._park(job)
                    else:
                        self._fail(job, "ImpossibleDependency",
                                   f"task {job.msg_id} cannot run: {why}", out)
                    continue
                fit_ids = {e.engine_id for e in fits}
                choices = [e for e in roomy if e.engine_id in fit_ids]
                if not choices:
                    kept.append(job)
                    continue
            else:
                choices = roomy
            if job.tried:
                fresh = [e for e in choices if e.engine_id not in job.tried]
                choices = fresh or choices
            # engines are Slot-like (engine_id, load, last_used): no copies per decision
            eng = self.scheme(choices, self.rng)
            self._dispatch(job, eng, out)
            if eng.engine_id not in self._roomy:
                remove_engine(roomy, eng)
        if kept:
            self.ready.extendleft(reversed(kept))

    def _dispatch(self, job: Job, eng: EngineState, out: list) -> None:
        job.phase = RUNNING
        job.attempts += 1
        job.rec.engine_id = eng.engine_id
        job.rec.engine_uuid = eng.uuid
        eng.outstanding[job.msg_id] = job.rec.queue
        self._dispatches += 1
        eng.last_used = self._dispatches
        if self.hwm and len(eng.outstanding) >= self.hwm:
            if self._roomy.pop(eng.engine_id, None) is not None:
                self._roomy_sorted = None
        elif eng.alive:
            self._room(eng)  # its load and last use changed
        if job.time_limit is not None and len(eng.outstanding) == 1:
            self.limits.arm(job, self._now)  # else it starts when the ones ahead finish
        out.append(C.DispatchTask(eng.engine_id, job.msg_id, job.rec.client_ident, job.frames))

    def _room(self, eng: EngineState) -> None:
        """``eng`` has room for a balanced task (again, or with a new load)."""
        if eng.engine_id not in self._roomy:
            self._roomy_sorted = None
        self._roomy[eng.engine_id] = eng
        if self._heaped:
            heap = self._by_load
            if len(heap) > 2 * len(self._roomy) + 1024:  # mostly outgrown entries
                heap[:] = [(e.load, e.last_used, e.engine_id) for e in self._roomy.values()]
                heapq.heapify(heap)
            else:
                heapq.heappush(heap, (len(eng.outstanding), eng.last_used, eng.engine_id))

    def _least_loaded(self) -> EngineState:
        """leastload's pick among the engines with room (there is one)."""
        heap = self._by_load
        while True:
            load, used, engine_id = heap[0]
            eng = self._roomy.get(engine_id)
            if eng is not None and len(eng.outstanding) == load and eng.last_used == used:
                return eng
            heapq.heappop(heap)

    def _arm_next(self, eng: EngineState) -> None:
        """The engine's next task starts running now: start its time-limit clock."""
        head = next(iter(eng.outstanding), None)
        job = self.pending.get(head) if head is not None else None
        if job is not None and job.time_limit is not None and job.limit_stage is None:
            self.limits.arm(job, self._now)

    def _revisit_waiting(self, out: list) -> None:
        """Reconsider parked jobs (engines or properties changed)."""
        for job in list(self.waiting.values()):
            if self.waiting.get(job.msg_id) is job:
                del self.waiting[job.msg_id]
                self._consider(job, out)

    def _revisit_ready(self, out: list) -> None:
        """Fail or park queued jobs that lost every engine they could run on."""
        if not any(j.constrained for j in self.ready):
            return
        queued, self.ready = self.ready, deque()
        for job in queued:
            if job.constrained and self.pending.get(job.msg_id) is job:
                self._consider(job, out)
            else:
                self.ready.append(job)

    def _release_dependents(self, msg_id: str, out: list) -> None:
        for dep_id in self._dependents.pop(msg_id, ()):
            job = self.waiting.pop(dep_id, None)
            if job is not None:
                self._consider(job, out)

    def _expire_deadlines(self, now: float, out: list) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, msg_id = heapq.heappop(self._deadlines)
            job = self.waiting.pop(msg_id, None)
            if job is None:
                continue
            self._fail(job, "DependencyTimeout",
                       f"task {msg_id} waited {job.timeout:g} s for its dependencies (or "
                       "for an engine that fits it) and timed out", out)
        self._schedule(out)

    def next_deadline(self) -> float | None:
        """When the next waiting task times out or a running one reaches a time-limit
        step (for the shell's timer), or None."""
        while self._deadlines and self._deadlines[0][1] not in self.waiting:
            heapq.heappop(self._deadlines)
        wait = self._deadlines[0][0] if self._deadlines else None
        run = self.limits.next_deadline(self.pending.get)
        if wait is None or run is None:
            return run if wait is None else wait
        return min(wait, run)


def _engine_id(eng: EngineState) -> int:
    return eng.engine_id


def remove_engine(engines: list, eng: EngineState) -> None:
    """Remove ``eng`` by identity (list.remove compares every field of each record)."""
    for i, e in enumerate(engines):
        if e is eng:
            del engines[i]
            return


def dep_ids(job: Job) -> set:
    ids: set = set()
    for spec in (job.after, job.follow):
        if spec is not None:
            ids |= spec.ids
    return ids
