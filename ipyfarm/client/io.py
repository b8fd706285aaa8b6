"""The client's one I/O thread: it alone touches the DEALER socket to the controller.

User threads hand signed frames to it through an inproc PUSH (under a lock);
replies and notifications are passed to ``on_message`` on this thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any, Callable

import zmq

log = logging.getLogger("ipyfarm.client")
_ids = itertools.count()


class ClientIO(threading.Thread):
    def __init__(self, context: zmq.Context, url: str, on_message: Callable[[list], None]):
        super().__init__(name="ipyfarm-client-io", daemon=True)
        self.context = context
        self.on_message = on_message
        self.sock = context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(url)
        addr = f"inproc://ipyfarm-client-{id(self)}-{next(_ids)}"
        self.outbox = context.socket(zmq.PULL)
        self.outbox.bind(addr)
        self.inbox = context.socket(zmq.PUSH)
        self.inbox.linger = 0
        self.inbox.connect(addr)
        self._send_lock = threading.Lock()
        self._stopping = False
        self.closed = threading.Event()

    def send(self, frames: list, track: bool = False) -> Any:
        """Queue ``frames`` for the controller; returns a MessageTracker when tracking."""
        with self._send_lock:
            if self._stopping:
                raise RuntimeError("this Client is closed; create a new one")
            if track:
                return self.inbox.send_multipart(frames, copy=False, track=True)
            self.inbox.send_multipart(frames, copy=False)
            return None

    def stop(self, timeout: float = 2.0) -> None:
        with self._send_lock:
            if self._stopping:
                return
            self._stopping = True
            self.inbox.send(b"")  # a one-frame message wakes the loop
        if self is not threading.current_thread():
            self.join(timeout)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        sock, outbox = self.sock, self.outbox
        try:
            while True:
                events = dict(poller.poll())
                if outbox in events:
                    for _ in range(1024):
                        try:
                            frames = outbox.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        if len(frames) == 1 and self._stopping:
                            return
                        sock.send_multipart(frames, copy=False)
                if sock in events:
                    for _ in range(1024):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        try:
                            self.on_message(frames)
                        except Exception:
                            log.exception("ipyfarm client: error handling a message")
        finally:
            for s in (self.sock, self.outbox):
                s.close(0)
            with self._send_lock:
                self.inbox.close(0)
            self.closed.set()
