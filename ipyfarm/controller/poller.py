"""A socket poller whose cost follows the active sockets, not the registered ones.

``zmq.Poller`` hands every registered socket to ``zmq_poll`` on each call: ~0.6 µs per
socket here, 2 ms per loop for 1,024 engines (three sockets each), and ``unregister``
shifts a list. :class:`SocketPoller` watches each socket's ``ZMQ_FD`` with epoll and
asks ``ZMQ_EVENTS`` only of sockets that signalled, or that may hold messages without a
new signal:

- a zmq FD signals a change, not a level: once a socket's signal has been consumed
  (by a receive, a send or an ``EVENTS`` query), messages already queued raise no new
  one. So the caller names with :meth:`recheck` each socket it did not drain to
  EAGAIN, and each socket it sent on (a send can consume the signal of a message that
  arrived meanwhile); the next :meth:`poll` asks those again;
- :meth:`sweep` asks every socket, as a safety net against a missed signal (the hub
  runs it from its timer, so a miss costs at most one timer period, never a hang).

Same calls as ``zmq.Poller`` where the hub uses them: ``register``, ``unregister``,
``poll(timeout_ms) -> [(socket, zmq.POLLIN), ...]``. Where epoll is missing (not Linux)
it is a thin wrapper over ``zmq.Poller``.
"""

from __future__ import annotations

import select
from typing import Any

import zmq

from .. import directzmq

__all__ = ["SocketPoller", "recv_frames"]

_POLLIN = int(zmq.POLLIN)  # a plain int: the enum's & costs more than the query


def recv_frames(sock: Any) -> list:
    """The next whole message on ``sock``, without blocking (zmq.Again if none): small
    frames as bytes, big ones as zero-copy views, received without giving up the GIL
    (:mod:`ipyfarm.directzmq`; zmq Frames where that is not available)."""
    return directzmq.recv(sock)


class SocketPoller:
    """Readable-socket polling in O(active sockets) per call."""

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._zpoller = zmq.Poller() if self._epoll is None else None
        self._by_fd: dict[int, Any] = {}
        self._fds: dict[Any, int] = {}
        self._again: dict[Any, None] = {}  # ask these next time (ordered, no duplicates)

    def __len__(self) -> int:
        return len(self._fds)

    def register(self, sock: Any, flags: int = _POLLIN) -> None:
        if self._epoll is None:
            self._zpoller.register(sock, flags)  # type: ignore[union-attr]
            self._fds[sock] = 0
            return
        if sock in self._fds:
            return
        fd = sock.getsockopt(zmq.FD)
        self._epoll.register(fd, select.EPOLLIN)
        self._by_fd[fd] = sock
        self._fds[sock] = fd
        self._again[sock] = None  # it may hold messages already

    def unregister(self, sock: Any) -> None:
        fd = self._fds.pop(sock, None)
        self._again.pop(sock, None)
        if self._epoll is None:
            if fd is not None:
                self._zpoller.unregister(sock)  # type: ignore[union-attr]
            return
        if fd is None:
            return
        self._by_fd.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def recheck(self, sock: Any) -> None:
        """Ask ``sock`` again at the next :meth:`poll` (after sending on it)."""
        if sock in self._fds:
            self._again[sock] = None

    def sweep(self) -> None:
        """Ask every socket at the next :meth:`poll`."""
        for sock in self._fds:
            self._again[sock] = None

    def pending(self) -> list:
        """The sockets named by :meth:`recheck` (or a sweep) since the last poll."""
        return list(self._again)

    def poll(self, timeout_ms: float | None = None,
             unlocked: Any = None) -> list[tuple[Any, int]]:
        """Readable sockets. ``unlocked``: a lock the caller holds, released while
        waiting (and only then: every zmq socket call is made with it held)."""
        if self._epoll is None:
            # zmq_poll asks the sockets themselves, so it waits with ``unlocked`` held
            # (submitting threads then queue their tasks: slower, same results)
            return self._zpoller.poll(timeout_ms)  # type: ignore[union-attr]
        ready: dict[Any, None] = {}
        asked = self._again
        self._again = {}
        for sock in asked:
            if self.readable(sock):
                ready[sock] = None
        if ready:
            wait = 0.0  # do not sleep with messages waiting
        elif timeout_ms is None or timeout_ms < 0:
            wait = -1.0
        else:
            wait = timeout_ms / 1000
        if unlocked is not None and wait != 0.0:
            unlocked.release()  # epoll waits on the fds only: no socket call meanwhile
            try:
                events = self._epoll.poll(wait)
            except InterruptedError:
                events = []
            finally:
                unlocked.acquire()
        else:
            try:
                events = self._epoll.poll(wait)
            except InterruptedError:
                events = []
        for fd, _ in events:
            sock = self._by_fd.get(fd)
            if sock is not None and sock not in ready and self.readable(sock):
                ready[sock] = None
        return [(sock, _POLLIN) for sock in ready]

    #: whether ``sock`` has a message waiting (asks it: the caller owns it now); False
    #: once closed
    readable = staticmethod(directzmq.readable)

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
