"""The floor the issues name: a plain Python process relaying zmq messages.

    python benchmarks/relayfloor.py

Three processes, none of them ipyfarm: a client (DEALER), a relay (ROUTER in front,
DEALER behind, a ``zmq.Poller`` loop in Python) and an echo server (ROUTER) that sends
each message straight back. Messages have the frames of a Jupyter task message (a
delimiter, a 64-byte signature, a 200-byte header, small parent / metadata / content,
a 500-byte buffer) but nothing signs, decodes or unpickles them. Measured:

- the round trip of one message at a time (client -> relay -> echo -> relay -> client);
- round trips per second with 1,000 in flight (each message relayed twice).

bench_core and bench_tasks print these next to ipyfarm's figures, so that each run shows
how far ipyfarm is from what Python and zmq alone cost on the machine at that moment.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from typing import Any

FRAMES = [b"<IDS|MSG>", b"s" * 64, b"h" * 200, b"{}", b"m" * 20, b"{}", b"b" * 500]


def _relay(front_port: Any, back_port: Any) -> None:
    import zmq

    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    front_port.value = front.bind_to_random_port("tcp://127.0.0.1")
    back_port.value = back.bind_to_random_port("tcp://127.0.0.1")
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if frames[-1] == b"stop":  # the end: pass it on to the echo, then stop
                    back.send_multipart(frames)
                    return
                (back if sock is front else front).send_multipart(frames)


def _echo(back_port: Any) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    while not back_port.value:
        time.sleep(0.01)
    sock.connect(f"tcp://127.0.0.1:{back_port.value}")
    while True:
        frames = sock.recv_multipart()
        if frames[-1] == b"stop":
            return
        sock.send_multipart(frames)


class Relay:
    """The relay and echo processes, started fresh (spawn: no inherited zmq state)."""

    def __enter__(self) -> Relay:
        mp = multiprocessing.get_context("spawn")
        self.front, self.back = mp.Value("i", 0), mp.Value("i", 0)
        self.procs = [mp.Process(target=_relay, args=(self.front, self.back), daemon=True),
                      mp.Process(target=_echo, args=(self.back,), daemon=True)]
        for p in self.procs:
            p.start()
        deadline = time.monotonic() + 30
        while not self.front.value and time.monotonic() < deadline:
            time.sleep(0.01)
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(f"tcp://127.0.0.1:{self.front.value}")
        self.one()  # connected end to end
        return self

    def one(self) -> None:
        self.sock.send_multipart(FRAMES)
        if not self.sock.poll(10_000):
            raise TimeoutError("the relay benchmark's echo did not answer in 10 s")
        self.sock.recv_multipart()

    def round_trip_ms(self, seconds: float) -> float:
        for _ in range(200):
            self.one()
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 100:
            t0 = time.perf_counter()
            self.one()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    def messages_per_s(self, n: int = 20_000, window: int = 1000) -> float:
        sock = self.sock
        t0 = time.perf_counter()
        sent = got = 0
        while got < n:
            while sent < n and sent - got < window:
                sock.send_multipart(FRAMES)
                sent += 1
            if not sock.poll(10_000):
                raise TimeoutError("the relay benchmark stalled")
            sock.recv_multipart()
            got += 1
        return n / (time.perf_counter() - t0)

    def __exit__(self, *exc: Any) -> None:
        try:
            self.sock.send_multipart([b"stop"])  # ends the relay, which passes it on
        finally:
            for p in self.procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)
            self.sock.close(0)
            self.ctx.term()


def main() -> None:
    with Relay() as relay:
        print(f"Python zmq relay: round trip {relay.round_trip_ms(3.0):.3f} ms, "
              f"{relay.messages_per_s():.0f} round trips/s with 1,000 in flight")


if __name__ == "__main__":
    main()
