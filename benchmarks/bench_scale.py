"""Scale figures: 64 real engines, 1,024 simulated ones, execute fan-out.

    python benchmarks/bench_scale.py [--quick] [--skip-ipyparallel]

Prints, in one run (the machine is noisy: compare within a run):

1. 64 local engines ready (start to all registered and answering): ipyfarm, then
   ipyparallel 9.2.
2. Execute fan-out on those 64 real engines: ``rc[:].execute("x=1")`` to 64 engines
   against ``rc[:2]`` (2 engines), median of repeated calls, and their ratio.
3. 1,024 simulated engines (``ipyfarm.testing.simengines``, in a process of their own)
   against an embedded controller: time for all to register; load-balanced tasks/s
   submitted (a) by a real ``Client`` in the controller's process (``apply_async`` of
   ``os.getpid``, pipelined) and (b) by a load-generating client process
   (``simengines --client``: signed apply_requests, results counted, not unpickled),
   each the best of three rounds (all three printed); execute fan-out 64 vs 2 simulated engines (the controller's and client's share alone).
4. The floor under the fan-out ratio (``fanoutfloor.py``): one plain zmq message to each
   of 64 and of 2 echo processes and back, no ipyfarm, no Jupyter.

Not a test: it asserts nothing and only reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any


ROUNDS = 3


def ready_time(lib: str, n: int) -> tuple[float, Any, Any]:
    """Seconds from start to ``n`` engines registered and each answering a task."""
    t0 = time.perf_counter()
    if lib == "ipyfarm":
        import ipyfarm as m

        cluster = m.Cluster(n=n, log_level="ERROR", profile=f"bench-scale-{os.getpid()}")
    else:
        import ipyparallel as m

        cluster = m.Cluster(n=n, log_level=40)
    rc = cluster.start_and_connect_sync()
    rc.wait_for_engines(n, timeout=300)
    rc[:].apply_sync(os.getpid)
    return time.perf_counter() - t0, cluster, rc


def fan_out(rc: Any, reps: int, limit: int | None = None) -> tuple[float, float]:
    """Median seconds of ``execute("x=1")`` on all engines (or the first ``limit``) and
    on the first two."""
    every = rc[:] if limit is None else rc[rc.ids[:limit]]
    two = rc[rc.ids[:2]]
    for view in (every, two):
        for _ in range(3):
            view.execute("x=1", block=True)
    t_all, t_two = [], []
    for _ in range(reps):
        t = time.perf_counter()
        every.execute("x=1", block=True)
        t_all.append(time.perf_counter() - t)
        t = time.perf_counter()
        two.execute("x=1", block=True)
        t_two.append(time.perf_counter() - t)
    return statistics.median(t_all), statistics.median(t_two)


def real_engines(n: int, reps: int, with_ipp: bool) -> dict:
    out: dict[str, Any] = {}
    secs, cluster, rc = ready_time("ipyfarm", n)
    out["ipyfarm_ready"] = secs
    try:
        out["fan_all"], out["fan_two"] = fan_out(rc, reps)
    finally:
        rc.close()
        cluster.stop_cluster_sync()
    if with_ipp:
        secs, cluster, rc = ready_time("ipyparallel", n)
        out["ipp_ready"] = secs
        try:
            out["ipp_fan_all"], out["ipp_fan_two"] = fan_out(rc, reps)
        finally:
            rc.close()
            cluster.stop_cluster_sync()
    return out


def simulated(n: int, tasks: int, reps: int) -> dict:
    from ipyfarm.client.client import Client
    from ipyfarm.controller.embedded import EmbeddedController

    out: dict[str, Any] = {}
    ctl = EmbeddedController(profile=f"bench-scale-sim-{os.getpid()}")
    ctl.start()
    hub = ctl.hub
    info = ctl.connection_info()
    sim = None
    rc = None
    try:
        t0 = time.perf_counter()
        sim = subprocess.Popen([sys.executable, "-m", "ipyfarm.testing.simengines",
                                "--url", info["registration"], "--key", info["key"],
                                "-n", str(n)], stdout=subprocess.PIPE, text=True)
        first = None
        deadline = time.monotonic() + 120
        while len(hub.state.engines) < n and time.monotonic() < deadline:
            if first is None and hub.state.engines:
                first = time.perf_counter()
            time.sleep(0.002)
        end = time.perf_counter()
        out["registered"] = len(hub.state.engines)
        out["reg_total"] = end - t0  # includes starting the process and binding its ports
        out["reg_first_to_all"] = end - (first or t0)
        rc = Client(info)
        rc.wait_for_engines(n, timeout=60)
        view = rc.load_balanced_view()
        for ar in [view.apply_async(os.getpid) for _ in range(500)]:
            ar.get(60)
        # rates: the best of ROUNDS rounds, all printed (this VM's noise only ever
        # slows a round, as in bench_core and bench_tasks)
        out["lb_client_rounds"] = []
        for _ in range(ROUNDS):
            t = time.perf_counter()
            ars = [view.apply_async(os.getpid) for _ in range(tasks)]
            for ar in ars:
                ar.get(120)
            out["lb_client_rounds"].append(tasks / (time.perf_counter() - t))
            out["engines_used"] = len({ar.get() for ar in ars})
            del ars
            rc.purge_local_results("all")
        out["lb_client"] = max(out["lb_client_rounds"])
        out["lb_loadgen_rounds"] = []
        out["lb_loadgen_errors"] = 0
        for _ in range(ROUNDS):
            gen = subprocess.run([sys.executable, "-m", "ipyfarm.testing.simengines",
                                  "--url", info["client"], "--key", info["key"],
                                  "--client", str(tasks * 2)],
                                 capture_output=True, text=True, timeout=300)
            if gen.returncode != 0:
                out["lb_loadgen_error"] = gen.stderr.strip()[-300:]
                break
            res = json.loads(gen.stdout.strip().splitlines()[-1])
            out["lb_loadgen_rounds"].append(res["rate"])
            out["lb_loadgen_errors"] += res["errors"]
        if out["lb_loadgen_rounds"]:
            out["lb_loadgen"] = max(out["lb_loadgen_rounds"])
        out["sim_fan_all"], out["sim_fan_two"] = fan_out(rc, reps, limit=64)
        t = time.perf_counter()
        sim.terminate()  # the simulator unregisters all its engines on SIGTERM
        sim.wait(60)
        deadline = time.monotonic() + 60
        while hub.state.live_ids() and time.monotonic() < deadline:
            time.sleep(0.01)
        out["unregistered_in"] = time.perf_counter() - t
        out["left_alive"] = len(hub.state.live_ids())
    finally:
        if rc is not None:
            rc.close()
        if sim is not None and sim.poll() is None:
            sim.kill()
            sim.wait(10)
        ctl.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tasks and repetitions")
    p.add_argument("--skip-ipyparallel", action="store_true")
    p.add_argument("--skip-real", action="store_true", help="only the simulated engines")
    p.add_argument("--sim", type=int, default=1024, help="simulated engines")
    args = p.parse_args()
    reps = 5 if args.quick else 15
    tasks = 5000 if args.quick else 20000
    print(f"# bench_scale on {os.cpu_count()} cores, python {sys.version.split()[0]}")
    if not args.skip_real:
        r = real_engines(64, reps, not args.skip_ipyparallel)
        line = f"64 engines ready: ipyfarm {r['ipyfarm_ready']:.1f} s"
        if "ipp_ready" in r:
            line += (f", ipyparallel 9.2 {r['ipp_ready']:.1f} s "
                     f"({r['ipp_ready'] / r['ipyfarm_ready']:.1f}x)")
        print(line)
        print(f"execute fan-out, real engines: 64 -> {r['fan_all'] * 1e3:.1f} ms, "
              f"2 -> {r['fan_two'] * 1e3:.1f} ms, ratio {r['fan_all'] / r['fan_two']:.1f}x")
        if "ipp_fan_all" in r:
            print(f"  ipyparallel 9.2: 64 -> {r['ipp_fan_all'] * 1e3:.1f} ms, "
                  f"2 -> {r['ipp_fan_two'] * 1e3:.1f} ms, "
                  f"ratio {r['ipp_fan_all'] / r['ipp_fan_two']:.1f}x")
    s = simulated(args.sim, tasks, reps)
    print(f"{args.sim} simulated engines: {s['registered']} registered in "
          f"{s['reg_total']:.2f} s from process start ({s['reg_first_to_all']:.2f} s from "
          "the first registration)")
    def rounds(key: str) -> str:
        return " / ".join(f"{r:.0f}" for r in s.get(key, []))

    print(f"LB tasks/s through them (best of {ROUNDS}): real Client {s['lb_client']:.0f} "
          f"({s['engines_used']} engines used); load-generator client "
          f"{s.get('lb_loadgen', float('nan')):.0f} "
          f"(errors {s.get('lb_loadgen_error', s['lb_loadgen_errors'])})")
    print(f"  rounds: real Client {rounds('lb_client_rounds')}; "
          f"load generator {rounds('lb_loadgen_rounds')}")
    print(f"execute fan-out, simulated engines: 64 -> {s['sim_fan_all'] * 1e3:.1f} ms, "
          f"2 -> {s['sim_fan_two'] * 1e3:.1f} ms, "
          f"ratio {s['sim_fan_all'] / s['sim_fan_two']:.1f}x")
    print(f"all unregistered in {s['unregistered_in']:.2f} s (left alive: {s['left_alive']})")
    import fanoutfloor  # next to this script

    floor = fanoutfloor.measure([2, 64], 2.0 if args.quick else 4.0)
    print(f"floor, plain zmq echo processes: 64 -> {floor[64] * 1e3:.2f} ms, "
          f"2 -> {floor[2] * 1e3:.3f} ms, ratio {floor[64] / floor[2]:.1f}x")


if __name__ == "__main__":
    main()
