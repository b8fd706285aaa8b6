"""Client: the connection to a controller, its task records, and views on engines.

Data flow::

    user thread ── sign + queue ──► ClientIO thread ── DEALER ──► controller ──► engine
    AsyncResult ◄── results/metadata ◄── ClientIO thread ◄────────────── reply ◄──┘
"""

from __future__ import annotations

import os
import signal as _signal
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import Any

import zmq

from .. import error
from ..protocol.serialize import loads
from ..protocol.session import (
    FarmSession,
    Parsed,
    parse_date,
    split_identities,
)
from ..protocol.sizes import check_outgoing
from .asyncresult import AsyncResult, Metadata
from .comms import CommBridge
from .connect import find_connection_info
from .display import ExecuteReply
from .io import ClientIO
from .records import ClientRecords

__all__ = ["Client"]

_IOPUB = frozenset({"stream", "display_data", "update_display_data", "execute_result",
                    "error", "clear_output"})
_REPLIES = frozenset({"apply_reply", "execute_reply"})
_COMMS = frozenset({"comm_open", "comm_msg", "comm_close"})
#: replies with more buffer bytes than this are unpickled on the I/O thread, not the hub's
_INLINE_MAX_BYTES = 65536


_created: list = []  # weak references to the clients of this process, oldest first


def latest_client() -> Client | None:
    """The most recently created Client of this process that is still open, or None."""
    for ref in reversed(_created):
        rc = ref()
        if rc is not None and not rc.closed and not rc.hub_shut_down:
            return rc
    return None


