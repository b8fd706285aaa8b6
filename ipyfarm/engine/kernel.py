"""FarmKernel: an IPython kernel that also runs ipyfarm tasks.

Shell requests (from the controller, or any Jupyter client)::

    execute_request ─► IPythonKernel.execute_request   (standard cell, outputs on iopub)
    apply_request   ─► FarmKernel.apply_request         f(*args, **kwargs) in the user namespace

Both replies carry ipyfarm metadata (``engine_id, engine_uuid, started, completed, status,
stdout, stderr, outputs, execute_result, error, msg_type``), built from the outputs the
request published, which :class:`~ipyfarm.engine.capture.EngineSession` records.

Control requests (handled on the control thread, so they act while a task runs):
``abort_request`` (these msg_ids will be answered ``aborted`` instead of running),
``clear_request`` (empty the user namespace), ``signal_request`` (signal this process:
SIGINT interrupts the running task).
"""

from __future__ import annotations

import _signal
import asyncio
import contextvars
import os
import signal
import sys
import threading
import traceback
import uuid
from typing import Any

import zmq
from ipykernel.ipkernel import IPythonKernel
from zmq.eventloop.zmqstream import ZMQStream
from traitlets import default

from ipyfarm.engine import ops
from ipyfarm.engine.capture import Captured, EngineSession, OutputCapture
from ipyfarm.protocol.memo import remember
from ipyfarm.protocol.messages import SchemaError, validate
from ipyfarm.protocol.session import frames_bytes, iso_now, unpack_json
from ipyfarm.protocol.serialize import (
    SerializationError,
    dumps,
    forget_added,
    unpack_apply,
)

__all__ = ["FarmKernel"]

#: how many aborted msg_ids are remembered (ids never seen again would pile up otherwise)
_ABORTED_LIMIT = 100_000
_DELIM = b"<IDS|MSG>"
_ERROR_KEYS = ("status", "ename", "evalue", "traceback", "engine_info")


def _describe(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}".removeprefix("builtins.")


class EngineExit(SystemExit):
    """Raised (from a signal handler) to stop the engine; never reported as a task error."""


