"""Views: a set of engines plus flags (``block``, ``track``, ``targets``).

``DirectView`` addresses engines by id: every call sends one message per engine.
"""

from __future__ import annotations

import builtins
import contextlib
import threading
from typing import Any, Iterator

from ..protocol.serialize import pack_apply
from . import mapping
from .asyncresult import AsyncMapResult, AsyncResult
from .remotefunction import ParallelFunction, RemoteFunction

__all__ = ["DirectView", "View"]


def _ops() -> Any:
    from ..engine import ops

    return ops


class View:
    """Shared machinery: flags and the apply family."""

    _flag_names = ("block", "track", "targets", "time_limit")

    def __init__(self, client: Any, targets: Any = "all", block: bool = False,
                 track: bool = False, **flags: Any):
        self.client = client
        self.targets = targets
        self.block = block
        self.track = track
        self.time_limit: float | None = None
        if flags:
            self.set_flags(**flags)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.targets}>"

    def __len__(self) -> int:
        t = self._targets()
        return len(t)

    # ------------------------------------------------------------------ flags
    def set_flags(self, **kwargs: Any) -> None:
        """Set view flags (``block``, ``track``, ``targets``, ``time_limit``); unknown
        names are errors.

        ``time_limit``: seconds each task may run once started on its engine; past it the
        task is interrupted, and its engine killed if it does not stop; it fails with
        ``TaskTimeout``. None (the default): no limit.
        """
        for name, value in kwargs.items():
            if name not in self._flag_names:
                raise KeyError(f"invalid flag {name!r}; valid flags are {self._flag_names}")
            if name == "time_limit" and value is not None and (
                    not isinstance(value, int | float) or isinstance(value, bool)
                    or not 0 < value < float("inf")):
                raise ValueError(f"time_limit must be seconds > 0 or None, not {value!r}")
            setattr(self, name, value)

    @contextlib.contextmanager
    def temp_flags(self, **kwargs: Any) -> Iterator[None]:
        """Set flags for the duration of a ``with`` block."""
        saved = {k: getattr(self, k) for k in kwargs}
        self.set_flags(**kwargs)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    def _limit_md(self) -> dict | None:
        """Task metadata for the ``time_limit`` flag (None: nothing to add)."""
        return None if self.time_limit is None else {"time_limit": self.time_limit}

    def _targets(self, targets: Any = None) -> list[int]:
        t = self.targets if targets is None else targets
        return self.client._resolve_targets(t)

    def _single(self, targets: Any = None) -> bool:
        t = self.targets if targets is None else targets
        return isinstance(t, int)

    # ------------------------------------------------------------------ apply
    def apply(self, f: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``f(*args, **kwargs)`` on the engines; blocks if ``self.block``."""
        return self._really_apply(f, args, kwargs)

    def apply_async(self, f: Any, /, *args: Any, **kwargs: Any) -> AsyncResult:
        return self._really_apply(f, args, kwargs, block=False)

    def apply_sync(self, f: Any, /, *args: Any, **kwargs: Any) -> Any:
        return self._really_apply(f, args, kwargs, block=True)

    def _really_apply(self, f: Any, args: tuple = (), kwargs: dict | None = None,
                      targets: Any = None, block: bool | None = None,
                      track: bool | None = None) -> Any:
        raise NotImplementedError

    def _finish(self, ar: AsyncResult, block: bool | None) -> Any:
        if self.block if block is None else block:
            return ar.get()
        return ar

    # ------------------------------------------------------------------ decorators
    def remote(self, block: bool | None = None, **flags: Any) -> Any:
        def wrap(f: Any) -> RemoteFunction:
            return RemoteFunction(self, f, block=block, **flags)
        return wrap

    def parallel(self, dist: str = "b", block: bool | None = None, **flags: Any) -> Any:
        def wrap(f: Any) -> ParallelFunction:
            return ParallelFunction(self, f, dist=dist, block=block, **flags)
        return wrap

    # ------------------------------------------------------------------ control
    def wait(self, jobs: Any = None, timeout: float | None = -1) -> bool:
        return self.client.wait(jobs, timeout)

    def abort(self, jobs: Any = None, targets: Any = None, block: bool | None = None) -> None:
        t = self.targets if targets is None else targets
        if jobs is None:
            self.client.abort(None, self._targets(t))
        else:
            self.client.abort(jobs)

    def queue_status(self, targets: Any = None, verbose: bool = False) -> dict:
        t = self.targets if targets is None else targets
        return self.client.queue_status(t if t == "all" else self._targets(t), verbose)

    def spin(self) -> None:
        self.client.spin()

    def get_result(self, indices_or_msg_ids: Any = None, block: bool | None = None) -> Any:
        return self.client.get_result(indices_or_msg_ids, block)

    def set_properties(self, properties: dict, targets: Any = None,
                       block: bool | None = None) -> Any:
        """Update the properties dict of this view's engines (the scheduler places
        load-balanced work on them: ``placement=lambda p: p.get("gpu_count", 0) > 0``)."""
        if not isinstance(properties, dict):
            raise TypeError(f"properties must be a dict, not {type(properties).__name__}")
        t = self.targets if targets is None else targets
        view = self.client.direct_view(self.client._resolve_targets(t))
        ar = view.apply_async(_ops().set_properties, properties)
        return ar.get() if (self.block if block is None else block) else ar

    def get_properties(self, targets: Any = None) -> dict:
        """``{engine_id: properties}`` for this view's engines."""
        t = self.targets if targets is None else targets
        ids = self.client._resolve_targets(t)
        view = self.client.direct_view(ids)
        return dict(zip(ids, view.apply_sync(_ops().get_properties), strict=True))

    def use_cloudpickle(self) -> None:
        """Kept for compatibility: ipyfarm always uses cloudpickle."""

    use_dill = use_cloudpickle
    use_pickle = use_cloudpickle


