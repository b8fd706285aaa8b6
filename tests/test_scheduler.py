"""Stories for load-balanced scheduling in the pure state machine: no sockets, no sleeps."""

import random

import pytest

from ipyfarm.controller import commands as C
from ipyfarm.controller import events as E
from ipyfarm.controller.dependencies import DepSpec
from ipyfarm.controller.schemes import SCHEMES, Slot, get_scheme
from ipyfarm.controller.state import ControllerState


def kinds(cmds):
    return [type(c).__name__ for c in cmds]


def dispatched(cmds):
    return [(c.msg_id, c.engine_id) for c in cmds if isinstance(c, C.DispatchTask)]


def failed(cmds):
    return {c.msg_id: (c.ename, c.evalue) for c in cmds if isinstance(c, C.FailTask)}


def make(hwm=1, scheme="leastload", engines=2, seed=0):
    s = ControllerState(hwm=hwm, scheme=scheme, seed=seed)
    for i in range(engines):
        register(s, f"u{i}", pid=100 + i)
    return s


def register(s, uuid, now=0.0, pid=100, properties=None):
    info = {"uuid": uuid, "pid": pid, "hostname": "h", "connection_info": {"shell_port": 1},
            "properties": dict(properties or {})}
    return s.handle(E.RegistrationRequested(now, uuid, b"id-" + uuid.encode(), info))


def task(s, msg_id, now=1.0, **fields):
    return s.handle(E.TaskSubmitted(now, msg_id, b"c1", "apply_request", None, ["f"],
                                    **fields))


def reply(s, engine_id, msg_id, status="ok", now=2.0, **kw):
    return s.handle(E.ReplyArrived(now, engine_id, msg_id, status, ["r"], 1, **kw))


@pytest.fixture(autouse=True)
def _invariants(monkeypatch):
    """Check the state's bookkeeping after every event of every story."""
    real = ControllerState.handle

    def checked(self, event):
        out = real(self, event)
        self.check_invariants()
        return out

    monkeypatch.setattr(ControllerState, "handle", checked)


# ---------------------------------------------------------------- placement and hwm

def test_tasks_fill_free_engines_then_queue_until_a_slot_frees():
    s = make(hwm=1)
    assert dispatched(task(s, "a")) == [("a", 0)]
    assert dispatched(task(s, "b")) == [("b", 1)]
    assert task(s, "c") == []  # both engines hold hwm=1 task
    assert s.queue_status()["unassigned"] == 1
    cmds = reply(s, 1, "b")
    assert kinds(cmds) == ["DeliverResult", "DispatchTask"]
    assert dispatched(cmds) == [("c", 1)]
    assert s.record("c").queue == "task" and s.record("c").engine_id == 1


def test_hwm_zero_sends_everything_at_once_spread_by_load():
    s = make(hwm=0)
    placed = [dispatched(task(s, f"t{i}"))[0][1] for i in range(6)]
    assert sorted(placed) == [0, 0, 0, 1, 1, 1]
    assert s.queue_status()[0]["tasks"] == 3


def test_direct_tasks_count_towards_an_engines_load():
    s = make(hwm=1)
    s.handle(E.TaskSubmitted(1.0, "d", b"c1", "apply_request", 0, ["f"]))
    assert dispatched(task(s, "t")) == [("t", 1)]
    qs = s.queue_status()
    assert qs[0] == {"queue": 1, "completed": 0, "tasks": 0}
    assert qs[1] == {"queue": 0, "completed": 0, "tasks": 1}


def test_tasks_wait_for_the_first_engine_then_run():
    s = ControllerState()
    assert task(s, "a") == []
    cmds = register(s, "u0")
    assert dispatched(cmds) == [("a", 0)]


def test_targets_restrict_the_candidates():
    s = make(hwm=0, engines=3)
    for i in range(4):
        assert dispatched(task(s, f"t{i}", targets=[2]))[0][1] == 2


