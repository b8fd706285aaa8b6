"""The client's sockets: user threads send, one I/O thread receives.

A client has two DEALER sockets to the controller with paired identities:
``<id>-s`` (sending, used by user threads under a lock, so a request costs no
thread hop) and ``<id>-r`` (receiving, owned by the I/O thread). The controller
answers a message from ``<id>-s`` to ``<id>-r``; messages from any other peer
are answered to the sender, as usual.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

import zmq

log = logging.getLogger("ipyfarm.client")


class ClientIO(threading.Thread):
    def __init__(self, context: zmq.Context, url: str, on_message: Callable[[list], None]):
        super().__init__(name="ipyfarm-client-io", daemon=True)
        self.on_message = on_message
        base = f"c{os.getpid():x}-{os.urandom(6).hex()}".encode()
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, base + b"-r")
        self.out = context.socket(zmq.DEALER)
        self.out.setsockopt(zmq.IDENTITY, base + b"-s")
        for s in (self.sock, self.out):
            s.linger = 0
            s.sndhwm = 0
            s.rcvhwm = 0
        self.sock.connect(url)
        self.out.connect(url)
        addr = f"inproc://ipyfarm-client-wake-{base.decode()}"
        self._wake_pull = context.socket(zmq.PAIR)
        self._wake_pull.bind(addr)
        self._wake = context.socket(zmq.PAIR)
        self._wake.linger = 0
        self._wake.connect(addr)
        self._send_lock = threading.Lock()
        self._stopping = False
        self.closed = threading.Event()

    def send(self, frames: list, track: bool = False) -> Any:
        """Send ``frames`` to the controller; returns a MessageTracker when tracking."""
        with self._send_lock:
            if self._stopping:
                raise RuntimeError("this Client is closed; create a new one")
            out = self.out
            if track:
                return out.send_multipart(frames, copy=False, track=True)
            last = len(frames) - 1
            more = zmq.SNDMORE.value
            for i, frame in enumerate(frames):
                if isinstance(frame, bytes) and len(frame) < 65536:
                    out.send(frame, 0 if i == last else more)
                else:
                    out.send(frame, 0 if i == last else more, copy=False)
            return None

    def stop(self, timeout: float = 2.0) -> None:
        with self._send_lock:
            if self._stopping:
                return
            self._stopping = True
            self._wake.send(b"")
            self.out.close(0)
        if self is not threading.current_thread():
            self.join(timeout)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_pull, zmq.POLLIN)
        sock = self.sock
        try:
            while not self._stopping:
                events = dict(poller.poll())
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
            for s in (self.sock, self._wake_pull):
                s.close(0)
            with self._send_lock:
                self._wake.close(0)
            self.closed.set()
