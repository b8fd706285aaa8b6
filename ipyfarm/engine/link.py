"""The engine's link to its controller: registration, heartbeats, unregistration.

One daemon thread owns one DEALER socket connected to the controller's ``registration``
ROUTER (docs/protocol.md, "Engine life")::

    engine                                   controller
    registration_request {uuid, rss, ...} ──►
                                       ◄──   registration_reply {status, engine_id,
                                                                heartbeat_period}
    heartbeat_request {uuid, rss}  (every heartbeat_period; rss: resident bytes)
                                       ◄──   heartbeat_reply {status: "ok" | "unknown",
                                                    heartbeat_period}
    unregistration_request {uuid}      ──►   (clean exit)

The link calls ``on_lost(reason)`` once, from its thread, when the controller answers
``unknown`` or has not answered for ``max(10 × period, 10 s)``. A heartbeat reply
may name another period (a cluster past 256 engines beats more slowly): the link keeps
that one from then on. Another thread wakes it
through a pipe (``stop``), so an idle link costs one wake-up per heartbeat.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from ipyfarm import curve
from ipyfarm.protocol.messages import SchemaError, validate
from ipyfarm.protocol.session import FarmSession, SignatureError, split_identities

__all__ = ["ControllerLink", "RegistrationError"]

#: a lost controller is declared after this many silent periods, and never sooner than
#: MIN_SILENCE seconds
MISSED_BEATS = 10
MIN_SILENCE = 10.0


def _rss() -> int | None:
    """This process's resident memory in bytes (Linux), or None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class RegistrationError(RuntimeError):
    """The controller refused the engine, or did not answer in time."""