def test_targets_all_dead_is_impossible():
    s = make(engines=2)
    s.handle(E.EngineProcessExited(1.0, 101, "h", -9))
    (ename, evalue), = failed(task(s, "t", targets=[1])).values()
    assert ename == "ImpossibleDependency" and "target engines [1]" in evalue


def test_queued_task_fails_when_its_only_target_dies():
    s = make(hwm=1, engines=2)
    task(s, "busy", targets=[1])
    assert task(s, "t", targets=[1]) == []  # waits for engine 1
    cmds = s.handle(E.EngineProcessExited(2.0, 101, "h", -9))
    f = failed(cmds)
    assert f["busy"][0] == "EngineError" and "retries=1" in f["busy"][1]
    assert f["t"][0] == "ImpossibleDependency"


# ---------------------------------------------------------------- schemes

@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_scheme_spreads_a_burst_over_all_engines(name):
    s = make(hwm=0, scheme=name, engines=4, seed=1)
    placed = [dispatched(task(s, f"t{i}"))[0][1] for i in range(200)]
    counts = [placed.count(e) for e in range(4)]
    assert all(c > 0 for c in counts), counts
    if name in ("leastload", "lru", "weighted"):
        assert max(counts) - min(counts) <= (1 if name != "weighted" else 40), counts


def test_leastload_prefers_the_less_loaded_then_the_least_recent():
    pick = get_scheme("leastload")
    rng = random.Random(0)
    assert pick([Slot(0, 2, 5), Slot(1, 1, 9)], rng).engine_id == 1
    assert pick([Slot(0, 1, 5), Slot(1, 1, 3)], rng).engine_id == 1


def test_lru_is_round_robin_regardless_of_load():
    pick = get_scheme("lru")
    assert pick([Slot(0, 0, 5), Slot(1, 9, 3)], random.Random()).engine_id == 1


def test_twobin_and_weighted_pick_among_candidates_with_one_engine():
    for name in ("twobin", "weighted", "plainrandom"):
        assert get_scheme(name)([Slot(3, 0, 0)], random.Random()).engine_id == 3


def test_weighted_draws_with_weights_one_over_one_plus_load():
    # weights 1 and 1/4: the busier engine wins only when both draws pick it,
    # (0.25 / 1.25) ** 2 = 4% of the time
    pick, rng = get_scheme("weighted"), random.Random(7)
    slots = [Slot(0, 0, 0), Slot(1, 3, 0)]
    busy = sum(pick(slots, rng).engine_id == 1 for _ in range(20_000))
    assert 0.03 < busy / 20_000 < 0.05, busy


def test_unknown_scheme_names_the_valid_ones():
    with pytest.raises(ValueError, match="leastload"):
        ControllerState(scheme="fastest")


# ---------------------------------------------------------------- dependencies

def test_after_waits_for_success_then_runs():
    s = make(hwm=0)
    task(s, "a")
    assert task(s, "b", after=DepSpec(frozenset({"a"}))) == []
    assert s.queue_status()["unassigned"] == 1
    cmds = reply(s, 0, "a")
    assert dispatched(cmds) == [("b", 1)] or dispatched(cmds) == [("b", 0)]


def test_after_on_a_failed_task_is_impossible():
    s = make(hwm=0)
    task(s, "a")
    task(s, "b", after=DepSpec(frozenset({"a"})))
    cmds = reply(s, 0, "a", status="error", ename="ZeroDivisionError")
    f = failed(cmds)
    assert f["b"][0] == "ImpossibleDependency" and "succeeded" in f["b"][1]


def test_failure_only_dependency_runs_after_a_failure():
    s = make(hwm=0)
    task(s, "a")
    task(s, "b", after=DepSpec(frozenset({"a"}), success=False, failure=True))
    assert dispatched(reply(s, 0, "a", status="error", ename="E"))[0][0] == "b"