class FarmKernel(IPythonKernel):
    """IPython kernel with ``apply_request`` and ipyfarm's control requests."""

    implementation = "ipyfarm"
    msg_types = [*IPythonKernel.msg_types, "apply_request"]
    control_msg_types = [
        *IPythonKernel.control_msg_types,
        "abort_request",
        "clear_request",
        "signal_request",
    ]
    # outputs are flushed synchronously before each reply; no need to sleep after them
    _execute_sleep = 0.0

    @default("ident")
    def _default_ident(self) -> str:
        # the app picks the uuid first: it names the connection file
        return getattr(self.parent, "engine_uuid", None) or str(uuid.uuid4())

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aborted: dict[str, None] = {}  # insertion-ordered set, bounded
        self.properties: dict[str, Any] = {}
        self._sent_properties: dict[str, Any] = {}  # as the controller last heard them
        self._queued_shell = 0  # shell messages on ipykernel's (asynchronous) path
        _cache_signature_checks()
        ops._bind(self)

    async def poll_stopped_queue(self) -> None:
        # ipykernel starts this whenever a debugpy stream exists, debugger or not
        if getattr(self, "debugger", None) is not None:
            await super().poll_stopped_queue()

    # ---- shell: the synchronous path for apply requests ---------------------------------
    # ipykernel runs every shell message as asyncio tasks (two tasks, a lock, then the
    # reply queued on the stream for a later loop turn): about half of an engine's time
    # per no-op task. An apply_request that arrives while no other shell message is
    # queued or running is handled at once, inside the socket's callback, and its reply
    # goes straight to the socket. Anything else (execute, comms, an apply behind an
    # async cell) takes ipykernel's path, so the order of requests is kept.

    @property
    def _supports_kernel_subshells(self) -> bool:
        # engines serve the shell on the main loop unless subshells were asked for
        # (see engine.app.MainThreadShell, which is False here)
        return bool(self.shell_channel_thread)

    def start(self) -> None:
        super().start()
        if self.shell_stream is None or self.shell_channel_thread:
            return  # subshells route shell messages through their own thread
        context = contextvars.copy_context()

        async def queued(msg: list) -> None:
            try:
                await asyncio.create_task(self.shell_main(None, msg), context=context)
            finally:
                self._queued_shell -= 1

        def on_shell(msg: list) -> Any:
            if self._queued_shell or not _is_apply_frames(msg):
                self._queued_shell += 1
                if msg and type(msg[0]) is not zmq.Frame:  # from the direct reader
                    msg = [zmq.Frame(f) for f in msg]
                return queued(msg)  # ZMQStream schedules the coroutine
            self._apply_now(msg)
            return None

        self.shell_stream.on_recv(on_shell, copy=False)
        self._read_shell_directly(on_shell)

    def _read_shell_directly(self, on_shell: Any) -> None:
        """Take the shell socket's readable events before its ZMQStream does.

        The stream reads one message per event loop turn (and asks the socket its
        state, as enum flags, several times for each): for an apply_request that costs
        about as much as running it. Here each event drains the socket through
        :mod:`ipyfarm.directzmq` (bytes frames, the GIL kept) into the same ``on_shell``;
        the stream still runs when it has replies of ipykernel's path to send, and
        keeps its own reading as the fallback for anything left. Nothing changes where
        the event loop is not tornado's asyncio one, or directzmq is unavailable.
        """
        from ipyfarm import directzmq

        stream = self.shell_stream
        handlers = getattr(stream.io_loop, "handlers", None)
        if not directzmq.available or not isinstance(handlers, dict):
            return
        sock = stream.socket
        fd = sock.getsockopt(zmq.FD)
        entry = handlers.get(fd)
        if entry is None:
            return
        fileobj, stream_handler = entry
        try_recv = directzmq.try_recv
        log = self.log
        aio = getattr(stream.io_loop, "asyncio_loop", None)

        def logged(future: asyncio.Future) -> None:
            if not future.cancelled() and future.exception() is not None:
                log.error("Exception handling a shell message", exc_info=future.exception())

        def on_events(fd_: Any, events: int) -> None:
            drained = failed = False
            for _ in range(256):  # then give the loop a turn, and read on
                try:
                    frames = try_recv(sock)
                except zmq.ZMQError:
                    failed = True  # (closed, say): the stream's handler deals with it
                    break
                if frames is None:
                    drained = True
                    break
                try:
                    pending = on_shell(frames)
                except Exception:
                    log.error("Exception handling a shell message", exc_info=True)
                    continue
                if pending is not None:  # ipykernel's path: a coroutine, as the stream
                    asyncio.ensure_future(pending).add_done_callback(logged)
            if not drained and not failed and aio is not None:
                # the rest after the loop's next turn, still read here: the stream would
                # take them one per turn through its own, slower path (and keep them,
                # rescheduling itself while any is left)
                aio.call_soon(on_events, fd_, 0)
                if stream.sending():
                    stream_handler(fd_, events)
            elif not drained or stream.sending():
                # the stream reads what is left, or sends what it queued. Drained with
                # nothing queued, it would only ask the socket its state again (half
                # an apply's time on the engine); a send queued later schedules the
                # stream's handler itself
                stream_handler(fd_, events)

        handlers[fd] = (fileobj, on_events)
        session = self.session
        loop = getattr(stream.io_loop, "asyncio_loop", None)
        if isinstance(session, EngineSession) and loop is not None:
            # execute replies too go straight to the socket when nothing is queued on the
            # stream; the socket is read again on the next loop pass (EngineSession.send)
            main = threading.main_thread()

            def direct_socket(target: Any) -> Any:
                if (target is stream and not stream.sending()
                        and threading.current_thread() is main):
                    return sock
                return None

            session.direct_socket = direct_socket
            session.after_direct_send = lambda: loop.call_soon(on_events, fd, 0)

    def _apply_now(self, msg: list) -> None:
        """What ``dispatch_shell`` does for an apply_request, without the event loop.

        The headers' dates stay text: nothing on this path reads them (outputs carry
        the parent header as it came, the reply the request's header bytes)."""
        if type(msg[0]) is bytes:  # the direct reader's frames (_is_apply_frames found one)
            i = msg.index(_DELIM)
            idents, frames = msg[:i], msg[i + 1:]
        else:
            idents, frames = self.session.feed_identities(msg, copy=False)
        try:
            parent = self.session.deserialize(frames, content=True, copy=False, dates=False)
        except Exception:
            self.log.error("Invalid Message", exc_info=True)
            return
        stream = self.shell_stream
        self.set_parent(idents, parent, channel="shell")
        if not self.should_handle(stream, parent, idents):
            return
        try:
            self.pre_handler_hook()
        except Exception:
            self.log.debug("Unable to signal in pre_handler_hook:", exc_info=True)
        try:
            self.apply_request(stream, idents, parent, frames_bytes(frames[1]))
        except Exception:
            self.log.error("Exception in message handler:", exc_info=True)
        except KeyboardInterrupt:
            self.log.error("KeyboardInterrupt caught in kernel.")
        finally:
            try:
                self.post_handler_hook()
            except Exception:
                self.log.debug("Unable to signal in post_handler_hook:", exc_info=True)

    # signal.signal wraps its handlers in enums both ways; per task that was 15% of an
    # engine's time. The C function takes and returns the same plain values.
    def pre_handler_hook(self) -> None:
        self.saved_sigint_handler = _signal.signal(_signal.SIGINT, _signal.default_int_handler)

    def post_handler_hook(self) -> None:
        _signal.signal(_signal.SIGINT, self.saved_sigint_handler)

    # ---- execute: each cell transformed once ------------------------------------------

    async def do_execute(self, code: str, silent: bool, *args: Any, **kwargs: Any) -> Any:
        """ipykernel's, with the cell's transformation done once.

        For a cell without top-level ``await``, ipykernel transforms the cell and asks
        whether it is async, then calls ``shell.run_cell``, which does both again: for
        ``pass`` that was a quarter of the engine's time per execute. During this
        request the shell answers a repeated call for the very same cell object from
        a memo (nothing runs in between: the user's code runs after the second call).
        """
        shell = self.shell
        if shell is None or "transform_cell" in vars(shell):
            return await super().do_execute(code, silent, *args, **kwargs)
        transform, should_async = shell.transform_cell, shell.should_run_async
        last: list = [None, None, None, None]  # raw cell, its transform, args, async?

        def transform_cell(raw_cell: str) -> str:
            if last[0] is raw_cell and last[1] is not None:
                return last[1]
            out = transform(raw_cell)
            last[0], last[1] = raw_cell, out
            return out

        def should_run_async(raw_cell: str, *, transformed_cell: Any = None,
                             preprocessing_exc_tuple: Any = None) -> bool:
            key = (raw_cell, transformed_cell, preprocessing_exc_tuple)
            if last[2] is not None and all(a is b for a, b in zip(last[2], key, strict=True)):
                return last[3]
            # whether a text has a top-level await is a property of the text: one
            # compile per distinct cell, not per execute
            cacheable = (preprocessing_exc_tuple is None and type(transformed_cell) is str
                         and len(transformed_cell) <= _CELL_CACHE_CHARS and shell.autoawait)
            answer = _HAS_TOP_LEVEL_AWAIT.get(transformed_cell) if cacheable else None
            if answer is None:
                answer = should_async(raw_cell, transformed_cell=transformed_cell,
                                      preprocessing_exc_tuple=preprocessing_exc_tuple)
                if cacheable:
                    remember(_HAS_TOP_LEVEL_AWAIT, transformed_cell, bool(answer),
                             _CACHE_ENTRIES)
            last[2], last[3] = key, answer
            return answer

        shell.transform_cell = transform_cell
        shell.should_run_async = should_run_async
        _cache_static_transforms(shell)
        try:
            return await super().do_execute(code, silent, *args, **kwargs)
        finally:
            del shell.transform_cell, shell.should_run_async

    # ---- identity ---------------------------------------------------------------------

    @property
    def engine_id(self) -> int:
        """The controller's number for this engine; -1 until registered."""
        return self.int_id

    @engine_id.setter
    def engine_id(self, value: int) -> None:
        self.int_id = int(value)

    @property
    def engine_uuid(self) -> str:
        return self.ident

    def _engine_info(self, method: str) -> dict[str, Any]:
        return {"engine_id": self.int_id, "engine_uuid": self.ident, "method": method}

    @property
    def _capture(self) -> OutputCapture | None:
        session = self.session
        return session.capture if isinstance(session, EngineSession) else None

    # ---- reply metadata (execute, apply, aborted) -------------------------------------

    def init_metadata(self, parent: dict) -> dict[str, Any]:
        capture = self._capture
        if capture is not None:
            capture.begin(parent["header"]["msg_id"])
        return {
            "engine_id": self.int_id,
            "engine_uuid": self.ident,
            "started": iso_now(),
            "msg_type": parent["header"]["msg_type"],
            "dependencies_met": True,
        }

    def finish_metadata(self, parent: dict, metadata: dict, reply_content: dict) -> dict:
        capture = self._capture
        captured = capture.end(parent["header"]["msg_id"]) if capture else Captured()
        metadata.update(captured.as_metadata())
        status = reply_content["status"]
        metadata["status"] = status
        if self.properties != self._sent_properties:
            # the scheduler places tasks on properties: tell it when they change
            self._sent_properties = dict(self.properties)
            metadata["properties"] = self._sent_properties
        metadata["completed"] = iso_now()
        if status == "error":
            metadata["error"] = {k: reply_content[k] for k in _ERROR_KEYS if k in reply_content}
            if reply_content.get("ename") == "UnmetDependency":
                metadata["dependencies_met"] = False
        return metadata

    # ---- status: the controller's tasks publish none --------------------------------------
    # A busy/idle pair per task is two iopub messages through the iopub thread, which
    # then runs while the reply is written: for an `execute` of `pass` on two engines
    # that was ~30% of the round trip. The controller drops them (it tracks task state
    # itself), and apply is not a Jupyter request at all. Requests from any other client
    # (a console attached to the engine) keep their status messages; execute_input is
    # published for every execute, so such a console still sees %px's code.

    def _is_task(self, parent: Any) -> bool:
        """Whether ``parent`` is one of the controller's tasks: every apply_request, and
        an execute_request whose metadata carries the controller's ``engine_id`` key."""
        header = (parent or {}).get("header") if isinstance(parent, dict) else None
        if not isinstance(header, dict):
            return False
        msg_type = header.get("msg_type")
        if msg_type == "apply_request":
            return True
        if msg_type == "execute_request":
            md = parent.get("metadata")
            return isinstance(md, dict) and "engine_id" in md
        return False

    def _publish_status(self, status: str, channel: str, parent: Any = None) -> None:
        if self._is_task(parent or self.get_parent(channel)):
            return
        super()._publish_status(status, channel, parent)

    def _publish_status_and_flush(self, status: str, channel: str, stream: Any,
                                  parent: Any = None) -> None:
        if self._is_task(parent or self.get_parent(channel)):
            return
        super()._publish_status_and_flush(status, channel, stream, parent)

    def _flush_output(self) -> None:
        if sys.stdout is not None:
            sys.stdout.flush()
        if sys.stderr is not None:
            sys.stderr.flush()

    # ---- shell: apply -----------------------------------------------------------------

    def apply_request(self, stream: Any, ident: list, parent: dict,
                      raw_header: bytes | None = None) -> None:
        """Call ``f(*args, **kwargs)`` from the request's buffers; reply with its result.

        ``raw_header`` (the request's verified header bytes) comes only from the
        synchronous path (:meth:`_apply_now`), whose reply may go straight to the socket.
        """
        metadata = self.init_metadata(parent)
        reply_content, buffers = self._run_apply(parent)
        if threading.current_thread() is threading.main_thread():
            # the task is over: a late Ctrl-C must not cut the reply (post_handler_hook
            # restores the idle handler)
            _signal.signal(signal.SIGINT, _signal.SIG_IGN)
        self._flush_output()
        metadata = self.finish_metadata(parent, metadata, reply_content)
        if raw_header is not None and isinstance(stream, ZMQStream) and not stream.sending():
            # the synchronous path with nothing queued before it: straight to the socket.
            # Safe only there: this runs inside the ZMQStream's receive callback, which
            # re-reads the socket's events afterwards, so a request whose edge this send
            # consumed is still picked up (from an asyncio task it would be missed)
            self.session.send_reply(stream.socket, ident, raw_header, "apply_reply",
                                    reply_content, metadata, buffers)
            return
        self.session.send(
            stream, "apply_reply", reply_content, parent, ident=ident, buffers=buffers,
            metadata=metadata,
        )

    def _run_apply(self, parent: dict) -> tuple[dict, list]:
        shell = self.shell
        f = None
        try:
            # zmq frames are writable: hand out read-only views (no copy), as documented
            buffers = [memoryview(b).toreadonly() for b in parent["buffers"]]
            f, args, kwargs = unpack_apply(buffers, shell.user_ns)
            result = f(*args, **kwargs)
            try:
                buffers = dumps(result)
            except Exception as e:
                raise SerializationError(
                    f"the result of {getattr(f, '__name__', 'the task')} (type "
                    f"{_describe(result)}) cannot be pickled to send back: {e}. Return "
                    "something picklable (plain data, arrays), or store the object in an "
                    "engine variable and pull what you need from it."
                ) from None
            return {"status": "ok"}, buffers
        except EngineExit:
            raise
        except BaseException as e:  # noqa: BLE001 - every task error is reported, not raised
            return self._error_content(e, "apply", f is None), []

    def _error_content(self, exc: BaseException, method: str, unpacking: bool) -> dict:
        """Publish the traceback on iopub (IPython formatting) and build the error reply."""
        shell = self.shell
        shell._last_traceback = None
        if unpacking:
            exc = _unpack_failure(exc)
        try:
            shell.showtraceback((type(exc), exc, exc.__traceback__), tb_offset=1)
        except Exception:
            self.log.error("could not format the traceback of %r", exc, exc_info=True)
        stb = shell._last_traceback or traceback.format_exception(exc)
        shell._last_traceback = None
        try:
            evalue = str(exc)
        except Exception as str_error:
            evalue = f"<str() of the exception failed: {str_error!r}>"
        return {
            "status": "error",
            "ename": type(exc).__name__,
            "evalue": evalue,
            "traceback": stb,
            "engine_info": self._engine_info(method),
        }

    # ---- shell: aborted requests ------------------------------------------------------

    def should_handle(self, stream: Any, msg: dict, idents: list) -> bool:
        msg_id = msg["header"]["msg_id"]
        if msg_id in self.aborted:
            del self.aborted[msg_id]
            self._send_abort_reply(stream, msg, idents)
            return False
        return True

    def _send_abort_reply(self, stream: Any, msg: dict, idents: list) -> None:
        self.log.info("aborting %s %s", msg["header"]["msg_type"], msg["header"]["msg_id"])
        content = {"status": "aborted"}
        metadata = self.finish_metadata(msg, self.init_metadata(msg), content)
        reply_type = msg["header"]["msg_type"].rsplit("_", 1)[0] + "_reply"
        self.session.send(
            stream, reply_type, content, msg, ident=idents, metadata=metadata
        )

    # ---- control ----------------------------------------------------------------------

    def _valid(self, parent: dict) -> bool:
        msg_type = parent["header"]["msg_type"]
        try:
            validate(msg_type, parent["content"])
        except SchemaError as e:
            self.log.error("dropped a malformed %s: %s", msg_type, e)
            return False
        return True

    def abort_request(self, stream: Any, ident: list, parent: dict) -> None:
        """Answer the listed tasks ``aborted`` when they come up, without running them.

        The controller knows each engine's queue and always names the tasks, so an
        abort never races with tasks sent after it.
        """
        if not self._valid(parent):
            return
        for msg_id in parent["content"]["msg_ids"]:
            self.aborted[str(msg_id)] = None
        while len(self.aborted) > _ABORTED_LIMIT:
            del self.aborted[next(iter(self.aborted))]
        self.session.send(stream, "abort_reply", {"status": "ok"}, parent, ident=ident)

    def clear_request(self, stream: Any, ident: list, parent: dict) -> None:
        """Empty the user namespace (IPython's own names come back)."""
        if not self._valid(parent):
            return
        self.clear_namespace()
        self.session.send(stream, "clear_reply", {"status": "ok"}, parent, ident=ident)

    def clear_namespace(self) -> None:
        forget_added(self.shell.user_ns)
        self.shell.reset(new_session=False)

    def signal_request(self, stream: Any, ident: list, parent: dict) -> None:
        """Send ``signum`` to this engine process (SIGINT interrupts the running task)."""
        if not self._valid(parent):
            return
        signum = parent["content"]["signum"]
        try:
            signum = signal.Signals(signum)
        except ValueError:
            content = {
                "status": "error",
                "ename": "ValueError",
                "evalue": f"{signum} is not a signal number on this engine's platform",
                "traceback": [],
            }
            self.session.send(stream, "signal_reply", content, parent, ident=ident)
            return
        # reply first: the signal may end this process
        self.session.send(stream, "signal_reply", {"status": "ok"}, parent, ident=ident)
        if stream is not None and hasattr(stream, "flush"):
            stream.flush(zmq.POLLOUT)
        if signum == signal.SIGINT and hasattr(signal, "pthread_kill"):
            # to the thread running the task: a process-directed signal may be taken by
            # another thread, and a task blocked in a system call (sleep, a wait) would
            # then see the interrupt only when that call returns
            signal.pthread_kill(threading.main_thread().ident, signum)
        else:
            os.kill(os.getpid(), signum)


