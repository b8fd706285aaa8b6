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