def test_any_dependency_runs_after_the_first_success():
    s = make(hwm=0)
    task(s, "a")
    task(s, "b")
    task(s, "c", after=DepSpec(frozenset({"a", "b"}), all=False))
    assert dispatched(reply(s, 1, "b"))[0][0] == "c"


def test_dependency_on_an_unknown_task_is_invalid():
    s = make()
    (ename, evalue), = failed(task(s, "b", after=DepSpec(frozenset({"nope"})))).values()
    assert ename == "InvalidDependency" and "nope" in evalue


def test_dependency_on_a_finished_task_is_checked_at_once():
    s = make(hwm=0)
    task(s, "a")
    reply(s, 0, "a")
    assert dispatched(task(s, "b", after=DepSpec(frozenset({"a"}))))[0][0] == "b"


def test_follow_runs_where_the_dependency_ran():
    s = make(hwm=0, engines=3)
    task(s, "a")
    task(s, "x")
    engine_a = s.record("a").engine_id
    reply(s, engine_a, "a")
    for i in range(3):
        assert dispatched(task(s, f"f{i}", follow=DepSpec(frozenset({"a"}))))[0][1] == engine_a


def test_follow_all_on_two_engines_is_impossible():
    s = make(hwm=0)
    task(s, "a")
    task(s, "b")
    assert {s.record("a").engine_id, s.record("b").engine_id} == {0, 1}
    reply(s, 0, "a")
    reply(s, 1, "b")
    f = failed(task(s, "c", follow=DepSpec(frozenset({"a", "b"}))))
    assert f["c"][0] == "ImpossibleDependency" and "one engine" in f["c"][1]


def test_follow_of_a_dead_engine_is_impossible():
    s = make(hwm=0)
    task(s, "a")
    reply(s, 0, "a")
    s.handle(E.EngineProcessExited(3.0, 100, "h", 0))
    assert failed(task(s, "c", follow=DepSpec(frozenset({"a"}))))["c"][0] == \
        "ImpossibleDependency"


def test_dependency_timeout():
    s = make(hwm=0)
    task(s, "a")
    task(s, "b", now=1.0, after=DepSpec(frozenset({"a"})), timeout=2.5)
    assert s.next_deadline() == 3.5
    assert failed(s.handle(E.TimerFired(3.0))) == {}
    f = failed(s.handle(E.TimerFired(3.6)))
    assert f["b"][0] == "DependencyTimeout" and "2.5 s" in f["b"][1]
    assert reply(s, 0, "a")[-1:] == [C.DeliverResult(b"c1", "a", ["r"])]


def test_chain_of_dependencies_runs_in_order():
    s = make(hwm=0)
    task(s, "t0")
    for i in range(1, 5):
        task(s, f"t{i}", after=DepSpec(frozenset({f"t{i - 1}"})))
    order = ["t0"]
    for i in range(1, 5):
        eng = s.record(f"t{i - 1}").engine_id
        (nxt,) = dispatched(reply(s, eng, f"t{i - 1}"))
        order.append(nxt[0])
    assert order == ["t0", "t1", "t2", "t3", "t4"]


def test_unreachability_propagates_down_a_chain():
    s = make(hwm=0)
    task(s, "a")
    task(s, "b", after=DepSpec(frozenset({"a"})))
    task(s, "c", after=DepSpec(frozenset({"b"})))
    f = failed(reply(s, 0, "a", status="error", ename="E"))
    assert set(f) == {"b", "c"}


# ---------------------------------------------------------------- retries and unmet

def test_retry_after_an_error_goes_to_another_engine():
    s = make(hwm=1)
    assert dispatched(task(s, "t", retries=1)) == [("t", 0)]
    cmds = reply(s, 0, "t", status="error", ename="ValueError")
    assert kinds(cmds) == ["DispatchTask"] and dispatched(cmds) == [("t", 1)]
    cmds = reply(s, 1, "t", status="error", ename="ValueError")
    assert kinds(cmds) == ["DeliverResult"]  # retries used up: the error goes back
    assert s.record("t").status == "error" and s.record("t").ename == "ValueError"