def _register_magics() -> None:
    """Register ipyfarm's magics (``%px``, ``%farm``, ...) in the IPython shell this runs
    in, unless they are there already. Cheap and idempotent: no IPython import outside
    IPython, and the magics module is imported only the first time."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return
    line_magics = shell.magics_manager.magics["line"]
    if "px" in line_magics and "farm" in line_magics:
        return
    from ..magics import load_ipython_extension  # the magics depend on the client

    load_ipython_extension(shell)


class Client(ClientRecords):
    """A connection to an ipyfarm controller (ipyparallel-compatible).

    ``Client()`` finds the embedded controller of this process, else the newest
    running cluster; ``Client(profile="x")`` or ``Client(url_file=path)`` pick one.
    ``sshserver="user@host[:port]"`` (with ``sshkey``, ``ssh_args``) reaches a controller
    behind a login node through an ssh tunnel (:mod:`.tunnel`).
    """

    def __init__(self, url_file: str | Path | None = None, profile: str | None = None,
                 timeout: float = 10, context: zmq.Context | None = None,
                 cluster: Any = None, sshserver: str | None = None,
                 sshkey: str | None = None, ssh_args: list[str] | tuple = (), **kwargs: Any):
        if isinstance(url_file, dict):
            info = url_file
        else:
            info = find_connection_info(url_file, profile)
        self._info = info
        self.profile = info.get("profile", profile)
        self.cluster = cluster
        self.session = FarmSession(key=info["key"].encode(), username="ipyfarm-client")
        self.results: dict[str, Any] = {}
        self.metadata: dict[str, Metadata] = {}
        self.history: list[str] = []
        self.outstanding: set[str] = set()
        self._engines: dict[int, dict] = {}
        self._watchers: dict[str, list[AsyncResult]] = {}
        self._hub_waiters: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._engines_changed = threading.Condition()
        self._closed = False
        self.hub_shut_down = False
        self.block = False
        self._comms = CommBridge(self)
        self.context = context or zmq.Context.instance()
        url = info["client"]
        hub = None
        self._tunnel = None
        if sshserver:  # a controller behind a login node: through our own ssh -L
            from .tunnel import Tunnel

            self._tunnel = Tunnel(sshserver, url, key=sshkey, ssh_args=ssh_args,
                                  timeout=timeout)
            url = self._tunnel.url
        elif info.get("inproc") and info.get("pid") == os.getpid() and context is None:
            from ..controller.embedded import hub_at

            url = info["inproc"]  # an embedded controller of this process: no TCP
            hub = hub_at(url)  # and, while it runs, no sockets at all
        self._io = ClientIO(self.context, url, self._on_message, hub=hub,
                            curve_serverkey=info.get("curve_publickey"))
        if hub is not None:
            self._io.inline = self._on_hub_thread
        self._io.start()
        try:
            reply = self._connect(timeout)
        except error.TimeoutError:
            self.close()
            raise error.NoClusterError(
                f"the controller at {info['client']} (pid {info.get('pid')}) did not answer "
                f"within {timeout} s. It may have died and left a stale connection file; "
                "restart the cluster (`ipyfarm stop; ipyfarm start -n 4 --daemonize`)."
            ) from None
        with self._engines_changed:
            self._engines = {int(k): v for k, v in reply["engines"].items()}
        _created[:] = [r for r in _created if r() is not None]
        _created.append(weakref.ref(self))
        _register_magics()  # in IPython, %px works from now on, as in ipyparallel

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # ------------------------------------------------------------------ engines
    @property
    def ids(self) -> list[int]:
        """Ids of the engines registered now, sorted."""
        return sorted(self._engines)

    @property
    def engines(self) -> dict[int, dict]:
        return dict(self._engines)

    def __len__(self) -> int:
        return len(self._engines)

    def __getitem__(self, key: Any) -> Any:
        """``rc[0]``, ``rc[[0, 2]]``, ``rc[::2]``, ``rc[-1]``, ``rc[:]``: DirectViews."""
        from .view import DirectView

        if key is None:  # the oldest API's spelling of a load-balanced view
            return self.load_balanced_view()
        if isinstance(key, slice) and key == slice(None):
            return DirectView(self, "all")
        return DirectView(self, self._resolve_targets(key, keep_single=True))

    def activate(self, targets: Any = "all", suffix: str = "") -> Any:
        """Make ``%px<suffix>``, ``%%px<suffix>``, ``%autopx<suffix>``, ``%pxresult<suffix>``
        and ``%pxconfig<suffix>`` run on a blocking DirectView of ``targets``; returns it."""
        view = self.direct_view(targets)
        view.block = True
        view.activate(suffix)
        return view

    def direct_view(self, targets: Any = "all", **kwargs: Any) -> Any:
        from .view import DirectView

        if targets != "all" and targets is not None:
            targets = self._resolve_targets(targets, keep_single=True)
        return DirectView(self, "all" if targets is None else targets, **kwargs)

    def load_balanced_view(self, targets: Any = None, **kwargs: Any) -> Any:
        """A LoadBalancedView: the controller's scheduler picks an engine per task.

        ``targets`` limits the engines it may pick (default: all, including ones that
        register later); keyword arguments set its flags (``retries=2``, ...).
        """
        from .lbview import LoadBalancedView

        if targets is not None and not (isinstance(targets, str) and targets == "all"):
            targets = self._resolve_targets(targets)
        else:
            targets = None
        return LoadBalancedView(self, targets, **kwargs)

    def _resolve_targets(self, targets: Any, keep_single: bool = False) -> Any:
        """Engine ids from ``targets`` (int, list, slice, "all", None)."""
        if isinstance(targets, list | tuple | range):
            engines = self._engines
            out = []
            for t in targets:
                if type(t) is int and t >= 0 and t in engines:
                    out.append(t)  # (ids are not sorted again for each: 1,024 engines)
                    continue
                if not isinstance(t, int):
                    raise TypeError(f"engine ids must be ints, got {t!r}")
                out.append(self._resolve_targets(t, keep_single=True))
            return out
        ids = self.ids
        if targets is None or (isinstance(targets, str) and targets == "all"):
            if not ids:
                raise error.NoEnginesRegistered(
                    "no engines are registered with the controller; start some "
                    "(cluster.start_engines_sync(n)) or wait_for_engines(n)")
            return ids
        if isinstance(targets, int):
            if targets < 0:
                if -targets > len(ids):
                    raise IndexError(f"engine index {targets} out of range for {len(ids)} engines")
                targets = ids[targets]
            if targets not in self._engines:
                raise IndexError(f"no engine {targets}; registered engines are {ids}")
            return targets if keep_single else [targets]
        if isinstance(targets, slice):
            chosen = ids[targets]
            if not chosen:
                raise IndexError(f"slice {targets} selects no engine of {ids}")
            return chosen
        raise TypeError(f"targets must be an int, list of ints, slice or 'all', not {targets!r}")

    def wait_for_engines(self, n: int | None = None, timeout: float | None = -1,
                         block: bool = True) -> Any:
        """Wait until at least ``n`` engines are registered (raise TimeoutError otherwise)."""
        if not block:
            fut: Future = Future()

            def waiter() -> None:
                try:
                    fut.set_result(self.wait_for_engines(n, timeout, True))
                except Exception as e:
                    fut.set_exception(e)
            threading.Thread(target=waiter, daemon=True).start()
            return fut
        want = n if n is not None else (getattr(self.cluster, "n", None) or 1)
        limit = None if timeout is None or timeout < 0 else timeout
        deadline = None if limit is None else time.monotonic() + limit
        with self._engines_changed:
            while len(self._engines) < want:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise error.TimeoutError(
                        f"{len(self._engines)} of {want} engines registered after {timeout} s; "
                        "engines may have failed to start (see the cluster's log) or be slow")
                self._engines_changed.wait(0.5 if left is None else min(left, 0.5))
        return None

    # ------------------------------------------------------------------ sending
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Client is closed; create a new one")
        if self.hub_shut_down:
            raise error.NoClusterError("the controller has shut down; start a new cluster")

    def _send_task(self, msg_type: str, content: dict, buffers: list, engine_id: int | None,
                   extra_md: dict | None = None, track: bool = False) -> tuple[str, Any]:
        """Sign and queue one task message; returns ``(msg_id, tracker)``."""
        self._check_open()
        if buffers:
            check_outgoing(buffers, self._info.get("max_message_bytes"), msg_type)
        md: dict[str, Any] = {"engine_id": engine_id}
        if extra_md:
            md.update(extra_md)
        msg = self.session.msg(msg_type, content=content, metadata=md)
        msg_id = msg["header"]["msg_id"]
        frames = self.session.serialize_with_buffers(msg, None, buffers)
        meta = Metadata(msg_id=msg_id, submitted=msg["header"]["date"], engine_id=engine_id)
        if extra_md:
            for key in ("after", "follow"):
                dep = extra_md.get(key)
                if dep:
                    meta[key] = list(dep["ids"] if isinstance(dep, dict) else dep)
        self.metadata[msg_id] = meta
        self.outstanding.add(msg_id)
        self.history.append(msg_id)
        tracker = self._io.send(frames, track, task=True, header=msg["header"])
        return msg_id, tracker

    def _send_tasks(self, msg_type: str, content: dict, buffers: list, engine_ids: list,
                    extra_md: dict | None = None) -> list[str]:
        """One task per engine (a DirectView's fan-out); returns their msg_ids.

        Several engines get one message: the task for the first, with a ``fanout`` list of
        ``[engine_id, msg_id]`` for the others in its metadata. The controller makes each
        engine's copy (its own header and metadata, signed) from it, so the content and
        buffers are packed, hashed and sent once whatever the number of engines.
        """
        if len(engine_ids) < 2:
            return [self._send_task(msg_type, content, buffers, e, extra_md)[0]
                    for e in engine_ids]
        self._check_open()
        if buffers:
            check_outgoing(buffers, self._info.get("max_message_bytes"), msg_type)
        session = self.session
        ids = [session.msg_id for _ in engine_ids]
        md: dict[str, Any] = {"engine_id": engine_ids[0], **(extra_md or {})}
        md["fanout"] = [[e, m] for e, m in zip(engine_ids[1:], ids[1:], strict=True)]
        msg = session.msg(msg_type, content=content, metadata=md)
        msg["header"]["msg_id"] = msg["msg_id"] = ids[0]
        frames = session.serialize_with_buffers(msg, None, buffers)
        date = msg["header"]["date"]
        deps = {key: list(dep["ids"] if isinstance(dep, dict) else dep)
                for key in ("after", "follow") if (dep := md.get(key))}
        metadata, outstanding = self.metadata, self.outstanding
        for engine_id, msg_id in zip(engine_ids, ids, strict=True):
            metadata[msg_id] = Metadata(msg_id=msg_id, submitted=date, engine_id=engine_id,
                                        **deps)
            outstanding.add(msg_id)
        self.history.extend(ids)
        self._io.send(frames, task=True)
        return ids

    def _send_comm(self, msg_type: str, content: dict, buffers: list) -> None:
        """A frontend's message for a comm an engine opened (see :mod:`.comms`)."""
        check_outgoing(buffers, self._info.get("max_message_bytes"), msg_type)
        msg = self.session.msg(msg_type, content=content)
        self._io.send(self.session.serialize_with_buffers(msg, None, list(buffers)))

    def _connect(self, timeout: float | None) -> dict:
        """The controller's connection_reply, asked again after 1, 2, 4, 5, 5... s until
        it comes or ``timeout`` runs out. The reply goes to this client's receiving
        socket, and a controller drops it if that socket's connection is not up yet when
        the request arrives through the sending one (over a slow link, or a loaded
        machine). Asking again is harmless. ``batch``: this client takes several small
        replies in one frame (ClientIO unpacks them)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = 1.0
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                return self._hub_request("connection_request", {"batch": True},
                                         timeout=wait if left is None else
                                         max(0.01, min(wait, left)))
            except error.TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            wait = min(2 * wait, 5.0)

    def _hub_request(self, msg_type: str, content: dict, timeout: float | None = 10) -> dict:
        """Send a request to the controller and wait for its reply content."""
        self._check_open()
        msg = self.session.msg(msg_type, content=content)
        fut: Future = Future()
        self._hub_waiters[msg["header"]["msg_id"]] = fut
        self._io.send(self.session.serialize_with_buffers(msg, None, []))
        try:
            reply = fut.result(timeout)
        except FuturesTimeout:
            self._hub_waiters.pop(msg["header"]["msg_id"], None)
            raise error.TimeoutError(
                f"the controller did not answer {msg_type} within {timeout} s; "
                "it may be overloaded or dead") from None
        return reply["content"]

    # ------------------------------------------------------------------ receiving (I/O thread)
    def _on_hub_thread(self, item: Any) -> bool:
        """A message from the controller of this process, on its thread: a small reply
        is handled here and now (see ClientIO); anything else goes to the I/O thread."""
        if type(item) is not Parsed or item.header.get("msg_type") not in _REPLIES:
            return False
        if sum(len(b) for b in item.buffers) > _INLINE_MAX_BYTES:
            return False  # unpickling a big result must not hold up the controller
        self._on_message(item)
        return True

    def _on_message(self, frames: list | Parsed) -> None:
        try:
            if isinstance(frames, Parsed):  # from the controller of this process
                msg = self.session.from_parsed(frames)
            else:
                _, rest = split_identities(frames)
                msg = self.session.deserialize(rest, content=True, copy=False)
        except Exception as e:
            import logging

            logging.getLogger("ipyfarm.client").warning("client: dropped a bad message: %s", e)
            return
        mt = msg["msg_type"]
        if mt in _REPLIES:
            self._on_reply(msg)
        elif mt in _IOPUB:
            self._on_iopub(msg)
        elif mt == "registration_notification":
            with self._engines_changed:
                self._engines[msg["content"]["engine_id"]] = msg["content"]["info"]
                self._engines_changed.notify_all()
        elif mt == "unregistration_notification":
            with self._engines_changed:
                self._engines.pop(msg["content"]["engine_id"], None)
                self._engines_changed.notify_all()
        elif mt in _COMMS:
            self._comms.from_engine(msg)
        elif mt == "hub_shutdown_notification":
            self.hub_shut_down = True
        else:
            fut = self._hub_waiters.pop(msg["parent_header"].get("msg_id", ""), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _on_reply(self, msg: dict) -> None:
        msg_id = msg["parent_header"].get("msg_id")
        if msg_id is None:
            return
        rmd = msg["metadata"] or {}
        content = msg["content"]
        md = self.metadata.get(msg_id)
        if md is None:
            md = self.metadata[msg_id] = Metadata(msg_id=msg_id)
        for key in ("engine_id", "engine_uuid", "stdout", "stderr", "outputs",
                    "execute_result", "error", "status", "started", "completed"):
            if key in rmd:
                md[key] = rmd[key]
        md["status"] = content.get("status")
        md["started"] = parse_date(md["started"])
        md["completed"] = parse_date(md["completed"])
        md["received"] = msg["header"].get("date")
        status = content.get("status")
        if status == "ok":
            if msg["msg_type"] == "apply_reply":
                try:
                    result: Any = loads(msg["buffers"])
                except Exception as e:
                    result = error.RemoteError(
                        type(e).__name__, f"the result could not be unpickled here: {e}",
                        "", {"engine_id": md["engine_id"], "method": "apply"})
            else:
                result = ExecuteReply(msg_id, content, md)
        elif status == "aborted":
            result = error.wrap_exception({
                "ename": "TaskAborted", "evalue": f"task {msg_id} was aborted before it ran",
                "engine_info": {"engine_id": md["engine_id"]}})
        else:
            result = error.wrap_exception(content)
        with self._lock:
            self.results[msg_id] = result
            self.outstanding.discard(msg_id)
            watchers = self._watchers.pop(msg_id, ())
        if watchers:
            self._tell(watchers, msg_id)

    def _tell(self, watchers: Any, msg_id: str) -> None:
        """``msg_id`` finished: tell each of ``watchers`` (AsyncResults) so."""
        io = self._io
        on_hub = io.on_hub_thread()
        for ar in watchers:
            if on_hub and not ar._finish_anywhere:
                io.call_soon(ar._msg_done, msg_id)  # e.g. joining a map's results
            else:
                ar._msg_done(msg_id)

    def _on_iopub(self, msg: dict) -> None:
        msg_id = msg["parent_header"].get("msg_id")
        md = self.metadata.get(msg_id) if msg_id else None
        if md is None or msg_id in self.results:
            return  # the reply's metadata is authoritative once it is in
        mt, content = msg["msg_type"], msg["content"]
        if mt == "stream":
            # live text is capped as the engine caps its reply's (EngineSession.
            # max_output_text): a task printing 50 MB must not grow this process by 50 MB
            limit = 2**20
            name = content.get("name", "stdout")
            have = md.get(name) or ""
            room = limit - len(have)
            if room <= 0:
                return  # full, marker written; the reply brings what the engine kept
            text = content.get("text", "")
            if len(text) > room:
                text = (text[:room] + f"\n[ipyfarm: output truncated: live {name} beyond "
                        f"{limit} characters was not kept]\n")
            md[name] = have + text
        elif mt == "display_data":
            if len(md["outputs"]) < 1000:  # as the engine's EngineSession.max_outputs
                md["outputs"].append({"data": content.get("data", {}),
                                      "metadata": content.get("metadata", {})})
        elif mt == "execute_result":
            md["execute_result"] = content
        elif mt == "error":
            md["error"] = content

    def _watch(self, ar: AsyncResult) -> None:
        """Tell ``ar`` when each of its messages finishes (at once for finished ones).

        Without the client's lock: the submitting thread took it for every task while
        the thread delivering results held it for theirs, and waiting for it was a
        sixth of an ``apply_async`` loop's time in the submitting thread. Each step is
        one dict operation, atomic under the GIL; the watcher goes in first and the
        result is looked for after, so whichever thread comes second tells ``ar`` (both
        may: ``_msg_done`` counts each message once)."""
        watchers, results = self._watchers, self.results
        for msg_id in ar.msg_ids:
            watchers.setdefault(msg_id, []).append(ar)
            if msg_id in results:
                # it finished meanwhile (or before): the deliverer may have taken the
                # watchers already (without ``ar``, perhaps), or may not have yet. What
                # is still listed is told here, as the deliverer would have told it
                # (another thread's watcher may be in the list, having looked before
                # the result came); ``ar`` in any case.
                listed = [w for w in watchers.pop(msg_id, ()) if w is not ar]
                if listed:
                    self._tell(listed, msg_id)
                ar._msg_done(msg_id)

    # ------------------------------------------------------------------ waiting
    def _msg_ids_of(self, jobs: Any) -> list[str]:
        if jobs is None:
            return list(self.outstanding)
        if isinstance(jobs, str | int | AsyncResult):
            jobs = [jobs]
        out: list[str] = []
        for job in jobs:
            if isinstance(job, AsyncResult):
                out.extend(job.msg_ids)
            elif isinstance(job, int):
                out.append(self.history[job])
            elif isinstance(job, str):
                out.append(job)
            else:
                raise TypeError(f"expected msg_ids, history indices or AsyncResults, not {job!r}")
        return out

    def wait(self, jobs: Any = None, timeout: float | None = -1) -> bool:
        """Wait for ``jobs`` (default: all outstanding); True if all finished in time."""
        ids = [m for m in self._msg_ids_of(jobs) if m not in self.results]
        if not ids:
            return True
        return AsyncResult(self, ids, "wait", single=False,
                           return_exceptions=True).wait(timeout)

    def spin(self) -> None:
        """Kept for compatibility: results arrive on a background thread by themselves."""

    # ------------------------------------------------------------------ control
    def abort(self, jobs: Any = None, targets: Any = None, block: bool | None = None) -> None:
        """Abort queued tasks (by msg_id / AsyncResult), or everything queued on ``targets``."""
        msg_ids = None if jobs is None else self._msg_ids_of(jobs)
        tgt = None if targets is None else self._resolve_targets(targets)
        self._hub_request("hub_abort_request", {"msg_ids": msg_ids, "targets": tgt})

    def clear(self, targets: Any = None, block: bool | None = None) -> None:
        """Empty the namespaces of ``targets`` (default: all engines)."""
        tgt = None if targets is None else self._resolve_targets(targets)
        self._hub_request("hub_clear_request", {"targets": tgt})

    def send_signal(self, sig: int | str, targets: Any = None, block: bool | None = None) -> None:
        """Send a signal (e.g. ``signal.SIGINT`` to interrupt running code) to engines."""
        signum = int(getattr(_signal, sig)) if isinstance(sig, str) else int(sig)
        tgt = None if targets is None else self._resolve_targets(targets)
        self._hub_request("hub_signal_request", {"targets": tgt, "signum": signum})

    def shutdown(self, targets: Any = "all", restart: bool = False, hub: bool = False,
                 block: bool | None = None) -> None:
        """Stop engines (``targets``), and the controller too with ``hub=True``."""
        if restart:
            raise NotImplementedError("restarting engines is not supported; stop and start them")
        tgt = None if targets in ("all", None) else self._resolve_targets(targets)
        self._hub_request("hub_shutdown_request", {"targets": tgt, "hub": bool(hub)})

    # ------------------------------------------------------------------ lifetime
    def close(self, linger: float | None = None) -> None:
        """Close the connection (engines keep running)."""
        if self._closed:
            return
        self._closed = True
        self._io.stop()
        if self._tunnel is not None:
            self._tunnel.close()
        for fut in list(self._hub_waiters.values()):
            if not fut.done():
                fut.set_exception(RuntimeError("client closed"))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<Client {self._info.get('client')}: {len(self._engines)} engines>"
