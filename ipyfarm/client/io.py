"""The client's sockets: user threads send, one I/O thread receives.

A client has two DEALER sockets to the controller with paired identities:
``<id>-s`` (sending, used by user threads under a lock, so a request costs no
thread hop) and ``<id>-r`` (receiving, owned by the I/O thread). The controller
answers a message from ``<id>-s`` to ``<id>-r``; messages from any other peer
are answered to the sender, as usual.

A client of an embedded controller in the same process (``hub`` given) uses no
sockets to it: it hands frame lists to the hub's inbox and the hub queues replies
in the client's, waking the I/O thread once per burst. Per task that saves four
multipart socket operations and the thread switches they cause, and nothing
changes for the engines (the frames are the same signed messages).

Replies for such a client are handled on the hub's thread when nothing is queued before
them (``inline``, set by the Client): the waiting thread is then woken by the result
itself, without a hop through the I/O thread (one thread wake-up and GIL hand-over
less, ~0.1 ms of each round trip here). Joining a map's results, which must not run on
the hub's thread, is handed to the I/O thread with :meth:`call_soon`; AsyncResult
done-callbacks (user code, which may block or wait on other results) run on a thread of
their own, ``ipyfarm-callbacks`` (:meth:`on_callback_thread`), for every kind of client.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from typing import Any, Callable

import zmq

from .. import curve, directzmq, switching
from ..protocol import batch

log = logging.getLogger("ipyfarm.client")


class _Call:
    """A function for the I/O thread to run (queued in the inbox among messages)."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., Any], args: tuple):
        self.fn, self.args = fn, args