def test_retry_on_the_same_engine_when_it_is_the_only_one():
    s = make(hwm=1, engines=1)
    task(s, "t", retries=2)
    assert dispatched(reply(s, 0, "t", status="error", ename="E")) == [("t", 0)]
    assert dispatched(reply(s, 0, "t", status="error", ename="E")) == [("t", 0)]
    assert kinds(reply(s, 0, "t", status="error", ename="E")) == ["DeliverResult"]


def test_a_late_reply_from_the_first_attempt_is_ignored():
    s = make(hwm=1)
    task(s, "t", retries=1)
    reply(s, 0, "t", status="error", ename="E")
    assert reply(s, 0, "t", status="ok") == []
    assert kinds(reply(s, 1, "t")) == ["DeliverResult"]


def test_engine_death_turns_tasks_into_retries_or_errors():
    s = make(hwm=0)
    task(s, "r", retries=1, targets=[0])
    task(s, "x", targets=[0])
    task(s, "free", retries=1)
    cmds = s.handle(E.EngineProcessExited(2.0, 100, "h", -9))
    f = failed(cmds)
    assert f["r"][0] == "ImpossibleDependency"  # retry wanted, but only engine 0 allowed
    assert f["x"][0] == "EngineError" and "SIGKILL" in f["x"][1]


def test_engine_death_reruns_a_task_elsewhere_when_retries_allow():
    s = make(hwm=1)
    task(s, "a", retries=1)
    task(s, "b")
    assert s.record("a").engine_id == 0
    cmds = s.handle(E.EngineProcessExited(2.0, 100, "h", -9))
    assert failed(cmds) == {}
    assert reply(s, 1, "b")[-1] == C.DispatchTask(1, "a", b"c1", ["f"])


def test_unmet_dependency_moves_on_then_becomes_impossible():
    s = make(hwm=1, engines=2)
    task(s, "t")
    cmds = reply(s, 0, "t", status="error", ename="UnmetDependency")
    assert dispatched(cmds) == [("t", 1)]
    f = failed(reply(s, 1, "t", status="error", ename="UnmetDependency"))
    assert f["t"][0] == "ImpossibleDependency" and "every engine" in f["t"][1]


def test_unmet_dependency_does_not_use_up_retries():
    s = make(hwm=1, engines=2)
    task(s, "t", retries=0)
    assert dispatched(reply(s, 0, "t", status="error", ename="UnmetDependency")) == [("t", 1)]


# ---------------------------------------------------------------- properties

def test_placement_on_properties():
    s = ControllerState(hwm=0)
    register(s, "cpu", properties={"gpu_count": 0})
    register(s, "gpu", properties={"gpu_count": 1})
    for i in range(3):
        cmds = task(s, f"t{i}", placement=lambda p: p["gpu_count"] > 0)
        assert dispatched(cmds)[0][1] == 1


def test_placement_that_raises_counts_as_false_and_nothing_fits_fails():
    s = make()
    f = failed(task(s, "t", placement=lambda p: p["missing"]))
    assert f["t"][0] == "ImpossibleDependency" and "placement" in f["t"][1]


def test_placement_waits_with_a_timeout_until_properties_change():
    s = make(hwm=0)
    assert task(s, "t", placement=lambda p: p.get("ready"), timeout=10) == []
    # a direct task's reply carries the engine's new properties
    s.handle(E.TaskSubmitted(2.0, "d", b"c1", "apply_request", 1, ["f"]))
    cmds = reply(s, 1, "d", properties={"ready": True})
    assert ("t", 1) in dispatched(cmds)


# ---------------------------------------------------------------- abort, resubmit

