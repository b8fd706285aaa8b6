"""libzmq called with the GIL held (ipyfarm.directzmq), on real zmq sockets."""

import gc
import threading
import time

import pytest
import zmq

from ipyfarm import directzmq


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.ROUTER)
    for s in (a, b):
        s.linger = 0
        s.sndhwm = s.rcvhwm = 0
    a.setsockopt(zmq.IDENTITY, b"A")
    b.bind("inproc://directzmq-test")
    a.connect("inproc://directzmq-test")
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


def _recv(sock, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return directzmq.recv(sock)
        except zmq.Again:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def test_the_library_pyzmq_loaded_is_found_here():
    # this project's CI runs Linux with pyzmq's bundled libzmq: the fast path must be on
    assert directzmq.available


def test_small_frames_are_bytes_big_ones_zero_copy_views(pair):
    a, b = pair
    big = bytes(range(256)) * 1000  # 256,000 bytes
    directzmq.send(a, [b"hello", b"", b"x" * 100, big, memoryview(big)])
    frames = _recv(b)
    assert [len(f) for f in frames] == [1, 5, 0, 100, len(big), len(big)]
    assert frames[:4] == [b"A", b"hello", b"", b"x" * 100]
    assert all(type(f) is bytes for f in frames[:4])
    view = frames[4]
    assert isinstance(view, memoryview) and view.readonly and bytes(view) == big
    # the reused receive buffer does not clobber a view kept from an earlier message
    for i in range(50):
        directzmq.send(a, [b"next %d" % i, big[::-1]])
        assert bytes(_recv(b)[2]) == big[::-1]
    assert bytes(view) == big
    # a kept view goes back out zero-copy and arrives intact
    directzmq.send(b, [b"A", b"back", view])
    assert bytes(_recv(a)[1]) == big
    del view, frames
    gc.collect()
    with pytest.raises(zmq.Again):
        directzmq.recv(b)


def test_without_the_library_pyzmq_does_the_same(pair, monkeypatch):
    a, b = pair
    monkeypatch.setattr(directzmq, "_lib", None)
    directzmq.send(a, [b"one", b"y" * 70000])
    frames = _recv(b)
    assert [bytes(f) for f in frames] == [b"A", b"one", b"y" * 70000]
    with pytest.raises(zmq.Again):
        directzmq.recv(b)


@pytest.mark.parametrize("direct", [True, False])
def test_readable_says_whether_a_message_waits(pair, monkeypatch, direct):
    a, b = pair
    if not direct:
        monkeypatch.setattr(directzmq, "_lib", None)
    assert directzmq.readable(b) is False
    directzmq.send(a, [b"x"])
    deadline = time.monotonic() + 5
    while not directzmq.readable(b):
        assert time.monotonic() < deadline, "the message never showed as waiting"
        time.sleep(0.001)
    assert [bytes(f) for f in _recv(b)] == [b"A", b"x"]
    assert directzmq.readable(b) is False
    ctx = zmq.Context()
    closed = ctx.socket(zmq.DEALER)
    closed.close(0)
    assert directzmq.readable(closed) is False
    ctx.term()


@pytest.mark.parametrize("direct", [True, False])
def test_a_wake_up_never_blocks(monkeypatch, direct):
    """wake() sends when a reader is there, and returns False at once (where a plain
    send would wait for ever) when the reader has closed its end, when the reader's
    queue is full, or when the socket itself is closed."""
    if not direct:
        monkeypatch.setattr(directzmq, "_lib", None)
    ctx = zmq.Context()

    def connected(name):
        reader, waker = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        waker.linger = 0
        reader.bind(f"inproc://directzmq-wake-{name}")
        waker.connect(f"inproc://directzmq-wake-{name}")
        return reader, waker

    try:
        reader, waker = connected("gone")
        assert directzmq.wake(waker) is True
        assert [bytes(f) for f in _recv(reader)] == [b""]
        reader.close(0)  # the reader is gone: a plain send would now wait
        time.sleep(0.2)  # (libzmq takes the pipe down asynchronously)
        waker.sndtimeo = 100
        with pytest.raises(zmq.Again):
            waker.send(b"")
        started = time.monotonic()
        for _ in range(3):
            assert directzmq.wake(waker) is False
        assert time.monotonic() - started < 0.5
        waker.close(0)
        assert directzmq.wake(waker) is False  # closed

        reader, waker = connected("full")
        waker.sndhwm = reader.rcvhwm = 1
        sent = sum(directzmq.wake(waker) for _ in range(5000))
        assert 1 <= sent < 5000  # the rest dropped, not waited for
        assert [bytes(f) for f in _recv(reader)] == [b""]
        reader.close(0)
        waker.close(0)
    finally:
        ctx.destroy(0)


def test_a_busy_python_thread_does_not_hold_up_sends_and_receives(pair):
    """The calls keep the GIL: with a thread spinning in Python and a 50 ms switch
    interval, pyzmq's 2,800 frame operations below would each wait up to 50 ms for the
    GIL to come back (minutes); these take milliseconds."""
    import sys

    a, b = pair
    stop = threading.Event()

    def spin():
        x = 0
        while not stop.is_set():
            x += 1

    msg = [b"s" * 64, b"h" * 300, b"p" * 300, b"m" * 200, b"c" * 50]
    took = []

    def worker():
        t0 = time.perf_counter()
        for _ in range(200):
            directzmq.send(a, msg)
            _recv(b)
        took.append(time.perf_counter() - t0)

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.05)
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        t = threading.Thread(target=worker)
        t.start()
        t.join(120)
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(before)
    assert took and took[0] < 3.0, took
