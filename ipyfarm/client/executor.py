"""``view.executor``: the ``concurrent.futures.Executor`` interface over a view."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, Iterator

__all__ = ["ViewExecutor"]


class ViewExecutor(Executor):
    """``submit`` returns the view's AsyncResult (a ``Future``); ``map`` is lazy-ordered."""

    def __init__(self, view: Any):
        self.view = view
        self._submitted: list[Any] = []
        self._shutdown = False

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if self._shutdown:
            raise RuntimeError("cannot submit to an executor that was shut down")
        ar = self.view.apply_async(fn, *args, **kwargs)
        self._submitted = [a for a in self._submitted if not a.done()]
        self._submitted.append(ar)
        return ar

    def map(self, fn: Any, *iterables: Any, timeout: float | None = None,
            chunksize: int = 1) -> Iterator:
        if self._shutdown:
            raise RuntimeError("cannot map on an executor that was shut down")
        ar = self.view.map_async(fn, *iterables, chunksize=chunksize)
        self._submitted.append(ar)

        def results() -> Iterator:
            ar.wait(timeout)
            if not ar.ready():
                from ..error import TimeoutError

                raise TimeoutError(f"executor.map: not finished within {timeout} s")
            yield from ar

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; wait for what was submitted (engines keep running)."""
        self._shutdown = True
        pending = [a for a in self._submitted if not a.done()]
        if cancel_futures and pending:
            try:
                self.view.client.abort(pending)
            except Exception:
                pass
        if wait:
            for ar in pending:
                ar.wait()
