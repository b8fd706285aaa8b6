"""Core figures for ipyfarm and ipyparallel 9.2, measured side by side in one run.

    pip install -e '.[bench]'
    python benchmarks/bench_core.py [--quick]

Prints one table: each figure for both, and the ratio (how many times better
ipyfarm is). Not a test: it asserts nothing and only reports.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from datetime import date
from typing import Any, Callable

import numpy as np
import psutil


def _noop() -> None:
    return None


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def timed_loop(fn: Callable[[], Any], seconds: float, min_n: int = 20,
               rounds: int = 3) -> float:
    """Mean seconds per call, after a warm-up: the lowest of ``rounds`` rounds sharing
    ``seconds`` (the VM's noise only ever adds time, in bursts; both libraries are
    timed the same way)."""
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while n < min_n or time.perf_counter() - t0 < seconds / rounds:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def start(lib: str, n: int) -> tuple[Any, Any, float]:
    """Start a cluster of ``n`` engines; return (cluster, client, seconds until ready)."""
    t0 = time.perf_counter()
    if lib == "ipyfarm":
        import ipyfarm as m
    else:
        import ipyparallel as m
    cluster = m.Cluster(n=n, log_level=40 if lib == "ipyparallel" else "ERROR")
    rc = cluster.start_and_connect_sync()
    rc.wait_for_engines(n, timeout=120)
    # "ready" means an engine answers work, not just registered
    rc[:].apply_sync(_noop)
    return cluster, rc, time.perf_counter() - t0


def controller_pid(lib: str, cluster: Any) -> int:
    if lib == "ipyfarm":
        return os.getpid()  # embedded: the controller lives in this process
    return cluster.controller.process.pid


def engine_pids(rc: Any) -> list[int]:
    return rc[:].apply_sync(os.getpid)


def engine_side_processes(pids: list[int], lib: str, cluster: Any) -> float:
    """Processes per engine: the engine plus any helper between it and this process."""
    me = os.getpid()
    total = 0
    for pid in pids:
        proc = psutil.Process(pid)
        while proc is not None and proc.pid != me:
            total += 1
            proc = proc.parent()
    return total / max(1, len(pids))


def measure(lib: str, quick: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    secs = 1.0 if quick else 3.0
    cluster, rc, ready2 = start(lib, 2)
    out["2 engines ready (s)"] = ready2
    try:
        pids = engine_pids(rc)
        time.sleep(0.5)
        out["idle engine RSS (MB)"] = sum(rss_mb(p) for p in pids) / len(pids)
        out["processes per engine"] = engine_side_processes(pids, lib, cluster)
        cpid = controller_pid(lib, cluster)
        e0 = rc[0]
        out["direct apply_sync round trip (ms)"] = timed_loop(
            lambda: e0.apply_sync(_noop), secs) * 1000
        dview = rc[:]
        out["execute on all engines (ms)"] = timed_loop(
            lambda: dview.execute("pass", block=True), secs) * 1000
        # the controller's memory before any data moved (after the small tasks above,
        # whose records it keeps: that growth is bench_tasks' 100,000-task figure)
        gc.collect()
        base = rss_mb(cpid)
        size = 100 * 2**20
        arr = np.ones(size // 8)
        e0.push({"x": arr}, block=True)
        e0.pull("x", block=True)

        def push_pull(arr: np.ndarray = arr) -> None:
            ar = e0.push({"x": arr}, block=False)
            ar.get()
            ar2 = e0.pull("x", block=False)
            back = ar2.get()
            assert back.nbytes == arr.nbytes
            # both clients cache every result; drop them so each round starts alike
            rc.purge_local_results([ar, ar2])

        reps = 3 if quick else 6
        t0 = time.perf_counter()
        for _ in range(reps):
            push_pull()
        dt = time.perf_counter() - t0
        out["push+pull 100 MB (GB/s)"] = 2 * reps * size / dt / 1e9
        # controller memory after the pushes and pulls above and a 1 GB push + pull
        e0.execute("x = None", block=True)
        del arr, push_pull  # (its default argument held the 100 MB array)
        big = np.ones(2**30 // 8)
        e0.push({"big": big}, block=True)
        back = e0.pull("big", block=True)
        del back
        e0.execute("big = None", block=True)
        del big
        rc.purge_local_results("all")
        gc.collect()
        time.sleep(1.0)
        after = rss_mb(cpid)
        out["controller RSS growth after 100 MB x 6 and 1 GB push+pull (MB)"] = after - base
    finally:
        rc.close()
        cluster.stop_cluster_sync()
    cluster, rc, ready8 = start(lib, 8)
    out["8 engines ready (s)"] = ready8
    rc.close()
    cluster.stop_cluster_sync()
    return out


def standalone_controller_growth() -> float:
    """RSS growth (MB) of a standalone ipyfarm controller across a 1 GB push + pull."""
    import subprocess

    import ipyfarm

    profile = f"bench-{os.getpid()}"
    cli = [sys.executable, "-m", "ipyfarm"]
    subprocess.run(cli + ["start", "-n", "1", "--daemonize", "--profile", profile],
                   check=True, capture_output=True, timeout=120)
    rc = ipyfarm.Client(profile=profile)
    try:
        cpid = rc._info["pid"]
        e0 = rc[0]
        e0.apply_sync(min, 1, 2)
        base = rss_mb(cpid)
        big = np.ones(2**30 // 8)
        e0.push({"big": big}, block=True)
        back = e0.pull("big", block=True)
        del back, big
        e0.execute("big = None", block=True)
        time.sleep(1.0)
        return rss_mb(cpid) - base
    finally:
        rc.close()
        subprocess.run(cli + ["stop", "--profile", profile], capture_output=True, timeout=60)


LOWER_IS_BETTER = {"2 engines ready (s)", "8 engines ready (s)",
                   "direct apply_sync round trip (ms)", "execute on all engines (ms)",
                   "idle engine RSS (MB)", "processes per engine",
                   "controller RSS growth after 100 MB x 6 and 1 GB push+pull (MB)"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shorter timing loops")
    parser.add_argument("--only", choices=["ipyfarm", "ipyparallel"])
    args = parser.parse_args()
    libs = [args.only] if args.only else ["ipyfarm", "ipyparallel"]
    results = {lib: measure(lib, args.quick) for lib in libs}
    key = "standalone controller RSS growth, 1 GB push+pull (MB)"
    LOWER_IS_BETTER.add(key)
    if "ipyfarm" in results:
        results["ipyfarm"][key] = standalone_controller_growth()
    if "ipyparallel" in results:  # its controller is always a separate process
        results["ipyparallel"][key] = results["ipyparallel"][
            "controller RSS growth after 100 MB x 6 and 1 GB push+pull (MB)"]
    print(f"\nipyfarm core benchmark, {date.today()}, {platform.node()}, "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"{'figure':<50} {'ipyfarm':>10} {'ipyparallel':>12} {'ratio':>7}")
    for key in results[libs[0]]:  # noqa: B020
        a = results.get("ipyfarm", {}).get(key, float("nan"))
        b = results.get("ipyparallel", {}).get(key, float("nan"))
        if key in LOWER_IS_BETTER:
            ratio = b / a if a else float("nan")
        else:
            ratio = a / b if b else float("nan")
        print(f"{key:<50} {a:>10.3f} {b:>12.3f} {ratio:>6.2f}x")
    print("ratio: how many times better ipyfarm is (>1 = ipyfarm better)")
    from relayfloor import Relay

    with Relay() as relay:
        floor = relay.round_trip_ms(1.0 if args.quick else 3.0)
    rt = results.get("ipyfarm", {}).get("direct apply_sync round trip (ms)")
    print(f"\nreference: a Python zmq relay round trip (benchmarks/relayfloor.py), the "
          f"floor to approach: {floor:.3f} ms"
          + (f"; ipyfarm's direct apply_sync is {rt / floor:.2f}x that" if rt else ""))


if __name__ == "__main__":
    main()
