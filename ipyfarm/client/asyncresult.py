"""AsyncResult: a ``concurrent.futures.Future`` over one or more task messages.

The client's I/O thread stores each reply in ``client.results`` /
``client.metadata`` and calls :meth:`AsyncResult._msg_done`; when the last of
its ``msg_ids`` is in, the future resolves. ``get(timeout)`` follows
ipyparallel: ``None`` or ``-1`` waits forever, a single-target result is the bare
value, errors raise (several as :class:`~ipyfarm.error.CompositeError`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import TYPE_CHECKING, Any, Iterator

from .. import error

if TYPE_CHECKING:
    from .client import Client

__all__ = ["AsyncHubResult", "AsyncMapResult", "AsyncResult", "Metadata"]

_METADATA_DEFAULTS: dict[str, Any] = {
    "msg_id": None, "submitted": None, "started": None, "completed": None,
    "received": None, "engine_id": None, "engine_uuid": None, "status": None,
    "follow": [], "after": [], "execute_input": None, "execute_result": None,
    "error": None, "stdout": "", "stderr": "", "outputs": [], "data": {},
}

_MUTABLE_DEFAULTS = tuple(k for k, v in _METADATA_DEFAULTS.items() if isinstance(v, list | dict))


class Metadata(dict):
    """A task's metadata; keys are also attributes (``md.engine_id``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(_METADATA_DEFAULTS)
        for key in _MUTABLE_DEFAULTS:  # each its own (a copy of the empty default)
            self[key] = self[key].copy()
        self.update(*args, **kwargs)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


def _timeout(timeout: float | None) -> float | None:
    return None if timeout is None or timeout < 0 else timeout


