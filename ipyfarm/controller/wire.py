"""The controller's wire helpers: sending frames, reading task metadata, holding frames.

Pure functions and small classes used by the I/O shell (:mod:`.hub`); no sockets of
their own.
"""

from __future__ import annotations

import base64
import collections
import logging
import time
from typing import Any


from ..protocol.serialize import loads
from ..protocol.session import COPY_THRESHOLD, frames_bytes, parse_date
from .dependencies import DepSpec

log = logging.getLogger("ipyfarm.controller")

__all__ = ["RateLimitedLog", "compact", "epoch", "epoch_of", "fanout_pairs",
           "frames_nbytes", "task_fields"]


def epoch(value: Any) -> float | None:
    """An ISO date from a header or metadata as seconds since the epoch (None if not one).

    Records keep floats: 24 bytes instead of a ~80-byte string, for each of three dates.
    """
    if value is None:
        return None
    try:
        return parse_date(value).timestamp()
    except (AttributeError, TypeError, ValueError):
        return None


def epoch_of(md: dict, key: str) -> float | None:
    """:func:`epoch` of ``md[key]``; a date read is left in ``md`` as the datetime it
    is, so that a client of this process, which gets this very dict, does not parse
    it again."""
    value = md.get(key)
    if value is None:
        return None
    try:
        parsed = parse_date(value)
        seconds = parsed.timestamp()
    except (AttributeError, TypeError, ValueError):
        return None
    md[key] = parsed
    return seconds


class RateLimitedLog:
    """At most one line per ``period`` seconds per kind; counts what it held back."""

    def __init__(self, period: float = 5.0):
        self.period = period
        self._last: dict[str, float] = {}
        self._held: collections.Counter = collections.Counter()

    def warn(self, kind: str, text: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) >= self.period:
            held = self._held.pop(kind, 0)
            extra = f" ({held} similar messages suppressed)" if held else ""
            log.warning("%s%s", text, extra)
            self._last[kind] = now
        else:
            self._held[kind] += 1


_BIG = COPY_THRESHOLD  # frames this big are kept zero-copy


def task_fields(md: Any) -> dict:
    """Routing and scheduling fields of a task from its (signed) metadata.

    Raises ValueError saying which field is wrong. The placement predicate is the one
    user object the controller unpickles, on purpose (after the signature checked out).
    """
    if not isinstance(md, dict):
        raise ValueError("task metadata must be a JSON object")
    engine_id = md.get("engine_id")
    if engine_id is not None and (not isinstance(engine_id, int) or isinstance(engine_id, bool)):
        raise ValueError(f"engine_id must be an int or null, not {engine_id!r}")
    label = md.get("label")
    if label is not None and not isinstance(label, str):
        raise ValueError(f"label must be a string, not {type(label).__name__}")
    out: dict[str, Any] = {"engine_id": engine_id, "label": label}
    time_limit = md.get("time_limit")
    if time_limit is not None:
        if (not isinstance(time_limit, int | float) or isinstance(time_limit, bool)
                or not time_limit > 0 or time_limit == float("inf")):
            raise ValueError(f"time_limit must be a number of seconds > 0 or null, "
                             f"not {time_limit!r}")
        out["time_limit"] = float(time_limit)
    if engine_id is not None:
        return out
    out["after"] = DepSpec.from_wire(md.get("after"))
    out["follow"] = DepSpec.from_wire(md.get("follow"))
    timeout = md.get("timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or isinstance(timeout, bool)):
        raise ValueError(f"timeout must be a number of seconds, not {timeout!r}")
    out["timeout"] = float(timeout) if timeout else None
    targets = md.get("targets")
    if targets is not None and not (isinstance(targets, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in targets)):
        raise ValueError(f"targets must be a list of engine ids, not {targets!r}")
    out["targets"] = targets
    retries = md.get("retries", 0) or 0
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ValueError(f"retries must be a count >= 0, not {retries!r}")
    out["retries"] = retries
    engine_retries = md.get("engine_retries")
    if engine_retries is not None and (not isinstance(engine_retries, int)
                                       or isinstance(engine_retries, bool) or engine_retries < 0):
        raise ValueError(f"engine_retries must be a count >= 0, not {engine_retries!r}")
    out["engine_retries"] = engine_retries
    placement = md.get("placement")
    if placement is not None:
        try:
            out["placement"] = loads([base64.b64decode(placement)])
        except Exception as e:
            raise ValueError(
                f"its placement predicate could not be unpickled by the controller: "
                f"{type(e).__name__}: {e}. Define it with modules the controller's Python "
                "has, or in the notebook/script itself") from None
        if not callable(out["placement"]):
            raise ValueError("placement must be a callable taking the engine's properties")
    return out


def fanout_pairs(value: Any) -> list[tuple[int, str]]:
    """The other engines of a fan-out message, ``[[engine_id, msg_id], ...]`` in its
    metadata, as pairs; ValueError unless each is an int id and a non-empty string."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"fanout must be a non-empty list of [engine_id, msg_id] pairs, "
                         f"not {value!r:.80}")
    out = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)
                and not isinstance(pair[0], bool) and isinstance(pair[1], str) and pair[1]):
            raise ValueError(f"fanout entries must be [engine_id, msg_id], not {pair!r:.80}")
        out.append((pair[0], pair[1]))
    return out


def frames_nbytes(frames: list) -> int:
    return sum(len(f) for f in frames)


def compact(frames: list) -> list:
    """Copies of the small frames of a message the controller will hold on to.

    libzmq decodes small messages in place in its receive buffer, so one small
    ``zmq.Frame`` kept alive pins that whole buffer (kilobytes): holding thousands of
    queued tasks or stored results as Frames costs ~17 kB each. Big frames own their
    memory and stay zero-copy.
    """
    return [f if isinstance(f, bytes) or len(f) >= _BIG else frames_bytes(f) for f in frames]
