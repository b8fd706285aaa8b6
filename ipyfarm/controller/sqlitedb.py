"""Task records and their payloads persisted in SQLite (stdlib ``sqlite3``).

Same interface as :class:`~.db.MemoryTaskDB`. The data flow::

    add(rec) ──► live (pending, mutated in place by the state machine) ─┐
    finish(rec) ───────────────────────────────────────────────────────┤
                                                    waiting rows ◄──────┘
                flush(): one transaction, executemany ──► tasks, payloads tables

Pending records stay in memory as the live objects; a finished record waits
(as an object) only until the next flush, which runs when more than
``flush_rows`` rows or ``flush_bytes`` payload bytes wait, or ``flush_interval``
seconds after the oldest waiting row (checked in ``add``/``finish``), and on
``close()``. After that it is read back from disk by ``get``, so memory does not
grow with the number of finished tasks.

A result or request payload is stored (frames packed into one BLOB) when it is at
most ``max_result_bytes``; there is no cap on the total on disk. Times are
stored as wall-clock seconds, so a reopened file reports them correctly. Records
still pending in a file being opened (the previous controller stopped or died
while they ran) are marked as errors, ``ename="ControllerRestarted"``.

To change a record that is already finished (e.g. set ``resubmitted``), call
``finish(rec)`` again: it rewrites the row.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..error import IPyFarmError
from .db import DONE_STATES, PENDING, REQUEST, RESULT, TaskRecord, _set_payload
from .query import select

__all__ = ["SQLiteTaskDB", "TaskDBError", "pack_frames", "unpack_frames"]

SCHEMA_VERSION = 1
_COLUMNS = (
    "seq", "msg_id", "msg_type", "client_ident", "engine_id", "submitted", "label", "status",
    "started", "completed", "received", "result_nbytes", "released", "queue", "engine_uuid",
    "ename", "evalue", "request_nbytes", "resubmitted", "submitted_date",
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY, msg_id TEXT NOT NULL UNIQUE, msg_type TEXT, client_ident BLOB,
    engine_id INTEGER, submitted REAL, label TEXT, status TEXT, started TEXT, completed TEXT,
    received REAL, result_nbytes INTEGER, released INTEGER, queue TEXT, engine_uuid TEXT,
    ename TEXT, evalue TEXT, request_nbytes INTEGER, resubmitted TEXT, submitted_date TEXT
);
CREATE TABLE IF NOT EXISTS payloads (
    msg_id TEXT NOT NULL, kind TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (msg_id, kind)
);
PRAGMA user_version = {SCHEMA_VERSION};
"""
_UPSERT = (
    f"INSERT INTO tasks ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
    "ON CONFLICT(msg_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[2:])
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM tasks"
_DONE_SQL = "status IN ({})".format(", ".join(f"'{s}'" for s in sorted(DONE_STATES)))
_RESTARTED = (
    "the controller stopped while this task was pending and was restarted; the task's "
    "outcome is unknown. Submit it again if you still need its result."
)


class TaskDBError(IPyFarmError):
    """The task database file could not be opened or used."""


# ---------------------------------------------------------------------- payload codec
def pack_frames(frames: Iterable[Any]) -> bytes:
    """Frames (bytes, memoryview, zmq.Frame: anything with the buffer protocol) as one blob."""
    views = [memoryview(f) for f in frames]
    header = struct.pack(f"<I{len(views)}Q", len(views), *(v.nbytes for v in views))
    return b"".join([header, *views])


def unpack_frames(blob: bytes) -> list[bytes]:
    """The frames packed by :func:`pack_frames`."""
    view = memoryview(blob)
    (count,) = struct.unpack_from("<I", view)
    sizes = struct.unpack_from(f"<{count}Q", view, 4)
    pos = 4 + 8 * count
    frames = []
    for size in sizes:
        frames.append(bytes(view[pos : pos + size]))
        pos += size
    if pos != len(view):
        raise ValueError(f"corrupt payload blob: {len(view) - pos} bytes left over")
    return frames


def _iso(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):  # epoch seconds, as the controller keeps them
        return datetime.fromtimestamp(value, timezone.utc).isoformat()
    iso = getattr(value, "isoformat", None)
    return iso() if iso is not None else str(value)


def _open_file(path: Path) -> sqlite3.Connection:
    """Connect, creating the directory 0700 and the file 0600 when they are new."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise TaskDBError(
                f"task database {path} has schema version {version}, this ipyfarm reads "
                f"version {SCHEMA_VERSION}; it was written by another ipyfarm version. "
                "Use another file (--db-file) or move this one away."
            )
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)
    except sqlite3.DatabaseError as e:
        conn.close()
        raise TaskDBError(
            f"cannot open the task database {path}: {e}. Likely the path names a file that "
            "is not an ipyfarm SQLite database (or it is damaged). Choose another file "
            "with --db-file, or move this one away."
        ) from e
    except TaskDBError:
        conn.close()
        raise
    return conn


class SQLiteTaskDB:
    """Task records in a SQLite file; pending ones live in memory until finished."""

    def __init__(
        self,
        path: str | os.PathLike,
        max_result_bytes: int = 8 * 2**20,
        flush_rows: int = 500,
        flush_bytes: int = 32 * 2**20,
        flush_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        clock_offset: float | None = None,
    ):
        self.path = Path(path)
        self.max_result_bytes = max_result_bytes
        self.flush_rows = flush_rows
        self.flush_bytes = flush_bytes
        self.flush_interval = flush_interval
        self._clock = clock
        # wall clock minus monotonic clock: stored times become wall-clock seconds
        self.clock_offset = time.time() - clock() if clock_offset is None else clock_offset
        self._conn: sqlite3.Connection | None = _open_file(self.path)
        self._live: dict[str, TaskRecord] = {}  # added, not finished
        self._waiting: dict[str, TaskRecord] = {}  # rows to write at the next flush
        self._seq: dict[str, int] = {}  # for records live or waiting
        self._dirty: set[tuple[str, str]] = set()  # (msg_id, kind) payloads to write or delete
        self._waiting_bytes = 0
        self._wait_since: float | None = None
        self.restarted = self._mark_restarted()
        last = self._db.execute("SELECT MAX(seq) FROM tasks").fetchone()[0]
        self._next_seq = (last or 0) + 1

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise TaskDBError(f"the task database {self.path} is closed")
        return self._conn

    def _mark_restarted(self) -> int:
        cur = self._db.execute(
            "UPDATE tasks SET status = 'error', ename = 'ControllerRestarted', evalue = ? "
            "WHERE status = ?", (_RESTARTED, PENDING))
        return cur.rowcount

    # ------------------------------------------------------------------ the DB interface
    def add(self, rec: TaskRecord) -> None:
        self._seq[rec.msg_id] = self._next_seq
        self._next_seq += 1
        self._live[rec.msg_id] = rec
        self._wait(rec)

    def finish(self, rec: TaskRecord) -> None:
        """Write ``rec`` (now done); called again later, it rewrites the row."""
        self._live.pop(rec.msg_id, None)
        self._wait(rec)

    def store_result(self, rec: TaskRecord, frames: Any, nbytes: int) -> None:
        rec.result_nbytes = nbytes
        self._store(rec, RESULT, frames, nbytes)

    def store_request(self, rec: TaskRecord, frames: Any, nbytes: int) -> None:
        rec.request_nbytes = nbytes
        self._store(rec, REQUEST, frames, nbytes)

    def get(self, msg_id: str) -> TaskRecord | None:
        rec = self._live.get(msg_id)
        if rec is None:
            rec = self._waiting.get(msg_id)
        if rec is not None:
            return rec
        row = self._db.execute(_SELECT + " WHERE msg_id = ?", (msg_id,)).fetchone()
        if row is None:
            return None
        rec = self._record(row)
        self._load_payloads({msg_id: rec})
        return rec

    def __contains__(self, msg_id: str) -> bool:
        if msg_id in self._live or msg_id in self._waiting:
            return True
        return self._db.execute("SELECT 1 FROM tasks WHERE msg_id = ?", (msg_id,)).fetchone() \
            is not None

    def __len__(self) -> int:
        self.flush()
        return self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]

    def __iter__(self) -> Iterator[TaskRecord]:
        """Every record, oldest first, with its payloads (read in chunks)."""
        for chunk in self._chunks():
            found = {}
            for row in chunk:
                live = self._live.get(row[1])
                if live is not None:
                    yield from self._flush_found(found)
                    yield live
                else:
                    found[row[1]] = self._record(row)
            yield from self._flush_found(found)

    def _flush_found(self, found: dict[str, TaskRecord]) -> Iterator[TaskRecord]:
        if found:
            self._load_payloads(found)
            yield from found.values()
            found.clear()

    def query(self, query: dict, keys: list[str] | None = None) -> list[dict]:
        """Records matching ``query`` (see :mod:`.query`), oldest first, as dicts of ``keys``."""
        return select(self._light_records(), query, keys, self.clock_offset)

    def purge(self, msg_ids: list[str] | None = None, engine_ids: list[int] | None = None) -> int:
        """Forget finished tasks: all of them (``msg_ids=None``), some, or an engine's."""
        self.flush()
        db = self._db
        if msg_ids is None and not engine_ids:
            where, params = _DONE_SQL, []
            wanted: set[str] = set()
            engines: set[int] = set()
        else:
            wanted, engines = set(msg_ids or ()), set(engine_ids or ())
            db.execute("CREATE TEMP TABLE IF NOT EXISTS purge_ids (msg_id TEXT PRIMARY KEY)")
            db.execute("DELETE FROM temp.purge_ids")
            db.executemany("INSERT OR IGNORE INTO temp.purge_ids VALUES (?)",
                           ((m,) for m in wanted))
            marks = ", ".join("?" * len(engines))
            where = f"{_DONE_SQL} AND (msg_id IN (SELECT msg_id FROM temp.purge_ids)" + (
                f" OR engine_id IN ({marks}))" if engines else ")")
            params = list(engines)
        db.execute("BEGIN")
        try:
            db.execute(f"DELETE FROM payloads WHERE msg_id IN "
                       f"(SELECT msg_id FROM tasks WHERE {where})", params)
            count = db.execute(f"DELETE FROM tasks WHERE {where}", params).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # records done but never finish()ed (kept live) were deleted on disk too
        everything = msg_ids is None and not engine_ids
        for msg_id, rec in list(self._live.items()):
            if rec.done and (everything or msg_id in wanted or rec.engine_id in engines):
                del self._live[msg_id]
                self._seq.pop(msg_id, None)
        return count

    # ------------------------------------------------------------------ writing
    def flush(self) -> None:
        """Write every waiting row and payload in one transaction."""
        if not self._waiting and not self._dirty:
            return
        db = self._db
        rows = [self._row(rec) for rec in self._waiting.values()]
        puts, drops = [], []
        for (msg_id, kind) in self._dirty:
            rec = self._waiting.get(msg_id) or self._live.get(msg_id)
            frames = None if rec is None else (
                rec.result_frames if kind == RESULT else rec.request_frames)
            if frames is None:
                drops.append((msg_id, kind))
            else:
                puts.append((msg_id, kind, pack_frames(frames)))
        db.execute("BEGIN")
        try:
            db.executemany(_UPSERT, rows)
            db.executemany("DELETE FROM payloads WHERE msg_id = ? AND kind = ?", drops)
            db.executemany("INSERT OR REPLACE INTO payloads VALUES (?, ?, ?)", puts)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for msg_id in self._waiting:
            if msg_id not in self._live:
                self._seq.pop(msg_id, None)
        self._waiting.clear()
        self._dirty.clear()
        self._waiting_bytes = 0
        self._wait_since = None

    def close(self) -> None:
        """Write everything (pending records as pending) and close the file."""
        if self._conn is None:
            return
        self._waiting.update(self._live)
        self.flush()
        self._conn.close()
        self._conn = None

    def __enter__(self) -> SQLiteTaskDB:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _wait(self, rec: TaskRecord) -> None:
        self._waiting[rec.msg_id] = rec
        if self._wait_since is None:
            self._wait_since = self._clock()
        if (len(self._waiting) > self.flush_rows or self._waiting_bytes > self.flush_bytes
                or self._clock() - self._wait_since >= self.flush_interval):
            self.flush()

    def _store(self, rec: TaskRecord, kind: str, frames: Any, nbytes: int) -> None:
        kept = frames if nbytes <= self.max_result_bytes else None
        _set_payload(rec, kind, kept, released=nbytes > self.max_result_bytes)
        self._dirty.add((rec.msg_id, kind))
        if kept is not None:
            self._waiting_bytes += nbytes
        if rec.msg_id not in self._live:  # already finished: write it again
            self._wait(rec)

    # ------------------------------------------------------------------ reading
    def _row(self, rec: TaskRecord) -> tuple:
        off = self.clock_offset
        return (
            self._seq.get(rec.msg_id), rec.msg_id, rec.msg_type,
            None if rec.client_ident is None else bytes(rec.client_ident), rec.engine_id,
            None if rec.submitted is None else rec.submitted + off, rec.label, rec.status,
            _iso(rec.started), _iso(rec.completed),
            None if rec.received is None else rec.received + off,
            rec.result_nbytes, int(rec.released), rec.queue, rec.engine_uuid, rec.ename,
            rec.evalue, rec.request_nbytes, rec.resubmitted, _iso(rec.submitted_date),
        )

    def _record(self, row: tuple) -> TaskRecord:
        (_, msg_id, msg_type, client_ident, engine_id, submitted, label, status, started,
         completed, received, result_nbytes, released, queue, engine_uuid, ename, evalue,
         request_nbytes, resubmitted, submitted_date) = row
        off = self.clock_offset
        return TaskRecord(
            msg_id=msg_id, msg_type=msg_type, client_ident=client_ident, engine_id=engine_id,
            submitted=None if submitted is None else submitted - off, label=label,
            status=status, started=started, completed=completed,
            received=None if received is None else received - off,
            result_nbytes=result_nbytes or 0, released=bool(released), queue=queue,
            engine_uuid=engine_uuid, ename=ename, evalue=evalue,
            request_nbytes=request_nbytes or 0, resubmitted=resubmitted,
            submitted_date=submitted_date,
        )

    def _load_payloads(self, recs: dict[str, TaskRecord]) -> None:
        marks = ", ".join("?" * len(recs))
        cur = self._db.execute(
            f"SELECT msg_id, kind, data FROM payloads WHERE msg_id IN ({marks})", list(recs))
        for msg_id, kind, data in cur:
            _set_payload(recs[msg_id], kind, unpack_frames(data), recs[msg_id].released)

    def _chunks(self, size: int = 500) -> Iterator[list[tuple]]:
        """Rows oldest first, ``size`` at a time (robust to writes between chunks)."""
        self.flush()
        last = 0
        while True:
            rows = self._db.execute(_SELECT + " WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (last, size)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield rows

    def _light_records(self) -> Iterator[TaskRecord]:
        """Every record without payloads (for queries): the live object where there is one."""
        for chunk in self._chunks():
            for row in chunk:
                live = self._live.get(row[1])
                yield live if live is not None else self._record(row)
