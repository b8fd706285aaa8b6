"""A task the controller holds until its reply is in: what it needs to be (re)placed.

Direct tasks have a fixed engine. Load-balanced ones ("task" queue) move through::

    waiting ──(dependencies met, an engine fits)──► ready ──(a slot frees)──► running
       │                                              ▲                          │
       └─ unreachable / timeout ─► failed             └── retry / UnmetDependency ┘

``waiting`` covers unmet ``after``/``follow`` dependencies and "no live engine fits
yet" (none registered, or a ``placement`` predicate no engine satisfies while the
task has a ``timeout`` to wait). Only waiting tasks time out: a task in ``ready``
just waits its turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .db import TaskRecord
from .dependencies import DepSpec

__all__ = ["Job", "RUNNING", "READY", "WAITING"]

WAITING, READY, RUNNING = "waiting", "ready", "running"


@dataclass(slots=True, eq=False)
class Job:
    rec: TaskRecord
    frames: Any
    nbytes: int = 0
    after: DepSpec | None = None
    follow: DepSpec | None = None
    targets: frozenset | None = None
    placement: Any = None
    retries: int = 0  # reruns left after an exception
    engine_retries: int = 0  # reruns left after its engine died
    deadline: float | None = None
    timeout: float | None = None
    phase: str = WAITING
    tried: set = field(default_factory=set)  # engines it failed on: retry elsewhere
    blacklist: set = field(default_factory=set)  # engines that raised UnmetDependency
    attempts: int = 0
    kills: int = 0  # engines that died while running it
    timed: bool = False  # its deadline is in the controller's timer heap
    time_limit: float | None = None  # seconds it may run (see .limits), None: no limit
    limit_stage: str | None = None  # None | armed | interrupted | killed
    limit_deadline: float | None = None  # when the current stage ends
    limit_started: float | None = None  # when it started running on its engine
    interrupted_at: float | None = None

    @property
    def msg_id(self) -> str:
        return self.rec.msg_id

    @property
    def balanced(self) -> bool:
        return self.rec.queue == "task"

    @property
    def constrained(self) -> bool:
        return bool(self.targets is not None or self.follow is not None
                    or self.placement is not None or self.blacklist)