def test_abort_answers_queued_tasks_and_asks_engines_for_running_ones():
    s = make(hwm=1)
    task(s, "a")
    task(s, "b")
    task(s, "c")
    task(s, "d", after=DepSpec(frozenset({"c"})))
    cmds = s.handle(E.AbortRequested(2.0, None, None))
    aborted = {c.msg_id for c in cmds if isinstance(c, C.FailTask) and c.status == "aborted"}
    assert aborted == {"c", "d"}
    controls = {(c.engine_id, tuple(c.content["msg_ids"])) for c in cmds
                if isinstance(c, C.SendControl)}
    assert controls == {(0, ("a",)), (1, ("b",))}
    assert s.record("c").status == "aborted"


def test_abort_of_named_queued_task_only():
    s = make(hwm=1, engines=1)
    task(s, "a")
    task(s, "b")
    task(s, "c")
    cmds = s.handle(E.AbortRequested(2.0, ["b"], None))
    assert [c.msg_id for c in cmds if isinstance(c, C.FailTask)] == ["b"]
    assert dispatched(reply(s, 0, "a")) == [("c", 0)]


def test_resubmission_links_the_records():
    s = make()
    task(s, "a")
    reply(s, 0, "a")
    task(s, "a2", resubmit_of="a")
    assert s.record("a").resubmitted == "a2"


# ---------------------------------------------------------------- memory

def test_many_tasks_leave_no_bookkeeping_behind():
    s = make(hwm=2)
    running = {}
    for i in range(2000):
        for msg_id, eng in dispatched(task(s, f"t{i}")):
            running[msg_id] = eng
        if len(running) >= 4 or i == 1999:
            while running:
                msg_id, eng = running.popitem()
                for m, e in dispatched(reply(s, eng, msg_id)):
                    running[m] = e
    assert not s.pending and not s.ready and not s.waiting and not s._dependents
    assert len(s.db) == 2000


def test_status_snapshot_counts_engines_and_tasks():
    s = make(hwm=1)
    s.handle(E.HeartbeatReceived(0.5, "u0", b"x", rss=50_000_000))
    task(s, "a")
    task(s, "b")
    task(s, "c")
    reply(s, 0, "a")
    reply(s, 1, "b", status="error", ename="E")
    s.handle(E.EngineProcessExited(3.0, 101, "h", -9))
    snap = s.status_snapshot()
    e0, e1 = snap["engines"]
    assert e0["state"] == "busy" and e0["queue"] == 1 and e0["completed"] == 1
    assert e0["rss"] == 50_000_000
    assert e1["state"] == "dead" and e1["failed"] == 1 and "SIGKILL" in e1["lost_reason"]
    assert snap["tasks"] == {"running": 1, "queued": 0, "waiting": 0, "ok": 1, "error": 1,
                             "aborted": 0}
    assert snap["dispatched"] == 3 and snap["finished"] == 2


def test_a_task_that_kills_three_engines_is_not_rerun():
    s = make(hwm=1, engines=4)
    task(s, "poison", retries=99)  # the oldest seed's canonical bad example
    killed = []
    for _ in range(4):
        eng = s.record("poison").engine_id
        if eng is None:
            break
        killed.append(eng)
        cmds = s.handle(E.EngineProcessExited(2.0, 100 + eng, "h", -9))
        f = failed(cmds)
        if f:
            break
    assert len(killed) == 3
    assert f["poison"][0] == "EngineError" and "3 engines that died" in f["poison"][1]
    assert len(s.live_ids()) == 1


# ---------------------------------------------------------------- time limits

def timer(s, now):
    return s.handle(E.TimerFired(now))


def signals(cmds):
    return [(c.engine_id, c.content["signum"]) for c in cmds
            if isinstance(c, C.SendControl) and c.msg_type == "signal_request"]


