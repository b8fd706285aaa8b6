"""Task records, kept in memory with a cap on count and on stored payload bytes.

Payloads (a task's result, and a finished task's request kept for resubmit) are
stored only while they fit: a single payload over ``max_result_bytes`` is never
kept, and the oldest stored payloads are released once the total passes
``max_total_bytes``. Their records stay (status, times, engine); a later
``get_result`` of a released result says so instead of hanging.

The state machine uses a DB through: ``add``, ``get``, ``in``, ``len``, iteration
(oldest first), ``store_result``, ``store_request``, ``finish``, ``purge`` and
``query``. :class:`~.sqlitedb.SQLiteTaskDB` offers the same on disk.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

from .query import select

#: what holding a frame costs beyond its bytes (a bytes object's header and allocator
#: rounding, its slot in the list), and a payload beyond its frames (the list)
FRAME_OVERHEAD = 48
PAYLOAD_OVERHEAD = 64

PENDING = "pending"
DONE_STATES = frozenset({"ok", "error", "aborted"})


@dataclass(slots=True)
class TaskRecord:
    msg_id: str
    msg_type: str
    client_ident: bytes
    engine_id: int | None
    submitted: float
    label: str | None = None
    status: str = PENDING
    started: Any = None
    completed: Any = None
    received: float | None = None
    result_frames: Any = None
    result_nbytes: int = 0
    released: bool = False  # payload dropped to bound memory
    queue: str = "mux"  # "mux": direct to one engine; "task": load-balanced
    engine_uuid: str | None = None
    ename: str | None = None  # the error's name when status == "error"
    evalue: str | None = None
    request_frames: Any = None  # the signed request, kept (within the byte budget) for resubmit
    request_nbytes: int = 0
    resubmitted: str | None = None  # msg_id of the task that reran this one
    submitted_date: float | None = None  # the request header's date, epoch seconds

    @property
    def done(self) -> bool:
        return self.status in DONE_STATES


RESULT = "result"
REQUEST = "request"


def _set_payload(rec: TaskRecord, kind: str, frames: Any, released: bool = False) -> None:
    """Hold ``frames`` as the record's result or request (``released``: dropped for space)."""
    if kind == RESULT:
        rec.result_frames = frames
        rec.released = released
    else:
        rec.request_frames = frames


class MemoryTaskDB:
    """Ordered records (oldest first) with memory bounds.

    Result and request payloads share one byte budget: each is kept only if it
    is at most ``max_result_bytes``, and the oldest kept payloads (of either
    kind) are released once their total passes ``max_total_bytes``. The total
    counts what a payload takes in memory: its bytes, plus ``frame_overhead`` for
    each frame and ``payload_overhead`` for the payload (Python's objects around
    them: for a no-op task's ~1.9 kB of frames, another ~0.7 kB).
    ``clock_offset`` (wall clock minus monotonic clock) lets :meth:`query`
    report ``received`` as a datetime; without it ``received`` is None.
    """

    def __init__(
        self,
        max_records: int = 200_000,
        max_total_bytes: int = 32 * 2**20,
        max_result_bytes: int = 8 * 2**20,
        clock_offset: float | None = None,
        frame_overhead: int = FRAME_OVERHEAD,
        payload_overhead: int = PAYLOAD_OVERHEAD,
    ):
        self.max_records = max_records
        self.max_total_bytes = max_total_bytes
        self.max_result_bytes = max_result_bytes
        self.frame_overhead = frame_overhead
        self.payload_overhead = payload_overhead
        self.clock_offset = clock_offset
        # a plain dict keeps insertion order too, at ~half an OrderedDict's cost an entry
        self._records: dict[str, TaskRecord] = {}
        # (msg_id, RESULT | REQUEST) -> nbytes held, oldest first
        self._stored: OrderedDict[tuple[str, str], int] = OrderedDict()
        self.stored_bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self._records

    def __iter__(self) -> Iterator[TaskRecord]:
        return iter(self._records.values())

    def get(self, msg_id: str) -> TaskRecord | None:
        return self._records.get(msg_id)

    def add(self, rec: TaskRecord) -> None:
        self._records[rec.msg_id] = rec
        if len(self._records) > self.max_records:
            # a tenth at a time: a dict finds its oldest entry by walking past those
            # already removed, so evicting one per task would walk further each time
            over = len(self._records) - self.max_records
            self._evict_oldest_done(max(over, self.max_records // 10))

    def store_result(self, rec: TaskRecord, frames: Any, nbytes: int) -> None:
        """Keep a reply's frames while they fit the budget; else mark it released."""
        rec.result_nbytes = nbytes
        self._keep(rec, RESULT, frames, nbytes)

    def store_request(self, rec: TaskRecord, frames: Any, nbytes: int) -> None:
        """Keep a finished task's request for ``resubmit`` (same byte budget as results)."""
        rec.request_nbytes = nbytes
        self._keep(rec, REQUEST, frames, nbytes)

    def finish(self, rec: TaskRecord) -> None:
        """Called when ``rec`` reaches a done state (a persistent DB writes it then).

        Call it again after changing a finished record (``resubmitted``): a
        persistent DB hands out copies of finished records and rewrites the row.
        """

    def query(self, query: dict, keys: list[str] | None = None) -> list[dict]:
        """Records matching ``query`` (see :mod:`.query`), oldest first, as dicts of ``keys``."""
        return select(self._records.values(), query, keys, self.clock_offset)

    # ------------------------------------------------------------------ payload budget
    def _keep(self, rec: TaskRecord, kind: str, frames: Any, nbytes: int) -> None:
        self._drop((rec.msg_id, kind))
        if nbytes > self.max_result_bytes:
            _set_payload(rec, kind, None, released=True)
            return
        _set_payload(rec, kind, frames)
        cost = nbytes
        if frames is not None:
            cost += self.payload_overhead + self.frame_overhead * len(frames)
        self._stored[(rec.msg_id, kind)] = cost
        self.stored_bytes += cost
        while self.stored_bytes > self.max_total_bytes and self._stored:
            (old_id, old_kind), old_n = self._stored.popitem(last=False)
            self.stored_bytes -= old_n
            old = self._records.get(old_id)
            if old is None and old_id == rec.msg_id:
                old = rec
            if old is not None:
                _set_payload(old, old_kind, None, released=True)

    def _drop(self, key: tuple[str, str]) -> None:
        n = self._stored.pop(key, None)
        if n is not None:
            self.stored_bytes -= n

    def remove(self, msg_id: str) -> None:
        if self._records.pop(msg_id, None) is not None:
            self._drop((msg_id, RESULT))
            self._drop((msg_id, REQUEST))

    def _evict_oldest_done(self, count: int) -> None:
        victims = []
        for msg_id, rec in self._records.items():
            if len(victims) >= count:
                break
            if rec.done:
                victims.append(msg_id)
        for msg_id in victims:
            self.remove(msg_id)

    def purge(self, msg_ids: list[str] | None = None, engine_ids: list[int] | None = None) -> int:
        """Forget finished tasks: all of them (``msg_ids=None``), some, or an engine's."""
        if msg_ids is None and not engine_ids:
            victims = [m for m, r in self._records.items() if r.done]
        else:
            wanted = set(msg_ids or ())
            engines = set(engine_ids or ())
            victims = [
                m
                for m, r in self._records.items()
                if r.done and (m in wanted or r.engine_id in engines)
            ]
        for msg_id in victims:
            self.remove(msg_id)
        if len(victims) > 1000:  # dicts never shrink by themselves: give their tables back
            self._records = dict(self._records)
            self._stored = OrderedDict(self._stored)
        return len(victims)
