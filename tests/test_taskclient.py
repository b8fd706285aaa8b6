"""TaskClient (the IPython 0.9 task interface) against two real engines."""

import contextlib
import datetime

import pytest

import ipyfarm as ipp
from ipyfarm import error

from .conftest import wait_until

WAIT = 30  # seconds: the bound of every wait in this module

# a task that holds its engine until the test creates the file ``release``
BLOCKER = """
import os, time
_deadline = time.monotonic() + 60
while not os.path.exists(release) and time.monotonic() < _deadline:
    time.sleep(0.01)
"""


@pytest.fixture
def tc(rc):
    with ipp.TaskClient(rc) as tc:
        yield tc


@pytest.fixture
def gate(tc, tmp_path):
    """``start()`` occupies both engines with blocker tasks; teardown releases them."""
    release = tmp_path / "release"
    blockers = []

    def start():
        blockers.extend(tc.run(ipp.Task(BLOCKER, push={"release": str(release)}))
                        for _ in range(2))
        assert wait_until(lambda: tc.queue_status()["pending"] == 2, WAIT), tc.queue_status()
        return blockers

    def open_():
        release.touch()
        tc.barrier(blockers, timeout=WAIT)

    start.open = open_
    try:
        yield start
    finally:
        open_()


@pytest.fixture
def special(rc):
    """Engine ``rc.ids[1]`` gets the property ``tc_special``; restored afterwards."""
    engine_id = rc.ids[1]
    rc[engine_id].set_properties({"tc_special": True}, block=True)
    try:
        yield engine_id
    finally:
        rc[engine_id].set_properties({"tc_special": False}, block=True)


def on_special(props):
    return props.get("tc_special", False)


def result(tc, task):
    return tc.get_task_result(tc.run(task), block=True, timeout=WAIT)


# ---------------------------------------------------------------------- the seeds
def test_seed_quickstart(tc, rc):
    tasklist = [ipp.Task("a = %i" % n, pull="a") for n in range(1000)]
    taskids = [tc.run(t) for t in tasklist]
    assert taskids == list(range(1000))
    tc.barrier(taskids, timeout=120)
    task_results = [tc.get_task_result(taskid) for taskid in taskids]
    tr = task_results[73]
    assert repr(tr) == "TaskResult[ID:73]:{'a': 73}"
    assert tr.results["a"] == 73
    assert tr.ns.a == 73
    assert tr.taskid == 73 and tr.failure is None
    assert tr.engineid in rc.ids
    assert all(isinstance(t, datetime.datetime) for t in (tr.submitted, tr.completed))
    assert tr.submitted <= tr.started <= tr.completed
    assert isinstance(tr.duration, float) and 0 <= tr.duration < 120
    assert [r.results["a"] for r in task_results] == list(range(1000))
    assert tc.queue_status() == {"scheduled": 0, "pending": 0, "succeeded": 1000, "failed": 0}


def test_seed_map(tc):
    serial_result = list(map(lambda x: x**10, range(32)))
    parallel_result = tc.map(lambda x: x**10, range(32))
    assert serial_result == parallel_result


def test_seed_parallel_decorator(tc):
    @tc.parallel()
    def f(x):
        return 10.0 * x**4

    assert f(range(32)) == [10.0 * x**4 for x in range(32)]


# ---------------------------------------------------------------------- data and namespaces
def test_push_and_pull(tc):
    tr = result(tc, ipp.Task("c = a + b", push={"a": 2, "b": 40}, pull=["c", "a"]))
    assert tr.results == {"c": 42, "a": 2}
    assert tr.ns.c == 42
    with pytest.raises(AttributeError, match="pulled no 'zz'"):
        _ = tr.ns.zz


def test_ipython_syntax(tc):
    tr = result(tc, ipp.StringTask("x = 5\n%time y = x * 2", pull="y"))
    assert tr.failure is None and tr.results == {"y": 10}


def test_attributes_settable_after_construction(tc):
    t = ipp.Task("pass")
    t.expression = "z = k * 3"
    t.push = {"k": 7}
    t.pull = "z"
    tid = tc.run(t)
    t.push = {"k": 1000}  # run took a copy: changes now don't affect the submitted task
    assert tc.get_task_result(tid, block=True, timeout=WAIT).results == {"z": 21}


def test_clear_after_removes_names_for_next_task(tc, special):
    check = ipp.Task("seen = 'tc_name' in globals()", pull="seen", depend=on_special)
    assert result(tc, ipp.Task("tc_name = 1", depend=on_special)).engineid == special
    assert result(tc, check).results == {"seen": True}  # not cleared: it stays
    cleared = ipp.Task("tc_name = 1", clear_after=True, depend=on_special)
    assert result(tc, cleared).failure is None
    assert result(tc, check).results == {"seen": False}