def _cache_signature_checks() -> None:
    """Answer ipykernel's per-execute "does run_cell accept cell_id?" from a cache.

    ipykernel 7 asks ``inspect.signature`` of the shell's ``run_cell_async`` on every
    execute_request (about a tenth of an engine's time for a short cell), and the
    answer depends only on the function. Engines only: this is their process.
    """
    from ipykernel import ipkernel

    original = getattr(ipkernel, "_accepts_parameters", None)
    if original is None or getattr(original, "ipyfarm_cached", False):
        return
    cache: dict[tuple, dict] = {}

    def accepts_parameters(meth: Any, param_names: list) -> dict:
        key = (getattr(meth, "__func__", meth), tuple(param_names))
        found = cache.get(key)
        if found is None:
            found = cache[key] = original(meth, param_names)
        return dict(found)

    accepts_parameters.ipyfarm_cached = True  # type: ignore[attr-defined]
    ipkernel._accepts_parameters = accepts_parameters


_CELL_CACHE_CHARS = 16384  # longer cells are transformed and checked every time
_CACHE_ENTRIES = 256
_HAS_TOP_LEVEL_AWAIT: dict[str, bool] = {}


def _cache_static_transforms(shell: Any) -> None:
    """Memoize the shell's static input transformations (IPython's TransformerManager:
    magics, ``!cmd``, ``x?``, prompts), a function of the cell's text and the
    transformers configured, which tokenizes the whole cell: for a short cell, a tenth
    of an engine's time per execute. The dynamic part (prefilters, which look at the
    namespace) and ``input_transformers_post`` still run for every execute."""
    manager = getattr(shell, "input_transformer_manager", None)
    original = getattr(manager, "transform_cell", None)
    if original is None or getattr(original, "ipyfarm_cached", False):
        return
    cache: dict = {}

    def transform_cell(cell: Any) -> Any:
        if type(cell) is not str or len(cell) > _CELL_CACHE_CHARS:
            return original(cell)
        try:
            key = (cell, tuple(manager.cleanup_transforms), tuple(manager.line_transforms),
                   tuple(manager.token_transformers))
            hit = cache.get(key)
        except (AttributeError, TypeError):  # another manager, unhashable transformers
            return original(cell)
        if hit is None:
            hit = original(cell)  # an error is raised each time, not remembered
            remember(cache, key, hit, _CACHE_ENTRIES)
        return hit

    transform_cell.ipyfarm_cached = True  # type: ignore[attr-defined]
    manager.transform_cell = transform_cell


