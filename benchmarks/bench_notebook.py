"""Notebook-experience figures (issue 4): %px against a direct execute, what a live
dashboard costs the controller while 10,000 load-balanced tasks run, and whether the
notebook process stays responsive while the dashboard refreshes.

    python benchmarks/bench_notebook.py [--tasks N] [--rounds R]

Runs in an IPython shell (the magics need one) on an embedded 2-engine cluster. The
controller is embedded, so its work is one thread of this process (``ipyfarm-hub``): its
CPU time is read from that thread's own CPU clock (``pthread_getcpuclockid``), which
counts nothing else this process does (the client's I/O thread, the dashboard's refresh
thread, the loop submitting tasks).

* dashboard cost: N no-op tasks with no dashboard, with one refreshing every 1 s (the
  default) and every 0.1 s, ``--rounds`` rounds interleaved (the order rotates each round);
  per configuration the median and the spread (min-max) of the hub's CPU per task and of
  the wall time; the cost is the change of the median against no dashboard.
* one refresh's hub CPU, measured directly: a 0.1 s dashboard on an idle farm against the
  idle hub with no dashboard, and what that is as a share of the hub's CPU under load.
* responsiveness: the main thread's gaps in a ``time.sleep(0)`` loop and the latency of a
  trivial controller round trip (``rc.queue_status()``), without a dashboard and with one
  refreshing every 0.1 s.

Not a test: it asserts nothing and only reports.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from datetime import date
from typing import Callable


def _noop() -> None:
    return None


# ---------------------------------------------------------------------- the hub's CPU clock
def hub_cpu_clock() -> Callable[[], float]:
    """Seconds of CPU the embedded controller's hub thread has used (its own clock)."""
    hub = next((t for t in threading.enumerate() if t.name == "ipyfarm-hub"), None)
    if hub is None or hub.ident is None:
        raise RuntimeError("no ipyfarm-hub thread in this process: the benchmark needs the "
                           "embedded controller (ipp.Cluster(...).start_and_connect_sync())")
    clock = time.pthread_getcpuclockid(hub.ident)
    return lambda: time.clock_gettime(clock)


# ---------------------------------------------------------------------- %px
def px_vs_execute(ip, rc, n: int = 200) -> tuple[float, float]:
    """Mean ms of ``%px pass`` and of ``rc[:].execute("pass", block=True)``."""
    from IPython.utils.capture import capture_output

    dview = rc[:]
    for _ in range(20):
        dview.execute("pass", block=True)
    t0 = time.perf_counter()
    for _ in range(n):
        dview.execute("pass", block=True)
    direct = (time.perf_counter() - t0) / n * 1000
    with capture_output():
        for _ in range(20):
            ip.run_line_magic("px", "pass")
        t0 = time.perf_counter()
        for _ in range(n):
            ip.run_line_magic("px", "pass")
    px = (time.perf_counter() - t0) / n * 1000
    return px, direct


# ---------------------------------------------------------------------- dashboard cost
def run_tasks(rc, n: int, hub_cpu: Callable[[], float]) -> tuple[float, float]:
    """(wall seconds, hub CPU seconds) of ``n`` load-balanced no-op tasks."""
    view = rc.load_balanced_view()
    c0, t0 = hub_cpu(), time.perf_counter()
    for ar in [view.apply_async(_noop) for _ in range(n)]:
        ar.get(300)
    wall, cpu = time.perf_counter() - t0, hub_cpu() - c0
    rc.purge_local_results("all")
    return wall, cpu


def one_run(rc, n: int, interval: float | None, hub_cpu) -> dict:
    """One batch of ``n`` tasks, with a dashboard refreshing every ``interval`` s (None:
    without one)."""
    from ipyfarm.widgets.dashboard import Dashboard

    dash = None if interval is None else Dashboard(rc, interval=interval)
    try:
        start = dash.refreshes if dash else 0
        wall, cpu = run_tasks(rc, n, hub_cpu)
        refreshes = dash.refreshes - start if dash else 0
    finally:
        if dash is not None:
            dash.close()
    return {"wall": wall, "cpu_us": cpu / n * 1e6, "refreshes": refreshes}


CONFIGS: tuple[float | None, ...] = (None, 1.0, 0.1)


