"""Tasks while the notebook's own thread computes in pure Python.

    python benchmarks/bench_busy.py [--tasks N] [--skip-ipyparallel]

An embedded controller and a client's I/O thread share the interpreter (and its GIL)
with the user's code. For each setup, in a process of its own, with 2 engines:

- ``map``: a load-balanced ``map_async`` of N no-op tasks (``chunksize=1``), timed with the
  notebook's thread idle (waiting in ``get``) and then spinning in a Python loop until done;
- ``apply_sync``: the median round trip to one engine from a second thread, idle and while
  a third thread spins.

Setups: ipyfarm as shipped (switch interval lowered while its threads run), ipyfarm with
``IPYFARM_SWITCH_INTERVAL=0`` (Python's 5 ms kept: what it did before), and ipyparallel 9.2
(a controller process of its own; only its client shares the interpreter).

Not a test: it asserts nothing; compare within one run (the machine is noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time


def noop(x: object) -> object:
    return x


def measure(lib: str, tasks: int) -> dict:
    if lib == "ipyparallel":
        import ipyparallel as ipp

        cluster = ipp.Cluster(n=2, log_level=40)
    else:
        import ipyfarm as ipp

        cluster = ipp.Cluster(n=2, log_level="ERROR", profile=f"bench-busy-{os.getpid()}")
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(2, timeout=120)
        view = rc.load_balanced_view()
        view.map_sync(noop, range(100), chunksize=1)
        out: dict = {"switch interval (ms)": sys.getswitchinterval() * 1e3}
        t = time.perf_counter()
        view.map_async(noop, range(tasks), chunksize=1).get(600)
        out["map idle (s)"] = time.perf_counter() - t
        t = time.perf_counter()
        ar = view.map_async(noop, range(tasks), chunksize=1)
        spins = 0
        while not ar.done():
            spins += 1  # the notebook's thread, busy in Python
        out["map busy (s)"] = time.perf_counter() - t
        ar.get(60)
        e0 = rc[0]

        def round_trips(n: int) -> float:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                e0.apply_sync(noop, 1)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        res: list = []
        th = threading.Thread(target=lambda: res.append(round_trips(200)))
        th.start()
        th.join()
        out["apply_sync idle (ms)"] = res[-1] * 1e3
        stop = threading.Event()

        def spin() -> None:
            x = 0
            while not stop.is_set():
                x += 1

        spinner = threading.Thread(target=spin)
        spinner.start()
        try:
            th = threading.Thread(target=lambda: res.append(round_trips(40)))
            th.start()
            th.join()
        finally:
            stop.set()
            spinner.join()
        out["apply_sync busy (ms)"] = res[-1] * 1e3
        return out
    finally:
        rc.close()
        cluster.stop_cluster_sync()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--skip-ipyparallel", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tasks)))
        return
    setups = [("ipyfarm", "ipyfarm", {}),
              ("ipyfarm, Python's 5 ms interval", "ipyfarm", {"IPYFARM_SWITCH_INTERVAL": "0"})]
    if not args.skip_ipyparallel:
        setups.append(("ipyparallel 9.2", "ipyparallel", {}))
    print(f"# bench_busy: {args.tasks} tasks, 2 engines, {os.cpu_count()} cores, "
          f"python {sys.version.split()[0]}")
    for label, lib, env in setups:
        proc = subprocess.run([sys.executable, __file__, "--child", lib,
                               "--tasks", str(args.tasks)],
                              env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=1800)
        if proc.returncode != 0:
            print(f"{label}: failed: {proc.stderr.strip()[-400:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{label} (interval {r['switch interval (ms)']:.1f} ms): map {r['map idle (s)']:.2f} s "
              f"idle / {r['map busy (s)']:.2f} s busy; apply_sync {r['apply_sync idle (ms)']:.2f} ms "
              f"idle / {r['apply_sync busy (ms)']:.2f} ms busy")


if __name__ == "__main__":
    main()
