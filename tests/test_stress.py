"""The long soak (marker ``stress``; not part of the normal run):

    IPYFARM_SOAK_SECONDS=7200 python -m pytest -m stress -s tests/test_stress.py

A standalone controller (``ipyfarm start --daemonize --restart-engines``) with 4 engines runs
load-balanced work without pause while a random engine is SIGKILLed every
``IPYFARM_SOAK_KILL_EVERY`` seconds (default 30) and replaced; batches of 200 tasks follow
each other with ``IPYFARM_SOAK_PAUSE`` seconds between them (default 0.5, so a long soak
leaves the machine some room). Every task must come back
with its right value or, when its engines kept dying, with an error that says so: nothing is
lost, nothing hangs. The controller's RSS is sampled every 10 s; after the first few minutes
(warm-up) it must stay within a band, and the figures (min/max, tasks, kills) are printed.

A second test runs an embedded cluster for ``IPYFARM_THREADS_SECONDS`` (default 120):
four threads of the notebook's process submit at once (load-balanced and direct applies,
maps, executes on all engines, and done-callbacks that themselves wait on results) while
an engine is SIGKILLed every 20 s and restarted. Every result must be right or an engine
error; no thread may hang. (Found a deadlock: done-callbacks ran on the client's I/O
thread, so one waiting on another result waited on itself.)
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

import ipyfarm as ipp
from ipyfarm import error

from .conftest import kill_pids, wait_until

SOAK_SECONDS = float(os.environ.get("IPYFARM_SOAK_SECONDS", "600"))
pytestmark = [pytest.mark.stress, pytest.mark.timeout(SOAK_SECONDS + 900)]


def _square_after(x, delay):
    import time

    time.sleep(delay)
    return x * x


def _engine_pids(ctl):
    try:
        return [p.pid for p in ctl.children() if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def test_soak_with_random_engine_kills(tmp_path):
    duration = SOAK_SECONDS
    kill_every = float(os.environ.get("IPYFARM_SOAK_KILL_EVERY", "30"))
    pause = float(os.environ.get("IPYFARM_SOAK_PAUSE", "0.5"))
    warmup = min(300.0, duration / 4)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path))
    cli = [sys.executable, "-m", "ipyfarm"]
    profile = f"soak-{os.getpid()}"
    out = subprocess.run(cli + ["start", "-n", "4", "--daemonize", "--restart-engines",
                                "--profile", profile], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.load(open(tmp_path / f"ipyfarm-cluster-{profile}.json"))
    ctl = psutil.Process(info["pid"])
    seen_pids = set(_engine_pids(ctl))
    rc = None
    samples = []  # (seconds since start, controller RSS in MB)
    counts = {"tasks": 0, "ok": 0, "engine_failures": 0, "kills": 0, "batches": 0}
    try:
        rc = ipp.Client(url_file=str(tmp_path / f"ipyfarm-cluster-{profile}.json"), timeout=10)
        rc.wait_for_engines(4, timeout=60)
        view = rc.load_balanced_view(retries=3)
        rng = random.Random(12345)
        t0 = last_kill = last_sample = time.monotonic()
        while time.monotonic() - t0 < duration:
            now = time.monotonic()
            if now - last_kill >= kill_every:
                pids = _engine_pids(ctl)
                if pids:
                    victim = rng.choice(pids)
                    os.kill(victim, 9)
                    counts["kills"] += 1
                last_kill = now
            if now - last_sample >= 10 or not samples:
                samples.append((now - t0, ctl.memory_info().rss / 2**20))
                last_sample = now
                print(f"soak: {samples[-1][0]:.0f} s controller RSS {samples[-1][1]:.1f} MB, "
                      f"{counts}", flush=True)
            xs = list(range(counts["tasks"], counts["tasks"] + 200))
            delays = [rng.choice((0.0, 0.0, 0.001, 0.01)) for _ in xs]
            ar = view.map_async(_square_after, xs, delays, chunksize=1, return_exceptions=True)
            results = ar.get(timeout=300)  # bounded: a hang fails the soak
            for x, r in zip(xs, results, strict=True):
                if isinstance(r, BaseException):
                    assert isinstance(r, (error.EngineError, error.RemoteError)), repr(r)
                    assert "engine" in str(r).lower(), str(r)
                    counts["engine_failures"] += 1
                else:
                    assert r == x * x
                    counts["ok"] += 1
            counts["tasks"] += len(xs)
            counts["batches"] += 1
            rc.purge_everything()
            seen_pids.update(_engine_pids(ctl))
            # engines come back: the cluster never stays below 4 for long
            assert wait_until(lambda: len(rc.ids) >= 4, 60), rc.ids
            time.sleep(pause)
        samples.append((time.monotonic() - t0, ctl.memory_info().rss / 2**20))
        steady = [mb for t, mb in samples if t >= warmup] or [samples[-1][1]]
        print(f"\nsoak: {duration:.0f} s, {counts['tasks']} tasks in {counts['batches']} "
              f"batches, {counts['ok']} ok, {counts['engine_failures']} failed with an engine "
              f"error, {counts['kills']} engines SIGKILLed (all replaced)")
        print(f"soak: controller RSS MB over the run min {min(m for _, m in samples):.1f} max "
              f"{max(m for _, m in samples):.1f}; after {warmup:.0f} s warm-up min "
              f"{min(steady):.1f} max {max(steady):.1f}")
        print("soak: samples " + " ".join(f"{t:.0f}:{m:.1f}" for t, m in samples))
        # flat: no growth with the number of tasks once warm
        assert max(steady) - min(steady) < 40, samples
        assert counts["ok"] > 0.9 * counts["tasks"], counts
    finally:
        if rc is not None:
            rc.close()
        subprocess.run(cli + ["stop", "--profile", profile], env=env, capture_output=True,
                       timeout=60)
        seen_pids.update(_engine_pids(ctl))
        kill_pids([info["pid"], *seen_pids])


THREADS_SECONDS = float(os.environ.get("IPYFARM_THREADS_SECONDS", "120"))


def _double(x):
    return 2 * x


def _engine_failure(e):
    """An error that says an engine died under the task (expected when it is killed)."""
    return isinstance(e, error.EngineError) or "EngineError" in f"{e!r} {e}"


@pytest.mark.timeout(THREADS_SECONDS + 600)
def test_threads_and_callbacks_on_an_embedded_cluster_with_engine_kills():
    counts = {"ok": 0, "engine_errors": 0, "callbacks": 0, "kills": 0}
    problems: list = []
    lock = threading.Lock()

    def add(key, n=1):
        with lock:
            counts[key] += n

    with ipp.Cluster(n=3, profile=f"threads-{os.getpid()}", restart_engines=True,
                     max_restarts=1000) as rc:
        rc.wait_for_engines(3, timeout=60)
        stop = time.monotonic() + THREADS_SECONDS

        def worker(k):
            rng = random.Random(k)
            lview = rc.load_balanced_view(retries=2)
            while time.monotonic() < stop:
                try:
                    ids = list(rc.ids)
                    if not ids:
                        time.sleep(0.2)
                        continue
                    choice = rng.random()
                    if choice < 0.3:
                        ars = [lview.apply_async(_double, i) for i in range(50)]
                        assert [a.get(60) for a in ars] == [2 * i for i in range(50)]
                        add("ok", 50)
                    elif choice < 0.5:
                        view = rc[rng.choice(ids)]
                        ars = [view.apply_async(_double, i) for i in range(20)]
                        assert [a.get(60) for a in ars] == [2 * i for i in range(20)]
                        add("ok", 20)
                    elif choice < 0.65:
                        assert lview.map_sync(_double, range(200)) == [2 * i for i in range(200)]
                        add("ok", 200)
                    elif choice < 0.8:
                        rc[ids].execute(f"thread_{k} = {k}", block=True)
                        add("ok")
                    else:
                        done, got = threading.Event(), []

                        def callback(ar, got=got, done=done):
                            got.append((ar.get(), lview.apply_sync(_double, 21)))
                            done.set()

                        ar = lview.apply_async(_double, 1)
                        ar.add_done_callback(callback)
                        assert done.wait(60), "a done-callback waiting on a result hung"
                        assert got == [(2, 42)], got
                        add("callbacks")
                except Exception as e:  # an engine killed under a task is expected
                    if _engine_failure(e):
                        add("engine_errors")
                    else:
                        problems.append((k, repr(e)[:500]))
                        return

        workers = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(4)]
        for w in workers:
            w.start()
        rng = random.Random(99)
        while time.monotonic() < stop and not problems:
            time.sleep(20)
            alive = [p for p in rc.cluster.launcher.pids if psutil.pid_exists(p)]
            if alive:
                victim = rng.choice(alive)
                os.kill(victim, signal.SIGKILL)
                counts["kills"] += 1
        for w in workers:
            w.join(240)
        hung = [w.name for w in workers if w.is_alive()]
        print(f"\nthreads: {THREADS_SECONDS:.0f} s, {counts}", flush=True)
        assert not hung, f"submitting threads hung: {hung}"
        assert not problems, problems
        assert counts["ok"] > 0 and counts["callbacks"] > 0, counts