def dashboard_cost(rc, n: int, rounds: int, hub_cpu) -> dict[float | None, list[dict]]:
    """``rounds`` rounds of every configuration, interleaved, the order rotating."""
    runs: dict[float | None, list[dict]] = {c: [] for c in CONFIGS}
    run_tasks(rc, 1000, hub_cpu)  # warm up
    for r in range(rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        for interval in order:
            runs[interval].append(one_run(rc, n, interval, hub_cpu))
    return runs


def refresh_cpu_us(rc, hub_cpu, seconds: float = 3.0) -> tuple[float, float, int]:
    """(hub CPU µs per refresh, idle hub CPU µs per second, refreshes) on an idle farm."""
    from ipyfarm.widgets.dashboard import Dashboard

    c0 = hub_cpu()
    time.sleep(seconds)
    idle_per_s = (hub_cpu() - c0) / seconds
    dash = Dashboard(rc, interval=0.1)
    try:
        start, c0, t0 = dash.refreshes, hub_cpu(), time.perf_counter()
        time.sleep(seconds)
        cpu, dt, refreshes = hub_cpu() - c0, time.perf_counter() - t0, dash.refreshes - start
    finally:
        dash.close()
    per_refresh = (cpu - idle_per_s * dt) / max(refreshes, 1)
    return per_refresh * 1e6, idle_per_s * 1e6, refreshes


# ---------------------------------------------------------------------- responsiveness
def responsiveness(rc, interval: float | None, seconds: float = 3.0) -> dict:
    """Main-thread gaps of a ``time.sleep(0)`` loop and ``rc.queue_status()`` latency (µs),
    with a dashboard refreshing every ``interval`` s (None: without one)."""
    from ipyfarm.widgets.dashboard import Dashboard

    dash = None if interval is None else Dashboard(rc, interval=interval)
    try:
        gaps = []
        end = time.perf_counter() + seconds
        last = time.perf_counter()
        while last < end:
            time.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        calls = []
        for _ in range(300):
            t0 = time.perf_counter()
            rc.queue_status()
            calls.append(time.perf_counter() - t0)
            time.sleep(0.005)
    finally:
        if dash is not None:
            dash.close()
    gaps.sort()
    calls.sort()
    return {"gap_p50": gaps[len(gaps) // 2] * 1e6, "gap_p999": gaps[int(len(gaps) * 0.999)] * 1e6,
            "gap_max": gaps[-1] * 1e6, "call_p50": calls[len(calls) // 2] * 1e6,
            "call_p99": calls[int(len(calls) * 0.99)] * 1e6, "call_max": calls[-1] * 1e6}


# ---------------------------------------------------------------------- report
def _label(interval: float | None) -> str:
    return "no dashboard" if interval is None else f"dashboard every {interval:g} s"


def _spread(values: list[float], fmt: str) -> str:
    return (f"median {format(statistics.median(values), fmt)} "
            f"(min {format(min(values), fmt)}, max {format(max(values), fmt)})")


def report(n: int, rounds: int, px: float, direct: float, runs, per_refresh, idle, probes,
           rows) -> str:
    lines = [f"ipyfarm notebook benchmark, {date.today()}, {platform.node()}, "
             f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
             f"%px pass on 2 engines: {px:.2f} ms; rc[:].execute('pass', block=True): "
             f"{direct:.2f} ms; ratio {px / direct:.2f}x",
             f"dashboard cost, {n} load-balanced no-op tasks per run, {rounds} rounds "
             "interleaved; hub = the controller's thread, its own CPU clock:"]
    base_cpu = statistics.median(r["cpu_us"] for r in runs[None])
    base_wall = statistics.median(r["wall"] for r in runs[None])
    for interval in CONFIGS:
        rs = runs[interval]
        cpu = [r["cpu_us"] for r in rs]
        wall = [r["wall"] for r in rs]
        line = (f"  {_label(interval):<24} hub CPU/task µs {_spread(cpu, '.1f')}; "
                f"wall s {_spread(wall, '.2f')}")
        if interval is not None:
            line += (f"; refreshes/run {statistics.median(r['refreshes'] for r in rs):.0f}; "
                     f"cost: hub CPU {(statistics.median(cpu) / base_cpu - 1) * 100:+.1f}%, "
                     f"wall {(statistics.median(wall) / base_wall - 1) * 100:+.1f}%")
        lines.append(line)
    hub_per_s = base_cpu * n / base_wall  # hub CPU µs per wall second under load
    lines.append(f"one refresh costs the hub {per_refresh:.0f} µs of CPU (idle farm, {probes} "
                 f"refreshes at 0.1 s, idle hub {idle:.0f} µs/s subtracted); under load the "
                 f"hub uses {hub_per_s / 1e6 * 100:.0f}% of a core, so a refresh every 1 s is "
                 f"{per_refresh / hub_per_s * 100:.3f}% of its work and every 0.1 s "
                 f"{per_refresh * 10 / hub_per_s * 100:.2f}%")
    lines.append("responsiveness of this (the notebook's) process, µs: main-thread "
                 "time.sleep(0) gaps and rc.queue_status() round trips:")
    for interval, row in rows:
        lines.append(f"  {_label(interval):<24} sleep(0) gap p50 {row['gap_p50']:.1f}, "
                     f"p99.9 {row['gap_p999']:.0f}, max {row['gap_max']:.0f}; "
                     f"queue_status p50 {row['call_p50']:.0f}, p99 {row['call_p99']:.0f}, "
                     f"max {row['call_max']:.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from IPython.core.interactiveshell import InteractiveShell

    import ipyfarm as ipp

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "ipyfarm")
    cluster = ipp.Cluster(n=2)
    rc = cluster.start_and_connect_sync()
    rc[:].activate()
    try:
        hub_cpu = hub_cpu_clock()
        px, direct = px_vs_execute(ip, rc)
        runs = dashboard_cost(rc, args.tasks, args.rounds, hub_cpu)
        per_refresh, idle, probes = refresh_cpu_us(rc, hub_cpu)
        rows = [(interval, responsiveness(rc, interval)) for interval in (None, 0.1, None, 0.1)]
    finally:
        cluster.stop_cluster_sync()
    print()
    print(report(args.tasks, args.rounds, px, direct, runs, per_refresh, idle, probes, rows))


if __name__ == "__main__":
    main()
