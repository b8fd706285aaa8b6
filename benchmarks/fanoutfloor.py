"""The floor under the fan-out target: one zmq message to each of N plain Python processes.

    python benchmarks/fanoutfloor.py [--engines 2,8,64] [--seconds 3]

No ipyfarm and no Jupyter: this process binds a ROUTER; N echo processes (spawned, one
DEALER each) send each message straight back, with the frames of a Jupyter message
(nothing signs, decodes or runs anything). A round sends one message to each of the N
and waits for the N answers, as a broadcast ``execute`` does. Printed: the median round
for each N, and its ratio to the round for 2; and the round trips per second with one
message in flight to each of 2 echo processes (an embedded controller's ``apply_async``
loop at ``hwm=1`` on two engines, without anything the task needs).

On a machine with fewer cores than processes, the N answers queue for the cores: each
costs its process a receive and a send in Python, and this process a send and a receive.
The round for 2 is mostly the latency of one exchange; the round for 64 is mostly those
costs, 64 times over, shared by the cores. bench_scale prints this next to ipyfarm's
fan-out, so that each run shows how much of the ratio is the machine's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from typing import Any

FRAMES = [b"<IDS|MSG>", b"s" * 64, b"h" * 200, b"{}", b"m" * 20, b"{}"]


def _echo(port: int, ident: bytes) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.identity = ident
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send_multipart([b"hello"])
    while True:
        frames = sock.recv_multipart()
        if frames[-1] == b"stop":
            return
        sock.send_multipart(frames)


class Fleet:
    """N echo processes behind one ROUTER of this process."""

    def __init__(self, n: int):
        import zmq

        self.n = n
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        mp = multiprocessing.get_context("spawn")
        self.idents = [f"echo-{i}".encode() for i in range(n)]
        self.procs = [mp.Process(target=_echo, args=(port, ident), daemon=True)
                      for ident in self.idents]
        for p in self.procs:
            p.start()
        seen = set()
        deadline = time.monotonic() + 60 + n
        while len(seen) < n:
            if not self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                raise TimeoutError(f"only {len(seen)} of {n} echo processes connected")
            seen.add(self.sock.recv_multipart()[0])

    def round(self, idents: list[bytes]) -> float:
        sock = self.sock
        t0 = time.perf_counter()
        for ident in idents:
            sock.send_multipart([ident, *FRAMES])
        for _ in idents:
            if not sock.poll(10_000):
                raise TimeoutError("an echo process did not answer in 10 s")
            sock.recv_multipart()
        return time.perf_counter() - t0

    def median_round(self, k: int, seconds: float) -> float:
        idents = self.idents[:k]
        for _ in range(50):
            self.round(idents)
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 50:
            times.append(self.round(idents))
        return statistics.median(times)

    def pipelined_rate(self, k: int, n: int = 20_000) -> float:
        """Round trips per second with one message in flight to each of the first ``k``
        echo processes: an embedded controller's ``apply_async`` loop at ``hwm=1``."""
        sock = self.sock
        idents = self.idents[:k]
        t0 = time.perf_counter()
        for ident in idents:
            sock.send_multipart([ident, *FRAMES])
        sent, got = k, 0
        while got < n:
            if not sock.poll(10_000):
                raise TimeoutError("an echo process did not answer in 10 s")
            ident = sock.recv_multipart()[0]
            got += 1
            if sent < n:
                sock.send_multipart([ident, *FRAMES])
                sent += 1
        return n / (time.perf_counter() - t0)

    def close(self) -> None:
        for ident in self.idents:
            self.sock.send_multipart([ident, b"stop"])
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.sock.close()
        self.ctx.term()


def measure(counts: list[int], seconds: float) -> dict[int, float]:
    """Median round (s) to the first k of max(counts) echo processes, for each k."""
    fleet = Fleet(max(counts))
    try:
        return {k: fleet.median_round(k, seconds) for k in counts}
    finally:
        fleet.close()


def cpu_seconds(procs: list) -> float:
    """CPU seconds (user + system) the psutil processes ``procs`` have used so far; one
    that is gone meanwhile counts nothing."""
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except Exception:  # psutil.Error: gone meanwhile
            continue
        total += t.user + t.system
    return total


def pipelined(k: int = 2, n: int = 20_000) -> tuple[float, float]:
    """:meth:`Fleet.pipelined_rate` on a fleet of ``k`` (best of three), and the CPU (us,
    user + system) that round took per round trip in this process and the echo
    processes together: what one message each way costs the machine, with nothing in it."""
    import psutil

    fleet = Fleet(k)
    procs = [psutil.Process(), *(psutil.Process(p.pid) for p in fleet.procs)]
    try:
        fleet.pipelined_rate(k, 2_000)
        best = (0.0, float("nan"))
        for _ in range(3):
            c0 = cpu_seconds(procs)
            rate = fleet.pipelined_rate(k, n)
            if rate > best[0]:
                best = (rate, (cpu_seconds(procs) - c0) / n * 1e6)
        return best
    finally:
        fleet.close()


def main(argv: Any = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="2,8,64")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    counts = sorted({int(c) for c in args.engines.split(",")})
    rounds = measure(counts, args.seconds)
    base = rounds[counts[0]]
    for k in counts:
        print(f"one message to each of {k:3d} plain echo processes and back: "
              f"{rounds[k] * 1e3:7.3f} ms  ({rounds[k] / base:5.1f}x the round for {counts[0]})")
    rate, cpu = pipelined(2)
    print(f"one message in flight to each of 2 echo processes: {rate:,.0f} round trips/s, "
          f"{cpu:.0f} us of CPU per round trip (all processes)")


if __name__ == "__main__":
    main()
