"""``ipyfarm demo``: a short tour on an embedded cluster, timed step by step."""

from __future__ import annotations

import os
import time
from typing import Any, Callable


def _step(label: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    value = fn()
    ms = (time.perf_counter() - t0) * 1000
    shown = repr(value)
    if len(shown) > 70:
        shown = shown[:67] + "..."
    print(f"  {label:<44} {ms:8.1f} ms   -> {shown}")
    return value


def _slow_square(x: int) -> int:
    import time as _t

    _t.sleep(0.05)
    return x * x


def _load_balanced(ipp: Any, rc: Any) -> None:
    """Task farming: map, a dependency, and throughput."""
    lview = rc.load_balanced_view()
    _step("load-balanced map x**2 over 100,000 items",
          lambda: sum(lview.map_sync(_square, range(100_000))))
    first = lview.apply_async(_slow_square, 3)
    with lview.temp_flags(after=first):
        second = lview.apply_async(_square, 4)
    _step("task that waits for another (after=)", lambda: (
        second.get(timeout=10), second.metadata.started >= first.metadata.completed))
    n_tasks = 1000
    t0 = time.perf_counter()
    for ar in [lview.apply_async(_square, i) for i in range(n_tasks)]:
        ar.get(timeout=60)
    dt = time.perf_counter() - t0
    print(f"  {'1,000 load-balanced tasks (apply_async loop)':<44} {dt * 1000:8.1f} ms"
          f"   -> {n_tasks / dt:,.0f} tasks/s")


def _square(x: int) -> int:
    return x * x


def run_demo(n: int = 4) -> int:
    import ipyfarm as ipp

    print(f"ipyfarm demo: embedded controller in this process (pid {os.getpid()}), "
          f"{n} engine kernels")
    t_all = time.perf_counter()
    cluster = ipp.Cluster(n=n, profile=f"demo-{os.getpid()}")
    rc = _step(f"start controller + {n} engines", cluster.start_and_connect_sync)
    try:
        dview = rc[:]
        dview.block = True
        _step("engine ids", lambda: rc.ids)
        _step("engine pids (apply os.getpid everywhere)", lambda: dview.apply(os.getpid))
        _step("execute 'import math' on all", lambda: dview.execute("import math") and None)
        _step("push a = 5 (dview['a'] = 5)", lambda: dview.__setitem__("a", 5))
        _step("apply lambda: a * 2 on engine 0", lambda: rc[0].apply_sync(ipp.interactive(lambda: a * 2)))  # noqa: F821
        _step("scatter range(16) as x", lambda: dview.scatter("x", range(16)))
        _step("gather x", lambda: dview.gather("x"))
        t0 = time.perf_counter()
        out = dview.map_sync(_slow_square, range(4 * n))
        par = time.perf_counter() - t0
        print(f"  {'map of a 50 ms function over ' + str(4 * n) + ' items':<44} "
              f"{par * 1000:8.1f} ms   -> {out[:6]}... ({4 * n * 0.05 / par:.1f}x vs serial)")
        ar = rc[1 % n].apply_async(pow, 2, 10)
        _step("apply_async pow(2, 10) on engine 1, get", lambda: (ar.get(timeout=5),
                                                                  ar.metadata.engine_id))
        try:
            rc[0].apply_sync(lambda: 1 / 0)
        except ipp.RemoteError as e:
            print(f"  {'remote error comes back as RemoteError':<44} {'':8}      -> {e}")
        n_rt = 200
        t0 = time.perf_counter()
        for _ in range(n_rt):
            rc[0].apply_sync(min, 1, 2)
        print(f"  {'round trip, direct apply_sync (mean of 200)':<44} "
              f"{(time.perf_counter() - t0) / n_rt * 1000:8.2f} ms")
        _load_balanced(ipp, rc)
    finally:
        _step("stop cluster", cluster.stop_cluster_sync)
    print(f"demo finished in {time.perf_counter() - t_all:.2f} s")
    return 0
