"""The controller's I/O shell: sockets in, events to the state machine, commands out.

One thread runs :meth:`Hub.run`. Payload frames are received without copies and
forwarded unchanged; only headers are decoded. Nothing the hub receives is
unpickled. Bad input (wrong signature, garbage frames, unknown types) is
dropped and counted, with a rate-limited log line.

The hub's other halves are mixins: :mod:`.requests` answers clients' requests,
:mod:`.relay` passes engines' output and comms on, :mod:`.effects` carries out the state
machine's commands.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable

import zmq

from .. import curve, directzmq, switching
from ..protocol import batch
from ..protocol.sizes import DEFAULT_MAX_MESSAGE_BYTES, REGISTRATION_MAX_BYTES
from ..protocol.messages import SchemaError, validate
from ..protocol.session import (
    FarmSession,
    Parsed,
    SignatureError,
    frames_bytes,
    split_identities,
)
from . import commands as C
from . import events as E
from .db import MemoryTaskDB
from .effects import CommandEffects
from .poller import SocketPoller
from .relay import COMM_TYPES, OutputRelay
from .requests import ClientRequests
from .state import ControllerState
from .wire import (
    RateLimitedLog,
    compact,
    epoch,
    epoch_of,
    fanout_pairs,
    frames_nbytes,
    task_fields,
)

log = logging.getLogger("ipyfarm.controller")

TASK_TYPES = frozenset({"execute_request", "apply_request"})


def _curve_keys(ip: str, wanted: bool | None) -> tuple[str, str] | None:
    """A fresh cluster keypair when Curve is on for ``ip`` (see ipyfarm.curve), else None."""
    if curve.wanted(ip, wanted):
        return curve.new_keypair()
    if not curve.is_loopback(ip):
        log.warning("controller: " + curve.PLAINTEXT_WARNING.format(ip=ip))
    return None


#: one string object per reply status: a JSON decode makes a new "ok" for every reply,
#: and each finished task's record keeps its status (~50 bytes a record otherwise)
_STATUSES = {s: s for s in ("ok", "error", "aborted")}


class Hub(ClientRequests, OutputRelay, CommandEffects):
    """Sockets and the event loop around a :class:`ControllerState`."""

    def __init__(
        self,
        key: bytes | None = None,
        ip: str = "127.0.0.1",
        heartbeat_period: float = 1.0,
        heartbeat_timeout: float = 8.0,
        context: zmq.Context | None = None,
        state: ControllerState | None = None,
        scheme: str = "leastload",
        hwm: int = 1,
        db: Any = None,
        curve: bool | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.key = key if key is not None else secrets.token_hex(32).encode()
        if not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be a byte count >= 1024, not "
                             f"{max_message_bytes!r}")
        self.max_message_bytes = max_message_bytes
        self.ip = ip
        self.curve_keys = _curve_keys(ip, curve)  # (public, secret) z85, or None: plain
        self.session = FarmSession(key=self.key, username="ipyfarm-controller")
        if db is None:  # wall clock minus monotonic: records can say when they arrived
            db = MemoryTaskDB(clock_offset=time.time() - time.monotonic())
        self.state = state or ControllerState(heartbeat_period, heartbeat_timeout, db=db,
                                              scheme=scheme, hwm=hwm)
        self.context = context or zmq.Context.instance()
        # engine-facing sockets (three per engine) live in a context of their own, made
        # with the first engine so its socket limit can still be raised: libzmq's default
        # of 1023 sockets per context, fixed at its first socket, stops at ~340 engines
        self.engine_context: zmq.Context | None = None
        self.bad = RateLimitedLog()
        self.dropped: collections.Counter = collections.Counter()
        self.on_kill: Callable[[int, int], None] | None = None
        self.on_shutdown: Callable[[], None] | None = None
        #: the engine launcher's description (backend, job id and state...) for status
        self.launcher_info: Callable[[], dict] | None = None
        self._posted: collections.deque = collections.deque()
        # clients in this process: their messages come and go as frame lists, no sockets
        self._local: dict[bytes, Callable[[Any], None]] = {}  # receiving ident -> deliver
        # clients over sockets that take batched replies (protocol/batch.py; the latest
        # batch.MAX_CLIENTS to connect: an older one just gets its replies one by one),
        # and the small messages waiting for each until the hub next waits:
        # ident -> [messages, their bytes, when they must go at the latest]
        self.batching: dict[bytes, None] = {}
        self._outbox: dict[bytes, list] = {}
        self.batches_sent = 0  # (and the messages in them: for tests and diagnostics)
        self.batched_messages = 0
        self._client_inbox: collections.deque = collections.deque()
        # widgets made on engines: comm_id -> (client ident, engine id) of the task that
        # opened the comm; the engine's comm messages go to that client, and the
        # client's (from its notebook's frontend) to that engine
        self._comms: dict[str, tuple[bytes, int]] = {}
        self._post_lock = threading.Lock()
        self._stop = threading.Event()
        self.stopped = threading.Event()
        self._thread: threading.Thread | None = None
        #: ``threading.get_ident()`` of the thread running the loop (0 before it runs)
        self.thread_ident = 0
        # held by the hub's thread except while it waits for sockets; a thread of this
        # process that finds it free submits its task itself (see post_task)
        self._lock = threading.Lock()
        self._inline_ident = 0  # the thread submitting inline, while it does
        self._sleep_until = 0.0  # when the waiting hub thread wakes anyway (monotonic)
        self._yield_pending = False  # a client here woke a waiting thread: see _yield
        self._engine_socks: dict[int, tuple[zmq.Socket, zmq.Socket, str]] = {}
        self._dispatch_out: list = []  # (engine id, frames) to send: _flush_dispatches
        self._control_groups: dict[str, dict] = {}  # control msg_id -> waiting hub request
        self._control_engine: dict[str, int] = {}  # control msg_id -> engine id
        self._sent_control: list[str] = []
        self._bind()

    # ------------------------------------------------------------------ setup
    def _bind(self) -> None:
        ctx = self.context
        self.client_sock = ctx.socket(zmq.ROUTER)
        self.reg_sock = ctx.socket(zmq.ROUTER)
        for s in (self.client_sock, self.reg_sock):
            s.linger = 0
            s.router_handover = 1
            # a ROUTER drops what exceeds its high-water mark: never lose a reply
            s.sndhwm = 0
            s.rcvhwm = 0
            if self.curve_keys is not None:
                curve.serve(s, *self.curve_keys)
        # libzmq drops a peer whose frame is over the limit, before it is buffered whole
        self.client_sock.maxmsgsize = self.max_message_bytes
        self.reg_sock.maxmsgsize = REGISTRATION_MAX_BYTES
        self.client_port = self.client_sock.bind_to_random_port(f"tcp://{self.ip}")
        # clients in this process (same zmq context) skip TCP
        self.inproc_url = f"inproc://ipyfarm-hub-{os.getpid()}-{id(self)}"
        self.client_sock.bind(self.inproc_url)
        self.reg_port = self.reg_sock.bind_to_random_port(f"tcp://{self.ip}")
        self._wake_addr = f"inproc://ipyfarm-hub-wake-{id(self)}"
        self.wake_pull = ctx.socket(zmq.PULL)
        self.wake_pull.bind(self._wake_addr)
        self.wake_push = ctx.socket(zmq.PUSH)
        self.wake_push.linger = 0
        self.wake_push.connect(self._wake_addr)
        self.poller = SocketPoller()  # epoll: cost per loop follows the active sockets
        self._handlers: dict[Any, Callable[[list], None]] = {
            self.client_sock: self._on_client,
            self.reg_sock: self._on_registration,
            self.wake_pull: self._on_wake,
        }
        for s in self._handlers:
            self.poller.register(s, zmq.POLLIN)

    def connection_info(self) -> dict:
        return {
            "key": self.key.decode(),
            "signature_scheme": self.session.signature_scheme,
            "location": self.ip,
            "client": f"tcp://{self.ip}:{self.client_port}",
            "registration": f"tcp://{self.ip}:{self.reg_port}",
            "pid": os.getpid(),
            "max_message_bytes": self.max_message_bytes,
            **(curve.record(*self.curve_keys) if self.curve_keys is not None else {}),
        }

    # ------------------------------------------------------------------ threading
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="ipyfarm-hub", daemon=True)
        self._thread.start()

    def post(self, event: E.Event) -> None:
        """Hand an event to the hub from any thread."""
        self._posted.append(event)
        with self._post_lock:
            directzmq.wake(self.wake_push)

    def attach_local(self, ident: bytes, deliver: Callable[[list], None]) -> Callable[[list], None]:
        """Serve a client of this process without sockets.

        ``deliver(frames)`` is called on the hub's thread with each message for the
        client (``[DELIM, signature, header, ...]``); it must only queue them. Returns
        the function the client sends with: ``send([sending ident, DELIM, ...])``.
        Everything the client sends goes that way, so its messages stay in order.
        """
        self._local[ident] = deliver
        return self.post_client

    def detach_local(self, ident: bytes) -> None:
        self._local.pop(ident, None)

    def post_client(self, frames: list, header: dict | None = None) -> None:
        """A message from a client of this process (any thread); ``header``: see
        :meth:`post_task`."""
        inbox = self._client_inbox
        inbox.append((frames, header))
        # the hub drains the inbox until it sees it empty, so only the message that
        # makes it non-empty needs a wake-up (append first: checking emptiness before
        # appending races with the hub's last look)
        if len(inbox) == 1:
            with self._post_lock:
                directzmq.wake(self.wake_push)  # the poster keeps the GIL

    def post_task(self, frames: list, header: dict | None = None) -> None:
        """A task from a client of this process (any thread): submitted at once, on
        the caller's thread, when the hub's thread is waiting for sockets and nothing
        from this process's clients is queued before it; else queued like any message.
        ``header``: the header dict the client built the message with, which the
        controller then does not verify and decode again.

        That saves the task its hand-over to the hub's thread (a wake-up and the GIL
        passing between threads: ~50 us of a round trip here). The hub's lock keeps
        the state machine and sockets to one thread at a time; the caller then makes
        sure the waiting hub looks again where it must (:meth:`_after_inline`).
        """
        inbox = self._client_inbox
        lock = self._lock
        if not inbox and lock.acquire(blocking=False):
            try:
                if not inbox and not (self._stop.is_set() or self.stopped.is_set()):
                    # nothing older is queued (order kept), and the hub still runs
                    self._inline_ident = threading.get_ident()
                    try:
                        self._on_client(frames, local=True, header=header)
                    except Exception:  # a bug or bad input must not reach the caller
                        log.exception("controller: error handling a message")
                    finally:
                        self._inline_ident = 0
                    self._send_queued()
                    self._after_inline()
                    return
            finally:
                lock.release()
        self.post_client(frames, header)

    def _after_inline(self) -> None:
        """Wake the waiting hub thread if what a submission did needs it: a send on an
        engine's socket may have taken the readable signal of a reply that arrived
        meanwhile, and a task may bring a deadline before the hub would wake."""
        poller = self.poller
        readable = any(poller.readable(s) for s in poller.pending())
        deadline = self.state.next_deadline()
        if readable or (deadline is not None and deadline < self._sleep_until):
            with self._post_lock:
                directzmq.wake(self.wake_push)

    def yield_after_message(self) -> None:
        """Called on the hub's thread by a client of this process that just woke a
        thread waiting on a result: after this message the hub gives up its lock and
        the GIL once, so that thread runs now (and may submit its next task inline)
        rather than after the hub's next wait for sockets."""
        self._yield_pending = True

    def _yield(self) -> None:
        self._yield_pending = False
        if self._dispatch_out:  # engines get their tasks before this thread pauses
            self._flush_dispatches()
        self._lock.release()
        try:
            time.sleep(0)
        finally:
            self._lock.acquire()

    def in_hub(self) -> bool:
        """Whether the caller runs the hub's code now: its thread, or a submitting one."""
        ident = threading.get_ident()
        return ident == self.thread_ident or ident == self._inline_ident

    def _to_client(self, frames: list) -> None:
        """``[ident, DELIM, ...]`` to a client: queued for one of this process, else sent
        (small ones to a client that takes batches: at the next :meth:`_flush_clients`)."""
        ident = frames[0]
        deliver = self._local.get(ident)
        if deliver is not None:
            deliver(frames[1:])
            return
        if ident in self.batching:
            size = sum(map(len, frames))
            if size < batch.MAX_BYTES and all(type(f) is bytes for f in frames):
                box = self._outbox.get(ident)
                if box is None:
                    box = self._outbox[ident] = [[], 0, time.monotonic() + batch.MAX_DELAY]
                box[0].append(frames[1:])
                box[1] += size
                if (box[1] >= batch.MAX_BYTES or len(box[0]) >= batch.MAX_MESSAGES
                        or time.monotonic() > box[2]):
                    self._flush_client(ident)
                return
            if ident in self._outbox:
                self._flush_client(ident)  # what was queued before goes first
        directzmq.send(self.client_sock, frames)
        self.poller.recheck(self.client_sock)  # the send may have taken its readable signal

    def _flush_client(self, ident: bytes) -> None:
        msgs = self._outbox.pop(ident)[0]
        if len(msgs) == 1:
            directzmq.send(self.client_sock, [ident, *msgs[0]])
        else:
            directzmq.send(self.client_sock, [ident, batch.BATCH, batch.pack(msgs)])
            self.batches_sent += 1
            self.batched_messages += len(msgs)
        self.poller.recheck(self.client_sock)

    def _send_queued(self) -> None:
        """Send the queued dispatches (those the timers made, say) and batched replies."""
        if self._dispatch_out:
            self._flush_dispatches()
        if self._outbox:
            self._flush_clients()

    def _flush_clients(self) -> None:
        """Send what waits for clients that take batches (before the hub waits)."""
        for ident in list(self._outbox):
            try:
                self._flush_client(ident)
            except zmq.ZMQError as e:  # a socket error must not stop the hub
                log.warning("controller: could not send to client %r: %s", ident, e)

    def _send_to_client(self, ident: bytes, msg_type: str, content: dict,
                        parent: dict | None = None, metadata: dict | None = None,
                        buffers: list | None = None) -> None:
        msg = self.session.msg(msg_type, content=content, parent=parent, metadata=metadata)
        self._to_client(self.session.serialize_with_buffers(msg, ident, list(buffers or [])))

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._post_lock:
            directzmq.wake(self.wake_push)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        self.thread_ident = threading.get_ident()
        timer_every = min(0.5, self.state.heartbeat_period)
        next_timer = time.monotonic() + timer_every
        switching.enter()  # a busy thread of this process must not starve this one
        self._lock.acquire()  # released only while waiting for sockets (see post_task)
        try:
            while not self._stop.is_set():
                wake = next_timer
                deadline = self.state.next_deadline()
                if deadline is not None and deadline < wake:
                    wake = deadline
                wait = max(0.0, wake - time.monotonic())
                self._sleep_until = wake
                for sock, _ in self.poller.poll(wait * 1000, unlocked=self._lock):
                    handler = self._handlers.get(sock)
                    if handler is None:
                        continue
                    for _ in range(512):
                        try:
                            frames = directzmq.try_recv(sock)
                        except zmq.ZMQError:
                            break
                        if frames is None:
                            break
                        try:
                            handler(frames)
                        except Exception:  # a bug or bad input must not stop the hub
                            log.exception("controller: error handling a message")
                        if self._yield_pending:
                            self._yield()
                    else:  # not drained: its signal is spent, so look again next time
                        self.poller.recheck(sock)
                    frames = None  # a big message is not kept alive while the hub waits
                    if self._dispatch_out:
                        self._flush_dispatches()
                now = time.monotonic()
                if now >= next_timer or (deadline is not None and now >= deadline):
                    self._execute(self.state.handle(E.TimerFired(now)))
                if now >= next_timer:
                    self.poller.sweep()  # a missed signal costs one period, not a hang
                    self._expire_control(now)
                    flush = getattr(self.state.db, "flush", None)
                    if flush is not None:  # a persistent DB writes what waits
                        flush()
                    next_timer = now + timer_every
                self._send_queued()  # before the hub waits
        finally:
            switching.leave()
            try:
                if self._outbox:
                    self._flush_clients()
            except Exception:
                log.exception("controller: error sending the last replies")
            try:
                self._close()
            finally:
                self._lock.release()
                self.stopped.set()

    def _close(self) -> None:
        for socks in self._engine_socks.values():
            for s in socks:
                s.close(0)
        self.poller.close()
        if self.engine_context is not None:
            self.engine_context.term()
        for s in (self.client_sock, self.reg_sock, self.wake_pull):
            s.close(0)
        with self._post_lock:
            self.wake_push.close(0)

    # ------------------------------------------------------------------ input
    def _too_large(self, frames: list, limit: int, where: str) -> bool:
        if sum(map(len, frames)) <= limit:
            return False
        self.dropped["too_large"] += 1
        self.bad.warn("large", f"controller: dropped a message of more than {limit} "
                      f"bytes on the {where} port (max_message_bytes)")
        return True

    def _decode(self, frames: list, where: str,
                local: bool = False) -> tuple[list[bytes], list, dict] | None:
        """Split, verify and read the header; None (counted, logged) when bad."""
        # peers on the open ports are limited; engines' replies are not (a result is
        # whatever the user's task returned, and dropping one would leave it pending)
        limit = (REGISTRATION_MAX_BYTES if where == "registration" else
                 self.max_message_bytes if where == "client" else None)
        if limit is not None and self._too_large(frames, limit, where):
            return None
        try:
            idents, rest = split_identities(frames)
            # payload buffers are forwarded, never unpickled here: the receiving end
            # checks them against the signed digests
            header = self.session.verify(rest, check_buffers=False, signed_here=local)
            if "msg_type" not in header or "msg_id" not in header:
                raise ValueError("header without msg_type or msg_id")
        except SignatureError as e:
            self.dropped["signature"] += 1
            self.bad.warn(
                "sig", f"controller: dropped a message on the {where} port: {e}. "
                "Likely cause: a peer with another cluster's key, or forged traffic."
            )
            return None
        except Exception as e:
            self.dropped["malformed"] += 1
            self.bad.warn("bad", f"controller: dropped a malformed message on the {where} "
                          f"port: {e}")
            return None
        return idents, rest, header

    def _content(self, msg_type: str, rest: list, what: str) -> dict | None:
        """The decoded content if it fits its schema; None (counted, logged) if not."""
        try:
            content = self.session.unpack_part(frames_bytes(rest[4]))
            validate(msg_type, content)
        except (SchemaError, ValueError) as e:
            self.dropped["schema"] += 1
            self.bad.warn("schema", f"controller: dropped {what}: {e}")
            return None
        return content

    def _on_wake(self, frames: list) -> None:
        while self._posted:
            self._execute(self.state.handle(self._posted.popleft()))
        inbox = self._client_inbox
        while inbox:
            frames, header = inbox.popleft()
            try:
                self._on_client(frames, local=True, header=header)
            except Exception:  # a bug or bad input must not stop the hub
                log.exception("controller: error handling a message")

    def _on_client(self, frames: list, local: bool = False,
                   header: dict | None = None) -> None:
        """A client's message; ``local``: from a client of this process (attach_local),
        whose signature the session has no need to compute again; ``header``: also the
        header it was built with (``frames`` are ``[ident, DELIM, signature, ...]``):
        nothing to verify or decode then (the signature is still remembered, so that a
        copy replayed from outside is refused)."""
        if header is not None:
            if self._too_large(frames, self.max_message_bytes, "client"):
                return
            idents, rest = frames[:1], frames[2:]
            self.session.record_signature(frames_bytes(rest[0]))
        else:
            decoded = self._decode(frames, "client", local)
            if decoded is None:
                return
            idents, rest, header = decoded
        if not idents:
            self.dropped["malformed"] += 1
            return
        ident = idents[0]
        if ident.endswith(b"-s"):
            ident = ident[:-1] + b"r"  # a client's sending socket: answer its receiving one
        msg_type = header["msg_type"]
        now = time.monotonic()
        if msg_type in TASK_TYPES:
            self._submit(ident, header, rest, now)
            return
        content = self._content(msg_type, rest, "a client request")
        if content is None:
            return
        if msg_type in COMM_TYPES:
            self._forward_comm(ident, msg_type, rest, content)
            return
        handler = getattr(self, "_q_" + msg_type, None)
        if handler is None:
            self.dropped["unknown"] += 1
            self.bad.warn("unknown", f"controller: unknown request type {msg_type!r}")
            return
        handler(ident, header, content)

    def _submit(self, ident: bytes, header: dict, rest: list, now: float,
                resubmit_of: str | None = None) -> None:
        msg_id, msg_type = header["msg_id"], header["msg_type"]
        md: Any = None
        copies: list = []
        try:
            md = self.session.unpack_part(frames_bytes(rest[3]))
            if isinstance(md, dict) and "fanout" in md:
                copies = fanout_pairs(md.pop("fanout"))
            fields = task_fields(md)
        except Exception as e:  # the task is answered, not dropped: its client waits for it
            self.dropped["schema"] += 1
            engine_id = md.get("engine_id") if isinstance(md, dict) else None
            for eid, mid in [(engine_id, msg_id), *copies]:
                self._do_FailTask(C.FailTask(ident, mid, msg_type, eid, "InvalidTaskMetadata",
                                             f"task {mid} was not run: {e}"))
            return
        if copies:
            self._fan_out(ident, header, rest, md, fields, copies, now)
            return
        ev = E.TaskSubmitted(now, msg_id, ident, msg_type, frames=compact(rest),
                             date=epoch(header.get("date")),
                             resubmit_of=resubmit_of, **fields)
        self._execute(self.state.handle(ev))

    def _fan_out(self, ident: bytes, header: dict, rest: list, md: dict, fields: dict,
                 copies: list, now: float) -> None:
        """One client message for the same task on several engines (a DirectView's
        fan-out): each engine's copy gets its own msg_id and engine_id, signed here; the
        content and buffers are the message's own, shared by all copies."""
        session, pack, handle = self.session, self.session.pack_part, self.state.handle
        # the header as it travelled (buffer digests included), whoever decoded it
        header = session.unpack_part(frames_bytes(rest[1]))
        parent, content, *buffers = compact([rest[2], *rest[4:]])
        msg_type, date = header["msg_type"], epoch(header.get("date"))
        # each copy's header and metadata: the shared JSON with its own first key written
        # in front (a third of packing each dict again)
        h_tail = pack({k: v for k, v in header.items() if k != "msg_id"})[1:]
        m_tail = pack({k: v for k, v in md.items() if k != "engine_id"})[1:]
        h_sep = b"," if h_tail != b"}" else b""
        m_sep = b"," if m_tail != b"}" else b""
        for engine_id, msg_id in [(md.get("engine_id"), header["msg_id"]), *copies]:
            parts = [b'{"msg_id":' + pack(msg_id) + h_sep + h_tail, parent,
                     b'{"engine_id":' + pack(engine_id) + m_sep + m_tail, content]
            ev = E.TaskSubmitted(now, msg_id, ident, msg_type,
                                 frames=[session.sign(parts), *parts, *buffers], date=date,
                                 **dict(fields, engine_id=engine_id))
            self._execute(handle(ev))

    def _on_registration(self, frames: list) -> None:
        decoded = self._decode(frames, "registration")
        if decoded is None:
            return
        idents, rest, header = decoded
        msg_type = header["msg_type"]
        content = self._content(msg_type, rest, "an engine message")
        if content is None:
            return
        ident = idents[0] if idents else b""
        now = time.monotonic()
        if msg_type == "registration_request":
            ev: E.Event = E.RegistrationRequested(now, content["uuid"], ident, content)
        elif msg_type == "heartbeat_request":
            rss = content.get("rss")
            ev = E.HeartbeatReceived(now, content["uuid"], ident,
                                     rss if isinstance(rss, int) else None)
        elif msg_type == "unregistration_request":
            ev = E.EngineUnregistered(now, content["uuid"])
        else:
            self.dropped["unknown"] += 1
            return
        self._execute(self.state.handle(ev))

    def _on_engine_shell(self, engine_id: int, frames: list) -> None:
        decoded = self._decode(frames, f"engine {engine_id} shell")
        if decoded is None:
            return
        idents, rest, header = decoded
        parent = self.session.unpack_part(frames_bytes(rest[2]))
        content = self.session.unpack_part(frames_bytes(rest[4]))
        md = self.session.unpack_part(frames_bytes(rest[3]))
        msg_id = parent.get("msg_id") if isinstance(parent, dict) else None
        if msg_id is None:
            self.dropped["malformed"] += 1
            return
        if not isinstance(content, dict) or not isinstance(md, dict):
            self.dropped["malformed"] += 1
            return
        status = content.get("status", "error")
        if type(status) is str:  # the record keeps one shared "ok", not a decoded copy each
            status = _STATUSES.get(status, status)
        rest = compact(rest)
        ev = E.ReplyArrived(
            time.monotonic(), engine_id, msg_id, status, rest, frames_nbytes(rest),
            epoch_of(md, "started"), epoch_of(md, "completed"), idents[0] if idents else None,
            content.get("ename"), content.get("evalue"), md.get("engine_uuid"),
            md.get("properties"),
            # for a client of this process: what it would otherwise verify and decode again
            Parsed(header, parent, md, content, rest[5:]),
        )
        commands = self.state.handle(ev)
        if (len(commands) > 1 and type(commands[0]) is C.DeliverResult
                and all(type(c) is C.DispatchTask for c in commands[1:])):
            # the tasks this reply made room for are dispatched before the result is
            # delivered (the state lists it first): see _do_DeliverResult
            commands.append(commands.pop(0))
        self._execute(commands)

    def _on_engine_control(self, engine_id: int, frames: list) -> None:
        decoded = self._decode(frames, f"engine {engine_id} control")
        if decoded is None:
            return
        parent = self.session.unpack_part(frames_bytes(decoded[1][2]))
        if isinstance(parent, dict):
            self._control_answered(parent.get("msg_id", ""))