def _is_apply_frames(msg: list) -> bool:
    """Whether a raw shell message's (unverified) header says apply_request.

    Only routing: the message is verified when it is deserialized, on either path.
    """
    for i, frame in enumerate(msg[:16]):  # identities come first, and are few
        if len(frame) == len(_DELIM) and frames_bytes(frame) == _DELIM:
            if len(msg) < i + 6:
                return False
            try:
                header = unpack_json(frames_bytes(msg[i + 2]))
            except ValueError:
                return False
            return (isinstance(header, dict) and header.get("msg_type") == "apply_request"
                    and not header.get("subshell_id"))
    return False


def _unpack_failure(exc: BaseException) -> BaseException:
    """Say that a task could not even be rebuilt on the engine (a missing module, usually)."""
    if isinstance(exc, (KeyboardInterrupt, NameError)):
        return exc  # an interrupt, or a Reference to a missing name: already clear
    hint = ""
    if isinstance(exc, (ModuleNotFoundError, AttributeError)):
        hint = (
            " Likely cause: the function or an argument needs a module (or a version of "
            "it) that this engine's Python lacks; install it where the engine runs."
        )
    wrapped = SerializationError(
        f"could not unpickle the task on this engine: {type(exc).__name__}: {exc}.{hint}"
    )
    wrapped.__cause__ = exc
    wrapped.__traceback__ = exc.__traceback__
    return wrapped