class AsyncResult(Future):
    """The pending or finished result of a submission (one or more messages)."""

    def __init__(
        self,
        client: Client,
        msg_ids: list[str],
        fname: str = "unknown",
        targets: Any = None,
        trackers: list | None = None,
        single: bool | None = None,
        return_exceptions: bool = False,
    ):
        super().__init__()
        self._client = client
        self.msg_ids = list(msg_ids)
        self._fname = fname
        self._targets = targets
        self._trackers = trackers or []
        self._single_result = (
            single if single is not None else (len(self.msg_ids) == 1 and
                                               not isinstance(targets, list | tuple))
        )
        self._return_exceptions = return_exceptions
        self._lock = threading.Lock()
        self._remaining = set(self.msg_ids)
        self._submitted = time.monotonic()
        self._finished_at: float | None = None
        client._watch(self)

    #: whether finishing is cheap enough for any thread, the controller's included
    #: (a map's joins its pieces, which may be large: not on the controller's thread)
    _finish_anywhere = True

    def add_done_callback(self, fn: Any) -> None:
        """As ``Future.add_done_callback``, but ``fn`` runs on the client's callback
        thread (``ipyfarm-callbacks``), one callback at a time in the order results
        arrive, never on a thread that delivers results: it may block, or wait on other
        results. For a result already finished, ``fn`` runs at once in the caller."""
        if self.done():
            super().add_done_callback(fn)  # Future calls it now, in this thread
        else:
            super().add_done_callback(self._client._io.on_callback_thread(fn))

    # ------------------------------------------------------------------ completion
    def _msg_done(self, msg_id: str) -> bool:
        """``msg_id`` finished; the last of them finishes this result. A second call for
        the same message (the client's watch may tell twice) changes nothing and
        returns False."""
        with self._lock:
            if msg_id not in self._remaining:
                return False
            self._remaining.discard(msg_id)
            if self._remaining or self.done():
                return True
        self._finish()
        return True

    def _finish(self) -> None:
        self._finished_at = time.monotonic()
        results = [self._client.results[m] for m in self.msg_ids]
        # a thread blocked in get()/wait() on this result (Condition's own list)
        waited_on = bool(getattr(self._condition, "_waiters", None))
        try:
            value = self._reconstruct(results)
        except BaseException as e:
            self.set_exception(e)
        else:
            self.set_result(value)
        if waited_on:
            # let the thread just woken run now: this thread (the controller's or the
            # client's I/O thread) would otherwise keep the GIL until its next wait
            # for sockets (~30 us of a round trip here)
            io = getattr(self._client, "_io", None)
            if io is not None:
                io.let_waiter_run()
            else:
                time.sleep(0)

    def _reconstruct(self, results: list) -> Any:
        if self._single_result:
            r = results[0]
            if isinstance(r, BaseException):
                raise r
            return r
        if not self._return_exceptions:
            error.collect_exceptions(results, self._fname)
        return results

    # ------------------------------------------------------------------ waiting
    def wait(self, timeout: float | None = -1) -> bool:
        """Wait up to ``timeout`` seconds (None/-1: forever); True when ready."""
        try:
            self.exception(_timeout(timeout))
        except FuturesTimeout:
            return False
        return True

    def ready(self) -> bool:
        return self.done()

    def successful(self) -> bool:
        if not self.done():
            raise AssertionError(f"{self!r} is not ready; wait() before asking successful()")
        return self.exception(0) is None

    def get(self, timeout: float | None = -1) -> Any:
        """The result, waiting up to ``timeout`` seconds; raises the remote error if any."""
        try:
            return self.result(_timeout(timeout))  # one wait, one look at the state
        except FuturesTimeout:
            if self.done():
                raise  # the result itself is a timeout error (a task's): raised as is
        raise error.TimeoutError(
            f"{self._fname}: {self.progress}/{len(self)} results ready after "
            f"{timeout} s. The tasks are still running; wait longer, or abort() them."
        )

    @property
    def r(self) -> Any:
        return self.get()

    def get_dict(self, timeout: float | None = -1) -> dict:
        """Results keyed by engine id (each engine must appear once)."""
        results = self.get(timeout)
        if self._single_result:
            results = [results]
        engine_ids = [md["engine_id"] for md in self._metadatas()]
        if len(set(engine_ids)) != len(engine_ids):
            raise ValueError(f"cannot key by engine: engines repeat in {engine_ids}")
        return dict(zip(engine_ids, results, strict=True))

    def __await__(self) -> Any:
        return asyncio.wrap_future(self).__await__()

    # ------------------------------------------------------------------ control
    def abort(self) -> None:
        """Abort the messages that have not finished; raises if all have."""
        if self.done():
            raise error.IPyFarmError(f"{self!r} is already done; nothing to abort")
        self._client.abort([m for m in self.msg_ids if m in self._remaining])

    @property
    def sent(self) -> bool:
        return all(t is None or t.done for t in self._trackers)

    def wait_on_send(self, timeout: float | None = -1) -> None:
        deadline = None if _timeout(timeout) is None else time.monotonic() + timeout
        for t in self._trackers:
            if t is None:
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.wait(left)

    # ------------------------------------------------------------------ information
    def __len__(self) -> int:
        return len(self.msg_ids)

    @property
    def progress(self) -> int:
        return len(self.msg_ids) - len(self._remaining)

    @property
    def elapsed(self) -> float:
        end = self._finished_at if self._finished_at is not None else time.monotonic()
        return end - self._submitted

    @property
    def wall_time(self) -> float:
        return self.elapsed

    def _metadatas(self) -> list[Metadata]:
        return [self._client.metadata[m] for m in self.msg_ids]

    @property
    def metadata(self) -> Any:
        mds = self._metadatas()
        return mds[0] if self._single_result else mds

    @property
    def result_dict(self) -> dict:
        return self.get_dict()

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            values = [md[key] for md in self._metadatas()]
            return values[0] if self._single_result else values
        results = self.get()
        return results[key] if not self._single_result else [results][key]

    def __iter__(self) -> Iterator:
        if self._single_result:
            yield from self.get()
            return
        for msg_id in self.msg_ids:
            while msg_id in self._remaining:
                self.wait(0.05)
            r = self._client.results[msg_id]
            if isinstance(r, BaseException) and not self._return_exceptions:
                raise r
            yield r

    def __repr__(self) -> str:
        state = "pending"
        if self.done():
            state = "finished" if self.exception(0) is None else "error"
        return f"<{type(self).__name__}({self._fname}): {state}>"

    def display_outputs(self, groupby: str = "type") -> None:
        """Print each engine's stdout/stderr and show its displays and results."""
        from .display import display_outputs

        display_outputs(self._metadatas(), groupby)

    def wait_interactive(self, interval: float = 0.1, timeout: float | None = -1,
                         widget: bool | None = None,
                         return_when: str = "ALL_COMPLETED") -> None:
        """Wait, showing progress: a widget bar in a notebook, a text line in a terminal.

        ``widget``: None picks by where this runs, True/False force the bar/the text.
        ``return_when``: ``concurrent.futures.ALL_COMPLETED`` (every task),
        ``FIRST_COMPLETED`` (one task) or ``FIRST_EXCEPTION`` (one task failed, or all
        finished). ``timeout`` None or -1 waits as long as that takes.
        """
        from ..widgets.progress import wait_interactive

        wait_interactive(self, interval, _timeout(timeout), widget, return_when)

    def _failed_count(self) -> int:
        """How many of the messages have finished with an error so far."""
        results = self._client.results
        return sum(1 for m in self.msg_ids
                   if m not in self._remaining and isinstance(results.get(m), BaseException))


