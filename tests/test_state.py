"""Stories for the controller's pure state machine: events in, commands out, no sockets."""

import pytest

from ipyfarm.controller import commands as C
from ipyfarm.controller import events as E
from ipyfarm.controller.state import ControllerState


def kinds(cmds):
    return [type(c).__name__ for c in cmds]


@pytest.fixture
def state():
    s = ControllerState(heartbeat_period=1.0, heartbeat_timeout=10.0)
    yield s
    s.check_invariants()


def register(state, uuid="u0", now=0.0, pid=100):
    info = {"uuid": uuid, "pid": pid, "hostname": "h", "connection_info": {"shell_port": 1}}
    return state.handle(E.RegistrationRequested(now, uuid, b"id-" + uuid.encode(), info))


def submit(state, msg_id, engine_id, now=1.0, client=b"c1"):
    return state.handle(E.TaskSubmitted(now, msg_id, client, "apply_request", engine_id, ["f"]))


def test_registration_assigns_ids_in_order_and_notifies(state):
    cmds = register(state, "a")
    assert kinds(cmds) == ["ConnectEngine", "ReplyRegistration", "NotifyClients"]
    assert cmds[1].content == {"status": "ok", "engine_id": 0, "heartbeat_period": 1.0}
    assert register(state, "b")[1].content["engine_id"] == 1
    assert state.live_ids() == [0, 1]


def test_same_engine_registering_twice_keeps_its_id(state):
    register(state, "a")
    cmds = register(state, "a", now=2.0)
    assert kinds(cmds) == ["ReplyRegistration"]
    assert cmds[0].content["engine_id"] == 0
    assert state.live_ids() == [0]


def test_direct_task_is_dispatched_then_delivered(state):
    register(state, "a")
    cmds = submit(state, "m1", 0)
    assert cmds == [C.DispatchTask(0, "m1", b"c1", ["f"])]
    assert state.queue_status() == {0: {"queue": 1, "completed": 0, "tasks": 0}, "unassigned": 0}
    cmds = state.handle(E.ReplyArrived(2.0, 0, "m1", "ok", ["r"], 10))
    assert cmds == [C.DeliverResult(b"c1", "m1", ["r"])]
    assert state.record("m1").status == "ok"
    assert state.record("m1").result_frames == ["r"]
    assert state.queue_status()[0]["completed"] == 1


def test_task_for_unknown_engine_fails_at_once_naming_the_engines(state):
    register(state, "a")
    (cmd,) = submit(state, "m1", 7)
    assert isinstance(cmd, C.FailTask)
    assert cmd.ename == "EngineError" and "no engine 7" in cmd.evalue and "[0]" in cmd.evalue
    assert state.record("m1").status == "error"


def test_engine_death_fails_its_tasks_with_the_exit_reason(state):
    register(state, "a", pid=100)
    submit(state, "m1", 0)
    submit(state, "m2", 0)
    cmds = state.handle(E.EngineProcessExited(3.0, 100, "h", -9))
    assert kinds(cmds) == ["FailTask", "FailTask", "DisconnectEngine", "NotifyClients"]
    assert {c.msg_id for c in cmds[:2]} == {"m1", "m2"}
    assert "SIGKILL" in cmds[0].evalue and "out of memory" in cmds[0].evalue
    assert state.live_ids() == []
    # a late reply from the dead engine is dropped, not delivered twice
    assert state.handle(E.ReplyArrived(4.0, 0, "m1", "ok", ["r"], 1)) == []
    # and new work for it fails, saying why
    (cmd,) = submit(state, "m3", 0)
    assert "dead" in cmd.evalue and "SIGKILL" in cmd.evalue


def test_exit_of_an_unknown_pid_changes_nothing(state):
    register(state, "a", pid=100)
    assert state.handle(E.EngineProcessExited(3.0, 999, "h", 0)) == []
    assert state.live_ids() == [0]


def test_heartbeat_silence_loses_the_engine_and_asks_to_kill_it(state):
    register(state, "a", now=0.0, pid=100)
    assert state.handle(E.HeartbeatReceived(5.0, "a", b"x")) == [
        C.ReplyHeartbeat(b"x", True, period=1.0)]
    assert state.handle(E.TimerFired(14.0)) == []
    cmds = state.handle(E.TimerFired(15.5))
    assert kinds(cmds) == ["DisconnectEngine", "NotifyClients", "KillEngine"]
    assert "no heartbeat for 10.5 s" in cmds[1].content["reason"]
    # the engine, if it still lives, is told it is unknown and exits
    assert state.handle(E.HeartbeatReceived(16.0, "a", b"x")) == [C.ReplyHeartbeat(b"x", False)]