def test_a_task_past_its_time_limit_is_interrupted_and_fails_with_task_timeout():
    s = make(hwm=1)
    assert dispatched(task(s, "slow", now=1.0, time_limit=2.0)) == [("slow", 0)]
    assert s.next_deadline() == 3.0  # the clock starts at dispatch
    assert timer(s, 2.9) == []
    cmds = timer(s, 3.0)
    assert signals(cmds) == [(0, 2)] and kinds(cmds) == ["SendControl"]
    assert s.next_deadline() == 4.0  # grace: max(limit_grace=1.0, 0.1 * 2.0)
    cmds = reply(s, 0, "slow", "error", now=3.1, ename="KeyboardInterrupt")
    ename, evalue = failed(cmds)["slow"]
    assert ename == "TaskTimeout" and "time limit of 2 s" in evalue
    assert "interrupted (SIGINT) at 2.0 s" in evalue and "KeyboardInterrupt" in evalue
    assert "DeliverResult" not in kinds(cmds)
    assert s.record("slow").ename == "TaskTimeout"
    assert s.live_ids() == [0, 1]  # the engine lives on
    assert s.next_deadline() is None and timer(s, 5.0) == []  # nothing left to kill


def test_a_task_that_ignores_the_interrupt_has_its_engine_killed_and_is_not_retried():
    s = make(hwm=1, engines=3)
    s.handle(E.TaskSubmitted(1.0, "d2", b"c1", "apply_request", 0, ["f"]))  # queued behind
    cmds = task(s, "stuck", now=1.0, time_limit=10.0, retries=5, targets=[0])
    assert dispatched(cmds) == []  # engine 0 is busy with d2 (hwm=1)
    s.handle(E.TaskSubmitted(1.0, "d3", b"c1", "apply_request", 1, ["f"]))
    reply(s, 0, "d2", now=2.0)
    assert s.record("stuck").engine_id == 0
    assert s.next_deadline() == 12.0  # counted from when it started, not submitted
    s.handle(E.HeartbeatReceived(11.0, "u0", b"id-u0"))
    s.handle(E.HeartbeatReceived(11.0, "u1", b"id-u1"))
    s.handle(E.HeartbeatReceived(11.0, "u2", b"id-u2"))
    assert signals(timer(s, 12.0)) == [(0, 2)]
    assert timer(s, 12.5) == []
    cmds = timer(s, 13.0)  # grace: max(1.0, 0.1 * 10) = 1 s, and no reply
    kills = [(c.engine_id, c.pid) for c in cmds if isinstance(c, C.KillEngine)]
    assert kills == [(0, 100)]
    ename, evalue = failed(cmds)["stuck"]
    assert ename == "TaskTimeout" and "engine 0 (pid 100) was killed" in evalue
    assert "not rerun" in evalue and dispatched(cmds) == []
    assert s.live_ids() == [1, 2]
    # the engine's exit, reported later, changes nothing; a late reply is dropped
    assert s.handle(E.EngineProcessExited(13.2, 100, "h", -9)) == []
    assert reply(s, 0, "stuck", "error", now=13.3) == []


def test_other_tasks_on_a_killed_engine_follow_the_engine_death_rules():
    s = make(hwm=0, engines=2)
    task(s, "stuck", now=1.0, time_limit=1.0, targets=[0])
    task(s, "next", now=1.0, retries=1, targets=[0, 1])  # hwm=0: leastload puts it on 1
    s.handle(E.TaskSubmitted(1.0, "direct", b"c1", "apply_request", 0, ["f"]))
    assert s.queue_status()[0]["queue"] == 1
    timer(s, 2.0)
    cmds = timer(s, 3.0)
    f = failed(cmds)
    assert f["stuck"][0] == "TaskTimeout"
    assert f["direct"][0] == "EngineError" and "ran past its time limit" in f["direct"][1]


def test_an_interrupted_task_whose_engine_then_dies_is_not_retried():
    s = make(hwm=1)
    task(s, "slow", now=1.0, time_limit=1.0, retries=3)
    timer(s, 2.0)
    cmds = s.handle(E.EngineProcessExited(2.5, 100, "h", -2))
    ename, evalue = failed(cmds)["slow"]
    assert ename == "TaskTimeout" and "then engine 0 died" in evalue
    assert dispatched(cmds) == []


