"""Task-record queries in ipyparallel's style, matched in pure Python.

A query is a dict from record key to a condition::

    {"status": "ok"}                                  # equality
    {"engine_id": {"$in": [0, 1]}}                    # operator dicts
    {"completed": {"$gte": t0, "$lt": t1}}            # several operators: all must hold
    {"label": {"$glob": "fit-*"}}                     # fnmatch pattern (case-sensitive)

Records are matched in their queryable form, :func:`record_dict` (dates as
timezone-aware datetimes). Comparisons that cannot be made (``None < 3``, a
string against a number) do not match instead of raising; a naive datetime in a
query means local time, as :meth:`datetime.astimezone` reads it.

Pure: no sqlite, zmq or clock in here.
"""

from __future__ import annotations

import fnmatch
import operator
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

__all__ = [
    "OPERATORS",
    "RECORD_KEYS",
    "compile_query",
    "matches",
    "record_dict",
    "select",
    "to_datetime",
]

RECORD_KEYS = (
    "msg_id",
    "msg_type",
    "queue",
    "status",
    "engine_id",
    "engine_uuid",
    "label",
    "submitted",
    "started",
    "completed",
    "received",
    "client_uuid",
    "ename",
    "evalue",
    "resubmitted",
    "result_nbytes",
)
_KEY_SET = frozenset(RECORD_KEYS)


def _normal(value: Any) -> Any:
    """Datetimes made comparable: naive ones read as local time."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.astimezone()
    return value


def _ordered(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    def compare(value: Any, arg: Any) -> bool:
        if value is None or arg is None:
            return False
        try:
            return bool(op(_normal(value), _normal(arg)))
        except TypeError:  # incomparable types simply do not match
            return False

    return compare


def _eq(value: Any, arg: Any) -> bool:
    return bool(_normal(value) == _normal(arg))


def _in(value: Any, arg: Any) -> bool:
    value = _normal(value)
    return any(value == _normal(x) for x in arg)


def _glob(value: Any, arg: Any) -> bool:
    return isinstance(value, str) and fnmatch.fnmatchcase(value, arg)


OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "$lt": _ordered(operator.lt),
    "$gt": _ordered(operator.gt),
    "$lte": _ordered(operator.le),
    "$gte": _ordered(operator.ge),
    "$eq": _eq,
    "$ne": lambda value, arg: not _eq(value, arg),
    "$in": _in,
    "$nin": lambda value, arg: not _in(value, arg),
    "$glob": _glob,
}


def _check_key(key: Any) -> None:
    if key not in _KEY_SET:
        raise KeyError(
            f"task records have no key {key!r}; valid keys: {', '.join(RECORD_KEYS)}"
        )


_DATE_KEYS = frozenset({"submitted", "started", "completed", "received"})


def _as_date(value: Any) -> Any:
    """A query's date argument that came over JSON (an ISO string) as a datetime."""
    if isinstance(value, str):
        return to_datetime(value) or value
    if isinstance(value, list):
        return [_as_date(v) for v in value]
    return value


def _condition(key: str, cond: Any) -> list[tuple[Callable[[Any, Any], bool], Any]]:
    """``cond`` as a list of (test, argument) pairs, validated."""
    if key in _DATE_KEYS:
        if isinstance(cond, dict):
            cond = {op: arg if op == "$glob" else _as_date(arg) for op, arg in cond.items()}
        else:
            cond = _as_date(cond)
    if not (isinstance(cond, dict) and any(isinstance(k, str) and k.startswith("$")
                                           for k in cond)):
        return [(_eq, cond)]
    tests = []
    for op, arg in cond.items():
        test = OPERATORS.get(op)
        if test is None:
            raise ValueError(
                f"unknown query operator {op!r} for key {key!r}; valid operators: "
                f"{', '.join(OPERATORS)} (a dict that mixes operators and plain keys is "
                "not allowed)"
            )
        if op in ("$in", "$nin"):
            if isinstance(arg, (str, bytes)) or not isinstance(arg, Iterable):
                raise ValueError(
                    f"query operator {op!r} for key {key!r} needs a list of values, "
                    f"got {type(arg).__name__} {arg!r}"
                )
            arg = list(arg)
        elif op == "$glob" and not isinstance(arg, str):
            raise ValueError(
                f"query operator '$glob' for key {key!r} needs a pattern string like "
                f"'fit-*', got {type(arg).__name__} {arg!r}"
            )
        tests.append((test, arg))
    return tests


