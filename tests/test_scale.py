"""Scale: many simulated engines on one controller, and 64 real engines.

The simulated engines (ipyfarm.testing.simengines) speak the engine protocol with the
cluster's signing: registration, heartbeats, apply/execute/control replies. Here 128 of
them run in a thread of the test process against a real controller (a Hub on its
thread) and a real Client; benchmarks/bench_scale.py drives 1,024 in their own process.
"""

import os
import time

import psutil
import pytest
import zmq

from ipyfarm.client.client import Client
from ipyfarm.controller.hub import Hub
from ipyfarm.controller.poller import SocketPoller, recv_frames
from ipyfarm.testing.simengines import SimEngines

from .conftest import running_cluster, wait_until

N_SIM = 128
PERIOD = 0.2  # heartbeat period (s) for the simulated cluster
TIMEOUT = 2.0  # heartbeat timeout (s): an engine silent this long is lost


@pytest.fixture(scope="module")
def sim_cluster():
    """A controller with N_SIM simulated engines and a client; everything stopped after."""
    hub = Hub(heartbeat_period=PERIOD, heartbeat_timeout=TIMEOUT)
    hub.start()
    info = dict(hub.connection_info(), profile=f"test-scale-{os.getpid()}")
    sim = rc = None
    try:
        t0 = time.monotonic()
        sim = SimEngines(info["registration"], info["key"].encode(), N_SIM).start()
        assert sim.wait_registered(timeout=60), (
            f"only {sim.registered} of {N_SIM} simulated engines registered in 60 s")
        took = time.monotonic() - t0
        rc = Client(info)
        rc.wait_for_engines(N_SIM, timeout=30)
        yield hub, sim, rc, took
    finally:
        if rc is not None:
            rc.close()
        if sim is not None:
            sim.stop()
        hub.stop()


def test_simulated_engines_register(sim_cluster):
    hub, sim, rc, took = sim_cluster
    print(f"\n{N_SIM} simulated engines registered in {took:.2f} s")
    assert took < 30
    assert len(hub.state.live_ids()) == N_SIM
    assert sorted(rc.ids) == sim.engine_ids()
    assert hub.dropped.total() == 0 and sim.dropped == 0


def test_heartbeats_keep_them_alive_past_the_timeout(sim_cluster):
    hub, sim, rc, _ = sim_cluster
    beats = sim.beats_sent
    time.sleep(2.5 * TIMEOUT)
    assert sim.beats_sent - beats >= N_SIM * 2.5 * TIMEOUT / PERIOD * 0.5
    assert len(hub.state.live_ids()) == N_SIM
    assert sim.lost == []


def test_load_balanced_tasks_spread_over_the_engines(sim_cluster):
    hub, sim, rc, _ = sim_cluster
    view = rc.load_balanced_view()
    ars = [view.apply_async(os.getpid) for _ in range(2000)]
    # a simulated engine answers with its engine id
    got = [ar.get(timeout=60) for ar in ars]
    assert set(got) <= set(rc.ids)
    assert len(set(got)) >= N_SIM // 2, f"only {len(set(got))} engines got work"
    assert all(ar.metadata["engine_id"] == g for ar, g in zip(ars, got, strict=True))
    assert not hub.state.pending


def test_direct_execute_and_control_reach_every_engine(sim_cluster):
    hub, sim, rc, _ = sim_cluster
    ar = rc[:].execute("x = 1", block=False)
    ar.get(timeout=60)
    assert sorted(ar.engine_id) == sorted(rc.ids)
    rc.clear(block=True)  # answered by every engine's control channel


def test_engines_unregister_and_vanish_cleanly(sim_cluster):
    hub, sim, rc, _ = sim_cluster
    ids = sim.engine_ids()
    by_index = {e.engine_id: e.index for e in sim.engines}
    leaving, crashing = ids[:16], ids[16:32]
    sim.unregister([by_index[i] for i in leaving])
    assert wait_until(lambda: len(hub.state.live_ids()) == N_SIM - 16, 30)
    assert wait_until(lambda: not set(leaving) & set(rc.ids), 30)
    sim.vanish([by_index[i] for i in crashing])
    # silent engines are declared lost after the heartbeat timeout
    assert wait_until(lambda: len(hub.state.live_ids()) == N_SIM - 32, 10 * TIMEOUT)
    lost = {e.engine_id: e.lost_reason for e in hub.state.engines.values() if not e.alive}
    assert set(lost) == set(leaving) | set(crashing)
    assert all("heartbeat" in lost[i] for i in crashing)
    # the rest still work, and nothing goes to the engines that left
    view = rc.load_balanced_view()
    got = [ar.get(timeout=60) for ar in [view.apply_async(os.getpid) for _ in range(500)]]
    assert set(got) <= set(ids[32:])


