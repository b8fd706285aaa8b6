"""LoadBalancedView against real engines: map, dependencies, retries, placement, abort."""

import os
import signal
import time

import pytest

import ipyfarm as ipp
from ipyfarm import error

from .conftest import kill_pids, wait_until


@pytest.fixture
def lview(rc):
    view = rc.load_balanced_view()
    yield view
    rc.wait(timeout=30)  # nothing of a test spills into the next one


def slow(t):
    import time

    time.sleep(t)
    return t


# ---------------------------------------------------------------- apply and map

def test_seed_examples(lview):
    lview.block = True
    assert lview.map(lambda x: x**10, range(32)) == [x**10 for x in range(32)]

    @lview.parallel()
    def f(x):
        return 10.0 * x**4

    assert f.map(range(32))[:3] == [0.0, 10.0, 160.0]
    assert lview.apply(lambda: 5) == 5


def test_apply_async_records_the_engine_it_ran_on(rc, lview):
    ar = lview.apply_async(os.getpid)
    pid = ar.get(10)
    assert ar.metadata.engine_id in rc.ids
    assert rc[ar.metadata.engine_id].apply_sync(os.getpid) == pid
    assert ar.metadata.status == "ok" and ar.metadata.completed >= ar.metadata.started


def test_work_spreads_over_engines(rc, lview):
    ars = [lview.apply_async(slow, 0.05) for _ in range(8)]
    engines = {ar.get(10) and ar.metadata.engine_id for ar in ars}
    assert engines == set(rc.ids)


@pytest.mark.parametrize("chunksize", [None, 1, 7])
def test_map_keeps_results_and_order(lview, chunksize):
    out = lview.map_sync(lambda x, y: x * y, range(1000), range(1, 1001), chunksize=chunksize)
    assert out == [x * (x + 1) for x in range(1000)]


def test_map_of_numpy_array_and_unordered_iteration(lview):
    np = pytest.importorskip("numpy")
    a = np.arange(10_000.0)
    assert lview.map_sync(lambda x: 2 * x, a) == list(2 * a)
    ar = lview.map_async(slow, [0.2, 0.0, 0.0, 0.0], chunksize=1, ordered=False)
    got = list(ar)
    assert sorted(got) == [0.0, 0.0, 0.0, 0.2] and got[-1] == 0.2


def test_map_return_exceptions_keeps_positions(lview):
    out = lview.map_sync(lambda x: 1 / x, [1, 0, 2, 0], return_exceptions=True)
    assert out[0] == 1.0 and out[2] == 0.5
    assert isinstance(out[1], error.RemoteError) and out[1].ename == "ZeroDivisionError"
    with pytest.raises(error.CompositeError):
        lview.map_sync(lambda x: 1 / x, [1, 0])


def test_imap_is_lazy_and_bounded(lview):
    pulled = []

    def source():
        for i in range(20):
            pulled.append(i)
            yield i

    it = lview.imap(lambda x: x * x, source(), max_outstanding=3)
    first = next(it)
    assert first == 0 and len(pulled) <= 4
    assert [first, *it] == [i * i for i in range(20)]
    assert sorted(lview.imap(lambda x: -x, range(10), ordered=False)) == sorted(
        -x for x in range(10))


def test_executor_and_joblib(lview):
    joblib = pytest.importorskip("joblib")
    ex = lview.executor
    fut = ex.submit(pow, 2, 10)
    assert fut.result(10) == 1024
    assert list(ex.map(abs, [-1, -2, 3])) == [1, 2, 3]
    ex.shutdown()
    lview.register_joblib_backend("ipyfarm-test")
    with joblib.parallel_backend("ipyfarm-test"):
        out = joblib.Parallel()(joblib.delayed(pow)(i, 2) for i in range(10))
    assert out == [i * i for i in range(10)]


def test_targets_restrict_the_engines(rc):
    view = rc.load_balanced_view(targets=[rc.ids[-1]])
    ars = [view.apply_async(os.getpid) for _ in range(4)]
    assert {ar.get(10) and ar.metadata.engine_id for ar in ars} == {rc.ids[-1]}


# ---------------------------------------------------------------- dependencies

