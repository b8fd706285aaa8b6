"""LoadBalancedView: tasks go to whichever engine the controller's scheduler picks.

Flags (``set_flags`` / ``temp_flags`` / keyword arguments of the view):
``block``, ``track``, ``targets`` (engines the scheduler may use), ``after`` (time
dependency), ``follow`` (location dependency), ``timeout`` (seconds to wait for
dependencies or for a fitting engine before ``DependencyTimeout``), ``retries``
(reruns after an error, and after an engine death unless ``engine_retries`` sets
another count for that; elsewhere when possible), ``label``
(stored with the task, queryable with ``db_query``), ``placement`` (a predicate on
an engine's properties dict, evaluated by the scheduler) and ``time_limit`` (seconds a
task may run before it is interrupted, then its engine killed: ``TaskTimeout``).

``map`` cuts its input in chunks unless told ``chunksize=``: large chunks first and
small ones at the end (guided self-scheduling), so that engines finish together while
per-task overhead stays small. Results and their order are the same as ``map``'s.
"""

from __future__ import annotations

import base64
import math
import threading
from collections import deque
from typing import Any, Iterable, Iterator

from .. import error
from ..protocol.serialize import dumps, pack_apply
from . import dependency, mapping
from .asyncresult import AsyncMapResult, AsyncResult
from .view import View

__all__ = ["LoadBalancedView", "guided_chunks"]


def guided_chunks(n: int, workers: int, factor: int = 4) -> list[tuple[int, int]]:
    """``(lo, hi)`` ranges covering ``range(n)``: each chunk ``remaining / (factor*workers)``.

    Few chunks (about ``factor*workers*ln(n)``), big first, size 1 at the end.
    """
    out, lo = [], 0
    div = max(1, factor * max(1, workers))
    while lo < n:
        size = max(1, math.ceil((n - lo) / div))
        out.append((lo, min(n, lo + size)))
        lo += size
    return out