def test_sixty_four_real_engines_register_and_run_a_map():
    t0 = time.monotonic()
    with running_cluster(64, heartbeat_timeout=60) as (cluster, rc):
        ready = time.monotonic() - t0
        assert len(rc.ids) == 64
        view = rc.load_balanced_view()
        pids = view.map_sync(lambda x: (x * x, os.getpid()), range(640), chunksize=1)
        assert [p[0] for p in pids] == [x * x for x in range(640)]
        used = {p[1] for p in pids}
        assert used <= set(cluster.launcher.pids)
        assert len(used) >= 32, f"only {len(used)} of 64 engines got work"
        assert set(rc[:].apply_sync(os.getpid)) == set(cluster.launcher.pids)
        print(f"\n64 real engines ready in {ready:.1f} s; map over them in "
              f"{time.monotonic() - t0 - ready:.1f} s")
    assert not [p for p in psutil.Process().children(recursive=True) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE and p.pid in cluster.launcher.pids]


def test_socket_poller_reports_what_arrives_and_what_it_is_told_to_look_at_again():
    ctx = zmq.Context()
    pulls, pushes = [], []
    poller = SocketPoller()
    try:
        for i in range(50):
            pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
            pull.bind(f"inproc://poller-test-{i}")
            push.connect(f"inproc://poller-test-{i}")
            pulls.append(pull)
            pushes.append(push)
            poller.register(pull)
        assert poller.poll(0) == []
        for i in (3, 17, 42):
            pushes[i].send_multipart([b"a", b"b"])
        ready = {s for s, _ in poller.poll(1000)}
        assert ready == {pulls[3], pulls[17], pulls[42]}
        for i in (3, 17):
            assert recv_frames(pulls[i]) == [b"a", b"b"]
            with pytest.raises(zmq.Again):
                recv_frames(pulls[i])
        # 42 was not drained: its signal is spent, so only a recheck or a sweep finds it
        assert poller.poll(0) == []
        poller.recheck(pulls[42])
        assert poller.poll(0) == [(pulls[42], zmq.POLLIN)]
        poller.sweep()
        assert poller.poll(0) == [(pulls[42], zmq.POLLIN)]
        recv_frames(pulls[42])
        poller.unregister(pulls[5])
        pushes[5].send(b"x")
        pushes[6].send(b"y")
        assert poller.poll(1000) == [(pulls[6], zmq.POLLIN)]
        assert len(poller) == 49
    finally:
        poller.close()
        for s in pulls + pushes:
            s.close(0)
        ctx.term()


def test_a_real_engine_beats_at_the_period_its_controller_asks_for():
    """Past ``beating_engines`` engines the controller asks for a longer heartbeat
    period in its heartbeat replies; a real engine keeps the new pace (here the limit is
    lowered so that one engine is past it: period 0.2 s -> 0.4 s)."""
    with running_cluster(1, heartbeat_period=0.2, heartbeat_timeout=5.0) as (c, rc):
        state = c.controller.hub.state
        eng = state.engines[rc.ids[0]]

        def intervals(seconds):
            seen, last = [], eng.last_beat
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if eng.last_beat != last:
                    seen.append(eng.last_beat - last)
                    last = eng.last_beat
                time.sleep(0.005)
            return seen[1:]  # the first may straddle the change

        before = intervals(1.5)
        assert before and 0.1 < sorted(before)[len(before) // 2] < 0.3, before
        state.beating_engines = 0.5  # one engine is now "past 256": factor 2
        after = intervals(3.0)
        assert after and 0.3 < sorted(after)[len(after) // 2] < 0.5, after
        assert eng.alive and rc.ids == [eng.engine_id]
        assert rc[:].apply_sync(os.getpid) == [eng.pid]