def test_after_and_follow(lview):
    ar = lview.apply_async(slow, 0.3)
    ar2 = lview.apply_async(slow, 0.3)
    with lview.temp_flags(after=[ar, ar2]):
        ar3 = lview.apply_async(time.time)
    t3 = ar3.get(10)
    assert t3 >= max(a.metadata.completed.timestamp() for a in (ar, ar2)) - 0.01
    assert ar3.metadata.after == sorted(ar.msg_ids + ar2.msg_ids)
    with lview.temp_flags(follow=[ar], timeout=2.5):
        ar4 = lview.apply_async(os.getpid)
    ar4.get(10)
    assert ar4.metadata.engine_id == ar.metadata.engine_id


def test_dependency_timeout_and_impossible(lview):
    long = lview.apply_async(slow, 1.5)
    with lview.temp_flags(after=long, timeout=0.3):
        waiting = lview.apply_async(lambda: 1)
    with pytest.raises(error.DependencyTimeout) as info:
        waiting.get(5)
    assert isinstance(info.value, error.RemoteError) and info.value.ename == "DependencyTimeout"
    bad = lview.apply_async(lambda: 1 / 0)
    with lview.temp_flags(after=bad):
        never = lview.apply_async(lambda: 1)
    with pytest.raises(error.ImpossibleDependency):
        never.get(5)
    with lview.temp_flags(after=ipp.Dependency(bad, success=False, failure=True)):
        cleanup = lview.apply_async(lambda: "cleaned")
    assert cleanup.get(5) == "cleaned"
    with lview.temp_flags(after=ipp.Dependency([bad, long], all=False)):
        either = lview.apply_async(lambda: "either")
    assert either.get(5) == "either"
    with lview.temp_flags(after=["not-a-task"]):
        invalid = lview.apply_async(lambda: 1)
    with pytest.raises(error.InvalidDependency, match="not-a-task"):
        invalid.get(5)


def test_depend_and_require_run_where_they_can(rc, lview):
    target_pid = rc[rc.ids[-1]].apply_sync(os.getpid)

    def on_pid(pid):
        import os

        return os.getpid() == pid

    @ipp.depend(on_pid, target_pid)
    def where():
        import os

        return os.getpid()

    assert [lview.apply_async(where).get(10) for _ in range(3)] == [target_pid] * 3

    @ipp.require("json", "no_such_module_ipyfarm")
    def needs_missing():
        return 1

    with pytest.raises(error.ImpossibleDependency, match="every engine"):
        lview.apply_sync(needs_missing)

    @ipp.require("json")
    def uses_json():
        return json.dumps([1])  # noqa: F821 - imported on the engine by require

    assert lview.apply_sync(uses_json) == "[1]"


# ---------------------------------------------------------------- retries, placement

def test_retries_move_a_failing_task_to_another_engine(rc, lview):
    bad, good = rc.ids[0], rc.ids[-1]
    rc[bad]["flaky"] = True
    rc[good]["flaky"] = False

    def fragile():
        if flaky:  # noqa: F821 - the engine's variable
            raise RuntimeError("flaky engine")
        return "done"

    try:
        with lview.temp_flags(targets=[bad], retries=0):
            with pytest.raises(error.RemoteError, match="flaky"):
                lview.apply_sync(fragile)
        outcomes = []
        for _ in range(4):
            with lview.temp_flags(retries=1):
                ar = lview.apply_async(fragile)
            outcomes.append((ar.get(10), ar.metadata.engine_id))
        assert outcomes == [("done", good)] * 4
    finally:
        rc[:].execute("flaky = False", block=True)


def test_placement_on_engine_properties(rc, lview):
    special = rc.ids[-1]
    rc[special].set_properties({"role": "special"}, block=True)
    try:
        props = lview.get_properties()
        assert props[special]["role"] == "special" and "cpu_count" in props[special]
        with lview.temp_flags(placement=lambda p: p.get("role") == "special"):
            ars = [lview.apply_async(os.getpid) for _ in range(4)]
        assert {ar.get(10) and ar.metadata.engine_id for ar in ars} == {special}
        with lview.temp_flags(placement=lambda p: p["no such key"]):
            with pytest.raises(error.ImpossibleDependency, match="placement"):
                lview.apply_sync(os.getpid)
    finally:
        rc[special].set_properties({"role": None}, block=True)