def test_a_task_that_finishes_in_time_or_after_the_interrupt_keeps_its_result():
    s = make(hwm=1)
    task(s, "quick", now=1.0, time_limit=5.0)
    assert kinds(reply(s, 0, "quick", now=2.0)) == ["DeliverResult"]
    assert timer(s, 7.0) == [] and s.next_deadline() is None
    task(s, "close", now=7.0, time_limit=1.0)
    eng = s.record("close").engine_id
    assert signals(timer(s, 8.0)) == [(eng, 2)]
    # its reply crossed the interrupt: it finished, so its result is delivered
    assert kinds(reply(s, eng, "close", now=8.01)) == ["DeliverResult"]
    assert s.record("close").status == "ok"


def test_no_time_limit_means_no_deadline_and_no_interrupt():
    s = make(hwm=1)
    task(s, "t", now=1.0)
    s.handle(E.TaskSubmitted(1.0, "d", b"c1", "apply_request", 1, ["f"], time_limit=None))
    assert s.next_deadline() is None
    assert timer(s, 7.5) == []  # (engines silent since 0: before the heartbeat timeout)


def test_time_limit_counts_a_retry_from_its_new_start():
    s = make(hwm=1)
    task(s, "t", now=1.0, time_limit=3.0, retries=1)
    eng = s.record("t").engine_id
    cmds = reply(s, eng, "t", "error", now=2.0, ename="ValueError")  # an ordinary error
    assert dispatched(cmds) == [("t", 1 - eng)]  # retried elsewhere
    assert s.next_deadline() == 5.0  # 2.0 + 3.0, the first clock is gone
    assert timer(s, 4.0) == []
    assert signals(timer(s, 5.0)) == [(1 - eng, 2)]


def test_the_limit_and_the_dependency_timeout_share_the_timer():
    s = make(hwm=1, engines=1)
    task(s, "a", now=1.0, time_limit=4.0)
    task(s, "b", now=1.0, timeout=2.0, after=DepSpec(frozenset({"a"})))
    assert s.next_deadline() == 3.0  # b's dependency timeout comes first
    assert failed(timer(s, 3.0))["b"][0] == "DependencyTimeout"
    assert s.next_deadline() == 5.0


def test_grace_is_a_parameter():
    s = ControllerState(limit_grace=0.25)
    register(s, "u0", pid=7)
    task(s, "t", now=1.0, time_limit=1.0)
    timer(s, 2.0)
    assert s.next_deadline() == 2.25
    assert failed(timer(s, 2.25))["t"][0] == "TaskTimeout"


def test_engine_retries_and_retries_are_separate_knobs():
    s = make(hwm=1, engines=3)
    task(s, "busy", targets=[2])
    task(s, "death-only", retries=0, engine_retries=1)
    task(s, "errors-only", retries=2, engine_retries=0)
    assert s.record("death-only").engine_id == 0 and s.record("errors-only").engine_id == 1
    # an exception is not rerun when only engine deaths are
    assert kinds(reply(s, 0, "death-only", status="error", ename="E")) == ["DeliverResult"]
    task(s, "death-only-2", retries=0, engine_retries=1)
    assert s.record("death-only-2").engine_id == 0
    f = failed(s.handle(E.EngineProcessExited(2.0, 101, "h", -9)))  # engine 1 dies
    assert f["errors-only"][0] == "EngineError"  # engine_retries=0: not rerun
    f = failed(s.handle(E.EngineProcessExited(3.0, 100, "h", -9)))  # engine 0 dies
    assert "death-only-2" not in f  # queued again, for engine 2
    assert dispatched(reply(s, 2, "busy")) == [("death-only-2", 2)]
    # engine_retries defaults to retries (ipyparallel's single knob)
    task(s, "both", retries=1)
    assert s.pending["both"].engine_retries == 1