class ControllerLink:
    """Registration then heartbeats, on a thread that owns its socket."""

    def __init__(
        self,
        url: str,
        session: FarmSession,
        uuid: str,
        registration: dict[str, Any],
        on_lost: Callable[[str], None],
        log: Any,
        curve_serverkey: bytes | None = None,
    ) -> None:
        self.url = url
        self.curve_serverkey = curve_serverkey  # the controller's Curve key, None: plain
        self.session = session
        self.uuid = uuid
        self.registration = registration
        self.on_lost = on_lost
        self.log = log
        self.engine_id: int | None = None
        self.heartbeat_period = 1.0
        self._timeout = 30.0
        self._registered = threading.Event()
        self._error: str | None = None
        self._stopping = False
        self._unregister = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="ipyfarm-link", daemon=True)

    # ---- called from the main thread --------------------------------------------------

    def register(self, timeout: float = 30.0) -> dict[str, Any]:
        """Start the thread; block until registered. Raise RegistrationError otherwise."""
        self._timeout = timeout
        self._thread.start()
        if not self._registered.wait(timeout + 5.0) and self._error is None:
            self._error = f"no registration_reply from {self.url} within {timeout:g} s"
        if self._error is not None or self.engine_id is None:
            self.stop(unregister=False)
            raise RegistrationError(self._error or "registration failed")
        return {"engine_id": self.engine_id, "heartbeat_period": self.heartbeat_period}

    def stop(self, unregister: bool = True, timeout: float = 2.0) -> None:
        """Stop heartbeating; send ``unregistration_request`` first when registered."""
        if self._stopping:
            return
        self._unregister = unregister and self.engine_id is not None
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is threading.current_thread():
            return
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    # ---- the link thread --------------------------------------------------------------

    def _run(self) -> None:
        context = zmq.Context(io_threads=1)
        sock = context.socket(zmq.DEALER)
        sock.linger = 1000
        curve.connect_as_client(sock, self.curve_serverkey)
        sock.connect(self.url)
        try:
            if self._do_register(sock):
                self._heartbeat(sock)
            if self._unregister:
                self.session.send(sock, "unregistration_request", {"uuid": self.uuid})
        except Exception as e:  # a bug here must not leave a silent orphan engine
            self.log.error("ipyfarm engine link failed", exc_info=True)
            if self.engine_id is None:
                self._error = f"registration failed: {e!r}"
                self._registered.set()
            else:
                self.on_lost(f"the engine's link to the controller failed: {e!r}")
        finally:
            sock.close(linger=1000 if self._unregister else 0)
            context.term()

    def _poll(self, sock: zmq.Socket, timeout: float) -> tuple[bool, bool]:
        """Wait up to ``timeout`` s; return (socket readable, woken by stop)."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        events = dict(poller.poll(max(0.0, timeout) * 1000))
        woken = self._wake_r in events
        if woken:
            os.read(self._wake_r, 64)
        return sock in events, woken or self._stopping

    def _recv(self, sock: zmq.Socket) -> list[dict]:
        """Every message waiting on ``sock`` that verifies and fits its schema."""
        msgs = []
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return msgs
            try:
                _, rest = split_identities(frames)
                msg = self.session.deserialize(rest, content=True, copy=False)
                validate(msg["msg_type"], msg["content"])
            except (ValueError, SignatureError, SchemaError, KeyError) as e:
                self.log.warning("dropped a message from the controller: %s", e)
                continue
            msgs.append(msg)

    def _do_register(self, sock: zmq.Socket) -> bool:
        # with its memory now, so a dashboard shows it before the first heartbeat
        self.session.send(sock, "registration_request", dict(self.registration, rss=_rss()))
        deadline = time.monotonic() + self._timeout
        while not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._error = (
                    f"no registration_reply from the controller at {self.url} within "
                    f"{self._timeout:g} s"
                )
                break
            readable, woken = self._poll(sock, remaining)
            if woken:
                break
            for msg in self._recv(sock) if readable else ():
                if msg["msg_type"] != "registration_reply":
                    continue
                content = msg["content"]
                if content["status"] != "ok":
                    reason = content.get("reason", "no reason given")
                    self._error = f"the controller refused this engine: {reason}"
                    self._registered.set()
                    return False
                self.engine_id = int(content["engine_id"])
                self.heartbeat_period = float(content.get("heartbeat_period") or 1.0)
                self._registered.set()
                return True
        self._registered.set()
        return False

    def _heartbeat(self, sock: zmq.Socket) -> None:
        period = max(self.heartbeat_period, 0.01)
        silence_limit = max(MISSED_BEATS * period, MIN_SILENCE)
        last_reply = time.monotonic()
        next_beat = last_reply + period
        while True:
            now = time.monotonic()
            if now >= next_beat:
                self.session.send(sock, "heartbeat_request",
                                  {"uuid": self.uuid, "rss": _rss()})
                next_beat = now + period
            readable, woken = self._poll(sock, min(next_beat, last_reply + silence_limit) - now)
            if woken:
                return
            for msg in self._recv(sock) if readable else ():
                if msg["msg_type"] != "heartbeat_reply":
                    continue
                content = msg["content"]
                if content["status"] == "unknown":
                    self.on_lost(
                        f"the controller at {self.url} no longer knows this engine "
                        f"(engine {self.engine_id}, uuid {self.uuid})"
                    )
                    return
                last_reply = time.monotonic()
                asked = content.get("heartbeat_period")
                if (isinstance(asked, (int, float)) and not isinstance(asked, bool)
                        and 0 < asked != self.heartbeat_period):
                    # a growing (or shrinking) cluster: beat at the controller's new pace
                    self.heartbeat_period = float(asked)
                    period = max(self.heartbeat_period, 0.01)
                    silence_limit = max(MISSED_BEATS * period, MIN_SILENCE)
                    next_beat = min(next_beat, last_reply + period)
            silent = time.monotonic() - last_reply
            if silent > silence_limit:
                self.on_lost(
                    f"the controller at {self.url} has not answered heartbeats for "
                    f"{silent:.0f} s"
                )
                return