def test_bad_flags_fail_at_once(lview):
    with pytest.raises(ValueError, match="retries"):
        lview.set_flags(retries=-1)
    with pytest.raises(ValueError, match="engine_retries"):
        lview.set_flags(engine_retries=-1)
    with pytest.raises(KeyError, match="valid flags"):
        lview.set_flags(priority=3)
    with pytest.raises(TypeError, match="placement"):
        lview.set_flags(placement="gpu")


# ---------------------------------------------------------------- abort, resubmit, status

def test_abort_queued_tasks(rc, lview):
    busy = [lview.apply_async(slow, 1.5) for _ in rc.ids]  # the queue holds meanwhile
    queued = [lview.apply_async(lambda: "ran") for _ in range(3)]
    assert wait_until(lambda: rc.queue_status()["unassigned"] >= 3, 5)
    queued[1].abort()
    with pytest.raises(error.TaskAborted):
        queued[1].get(5)
    assert [queued[0].get(10), queued[2].get(10)] == ["ran", "ran"]
    assert [b.get(10) for b in busy] == [1.5] * len(busy)


def test_resubmit_and_label(rc, lview):
    with lview.temp_flags(label="first-run"):
        ar = lview.apply_async(lambda x: x + 1, 41)
    assert ar.get(10) == 42
    again = rc.resubmit(ar.msg_ids)
    assert again.get(10) == [42] and again.msg_ids != ar.msg_ids
    assert rc.resubmit(ar.msg_ids[0]).get(10) == 42


def test_queue_status_reports_load_balanced_work(rc, lview):
    busy = [lview.apply_async(slow, 0.5) for _ in rc.ids]
    extra = lview.apply_async(slow, 0.0)
    status = rc.queue_status()
    assert status["unassigned"] + sum(status[e]["tasks"] for e in rc.ids) >= 1
    verbose = rc.queue_status(verbose=True)
    listed = set(verbose["unassigned"]).union(*(verbose[e]["tasks"] for e in rc.ids))
    assert extra.msg_ids[0] in listed or extra.ready()
    for a in (*busy, extra):
        a.get(10)


# ---------------------------------------------------------------- schemes and engine death

@pytest.mark.parametrize("scheme", ["leastload", "lru", "plainrandom", "twobin", "weighted"])
def test_each_scheme_runs_a_map(scheme):
    with ipp.Cluster(n=2, scheme=scheme, profile=f"scheme-{scheme}-{os.getpid()}") as rc:
        view = rc.load_balanced_view()
        out = view.map_sync(lambda x: x + 1, range(50), chunksize=1)
        assert out == list(range(1, 51))
        engines = {rc.metadata[m]["engine_id"] for m in rc.history[-50:]}
        assert engines == set(rc.ids), (scheme, engines)


def pid_after(t):
    import os
    import time

    time.sleep(t)
    return os.getpid()


def test_engine_death_reruns_or_fails_its_tasks():
    cluster = ipp.Cluster(n=3, hwm=2, profile=f"death-{os.getpid()}")
    rc = cluster.start_and_connect_sync()
    pids = list(cluster.launcher.pids)
    try:
        view = rc.load_balanced_view()
        victim, e1, e2 = rc.ids
        victim_pid = rc[victim].apply_sync(os.getpid)
        holds = []
        for e in (e1, e2):
            with view.temp_flags(targets=[e]):
                holds.append(view.apply_async(slow, 1.0))
        with view.temp_flags(retries=1):
            moved = view.apply_async(pid_after, 0.5)  # the only engine with nothing to do
        with view.temp_flags(targets=[victim]):
            lost = view.apply_async(slow, 30)
        assert wait_until(lambda: rc.queue_status(victim)["tasks"] == 2, 5)
        t0 = time.monotonic()
        os.kill(victim_pid, signal.SIGKILL)
        with pytest.raises(error.EngineError, match="SIGKILL") as info:
            lost.get(5)
        assert time.monotonic() - t0 < 5 and "retries=1" in str(info.value)
        survivor_pid = moved.get(10)
        assert survivor_pid != victim_pid and moved.metadata.engine_id in (e1, e2)
        for h in holds:
            h.get(10)
    finally:
        cluster.stop_cluster_sync()
        kill_pids(pids)


