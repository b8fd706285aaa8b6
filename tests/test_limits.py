"""Real engines: per-task time limits (interrupt, then kill) and restarting dead engines.

Each test starts its own small cluster (engines get killed here) and always stops it.
"""

import os
import signal
import time

import psutil
import pytest

import ipyfarm as ipp
from ipyfarm import error

from .conftest import cli_cluster, running_cluster, wait_until


def small_cluster(n=1, **kwargs):
    return running_cluster(n, profile=f"limits-{os.getpid()}-{time.monotonic_ns()}", **kwargs)


def ignore_sigint_and_sleep(seconds):
    import signal
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(seconds)
    return "finished"


def sleep_in_steps(seconds):
    import time

    for _ in range(int(seconds * 10)):
        time.sleep(0.1)


def test_a_task_past_its_time_limit_is_interrupted_and_the_engine_lives_on():
    with small_cluster() as (c, rc):
        pid = rc[0].apply_sync(os.getpid)
        view = rc.load_balanced_view()
        view.set_flags(time_limit=1)
        t0 = time.monotonic()
        # sleeping in steps: the engine's SIGINT may land on a thread other than the
        # task's, and one long C-level sleep then only ends when it is over
        ar = view.apply_async(sleep_in_steps, 30)
        with pytest.raises(error.TaskTimeout) as info:
            ar.get(10)
        took = time.monotonic() - t0
        assert took < 3, took
        assert "time limit of 1 s" in str(info.value)
        assert "KeyboardInterrupt" in str(info.value)
        assert rc.ids == [0] and rc[0].apply_sync(os.getpid) == pid
        assert c.launcher.pids == [pid]
        # a direct view has the flag too (temp_flags), and quick tasks are unaffected
        dv = rc[0]
        with dv.temp_flags(time_limit=1):
            assert dv.apply_sync(lambda: 42) == 42
            with pytest.raises(error.TaskTimeout):
                dv.apply_async(sleep_in_steps, 30).get(10)
        assert dv.time_limit is None
        assert view.map_sync(abs, [-1, -2]) == [1, 2]


def test_a_task_that_ignores_the_interrupt_is_killed_and_its_engine_replaced():
    with small_cluster(restart_engines=True) as (c, rc):
        old_pid = c.launcher.pids[0]
        view = rc.load_balanced_view(time_limit=1, retries=3)
        t0 = time.monotonic()
        ar = view.apply_async(ignore_sigint_and_sleep, 30)
        with pytest.raises(error.TaskTimeout) as info:
            ar.get(15)
        took = time.monotonic() - t0
        assert took < 4, took  # 1 s limit + 1 s grace + detection
        assert "was killed" in str(info.value) and "not rerun" in str(info.value)
        assert wait_until(lambda: 1 in rc.ids, 30), (rc.ids, c.restart_log)
        replaced = time.monotonic() - t0
        assert rc.ids == [1]
        assert not psutil.pid_exists(old_pid) or \
            psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
        (entry,) = c.restart_log
        assert entry["pid"] == old_pid and entry["returncode"] == -signal.SIGKILL
        assert entry["action"] == "restarted" and entry["new_pid"] == c.launcher.pids[0]
        assert rc[1].apply_sync(os.getpid) == entry["new_pid"]
        print(f"TaskTimeout after {took:.2f} s; replacement registered after {replaced:.2f} s")


def test_a_crash_loop_stops_restarting_after_max_restarts():
    with small_cluster(restart_engines=True, max_restarts=2, restart_window=60) as (c, rc):
        for expected_id in (1, 2):
            (pid,) = c.launcher.pids
            os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda eid=expected_id: rc.ids == [eid], 30), (
                rc.ids, c.restart_log)
        # the third death in the window: not restarted, and the log says why
        (pid,) = c.launcher.pids
        rc[2].apply_async(os._exit, 3)  # a task that takes its engine down
        assert wait_until(lambda: len(c.restart_log) == 3 and not rc.ids, 15), (
            rc.ids, c.restart_log)
        last = c.restart_log[-1]
        assert last["action"] == "not restarted" and last["returncode"] == 3
        assert "max_restarts=2" in last["reason"]
        assert [e["action"] for e in c.restart_log] == ["restarted", "restarted",
                                                        "not restarted"]
        assert c.launcher.pids == []


def test_engines_stopped_on_purpose_are_not_restarted():
    with small_cluster(n=2, restart_engines=True) as (c, rc):
        c.stop_engines_sync([0])
        assert wait_until(lambda: rc.ids == [1], 10), rc.ids
        assert len(c.launcher.pids) == 1 and c.restart_log == []


def test_restart_policy_counts_restarts_in_a_sliding_window_then_gives_up():
    from ipyfarm.cluster.launcher import RestartPolicy

    p = RestartPolicy(max_restarts=2, window=10.0)
    assert p.allow(0.0) and p.allow(5.0)
    assert p.allow(10.5)  # the first one left the window
    assert not p.allow(11.0) and "max_restarts=2" in p.gave_up
    assert not p.allow(100.0)  # a crash loop stops restarting for good
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError):
        ipp.Cluster(n=1, restart_engines=True, restart_window=0)


def test_standalone_controller_restarts_engines(tmp_path):
    """``ipyfarm start --restart-engines``: a standalone controller replaces an engine that
    dies unexpectedly (here: a task that exits its engine with code 3)."""
    with cli_cluster(tmp_path, f"restart-{os.getpid()}") as cluster:
        cluster.start("-n", "1", "--restart-engines")
        code = ("import os, time\n"
                "first = rc[0].apply_sync(os.getpid)\n"
                "rc[0].apply_async(os._exit, 3)\n"
                "t = time.monotonic()\n"
                "while 1 not in rc.ids and time.monotonic() - t < 30: time.sleep(0.05)\n"
                "print(first, rc[1].apply_sync(os.getpid))\n"
                "rc.close()\n")
        first, second = map(int, cluster.client(code, timeout=90).split())
        assert first != second and psutil.pid_exists(second)
        cluster.track([second])
        cluster.stop()
