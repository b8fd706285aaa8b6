"""``@view.remote()`` and ``@view.parallel()``: functions that run on engines."""

from __future__ import annotations

import functools
from typing import Any


class RemoteFunction:
    """Calling it calls the function on the view's engines (``view.apply``)."""

    def __init__(self, view: Any, f: Any, block: bool | None = None, **flags: Any):
        self.view = view
        self.func = f
        self.block = block
        self.flags = flags
        functools.update_wrapper(self, f)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        block = self.view.block if self.block is None else self.block
        with self.view.temp_flags(block=block, **self.flags):
            return self.view.apply(self.func, *args, **kwargs)


class ParallelFunction(RemoteFunction):
    """Calling it on sequences maps the function over them across the view's engines."""

    def __init__(self, view: Any, f: Any, dist: str = "b", block: bool | None = None,
                 **flags: Any):
        if dist != "b":
            raise ValueError(f"only block distribution ('b') is supported, not {dist!r}")
        super().__init__(view, f, block, **flags)

    def __call__(self, *sequences: Any, **kwargs: Any) -> Any:
        return self.map(*sequences, **kwargs)

    def map(self, *sequences: Any, **kwargs: Any) -> Any:
        block = self.view.block if self.block is None else self.block
        with self.view.temp_flags(**self.flags):
            return self.view.map(self.func, *sequences, block=block, **kwargs)


def remote(view: Any, block: bool | None = None, **flags: Any) -> Any:
    """Decorator: ``@remote(view)`` turns a function into a :class:`RemoteFunction`."""

    def wrap(f: Any) -> RemoteFunction:
        return RemoteFunction(view, f, block=block, **flags)

    return wrap


def parallel(view: Any, dist: str = "b", block: bool | None = None, **flags: Any) -> Any:
    """Decorator: ``@parallel(view)`` turns a function into a :class:`ParallelFunction`."""

    def wrap(f: Any) -> ParallelFunction:
        return ParallelFunction(view, f, dist=dist, block=block, **flags)

    return wrap
