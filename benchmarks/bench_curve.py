"""What CurveZMQ encryption costs: round trips and bulk data, with and without Curve.

    python benchmarks/bench_curve.py [--quick]

One run starts two 1-engine clusters on loopback, ``curve=False`` and ``curve=True``
(``curve=True`` forces encryption there), and measures for each, through two clients:
the in-process client of the embedded controller (only controller <-> engine traffic is
encrypted) and a TCP client with its own zmq context (client <-> controller encrypted
too, as for a notebook on another host), and, for scale, 100 MB between two bare zmq
sockets. Prints one table. Not a test: reports only.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from typing import Any

import numpy as np
import zmq

import ipyfarm
from ipyfarm.client.client import Client

from bench_core import timed_loop  # run as a script: this folder is on sys.path

SIZE = 100 * 2**20


def _noop() -> None:
    return None


def push_pull_rate(rc: Any, reps: int) -> float:
    """GB/s moved by ``reps`` rounds of a 100 MB push then pull on engine 0."""
    e0 = rc[0]
    arr = np.ones(SIZE // 8)
    e0.push({"x": arr}, block=True)
    e0.pull("x", block=True)
    t0 = time.perf_counter()
    for _ in range(reps):
        ar = e0.push({"x": arr}, block=False)
        ar.get()
        ar2 = e0.pull("x", block=False)
        assert ar2.get().nbytes == arr.nbytes
        rc.purge_local_results([ar, ar2])
    dt = time.perf_counter() - t0
    e0.execute("x = None", block=True)
    return 2 * reps * SIZE / dt / 1e9


def measure(curve: bool, quick: bool) -> dict[str, float]:
    secs, reps = (1.0, 3) if quick else (3.0, 6)
    out: dict[str, float] = {}
    cluster = ipyfarm.Cluster(n=1, curve=curve, log_level="ERROR",
                              profile=f"bench-curve-{os.getpid()}-{int(curve)}")
    rc = cluster.start_and_connect_sync()
    ctx = zmq.Context()
    tcp = None
    try:
        assert (cluster.controller.hub.curve_keys is not None) is curve
        tcp = Client(cluster.controller.file, context=ctx, timeout=30)
        for name, client in (("in-process client", rc), ("TCP client", tcp)):
            e0 = client[0]
            e0.apply_sync(_noop)
            out[f"apply_sync round trip, {name} (ms)"] = timed_loop(
                lambda e0=e0: e0.apply_sync(_noop), secs) * 1000
            out[f"push+pull 100 MB, {name} (GB/s)"] = push_pull_rate(client, reps)
    finally:
        if tcp is not None:
            tcp.close()
        rc.close()
        cluster.stop_cluster_sync()
        ctx.term()
    return out


def raw_zmq_rate(curve_on: bool, reps: int) -> float:
    """GB/s of 100 MB messages between two bare zmq sockets over loopback TCP: what
    libzmq's Curve itself costs, without ipyfarm."""
    from ipyfarm import curve

    ctx = zmq.Context()
    server, client = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        if curve_on:
            public, secret = curve.new_keypair()
            curve.serve(server, public, secret)
            curve.connect_as_client(client, public)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.connect(f"tcp://127.0.0.1:{port}")
        payload = np.ones(SIZE // 8)
        client.send(payload, copy=False)
        server.recv(copy=False)
        t0 = time.perf_counter()
        for _ in range(reps):
            client.send(payload, copy=False)
            server.recv(copy=False)
        return reps * SIZE / (time.perf_counter() - t0) / 1e9
    finally:
        server.close(0)
        client.close(0)
        ctx.term()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shorter timing loops")
    args = parser.parse_args()
    plain = measure(False, args.quick)
    enc = measure(True, args.quick)
    reps = 3 if args.quick else 6
    key = "bare zmq PAIR, 100 MB one way (GB/s)"
    plain[key], enc[key] = raw_zmq_rate(False, reps), raw_zmq_rate(True, reps)
    print(f"\nipyfarm Curve cost, {date.today()}, {platform.node()}, {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, libzmq {zmq.zmq_version()}")
    print(f"{'figure':<46} {'plain':>9} {'curve':>9} {'curve/plain':>12}")
    for key in plain:
        a, b = plain[key], enc[key]
        print(f"{key:<46} {a:>9.3f} {b:>9.3f} {b / a:>12.2f}")


if __name__ == "__main__":
    main()