def test_clear_before_runs_on_fresh_namespace(tc, rc):
    rc[:].push({"tc_old": 1}, block=True)
    seen = "seen = 'tc_old' in globals()"
    assert result(tc, ipp.Task(seen, pull="seen")).results == {"seen": True}
    tr = result(tc, ipp.Task(seen + "\nv = v + 1", push={"v": 1}, pull=["seen", "v"],
                             clear_before=True))
    assert tr.results == {"seen": False, "v": 2}  # cleared, then pushed


# ---------------------------------------------------------------------- MapTask
def test_maptask_args_kwargs(tc):
    def f(a, b, scale=1):
        return (a + b) * scale

    tr = result(tc, ipp.MapTask(f, args=(2, 3), kwargs={"scale": 10}))
    assert tr.results == {"result": 50}
    assert tr.ns.result == 50
    assert result(tc, ipp.MapTask(lambda: "none")).results == {"result": "none"}


def test_maptask_clear_after(tc, special):
    def define():
        from ipyfarm.engine import ops

        ops._shell().user_ns["tc_map_name"] = 1

    result(tc, ipp.MapTask(define, clear_after=True, depend=on_special))
    check = ipp.Task("seen = 'tc_map_name' in globals()", pull="seen", depend=on_special)
    assert result(tc, check).results == {"seen": False}


# ---------------------------------------------------------------------- failures
def test_error_gives_failure(tc):
    tr = result(tc, ipp.Task("a = 1\n1/0", pull="a"))
    assert isinstance(tr.failure, error.RemoteError)
    assert tr.failure.ename == "ZeroDivisionError"
    assert tr.results == {} and not tr.recovered
    assert "ZeroDivisionError" in repr(tr)
    with pytest.raises(error.RemoteError, match="ZeroDivisionError"):
        tr.raise_exception()
    assert tc.queue_status() == {"scheduled": 0, "pending": 0, "succeeded": 0, "failed": 1}


def test_pull_of_missing_name_fails(tc):
    tr = result(tc, ipp.Task("a = 1", pull="nothere"))
    assert tr.failure.ename == "NameError"


def test_retries_rerun_a_failed_task(tc, tmp_path):
    code = ("import os\nif not os.path.exists(flag):\n    open(flag, 'w').close()\n"
            "    raise RuntimeError('first attempt fails')\nok = True")
    tr = result(tc, ipp.Task(code, push={"flag": str(tmp_path / "a")}, pull="ok", retries=1))
    assert tr.failure is None and tr.results == {"ok": True}
    tr = result(tc, ipp.Task(code, push={"flag": str(tmp_path / "b")}, pull="ok"))
    assert tr.failure.ename == "RuntimeError"


def test_recovery_task_after_retries(tc, tmp_path):
    log = tmp_path / "log"
    failing = ipp.Task("open(log, 'a').write('x')\nraise ValueError('broken')",
                       push={"log": str(log)}, retries=1,
                       recovery_task=ipp.Task("b = 5", pull="b"))
    tid = tc.run(failing)
    tr = tc.get_task_result(tid, block=True, timeout=WAIT)
    assert log.read_text() == "xx"  # the task ran twice before its recovery
    assert tr.taskid == tid and tr.results == {"b": 5} and tr.failure is None
    assert tr.recovered and [f.ename for f in tr.failures] == ["ValueError"]
    assert tr.task.expression == "b = 5"
    assert tc.queue_status(verbose=True)["succeeded"] == [tid]


def test_recovery_chain(tc):
    last = ipp.MapTask(lambda: "rescued")
    middle = ipp.Task("raise KeyError('k')", recovery_task=last)
    tr = result(tc, ipp.Task("raise ValueError('v')", recovery_task=middle))
    assert tr.results == {"result": "rescued"}
    assert [f.ename for f in tr.failures] == ["ValueError", "KeyError"]
    # a chain that fails to its end: the last failure is the task's
    tr = result(tc, ipp.Task("raise ValueError('v')",
                             recovery_task=ipp.Task("raise KeyError('k')")))
    assert tr.failure.ename == "KeyError" and [f.ename for f in tr.failures] == ["ValueError"]
    # a task that succeeds never runs its recovery
    tr = result(tc, ipp.Task("a = 1", pull="a", recovery_task=ipp.Task("a = 2", pull="a")))
    assert tr.results == {"a": 1} and not tr.recovered


def test_recovery_loops_are_refused(tc):
    t = ipp.Task("a = 1")
    t.recovery_task = t
    with pytest.raises(ValueError, match="loop"):
        tc.run(t)
    a, b = ipp.Task("a = 1"), ipp.MapTask(len, args=([],))
    a.recovery_task, b.recovery_task = b, a
    with pytest.raises(ValueError, match="loop"):
        tc.run(a)
    assert tc.queue_status() == {"scheduled": 0, "pending": 0, "succeeded": 0, "failed": 0}