def compile_query(query: dict) -> Callable[[dict], bool]:
    """Validate ``query`` once; return a predicate on record dicts.

    Raises KeyError for a key records do not have and ValueError for an unknown
    operator or a malformed argument.
    """
    if not isinstance(query, dict):
        raise TypeError(
            f"a task query is a dict like {{'status': 'ok'}}, got {type(query).__name__}"
        )
    plan = []
    for key, cond in query.items():
        _check_key(key)
        plan.append((key, _condition(key, cond)))

    def predicate(record: dict) -> bool:
        for key, tests in plan:
            value = record.get(key)
            for test, arg in tests:
                if not test(value, arg):
                    return False
        return True

    return predicate


def matches(record: dict, query: dict) -> bool:
    """Whether the record dict satisfies every condition of ``query``."""
    return compile_query(query)(record)


def to_datetime(value: Any) -> datetime | None:
    """An ISO string or datetime as an aware datetime (naive ones are UTC); else None."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, timezone.utc)  # epoch seconds
    elif isinstance(value, str) and value:
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def _client_uuid(ident: Any) -> str | None:
    if ident is None:
        return None
    if isinstance(ident, (bytes, bytearray, memoryview)):
        return bytes(ident).decode("utf-8", "replace")
    return str(ident)


def _received(rec: Any, clock_offset: float | None) -> datetime | None:
    if rec.received is None or clock_offset is None:
        return None
    return datetime.fromtimestamp(rec.received + clock_offset, timezone.utc)


_GETTERS: dict[str, Callable[[Any, float | None], Any]] = {
    "msg_id": lambda r, o: r.msg_id,
    "msg_type": lambda r, o: r.msg_type,
    "queue": lambda r, o: r.queue,
    "status": lambda r, o: r.status,
    "engine_id": lambda r, o: r.engine_id,
    "engine_uuid": lambda r, o: r.engine_uuid,
    "label": lambda r, o: r.label,
    "submitted": lambda r, o: to_datetime(r.submitted_date),
    "started": lambda r, o: to_datetime(r.started),
    "completed": lambda r, o: to_datetime(r.completed),
    "received": _received,
    "client_uuid": lambda r, o: _client_uuid(r.client_ident),
    "ename": lambda r, o: r.ename,
    "evalue": lambda r, o: r.evalue,
    "resubmitted": lambda r, o: r.resubmitted,
    "result_nbytes": lambda r, o: r.result_nbytes,
}


def _wanted(keys: Iterable[str] | None) -> tuple[str, ...]:
    """Validated keys to build: all when None, else ``msg_id`` first and then ``keys``."""
    if keys is None:
        return RECORD_KEYS
    wanted = ["msg_id"]
    for key in keys:
        _check_key(key)
        if key not in wanted:
            wanted.append(key)
    return tuple(wanted)


def _view(rec: Any, wanted: tuple[str, ...], clock_offset: float | None) -> dict:
    return {key: _GETTERS[key](rec, clock_offset) for key in wanted}


def record_dict(rec: Any, keys: Iterable[str] | None = None,
                clock_offset: float | None = None) -> dict:
    """The queryable view of a TaskRecord: ``keys`` of it (all when None), ``msg_id`` always.

    ``received`` is a monotonic time inside the controller; it becomes a datetime
    only when ``clock_offset`` (wall clock minus monotonic clock) is given.
    Raises KeyError, naming the valid keys, for a key records do not have.
    """
    return _view(rec, _wanted(keys), clock_offset)


def select(records: Iterable[Any], query: dict, keys: Iterable[str] | None = None,
           clock_offset: float | None = None) -> list[dict]:
    """The ``keys`` view of each record matching ``query``, in the order given."""
    predicate = compile_query(query)
    wanted = _wanted(keys)
    need = _wanted(query)
    out = []
    for rec in records:
        if predicate(_view(rec, need, clock_offset)):
            out.append(_view(rec, wanted, clock_offset))
    return out