def test_past_256_engines_heartbeats_slow_down_in_proportion(state):
    """1,024 engines at a 1 s period would send the controller 1,024 heartbeats a
    second: past 256, period and timeout grow with the count instead."""
    for i in range(256):
        assert register(state, f"e{i}")[1].content["heartbeat_period"] == 1.0
    # the 257th is asked for a longer period (quarter steps); the others learn it from
    # their next heartbeat's reply
    assert register(state, "e256")[1].content["heartbeat_period"] == 1.25
    assert state.handle(E.HeartbeatReceived(0.5, "e0", b"x")) == [
        C.ReplyHeartbeat(b"x", True, period=1.25)]
    for i in range(257, 1024):
        register(state, f"e{i}")
    assert state.beat_factor() == 4.0
    assert state.handle(E.HeartbeatReceived(1.0, "e1023", b"y"))[0].period == 4.0
    # silence is judged by the longer timeout: the fixture's 10 s, x 4
    for i in range(1024):
        state.handle(E.HeartbeatReceived(1.0, f"e{i}", b"z"))
    assert state.handle(E.TimerFired(40.5)) == []
    lost = kinds(state.handle(E.TimerFired(41.5)))
    assert lost.count("KillEngine") == 1024
    # a cluster that shrinks asks for shorter periods again; an engine told the shorter
    # one is judged by the longer until it has beaten at the new pace
    state2 = type(state)(heartbeat_period=1.0, heartbeat_timeout=10.0)
    for i in range(512):
        register(state2, f"e{i}")
    assert state2.handle(E.HeartbeatReceived(1.0, "e0", b"x"))[0].period == 2.0
    for i in range(1, 512):
        state2.handle(E.EngineUnregistered(2.0, f"e{i}"))
    assert state2.handle(E.HeartbeatReceived(3.0, "e0", b"x"))[0].period == 1.0
    assert state2.handle(E.TimerFired(3.0 + 10.0 + 5.0)) == []  # still within 2 x 10 s
    state2.handle(E.HeartbeatReceived(4.0, "e0", b"x"))  # now beating at 1 s
    assert kinds(state2.handle(E.TimerFired(4.0 + 10.5)))[-1] == "KillEngine"


def test_unregistration_is_a_clean_loss(state):
    register(state, "a")
    cmds = state.handle(E.EngineUnregistered(2.0, "a"))
    assert kinds(cmds) == ["DisconnectEngine", "NotifyClients"]
    assert cmds[1].content["reason"] == "it shut down"


def test_abort_targets_only_queued_ids_of_each_engine(state):
    register(state, "a")
    register(state, "b")
    submit(state, "m1", 0)
    submit(state, "m2", 1)
    cmds = state.handle(E.AbortRequested(2.0, ["m2", "zzz"], None))
    assert cmds == [C.SendControl(1, "abort_request", {"msg_ids": ["m2"]})]
    cmds = state.handle(E.AbortRequested(2.0, None, [0]))
    assert cmds == [C.SendControl(0, "abort_request", {"msg_ids": ["m1"]})]


def test_purge_forgets_finished_records_only(state):
    register(state, "a")
    submit(state, "m1", 0)
    submit(state, "m2", 0)
    state.handle(E.ReplyArrived(2.0, 0, "m1", "ok", ["r"], 1))
    state.handle(E.PurgeRequested(3.0, "all"))
    assert state.history() == ["m2"]
    assert state.db.stored_bytes == 0


def test_result_storage_is_bounded():
    s = ControllerState()
    s.db.max_total_bytes = 100
    s.db.max_result_bytes = 60
    s.db.frame_overhead = s.db.payload_overhead = 0  # the frames' bytes alone here
    register(s, "a")
    for i in range(5):
        submit(s, f"m{i}", 0)
        s.handle(E.ReplyArrived(2.0, 0, f"m{i}", "ok", ["r"], 40))
    submit(s, "big", 0)
    s.handle(E.ReplyArrived(2.0, 0, "big", "ok", ["r"], 61))
    assert s.db.stored_bytes <= 100
    assert s.record("big").released and s.record("big").result_frames is None
    assert s.record("m0").released and s.record("m4").result_frames == ["r"]
    s.check_invariants()


def test_record_count_is_capped_keeping_pending_tasks():
    s = ControllerState()
    s.db.max_records = 3
    register(s, "a")
    submit(s, "p", 0)  # stays pending
    for i in range(5):
        submit(s, f"m{i}", 0)
        s.handle(E.ReplyArrived(2.0, 0, f"m{i}", "ok", None, 0))
    assert "p" in s.history() and len(s.db) == 3
    s.check_invariants()


def register_asking(state, uuid, requested, now=0.0):
    """An engine asking for an id (an MPI engine asks for its rank)."""
    info = {"uuid": uuid, "pid": 100, "hostname": "h", "connection_info": {"shell_port": 1},
            "requested_id": requested}
    cmds = state.handle(E.RegistrationRequested(now, uuid, b"id-" + uuid.encode(), info))
    return cmds[1].content["engine_id"] if len(cmds) > 1 else cmds[0].content["engine_id"]


def test_requested_ids_are_granted_whatever_the_registration_order(state):
    # four MPI ranks registering out of order get their ranks as ids
    assert [register_asking(state, f"r{r}", r) for r in (2, 0, 3, 1)] == [2, 0, 3, 1]
    assert state.live_ids() == [0, 1, 2, 3]
    # an engine asking for nothing gets the lowest id never used
    assert register(state, "plain")[1].content["engine_id"] == 4


def test_a_taken_requested_id_gives_the_lowest_unused_one(state):
    register_asking(state, "a", 0)
    register_asking(state, "b", 1)
    # a second mpiexec world: its ranks 0 and 1 are taken, so they get 2 and 3
    assert register_asking(state, "c", 0) == 2
    assert register_asking(state, "d", 1) == 3
    assert state.live_ids() == [0, 1, 2, 3]


def test_a_dead_engines_id_is_not_given_again(state):
    register_asking(state, "a", 0)
    state.handle(E.EngineUnregistered(1.0, "a"))
    assert state.live_ids() == []
    assert register_asking(state, "b", 0, now=2.0) == 1


def test_requested_id_skipped_by_plain_ids_and_bad_requests_ignored(state):
    assert register_asking(state, "a", 1) == 1
    assert register(state, "b")[1].content["engine_id"] == 0
    assert register(state, "c")[1].content["engine_id"] == 2  # 1 is taken: skipped
    for bad, uuid in ((-1, "d"), ("5", "e"), (True, "f"), (None, "g")):
        assert register_asking(state, uuid, bad) == 3 + ["d", "e", "f", "g"].index(uuid)
    # the same engine registering again keeps its id, whatever it asks
    assert register_asking(state, "a", 9) == 1
