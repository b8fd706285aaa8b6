"""A shorter interpreter switch interval while ipyfarm's threads serve a cluster.

CPython gives the GIL from a thread that computes to a thread that waits for it only once
per switch interval (5 ms by default). The controller's and the client's I/O threads
release the GIL in every socket call (pyzmq does, even when nothing blocks) and must then
wait to get it back: while the notebook's own thread runs pure Python (a loop over
results, local work after a ``map_async``), each of those waits lasts a whole interval.
On the project's VM 2,000 no-op tasks took 58 s instead of 1.45 s that way, and an
``apply_sync`` from another thread 58 ms instead of 1 ms.

Those threads now make their non-blocking socket calls without giving up the GIL
(:mod:`ipyfarm.directzmq`), which leaves the waits of their blocking polls. While a
controller or client thread of this process runs, the interval is lowered to 0.5 ms for
those (this alone: 2,000 tasks in 7 s, ``apply_sync`` 5 ms; with directzmq: 2 s and
3.3 ms). ``IPYFARM_SWITCH_INTERVAL`` (seconds) chooses another value; ``0`` keeps
Python's. The interval the process had comes back when
the last of those threads stops, unless something else changed it meanwhile. The cost: a
thread computing in pure Python yields the GIL more often while ipyfarm's threads have
work, a few percent of its time at most.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["DEFAULT", "enter", "leave", "wanted"]

DEFAULT = 0.0005  # seconds

_lock = threading.Lock()
_users = 0
_saved: float | None = None  # the interval before ours, to restore
_ours: float | None = None  # the interval we set (restored only if still in place)


def wanted() -> float | None:
    """The interval to use while ipyfarm's threads run; None to leave Python's alone."""
    raw = os.environ.get("IPYFARM_SWITCH_INTERVAL", "").strip()
    if not raw:
        return DEFAULT
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT
    return value if value > 0 else None


def enter() -> None:
    """An ipyfarm thread starts serving: lower the interval (first one in)."""
    global _users, _saved, _ours
    with _lock:
        _users += 1
        if _users > 1:
            return
        want, current = wanted(), sys.getswitchinterval()
        if want is not None and want < current:
            _saved = current
            sys.setswitchinterval(want)
            _ours = sys.getswitchinterval()
        else:
            _saved = _ours = None


def leave() -> None:
    """An ipyfarm thread stops: give the process its interval back (last one out)."""
    global _users, _saved, _ours
    with _lock:
        _users = max(0, _users - 1)
        if _users or _saved is None:
            return
        if sys.getswitchinterval() == _ours:
            sys.setswitchinterval(_saved)
        _saved = _ours = None