def _metadata_property(key: str) -> property:
    def getter(self: AsyncResult) -> Any:
        return self[key]

    getter.__doc__ = f"metadata[{key!r}] of each message (a single value for one engine)"
    return property(getter)


for _key in ("stdout", "stderr", "outputs", "engine_id", "execute_result", "error",
             "submitted", "started", "completed", "received", "status"):
    setattr(AsyncResult, _key, _metadata_property(_key))


class AsyncMapResult(AsyncResult):
    """A map's result: the chunks' results joined back in order.

    ``ordered=False``: iteration yields each chunk's items as the chunk finishes.
    ``return_exceptions=True``: a chunk that failed as a whole (its engine died, say)
    gives its exception once per item, so results still line up with the input.
    """

    _finish_anywhere = False

    def __init__(self, client: Client, msg_ids: list[str], joiner: Any, fname: str = "map",
                 ordered: bool = True, return_exceptions: bool = False,
                 sizes: list[int] | None = None, **kwargs: Any):
        self._joiner = joiner
        self._ordered = ordered
        self._sizes = sizes
        self._arrived: list[str] = []
        self._arrival = threading.Condition()
        super().__init__(client, msg_ids, fname, single=False,
                         return_exceptions=return_exceptions, **kwargs)

    def _msg_done(self, msg_id: str) -> bool:
        if not super()._msg_done(msg_id):
            return False
        with self._arrival:
            self._arrived.append(msg_id)
            self._arrival.notify_all()
        return True

    def _piece(self, i: int, r: Any) -> list:
        if isinstance(r, BaseException):
            if not self._return_exceptions:
                raise r
            return [r] * (self._sizes[i] if self._sizes else 1)
        return r

    def _reconstruct(self, results: list) -> Any:
        if not self._return_exceptions:
            error.collect_exceptions(results, self._fname)
            return self._joiner(results)
        return self._joiner([self._piece(i, r) for i, r in enumerate(results)])

    def _in_arrival_order(self) -> Iterator[str]:
        seen = 0
        while seen < len(self.msg_ids):
            with self._arrival:
                while len(self._arrived) <= seen:
                    self._arrival.wait(1.0)
                batch = self._arrived[seen:]
            seen += len(batch)
            yield from batch

    def __iter__(self) -> Iterator:
        index = {m: i for i, m in enumerate(self.msg_ids)}
        order = iter(self.msg_ids) if self._ordered else self._in_arrival_order()
        for msg_id in order:
            with self._arrival:
                while msg_id in self._remaining:
                    self._arrival.wait(1.0)
            yield from self._piece(index[msg_id], self._client.results[msg_id])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.get()[key]


class AsyncHubResult(AsyncResult):
    """Results of tasks another client submitted, fetched from the controller."""

    def _watch_remote(self, poll: float = 0.05, grace: float = 2.0) -> None:
        """Poll the controller until every result is in.

        An id the controller does not know yet is retried for ``grace`` seconds (its
        submission may still be on its way from another client), then fails.
        """
        def poller() -> None:
            start = time.monotonic()
            while not self.done() and not self._client._closed:
                missing = [m for m in self.msg_ids if m in self._remaining]
                if not missing:
                    return
                try:
                    unknown = self._client._fetch_results(missing)
                    if unknown and time.monotonic() - start > grace:
                        raise KeyError(f"the controller has no record of {unknown}: unknown "
                                       "ids, or purged")
                except Exception as e:
                    if not self.done():
                        self.set_exception(e)
                    return
                time.sleep(poll)

        threading.Thread(target=poller, name="ipyfarm-hubresult", daemon=True).start()