def test_db_query_by_label_and_status(rc, lview):
    with lview.temp_flags(label="dbq-ok"):
        ok = lview.apply_async(lambda: 1)
    with lview.temp_flags(label="dbq-bad"):
        bad = lview.apply_async(lambda: 1 / 0)
    ok.get(10)
    bad.wait(10)
    found = rc.db_query({"label": {"$glob": "dbq-*"}}, keys=["msg_id", "label", "status",
                                                             "engine_id", "queue"])
    by_label = {r["label"]: r for r in found}
    assert by_label["dbq-ok"]["status"] == "ok" and by_label["dbq-ok"]["queue"] == "task"
    assert by_label["dbq-bad"]["status"] == "error"
    assert rc.db_query({"msg_id": {"$in": ok.msg_ids}, "status": {"$ne": "error"}},
                       keys=["msg_id"]) == [{"msg_id": ok.msg_ids[0]}]
    with pytest.raises(ValueError, match=r"\$regex"):
        rc.db_query({"label": {"$regex": "x"}})


def test_db_query_by_time_range(rc, lview):
    from datetime import datetime, timedelta, timezone

    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    with lview.temp_flags(label="dbq-time"):
        lview.apply_async(lambda: 1).get(10)
    recent = rc.db_query({"submitted": {"$gte": before}, "label": "dbq-time"},
                         keys=["msg_id", "received", "completed"])
    assert len(recent) == 1
    assert recent[0]["received"] >= recent[0]["completed"] >= before
    naive_future = datetime.now() + timedelta(hours=1)  # naive means local time
    assert rc.db_query({"submitted": {"$gte": naive_future}}, keys=["msg_id"]) == []


def test_aborted_task_error_has_remote_fields(rc, lview):
    busy = [lview.apply_async(slow, 1.5) for _ in rc.ids]
    queued = lview.apply_async(lambda: 1)
    queued.abort()
    with pytest.raises(error.TaskAborted) as info:
        queued.get(5)
    assert info.value.ename == "TaskAborted" and isinstance(info.value, error.RemoteError)
    for b in busy:
        b.get(10)


def test_in_process_and_tcp_clients_side_by_side(rc):
    import zmq

    assert rc._io._post is not None  # the embedded controller's own process: no sockets
    ctx = zmq.Context()
    tcp = ipp.Client(dict(rc._info, inproc=None), context=ctx)
    try:
        assert tcp._io._post is None
        a = rc.load_balanced_view().map_async(lambda x: x * 2, range(50), chunksize=1)
        b = tcp.load_balanced_view().map_async(lambda x: x * 3, range(50), chunksize=1)
        assert a.get(20) == [x * 2 for x in range(50)]
        assert b.get(20) == [x * 3 for x in range(50)]
        np = pytest.importorskip("numpy")
        arr = np.arange(100_000.0)
        ar = rc[rc.ids[0]].push({"arr": arr}, block=False, track=True)
        ar.get(10)
        assert ar.sent
        assert rc[rc.ids[0]].pull("arr", block=True).sum() == arr.sum()
    finally:
        tcp.close()
        ctx.term()


def test_farm_status_snapshot(rc, lview):
    lview.map_sync(lambda x: x, range(10), chunksize=1)
    snap = wait_until(lambda: (lambda s: s if all(e["rss"] for e in s["engines"]) else None)(
        rc.farm_status()), 5)
    assert snap, "engines report their memory with each heartbeat"
    assert {e["engine_id"] for e in snap["engines"] if e["state"] != "dead"} >= set(rc.ids)
    assert snap["tasks"]["ok"] >= 10 and snap["finished"] >= snap["tasks"]["ok"]
    assert snap["scheme"] == "leastload" and snap["hwm"] == 1


def test_another_client_fetches_results_again_and_controller_failures(rc, lview):
    import zmq

    ok = lview.apply_async(lambda: 42)
    ok.get(10)
    bad = lview.apply_async(lambda: 1 / 0)
    bad.wait(10)
    with lview.temp_flags(after=bad):
        never = lview.apply_async(lambda: 1)
    with pytest.raises(error.ImpossibleDependency):
        never.get(10)
    ctx = zmq.Context()
    other = ipp.Client(dict(rc._info, inproc=None), context=ctx)
    try:
        for _ in range(2):  # each fetch is a fresh message: not taken for a replay
            assert other.get_result(ok.msg_ids[0]).get(10) == 42
        with pytest.raises(error.ImpossibleDependency, match="can never run"):
            other.get_result(never.msg_ids[0]).get(10)
    finally:
        other.close()
        ctx.term()
