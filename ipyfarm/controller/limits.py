"""Per-task run-time limits (``time_limit``): a timer heap for the state machine.

A task's clock starts when it *starts running* on its engine: at dispatch when the
engine had nothing else outstanding, else when the task ahead of it on that engine
finished (an engine runs its tasks one after another). Then::

    running ──(time_limit passes)──► interrupted ──(grace passes, no reply)──► killed
                                        │ SIGINT (signal_request)                │ KillEngine
                                        └─ error reply ─► TaskTimeout            └─ TaskTimeout

The heap holds ``(deadline, msg_id)``; entries of tasks that finished, were retried
or re-armed are stale and skipped (a job's ``limit_deadline`` no longer matches).
Pure: no clocks, every time comes in as an argument.
"""

from __future__ import annotations

import heapq
from typing import Callable

from .jobs import Job

__all__ = ["ARMED", "INTERRUPTED", "KILLED", "RunLimits"]

ARMED, INTERRUPTED, KILLED = "armed", "interrupted", "killed"


class RunLimits:
    """Deadlines of running tasks that have a ``time_limit``."""

    def __init__(self, grace: float = 1.0, grace_fraction: float = 0.1):
        if grace < 0 or grace_fraction < 0:
            raise ValueError(f"the time-limit grace must be >= 0, not {grace}, {grace_fraction}")
        self.grace_min = grace
        self.grace_fraction = grace_fraction
        self._heap: list[tuple[float, str]] = []

    def grace(self, time_limit: float) -> float:
        """How long an interrupted task has to stop before its engine is killed."""
        return max(self.grace_min, self.grace_fraction * time_limit)

    def arm(self, job: Job, now: float) -> None:
        """The task started running now: its limit counts from here."""
        assert job.time_limit is not None
        job.limit_started = now
        job.limit_stage = ARMED
        self._push(job, now + job.time_limit)

    def interrupted(self, job: Job, now: float) -> None:
        """The task was sent SIGINT now: it has its grace period to stop."""
        assert job.time_limit is not None
        job.limit_stage = INTERRUPTED
        job.interrupted_at = now
        self._push(job, now + self.grace(job.time_limit))

    @staticmethod
    def disarm(job: Job) -> None:
        """The task left its engine (retried elsewhere): its next run starts a new clock."""
        job.limit_stage = None
        job.limit_deadline = None

    def _push(self, job: Job, deadline: float) -> None:
        job.limit_deadline = deadline
        heapq.heappush(self._heap, (deadline, job.msg_id))

    def due(self, now: float, lookup: Callable[[str], Job | None]) -> list[Job]:
        """Running jobs whose current deadline has passed, earliest first."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, msg_id = heapq.heappop(heap)
            job = lookup(msg_id)
            if job is not None and job.limit_deadline == deadline:
                out.append(job)
        return out

    def next_deadline(self, lookup: Callable[[str], Job | None]) -> float | None:
        heap = self._heap
        while heap:
            deadline, msg_id = heap[0]
            job = lookup(msg_id)
            if job is not None and job.limit_deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def __len__(self) -> int:
        return len(self._heap)