class ClientIO(threading.Thread):
    def __init__(self, context: zmq.Context, url: str, on_message: Callable[[list], None],
                 hub: Any = None, curve_serverkey: str | None = None):
        super().__init__(name="ipyfarm-client-io", daemon=True)
        self.on_message = on_message
        base = f"c{os.getpid():x}-{os.urandom(6).hex()}".encode()
        self._ident_s, self._ident_r = base + b"-s", base + b"-r"
        self._hub = hub
        self._inbox: collections.deque = collections.deque()
        self._post: Callable[..., None] | None = None
        self._post_task: Callable[..., None] | None = None
        #: set by the Client: handles a message on the hub's thread, True when it did
        self.inline: Callable[[Any], bool] | None = None
        # AsyncResult done-callbacks run on a thread of their own, started when needed
        self._cb_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cb_thread: threading.Thread | None = None
        self._cb_lock = threading.Lock()
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self._ident_r)
        self.out = context.socket(zmq.DEALER)
        self.out.setsockopt(zmq.IDENTITY, self._ident_s)
        for s in (self.sock, self.out):
            s.linger = 0
            s.sndhwm = 0
            s.rcvhwm = 0
        if hub is None:
            for s in (self.sock, self.out):  # the controller's Curve key: encrypted
                curve.connect_as_client(s, curve_serverkey)
            self.sock.connect(url)
            self.out.connect(url)
        addr = f"inproc://ipyfarm-client-wake-{base.decode()}"
        self._wake_pull = context.socket(zmq.PAIR)
        self._wake_pull.bind(addr)
        self._wake = context.socket(zmq.PAIR)
        self._wake.linger = 0
        self._wake.connect(addr)
        self._send_lock = threading.Lock()
        self._wake_lock = threading.Lock()
        self._stopping = False
        self.closed = threading.Event()
        if hub is not None:
            self._post = hub.attach_local(self._ident_r, self._deliver)
            self._post_task = getattr(hub, "post_task", self._post)

    def _deliver(self, frames: list) -> None:
        """From the hub's thread: handle a message at once where the Client can (and
        nothing queued is older), else queue it; wake the I/O thread once per burst."""
        inbox = self._inbox
        inline = self.inline
        if inline is not None and not inbox and not self._stopping:
            try:
                if inline(frames):
                    return
            except Exception:
                log.exception("ipyfarm client: error handling a message")
                return
        self._queue(frames)

    def on_hub_thread(self) -> bool:
        """Whether the caller is running the controller's code (its thread, or a thread
        submitting a task to it inline: see Hub.post_task)."""
        return self._hub is not None and self._hub.in_hub()

    def let_waiter_run(self) -> None:
        """Give up the GIL once: a result was just set that a thread waits on. On the
        controller's thread the controller does it after the message at hand, with its
        lock released (the woken thread may then submit its next task itself)."""
        hub = self._hub
        if hub is not None and threading.get_ident() == hub.thread_ident:
            hub.yield_after_message()
        else:
            time.sleep(0)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the I/O thread, after the messages queued before it."""
        self._queue(_Call(fn, args))

    def on_callback_thread(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``fn`` as a callback that runs on the client's callback thread: never on the
        controller's thread or this I/O thread, where a callback that blocks, or waits
        on another result, would stall or deadlock the results it waits for."""

        def callback(arg: Any) -> None:
            if threading.current_thread() is self._cb_thread:
                fn(arg)
            else:
                self._run_callback(fn, arg)

        return callback

    def _run_callback(self, fn: Callable[[Any], Any], arg: Any) -> None:
        with self._cb_lock:
            if self._cb_thread is None:
                self._cb_thread = threading.Thread(target=self._callbacks_loop,
                                                   name="ipyfarm-callbacks", daemon=True)
                self._cb_thread.start()
            self._cb_queue.put((fn, arg))

    def _callbacks_loop(self) -> None:
        queue = self._cb_queue
        while True:
            fn, arg = queue.get()
            if fn is None:
                return
            try:
                fn(arg)
            except Exception:
                log.exception("ipyfarm client: error in a done-callback")
            fn = arg = None  # the last result is not kept alive while waiting

    def _queue(self, item: Any) -> None:
        inbox = self._inbox
        inbox.append(item)
        if len(inbox) == 1:  # append first: see Hub.post_client
            with self._wake_lock:
                if not self._stopping:
                    directzmq.wake(self._wake)  # keeps the hub thread's GIL

    def send(self, frames: list, track: bool = False, task: bool = False,
             header: dict | None = None) -> Any:
        """Send ``frames`` to the controller; returns a MessageTracker when tracking.
        ``task``: a task request, which a controller of this process may take at once
        on this thread (Hub.post_task), along with ``header``, the header dict it was
        built with, if given."""
        if self._post is not None:
            if self._stopping:
                raise RuntimeError("this Client is closed; create a new one")
            if track:  # the hub holds the frames until sent on: give it copies, done now
                frames = [f if isinstance(f, bytes) else bytes(f) for f in frames]
            if task:
                self._post_task([self._ident_s, *frames], header)  # type: ignore[misc]
            else:
                self._post([self._ident_s, *frames])  # type: ignore[misc]
            return None
        with self._send_lock:
            if self._stopping:
                raise RuntimeError("this Client is closed; create a new one")
            out = self.out
            if track:
                return out.send_multipart(frames, copy=False, track=True)
            directzmq.send(out, frames)
            return None

    def _handle(self, item: Any) -> None:
        # a function of its own: no local variable of the loop keeps the last message
        # (a big result, say) alive until the next one comes this way
        try:
            if type(item) is _Call:
                item.fn(*item.args)
            else:
                self.on_message(item)
        except Exception:
            log.exception("ipyfarm client: error handling a message or running a callback")

    def _on_batch(self, packed: Any) -> None:
        """The messages of a batched frame (protocol/batch.py), each handled as if it
        had come alone."""
        try:
            messages = batch.unpack(packed)
        except ValueError as e:
            log.error("ipyfarm client: dropped a malformed batch of replies: %s", e)
            return
        for msg in messages:
            try:
                self.on_message(msg)
            except Exception:
                log.exception("ipyfarm client: error handling a message")

    def stop(self, timeout: float = 2.0) -> None:
        if self._hub is not None:
            self._hub.detach_local(self._ident_r)
        with self._send_lock, self._wake_lock:
            if self._stopping:
                return
            self._stopping = True
            # not a blocking send: the I/O thread may have seen _stopping already and
            # closed its end, and a PAIR socket without a peer would wait for ever
            directzmq.wake(self._wake)
            self.out.close(0)
        with self._cb_lock:
            cb_thread = self._cb_thread
            self._cb_queue.put((None, None))  # after the callbacks already queued
        if self is not threading.current_thread():
            self.join(timeout)
        if cb_thread is not None and cb_thread is not threading.current_thread():
            cb_thread.join(timeout)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_pull, zmq.POLLIN)
        sock = self.sock
        switching.enter()  # see ipyfarm.switching: results keep flowing past busy threads
        try:
            while not self._stopping:
                events = dict(poller.poll())
                if self._wake_pull in events:
                    while directzmq.try_recv(self._wake_pull) is not None:
                        pass
                inbox = self._inbox
                while inbox and not self._stopping:
                    self._handle(inbox.popleft())
                if sock in events:
                    for _ in range(1024):
                        frames = directzmq.try_recv(sock)  # without giving up the GIL
                        if frames is None:
                            break
                        if frames[0] == batch.BATCH and len(frames) == 2:
                            self._on_batch(frames[1])  # several replies in one frame
                            continue
                        try:
                            self.on_message(frames)
                        except Exception:
                            log.exception("ipyfarm client: error handling a message")
                    frames = None  # not kept alive while waiting for the next
        finally:
            switching.leave()
            for s in (self.sock, self._wake_pull):
                s.close(0)
            with self._wake_lock:
                self._wake.close(0)
            self.closed.set()