class DirectView(View):
    """Engines addressed by id; data movement and execution on each of them."""

    def activate(self, suffix: str = "") -> None:
        """Make ``%px<suffix>``, ``%autopx<suffix>``, ... in IPython run on this view."""
        from ..magics import activate  # the magics depend on the client, not back

        activate(self, suffix)

    def _really_apply(self, f: Any, args: tuple = (), kwargs: dict | None = None,
                      targets: Any = None, block: bool | None = None,
                      track: bool | None = None) -> Any:
        if not callable(f):
            raise TypeError(f"apply needs a callable, got {type(f).__name__}")
        engine_ids = self._targets(targets)
        frames = pack_apply(f, args, kwargs or {})
        track = self.track if track is None else track
        msg_ids, trackers = [], []
        md = self._limit_md()
        if track:
            for engine_id in engine_ids:
                msg_id, tracker = self.client._send_task("apply_request", {}, frames,
                                                         engine_id, extra_md=md, track=True)
                msg_ids.append(msg_id)
                trackers.append(tracker)
        else:  # packed and hashed once for all engines
            msg_ids = self.client._send_tasks("apply_request", {}, frames, engine_ids, md)
            trackers = [None] * len(msg_ids)
        fname = getattr(f, "__name__", "f")
        ar = AsyncResult(self.client, msg_ids, fname, trackers=trackers,
                         single=self._single(targets))
        return self._finish(ar, block)

    # ------------------------------------------------------------------ execution
    def execute(self, code: str, silent: bool = True, targets: Any = None,
                block: bool | None = None) -> Any:
        """Run ``code`` as an IPython cell on each engine."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a string, not {type(code).__name__}")
        content = {"code": code, "silent": silent, "store_history": not silent,
                   "user_expressions": {}, "allow_stdin": False, "stop_on_error": False}
        md = self._limit_md()
        msg_ids = self.client._send_tasks("execute_request", content, [], self._targets(targets),
                                          md)
        ar = AsyncResult(self.client, msg_ids, "execute", single=self._single(targets))
        return self._finish(ar, block)

    def run(self, filename: str, targets: Any = None, block: bool | None = None) -> Any:
        """Execute the contents of a local file on the engines."""
        with open(filename) as f:
            code = f.read()
        return self.execute(code, targets=targets, block=block)

    # ------------------------------------------------------------------ namespace
    def push(self, ns: dict, targets: Any = None, block: bool | None = None,
             track: bool | None = None) -> Any:
        """Update the engines' namespaces with ``ns``."""
        if not isinstance(ns, dict):
            raise TypeError(f"push needs a dict of names to values, not {type(ns).__name__}")
        return self._really_apply(_ops().push, (ns,), {}, targets, block, track)

    def pull(self, names: str | list | tuple, targets: Any = None,
             block: bool | None = None) -> Any:
        """Values of ``names`` (a name or a list of names) from the engines."""
        if isinstance(names, str):
            names_arg: Any = names
        else:
            names_arg = list(names)
            for n in names_arg:
                if not isinstance(n, str):
                    raise TypeError(f"names to pull must be strings, not {n!r}")
        return self._really_apply(_ops().pull, (names_arg,), {}, targets, block)

    def update(self, ns: dict) -> Any:
        return self.push(ns)

    def get(self, key_s: str | list) -> Any:
        return self.pull(key_s, block=True)

    def __setitem__(self, key: str, value: Any) -> None:
        self.push({key: value}, block=True)

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str):
            raise TypeError(f"view[...] takes a variable name; for engines use client[{key!r}]")
        return self.pull(key, block=True)

    def clear(self, targets: Any = None, block: bool | None = None) -> None:
        """Empty the namespaces of this view's engines."""
        t = self.targets if targets is None else targets
        self.client.clear(self._targets(t))

    def shutdown(self, targets: Any = None, restart: bool = False, hub: bool = False,
                 block: bool | None = None) -> None:
        t = self.targets if targets is None else targets
        self.client.shutdown(self._targets(t), restart=restart, hub=hub)

    def send_signal(self, sig: int | str, targets: Any = None) -> None:
        t = self.targets if targets is None else targets
        self.client.send_signal(sig, self._targets(t))

    # ------------------------------------------------------------------ scatter / gather
    def scatter(self, key: str, seq: Any, dist: str = "b", flatten: bool = False,
                targets: Any = None, block: bool | None = None,
                track: bool | None = None) -> Any:
        """Cut ``seq`` in one piece per engine and push piece ``i`` as ``key`` to engine ``i``."""
        if dist != "b":
            raise ValueError(f"only block distribution ('b') is supported, not {dist!r}")
        engine_ids = self._targets(targets)
        pieces = mapping.partition(seq, len(engine_ids))
        msg_ids, trackers = [], []
        track = self.track if track is None else track
        push = _ops().push
        for engine_id, piece in zip(engine_ids, pieces, strict=True):
            if flatten and len(piece) == 1:
                piece = piece[0]
            frames = pack_apply(push, ({key: piece},), {})
            msg_id, tracker = self.client._send_task("apply_request", {}, frames, engine_id,
                                                     track=track)
            msg_ids.append(msg_id)
            trackers.append(tracker)
        ar = AsyncResult(self.client, msg_ids, "scatter", trackers=trackers, single=False)
        if self.block if block is None else block:
            ar.get()
            return None
        return ar

    def gather(self, key: str, dist: str = "b", targets: Any = None,
               block: bool | None = None) -> Any:
        """Pull ``key`` from each engine and join the pieces in engine order."""
        if dist != "b":
            raise ValueError(f"only block distribution ('b') is supported, not {dist!r}")
        engine_ids = self._targets(targets)
        frames = pack_apply(_ops().pull, (key,), {})
        msg_ids = [self.client._send_task("apply_request", {}, frames, e)[0]
                   for e in engine_ids]
        ar = AsyncMapResult(self.client, msg_ids, mapping.join, fname="gather")
        return self._finish(ar, block)

    # ------------------------------------------------------------------ map
    def map(self, f: Any, *sequences: Any, block: bool | None = None,
            track: bool | None = None, return_exceptions: bool = False) -> Any:
        """Parallel ``map``: each engine gets one contiguous piece of the sequences."""
        if not sequences:
            raise TypeError("map needs at least one sequence")
        seqs = [s if hasattr(s, "__getitem__") and hasattr(s, "__len__") else list(s)
                for s in sequences]
        n = min(len(s) for s in seqs)
        engine_ids = self._targets()
        p = max(1, min(len(engine_ids), n))
        per_seq = [mapping.partition(s[:n], p) for s in seqs]
        msg_ids = []
        md = self._limit_md()
        for i, engine_id in enumerate(engine_ids[:p]):
            chunks = tuple(ps[i] for ps in per_seq)
            frames = pack_apply(mapping.map_chunk, (f, *chunks), {})
            msg_ids.append(self.client._send_task("apply_request", {}, frames, engine_id,
                                                  extra_md=md)[0])
        ar = AsyncMapResult(self.client, msg_ids, mapping.join,
                            fname=getattr(f, "__name__", "map"))
        return self._finish(ar, block)

    def map_async(self, f: Any, *sequences: Any, **kwargs: Any) -> AsyncMapResult:
        return self.map(f, *sequences, block=False, **kwargs)

    def map_sync(self, f: Any, *sequences: Any, **kwargs: Any) -> Any:
        return self.map(f, *sequences, block=True, **kwargs)

    # ------------------------------------------------------------------ imports
    @contextlib.contextmanager
    def sync_imports(self, local: bool = True, quiet: bool = False) -> Iterator[None]:
        """Imports in the ``with`` block also run on every engine of this view."""
        real_import = builtins.__import__
        view = self
        depth = [0]
        owner = threading.get_ident()

        def importer(name: str, globals: Any = None, locals: Any = None,
                     fromlist: Any = (), level: int = 0) -> Any:
            if threading.get_ident() != owner:  # other threads import as usual
                return real_import(name, globals, locals, fromlist, level)
            top = depth[0] == 0
            depth[0] += 1
            try:
                module = real_import(name, globals, locals, fromlist, level) if local else None
            finally:
                depth[0] -= 1
            if top and level == 0:
                stmt = f"from {name} import {', '.join(fromlist)}" if fromlist else f"import {name}"
                if not quiet:
                    print(f"{stmt} on engine(s)")
                view.execute(stmt, block=True)
            return module

        builtins.__import__ = importer
        try:
            yield
        finally:
            builtins.__import__ = real_import

