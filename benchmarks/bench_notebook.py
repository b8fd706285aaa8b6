"""Notebook-experience figures (issue 4): %px against a direct execute, and what a live
dashboard costs the controller while 10,000 load-balanced tasks run.

    python benchmarks/bench_notebook.py [--tasks N]

Runs in an IPython shell (the magics need one) on an embedded 2-engine cluster. The
dashboard cost is measured with the dashboard refreshing at its default rate (1 s) and at
ten times it (0.1 s), each against a run without a dashboard just before and after it.
Not a test: it asserts nothing and only reports.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date


def _noop() -> None:
    return None


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


def run_tasks(rc, n: int) -> float:
    view = rc.load_balanced_view()
    t0 = time.perf_counter()
    for ar in [view.apply_async(_noop) for _ in range(n)]:
        ar.get(300)
    dt = time.perf_counter() - t0
    rc.purge_local_results("all")
    return dt


def dashboard_cost(rc, n: int, interval: float) -> tuple[float, float, int]:
    """(seconds without, seconds with a dashboard refreshing every ``interval``, refreshes)."""
    from ipyfarm.widgets.dashboard import Dashboard

    before = run_tasks(rc, n)
    dash = Dashboard(rc, interval=interval)
    try:
        start = dash.refreshes
        with_dash = run_tasks(rc, n)
        done = dash.refreshes - start
    finally:
        dash.close()
    after = run_tasks(rc, n)
    return (before + after) / 2, with_dash, done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=10_000)
    args = parser.parse_args()
    from IPython.core.interactiveshell import InteractiveShell

    import ipyfarm as ipp

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "ipyfarm")
    cluster = ipp.Cluster(n=2)
    rc = cluster.start_and_connect_sync()
    rc[:].activate()
    try:
        px, direct = px_vs_execute(ip, rc)
        rows = [(interval, *dashboard_cost(rc, args.tasks, interval)) for interval in (1.0, 0.1)]
    finally:
        cluster.stop_cluster_sync()
    print(f"\nipyfarm notebook benchmark, {date.today()}, {platform.node()}, "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"%px pass on 2 engines: {px:.2f} ms; rc[:].execute('pass', block=True): "
          f"{direct:.2f} ms; ratio {px / direct:.2f}x")
    for interval, without, with_dash, refreshes in rows:
        print(f"{args.tasks} load-balanced tasks: {without:.2f} s without a dashboard, "
              f"{with_dash:.2f} s with one refreshing every {interval:g} s "
              f"({refreshes} refreshes): {(with_dash - without) / without * 100:+.1f}%")


if __name__ == "__main__":
    main()