def test_bad_tasks_are_refused(tc):
    with pytest.raises(TypeError, match="Task"):
        tc.run("a = 1")
    with pytest.raises(ValueError, match="retries"):
        tc.run(ipp.Task("a = 1", retries=-1))
    with pytest.raises(TypeError, match="depend"):
        tc.run(ipp.Task("a = 1", depend=3))
    with pytest.raises(TypeError, match="pull"):
        tc.run(ipp.Task("a = 1", pull=[1]))
    with pytest.raises(KeyError, match="no task 99"):
        tc.get_task_result(99)


# ---------------------------------------------------------------------- dependencies
def test_depend_on_engine_properties(tc, special):
    ids = [tc.run(ipp.Task("a = 1", depend=on_special)) for _ in range(8)]
    tc.barrier(ids, timeout=WAIT)
    assert {tc.get_task_result(t).engineid for t in ids} == {special}


def test_impossible_dependency(tc):
    tr = result(tc, ipp.Task("a = 1", depend=lambda p: p["tc_no_such_key"]))
    assert isinstance(tr.failure, error.ImpossibleDependency)
    # ... which a recovery task without that dependency rescues
    tr = result(tc, ipp.Task("a = 1", depend=lambda p: False,
                             recovery_task=ipp.Task("a = 2", pull="a")))
    assert tr.results == {"a": 2} and isinstance(tr.failures[0], error.ImpossibleDependency)


# ---------------------------------------------------------------------- queue, abort
def test_result_is_none_while_running(tc, gate):
    blockers = gate()
    assert tc.get_task_result(blockers[0]) is None
    with pytest.raises(error.TimeoutError, match="did not finish"):
        tc.get_task_result(blockers[0], block=True, timeout=0.05)
    with pytest.raises(error.TimeoutError, match="2 of 2 tasks"):
        tc.barrier(blockers, timeout=0.05)
    gate.open()
    assert tc.get_task_result(blockers[0]).failure is None


def test_queue_status(tc, gate):
    blockers = gate()
    queued = [tc.run(ipp.Task("a = 1")) for _ in range(3)]
    failed = tc.run(ipp.Task("a = 1", depend=lambda p: False))
    tc.get_task_result(failed, block=True, timeout=WAIT)
    assert tc.queue_status() == {"scheduled": 3, "pending": 2, "succeeded": 0, "failed": 1}
    assert tc.queue_status(verbose=True) == {
        "scheduled": queued, "pending": blockers, "succeeded": [], "failed": [failed]}
    gate.open()
    tc.barrier(queued, timeout=WAIT)
    assert tc.queue_status() == {"scheduled": 0, "pending": 0, "succeeded": 5, "failed": 1}


def test_abort_queued_task(tc, gate):
    gate()
    victim = tc.run(ipp.Task("a = 1", pull="a", recovery_task=ipp.Task("b = 1")))
    other = tc.run(ipp.Task("a = 2", pull="a"))
    assert tc.abort(victim) is None
    tr = tc.get_task_result(victim, block=True, timeout=WAIT)  # answered while engines are busy
    assert isinstance(tr.failure, error.TaskAborted) and not tr.recovered
    assert tc.get_task_result(other) is None
    gate.open()
    assert tc.get_task_result(other, block=True, timeout=WAIT).results == {"a": 2}
    assert tc.queue_status(verbose=True)["failed"] == [victim]


def test_abort_completed_task_raises(tc):
    tid = tc.run(ipp.Task("a = 1"), block=True)
    with pytest.raises(IndexError, match="already completed"):
        tc.abort(tid)


# ---------------------------------------------------------------------- lifetime
def test_clear_forgets_finished_results(tc, gate):
    done = tc.run(ipp.Task("a = 1"), block=True)
    running = gate()[0]
    tc.clear()
    with pytest.raises(KeyError):
        tc.get_task_result(done)
    assert tc.get_task_result(running) is None  # unfinished tasks stay
    gate.open()
    assert tc.get_task_result(running).failure is None
    assert tc.run(ipp.Task("a = 1")) == 3  # ids are never reused


def test_own_client(cluster):
    c, rc = cluster
    with contextlib.closing(ipp.TaskClient(profile=c.profile)) as tc:
        assert tc.client is not rc
        assert result(tc, ipp.Task("a = 3", pull="a")).ns.a == 3
        tc.spin()
    assert tc.client._closed
    with ipp.TaskClient(rc) as tc:
        pass
    assert not rc._closed