class LoadBalancedView(View):
    """Engines as a pool: each task runs once, on an engine the scheduler chooses."""

    _flag_names = ("block", "track", "targets", "after", "follow", "timeout", "retries",
                   "engine_retries", "label", "placement", "time_limit")

    def __init__(self, client: Any, targets: Any = None, block: bool = False,
                 track: bool = False, **flags: Any):
        self.after: Any = None
        self.follow: Any = None
        self.timeout: float | None = None
        self.retries = 0
        self.engine_retries: int | None = None  # None: as many as ``retries``
        self.label: str | None = None
        self.placement: Any = None
        super().__init__(client, targets, block, track, **flags)

    def __repr__(self) -> str:
        where = "all engines" if self.targets is None else f"engines {self.targets}"
        return f"<LoadBalancedView over {where}>"

    def __len__(self) -> int:
        return len(self.client.ids if self.targets is None else self._targets())

    def set_flags(self, **kwargs: Any) -> None:
        for name, value in kwargs.items():
            if name == "retries" and (not isinstance(value, int) or value < 0):
                raise ValueError(f"retries must be a count >= 0, not {value!r}")
            if name == "engine_retries" and value is not None and (
                    not isinstance(value, int) or value < 0):
                raise ValueError(f"engine_retries must be a count >= 0 or None (as many as "
                                 f"retries), not {value!r}")
            if name == "timeout" and value is not None and not isinstance(value, int | float):
                raise TypeError(f"timeout must be seconds (a number) or None, not {value!r}")
            if name == "placement" and value is not None and not callable(value):
                raise TypeError("placement must be a callable taking an engine's properties")
        super().set_flags(**kwargs)

    # ------------------------------------------------------------------ submission
    def _task_metadata(self, flags: dict) -> dict:
        targets = flags.get("targets", self.targets)
        md: dict[str, Any] = {
            "after": dependency.to_wire(flags.get("after", self.after)),
            "follow": dependency.to_wire(flags.get("follow", self.follow)),
            "timeout": flags.get("timeout", self.timeout),
            "targets": None if targets is None else self.client._resolve_targets(targets),
            "retries": flags.get("retries", self.retries),
        }
        engine_retries = flags.get("engine_retries", self.engine_retries)
        if engine_retries is not None:
            md["engine_retries"] = engine_retries
        time_limit = flags.get("time_limit", self.time_limit)
        if time_limit is not None:
            md["time_limit"] = time_limit
        label = flags.get("label", self.label)
        if label is not None:
            md["label"] = str(label)
        placement = flags.get("placement", self.placement)
        if placement is not None:
            try:
                (data,) = dumps(placement)
            except ValueError:
                raise error.SerializationError(
                    "the placement predicate pickles with out-of-band buffers (it holds large "
                    "arrays?); keep it a small function of the properties dict") from None
            md["placement"] = base64.b64encode(data).decode()
        return md

    def _submit(self, frames: list, md: dict, track: bool) -> tuple[str, Any]:
        return self.client._send_task("apply_request", {}, frames, None, extra_md=md,
                                      track=track)

    def _really_apply(self, f: Any, args: tuple = (), kwargs: dict | None = None,
                      targets: Any = None, block: bool | None = None,
                      track: bool | None = None, **flags: Any) -> Any:
        if not callable(f):
            raise TypeError(f"apply needs a callable, got {type(f).__name__}")
        if targets is not None:
            flags["targets"] = targets
        md = self._task_metadata(flags)
        frames = pack_apply(f, args, kwargs or {})
        track = self.track if track is None else track
        msg_id, tracker = self._submit(frames, md, track)
        ar = AsyncResult(self.client, [msg_id], getattr(f, "__name__", "f"),
                         trackers=[tracker], single=True)
        return self._finish(ar, block)

    # ------------------------------------------------------------------ map
    def map(self, f: Any, *sequences: Any, block: bool | None = None,
            chunksize: int | None = None, ordered: bool = True,
            return_exceptions: bool = False, track: bool | None = None) -> Any:
        """Load-balanced ``map``: chunks of the sequences go to engines as they free up.

        ``chunksize=None`` chooses chunks automatically (``chunksize=1``: one task per
        item, as ipyparallel does by default); ``ordered=False`` lets iteration yield
        chunks as they finish; ``return_exceptions=True`` puts each failing item's
        RemoteError in the results instead of raising.
        """
        if not callable(f):
            raise TypeError(f"map needs a callable, got {type(f).__name__}")
        if not sequences:
            raise TypeError("map needs at least one sequence")
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a positive int or None, not {chunksize!r}")
        seqs = [s if hasattr(s, "__getitem__") and hasattr(s, "__len__") else list(s)
                for s in sequences]
        n = min(len(s) for s in seqs) if seqs else 0
        if chunksize is None:
            bounds = guided_chunks(n, len(self) or 1)
        else:
            bounds = [(lo, min(n, lo + chunksize)) for lo in range(0, n, chunksize)]
        md = self._task_metadata({})
        track = self.track if track is None else track
        runner = mapping.map_chunk_catching if return_exceptions else mapping.map_chunk
        msg_ids = []
        for lo, hi in bounds:
            frames = pack_apply(runner, (f, *(s[lo:hi] for s in seqs)), {})
            msg_ids.append(self._submit(frames, md, track)[0])
        ar = AsyncMapResult(self.client, msg_ids, mapping.join,
                            fname=getattr(f, "__name__", "map"), ordered=ordered,
                            return_exceptions=return_exceptions,
                            sizes=[hi - lo for lo, hi in bounds])
        return self._finish(ar, block)

    def map_async(self, f: Any, *sequences: Any, **kwargs: Any) -> AsyncMapResult:
        return self.map(f, *sequences, block=False, **kwargs)

    def map_sync(self, f: Any, *sequences: Any, **kwargs: Any) -> Any:
        return self.map(f, *sequences, block=True, **kwargs)

    def imap(self, f: Any, *sequences: Any, ordered: bool = True,
             max_outstanding: int | str = "auto", return_exceptions: bool = False) -> Iterator:
        """Lazy ``map``: reads the input as it goes, with at most ``max_outstanding``
        tasks in flight (``"auto"``: twice the number of engines); yields results in
        input order (``ordered=False``: as they finish)."""
        if max_outstanding == "auto":
            limit = 2 * max(1, len(self))
        elif isinstance(max_outstanding, int) and max_outstanding > 0:
            limit = max_outstanding
        else:
            raise ValueError(f"max_outstanding must be 'auto' or a positive int, "
                             f"not {max_outstanding!r}")
        return self._imap(f, zip(*sequences, strict=False), ordered, limit, return_exceptions)

    def _imap(self, f: Any, items: Iterable, ordered: bool, limit: int,
              return_exceptions: bool) -> Iterator:
        md = self._task_metadata({})
        done = threading.Condition()
        finished: deque[AsyncResult] = deque()
        inflight: deque[AsyncResult] = deque()

        def arrived(fut: Any) -> None:
            with done:
                finished.append(fut)
                done.notify()

        def result_of(ar: AsyncResult) -> Any:
            try:
                return ar.get()
            except Exception as e:
                if return_exceptions:
                    return e
                raise

        source = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(inflight) < limit:
                args = next(source, None)
                if args is None:
                    exhausted = True
                    break
                msg_id, _ = self._submit(pack_apply(f, args, {}), md, False)
                ar = AsyncResult(self.client, [msg_id], getattr(f, "__name__", "f"), single=True)
                inflight.append(ar)
                if not ordered:
                    ar.add_done_callback(arrived)
            if not inflight:
                return
            if ordered:
                ar = inflight.popleft()
                ar.wait()
            else:
                with done:
                    while not finished:
                        done.wait(1.0)
                    ar = finished.popleft()
                inflight.remove(ar)
            yield result_of(ar)

    def abort(self, jobs: Any = None, targets: Any = None, block: bool | None = None) -> None:
        """Abort tasks (default: every unfinished task of this client): queued ones are
        answered ``TaskAborted`` at once; running ones can't be stopped this way
        (interrupt them with ``client.send_signal``)."""
        if jobs is None and targets is None:
            jobs = list(self.client.outstanding)
            if not jobs:
                return
        self.client.abort(jobs, targets)

    # ------------------------------------------------------------------ executors
    @property
    def executor(self) -> Any:
        """A ``concurrent.futures.Executor`` that submits to this view."""
        from .executor import ViewExecutor

        return ViewExecutor(self)

    def register_joblib_backend(self, name: str = "ipyparallel",
                                make_default: bool = False) -> None:
        """Make this view a joblib backend: ``with joblib.parallel_backend(name): ...``."""
        from .joblib_backend import register

        register(self, name, make_default)

