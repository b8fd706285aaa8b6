"""libzmq's non-blocking send and receive, called with the GIL held.

pyzmq releases the GIL around every ``zmq_msg_send`` and ``zmq_msg_recv``, blocking or
not. A thread that moves many small frames without ever blocking (the controller's) then
hands the interpreter to any thread that wants it once per frame, and gets it back only
after that thread's switch interval when it computes: seven frames a message, several
messages a task. These functions call the libzmq that pyzmq itself loaded, through
``ctypes.PyDLL`` (which keeps the GIL), and only ever with ``ZMQ_DONTWAIT``, so a call
cannot block: the thread keeps the interpreter until it waits on purpose (in poll).

- Small frames are copied (as pyzmq's default ``copy=True`` does); frames of
  ``BIG`` bytes and more travel zero-copy: sent through pyzmq, received as a read-only
  view of the libzmq message, which is closed when the last view of it goes.
- A send that would block (a peer's queue full) falls back to pyzmq's blocking send.
- Where the library cannot be found (another platform, pyzmq built another way),
  :data:`available` is False and :func:`send` / :func:`recv` use pyzmq: same behaviour,
  without the saving. ``IPYFARM_DIRECT_ZMQ=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import threading
import weakref
from typing import Any

import zmq

from .protocol.received import MARK as _RECEIVED
from .protocol.session import COPY_THRESHOLD, send_plain

__all__ = ["BIG", "available", "readable", "recv", "send", "try_recv", "wake"]

BIG = COPY_THRESHOLD  # frames this big travel zero-copy, as everywhere else
_DONTWAIT = 1
_SNDMORE = 2
_MSG_T = ctypes.c_uint64 * 8  # zmq_msg_t: 64 bytes, 8-aligned
_EVENTS = 15  # ZMQ_EVENTS
_POLLIN = 1


def _find_libzmq() -> str | None:
    """The path of the libzmq shared library this process has loaded (via pyzmq); None
    if there is none, or more than one (then which one pyzmq uses is not known)."""
    found = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip().split(" ")[-1]
                name = os.path.basename(path)
                if name.startswith("libzmq") and ".so" in name:
                    found.add(path)
    except OSError:
        return None
    return found.pop() if len(found) == 1 else None


def _load() -> Any:
    if os.environ.get("IPYFARM_DIRECT_ZMQ", "1").strip() in ("0", "false", "no", "off"):
        return None
    path = _find_libzmq()
    if path is None:
        return None
    try:
        lib = ctypes.PyDLL(path)
        major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        lib.zmq_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
        if (major.value, minor.value) != zmq.zmq_version_info()[:2]:
            return None  # not the library pyzmq uses
        # no argtypes (their conversions double a call's cost): every argument is passed
        # as a ctypes object of the C type, or a bytes (const void *) or int (int flags)
        lib.zmq_msg_data.restype = ctypes.c_void_p
        lib.zmq_msg_size.restype = ctypes.c_size_t
        return lib
    except (OSError, AttributeError):
        return None


_lib = _load()
available = _lib is not None
_local = threading.local()


def _error(code: int) -> zmq.ZMQError:
    return zmq.Again(code) if code == _errno.EAGAIN else zmq.ZMQError(code)


def send(sock: Any, frames: list, copy_threshold: int = BIG) -> None:
    """Send ``frames`` as one multipart message on ``sock`` (owned by this thread)."""
    lib = _lib
    if lib is None:
        send_plain(sock, frames, copy_threshold)
        return
    last = len(frames) - 1
    handle = ctypes.c_void_p(sock.underlying)
    zsend, size_t = lib.zmq_send, ctypes.c_size_t
    for i, frame in enumerate(frames):
        flags = 0 if i == last else _SNDMORE
        if type(frame) is memoryview and frame.nbytes < copy_threshold:
            frame = frame.tobytes()  # small: copied either way, here without pyzmq
        if type(frame) is bytes and len(frame) < copy_threshold:
            while zsend(handle, frame, size_t(len(frame)), flags | _DONTWAIT) < 0:
                code = lib.zmq_errno()
                if code == _errno.EINTR:
                    continue
                if code == _errno.EAGAIN:  # the peer's queue is full: wait, as pyzmq would
                    sock.send(frame, flags)
                    break
                raise _error(code)
        else:
            sock.send(frame, flags, copy=len(frame) < copy_threshold)


def wake(sock: Any) -> bool:
    """Send one empty frame on ``sock`` (a wake-up) without ever blocking; False when
    it could not go: the reader's queue is full (it has wake-ups to read anyway), no
    reader is connected (it has closed its end: no one is left to wake) or ``sock``
    is closed. A blocking send there would wait for a reader that never comes."""
    lib = _lib
    if lib is not None:
        try:
            handle = ctypes.c_void_p(sock.underlying)
        except (AttributeError, zmq.ZMQError):
            return False
        while lib.zmq_send(handle, b"", ctypes.c_size_t(0), _DONTWAIT) < 0:
            if lib.zmq_errno() != _errno.EINTR:
                return False
        return True
    try:
        sock.send(b"", zmq.NOBLOCK)
    except zmq.ZMQError:
        return False
    return True


class _Slot:
    """A thread's reusable libzmq message, closed when the thread's locals go."""

    __slots__ = ("msg", "__weakref__")

    def __init__(self, lib: Any):
        self.msg = _MSG_T()
        lib.zmq_msg_init(self.msg)
        weakref.finalize(self, lib.zmq_msg_close, self.msg)


def readable(sock: Any) -> bool:
    """Whether ``sock`` (owned by this thread now) has a message waiting: ZMQ_EVENTS,
    asked in one foreign call (pyzmq's getsockopt takes twice as long). False for a
    closed socket."""
    lib = _lib
    if lib is None:
        try:
            return bool(sock.getsockopt(zmq.EVENTS) & _POLLIN)
        except zmq.ZMQError:
            return False
    bufs = getattr(_local, "events", None)
    if bufs is None:
        value, size = ctypes.c_int(), ctypes.c_size_t()
        bufs = _local.events = (value, size, ctypes.byref(value), ctypes.byref(size))
    value, size, value_ref, size_ref = bufs
    size.value = ctypes.sizeof(ctypes.c_int)
    try:
        handle = ctypes.c_void_p(sock.underlying)
    except (AttributeError, zmq.ZMQError):  # closed
        return False
    if lib.zmq_getsockopt(handle, _EVENTS, value_ref, size_ref) != 0:
        return False
    return bool(value.value & _POLLIN)


def recv(sock: Any) -> list:
    """The next whole message on ``sock`` without blocking (zmq.Again if none): small
    frames as bytes, big ones as read-only memoryviews of the received data."""
    frames = try_recv(sock)
    if frames is None:
        raise zmq.Again(_errno.EAGAIN)
    return frames


def try_recv(sock: Any) -> list | None:
    """:func:`recv`, with None instead of zmq.Again when no message waits (a loop that
    drains a socket ends on that every time; raising it cost ~6 us a drain)."""
    lib = _lib
    if lib is None:
        try:
            frame = sock.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        frames = [frame]
        while frame.more:
            frame = sock.recv(zmq.NOBLOCK, copy=False)
            frames.append(frame)
        return frames
    slot = getattr(_local, "slot", None)
    if slot is None:
        slot = _local.slot = _Slot(lib)
    msg = slot.msg
    handle = ctypes.c_void_p(sock.underlying)
    zrecv, data, msg_more = lib.zmq_msg_recv, lib.zmq_msg_data, lib.zmq_msg_more
    string_at = ctypes.string_at
    frames: list = []
    while True:
        size = zrecv(msg, handle, _DONTWAIT)
        if size == -1:
            code = lib.zmq_errno()
            if code == _errno.EINTR:
                continue
            if not frames and code == _errno.EAGAIN:
                return None
            raise zmq.ZMQError(code)  # (never mid-message: libzmq delivers parts together)
        more = msg_more(msg)
        if size < BIG:  # zmq_msg_recv's count is exact below INT_MAX
            frames.append(string_at(data(msg), size))
        else:
            # the size again from zmq_msg_size: the count is an int, capped for 2 GiB
            # and more. The data stays in libzmq's message, moved out of the reused
            # one and closed when the last view of it goes
            size = lib.zmq_msg_size(msg)
            own = _MSG_T()
            lib.zmq_msg_init(own)
            lib.zmq_msg_move(own, msg)
            buf = (ctypes.c_char * size).from_address(data(own))
            setattr(buf, _RECEIVED, True)  # only ever handed out read-only
            weakref.finalize(buf, lib.zmq_msg_close, own)
            frames.append(memoryview(buf).cast("B").toreadonly())
        if not more:
            return frames
