"""Client, DirectView and AsyncResult against real engine processes (one cluster per module)."""

import asyncio
import os
import signal
import stat
import time

import numpy as np
import pytest

import ipyfarm as ipp
from ipyfarm import error

WAIT = 30  # s: every wait on the cluster is bounded


def test_the_issue_example_runs(rc):
    dview = rc[:]
    dview.block = True
    dview.execute("import numpy as np")
    dview["a"] = 5
    dview.scatter("x", range(16))
    assert dview.gather("x") == list(range(16))
    assert dview["a"] == [5, 5]
    assert rc[0].apply_sync(lambda: a) == 5  # noqa: F821  (the engine's a)
    k = 3
    assert rc[0].apply_sync(lambda y: y * k, 2) == 6  # closures work
    ar = rc[1].apply_async(pow, 2, 10)
    assert ar.get(timeout=5) == 1024
    assert ar.metadata.engine_id == 1


def test_reference_resolves_on_each_engine(rc):
    rc[0]["ref_value"] = 10
    rc[1]["ref_value"] = 20
    assert rc[:].apply_sync(lambda x, y: x + y, ipp.Reference("ref_value"), 1) == [11, 21]
    with pytest.raises(error.RemoteError, match="'nothing_here' is not defined"):
        rc[0].apply_sync(len, ipp.Reference("nothing_here"))


def test_targets_select_engines(rc):
    assert rc.ids == [0, 1]
    assert rc[0].apply_sync(lambda: 1) == 1
    assert rc[[0, 1]].apply_sync(lambda: 1) == [1, 1]
    assert rc[::2].targets == [0]
    assert rc[-1].targets == 1
    assert rc[:].targets == "all"
    assert rc.direct_view().targets == "all"
    with pytest.raises(IndexError, match="no engine 9"):
        rc[9]
    # lists: ids checked one by one, negative ones counted from the end, others refused
    assert rc._resolve_targets([1, 0, -1]) == [1, 0, 1]
    with pytest.raises(IndexError, match="no engine 9"):
        rc._resolve_targets([0, 9])
    with pytest.raises(TypeError, match="must be ints"):
        rc._resolve_targets([0, "1"])


def test_push_pull_get_update(rc):
    v = rc[:]
    v.push({"b": 1, "c": [1, 2]}, block=True)
    assert v.pull("b", block=True) == [1, 1]
    assert v.pull(["b", "c"], block=True) == [[1, [1, 2]], [1, [1, 2]]]
    assert rc[0].get("c") == [1, 2]
    v.update({"b": 2})
    v.wait()
    assert rc[1]["b"] == 2
    with pytest.raises(error.RemoteError, match="nope"):
        rc[0].pull("nope", block=True)


def test_numpy_scatter_gather_and_readonly_receipt(rc):
    v = rc[:]
    arr = np.arange(10_000, dtype="float64")
    v.scatter("arr", arr, block=True)
    assert rc[0].apply_sync(lambda: arr.flags.writeable) is False  # noqa: F821
    back = v.gather("arr", block=True)
    assert isinstance(back, np.ndarray) and (back == arr).all()
    one = rc[0].apply_sync(lambda x: x, arr)
    assert not one.flags.writeable and (one == arr).all()


def test_scatter_flatten(rc):
    v = rc[:]
    v.scatter("y", [10, 20], flatten=True, block=True)
    assert v["y"] == [10, 20]
    v.scatter("y", [10, 20], block=True)
    assert v["y"] == [[10], [20]]


def test_execute_collects_outputs(rc):
    ar = rc[:].execute("print('hello'); import sys; print('err', file=sys.stderr); 6 * 7",
                       silent=False)
    ar.get(timeout=10)
    assert ar.stdout == ["hello\n", "hello\n"]
    assert ar.stderr == ["err\n", "err\n"]
    results = ar.execute_result
    assert results[0]["data"]["text/plain"] == "42"
    assert {md["engine_id"] for md in ar.metadata} == {0, 1}


def test_apply_collects_stdout_and_display(rc):
    def show():
        from IPython.display import HTML, display

        print("out")
        display(HTML("<b>x</b>"))
        return 1

    ar = rc[0].apply_async(show)
    assert ar.get(timeout=10) == 1
    assert ar.stdout == "out\n"
    assert ar.outputs[0]["data"]["text/html"] == "<b>x</b>"


def test_run_a_file(rc, tmp_path):
    script = tmp_path / "s.py"
    script.write_text("ran_from_file = 11\n")
    rc[:].run(str(script), block=True)
    assert rc[:]["ran_from_file"] == [11, 11]


def test_map_remote_parallel(rc):
    v = rc[:]
    assert v.map_sync(lambda x: x * x, range(10)) == [x * x for x in range(10)]
    assert v.map_sync(lambda x, y: x + y, [1, 2, 3], [10, 20, 30]) == [11, 22, 33]
    amr = v.map_async(str, range(5))
    assert list(amr) == ["0", "1", "2", "3", "4"]

    @v.remote(block=True)
    def getpid():
        import os
        return os.getpid()

    assert len(set(getpid())) == 2

    @v.parallel(block=True)
    def square(x):
        return x * x

    assert square.map(range(6)) == [0, 1, 4, 9, 16, 25]
    assert square(range(3)) == [0, 1, 4]
    f = ipp.remote(rc[0], block=True)(lambda: 7)
    assert f() == 7


def test_sync_imports(rc):
    v = rc[:]
    with v.sync_imports(quiet=True):
        import json  # noqa: F401
    assert v.apply_sync(lambda: json.dumps(1)) == ["1", "1"]  # noqa: F821


def test_flags(rc):
    v = rc[:]
    with v.temp_flags(block=True):
        assert v.apply(lambda: 2) == [2, 2]
    assert isinstance(v.apply(lambda: 2), ipp.AsyncResult)
    v.set_flags(block=True)
    assert v.block
    with pytest.raises(KeyError, match="invalid flag 'bogus'"):
        v.set_flags(bogus=1)


def test_asyncresult_api(rc):
    ar = rc[:].apply_async(time.sleep, 0.3)
    assert not ar.ready() and len(ar.msg_ids) == 2
    with pytest.raises(error.TimeoutError):
        ar.get(timeout=0.01)
    assert ar.wait(5) and ar.ready() and ar.successful()
    assert ar.get() == [None, None] and ar.r == [None, None] and ar.result() == [None, None]
    assert ar.progress == 2 and ar.elapsed >= 0.25
    assert ar.get_dict() == {0: None, 1: None}
    assert list(ar) == [None, None]
    md = ar.metadata[0]
    for key in ("msg_id", "submitted", "started", "completed", "received", "engine_id",
                "engine_uuid", "status", "stdout", "stderr", "outputs", "execute_result",
                "error", "after", "follow"):
        assert key in md, key
    assert md.completed >= md.started
    assert isinstance(ar, __import__("concurrent.futures").futures.Future)

    async def awaiting():
        return await rc[0].apply_async(lambda: 9)

    assert asyncio.run(awaiting()) == 9


def test_a_result_is_counted_once_however_often_it_is_told(rc):
    """The client watches results without its lock, so a racing watch and delivery may
    both report one message: it counts once, and an unordered map yields each chunk
    once. A result watched after it finished is complete at once, with no watcher
    left behind."""
    from ipyfarm.client.asyncresult import AsyncResult

    view = rc.load_balanced_view()
    amr = view.map_async(lambda x: x * 2, range(6), chunksize=2, ordered=False)
    assert sorted(amr.get(WAIT)) == [0, 2, 4, 6, 8, 10]
    for msg_id in amr.msg_ids:
        assert amr._msg_done(msg_id) is False
    assert sorted(amr) == [0, 2, 4, 6, 8, 10]
    ar = view.apply_async(lambda: 5)
    assert ar.get(WAIT) == 5
    late = AsyncResult(rc, ar.msg_ids, single=True)
    assert late.ready() and late.get(0) == 5
    assert ar.msg_ids[0] not in rc._watchers


def test_a_late_watcher_tells_the_watchers_listed_before_it(rc):
    """The interleaving a lock-free watch must survive, set up by hand: one watcher
    listed while the task runs; the result stored (as the delivering thread does just
    before it takes the watchers); a second watcher then finds the result and takes
    the list. The first must be told too, or it would wait forever."""
    from ipyfarm.client.asyncresult import AsyncResult

    ar = rc[0].apply_async(time.sleep, 0.5)
    msg_id = ar.msg_ids[0]
    first = AsyncResult(rc, [msg_id], single=True)
    assert not first.ready()
    rc.results[msg_id] = "stored"  # the deliverer's store, before its pop
    second = AsyncResult(rc, [msg_id], single=True)
    assert second.ready() and first.ready()
    assert first.get(0) == second.get(0) == "stored"
    assert msg_id not in rc._watchers
    assert ar.ready()  # listed too, so told with them
    deadline = time.monotonic() + WAIT  # the real reply still comes in, and is stored
    while msg_id in rc.outstanding:
        assert time.monotonic() < deadline, "the task's reply never arrived"
        time.sleep(0.02)
    assert rc.results[msg_id] is None


def test_results_delivered_while_other_threads_submit_all_arrive(rc):
    """Four threads submit and wait while the controller's thread delivers: every
    result arrives, none twice, within the timeout."""
    import threading

    view = rc.load_balanced_view()
    got: dict[int, list] = {}

    def worker(k: int) -> None:
        ars = [view.apply_async(lambda i=i: i) for i in range(300)]
        got[k] = [ar.get(WAIT) for ar in ars]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * WAIT)
    assert not any(t.is_alive() for t in threads), "a submitting thread still waits"
    assert got == {k: list(range(300)) for k in range(4)}


def test_track_and_sent(rc):
    arr = np.ones(1_000_000)
    ar = rc[0].apply_async(lambda x: x.sum(), arr)
    ar.wait_on_send(5)
    assert ar.sent
    with rc[0].temp_flags(track=True):
        ar2 = rc[0].apply_async(lambda x: x.sum(), arr)
    ar2.wait_on_send(5)
    assert ar2.sent and ar2.get(5) == 1e6


def test_remote_errors(rc):
    def boom():
        raise ValueError("bad value")

    with pytest.raises(error.RemoteError) as info:
        rc[0].apply_sync(boom)
    e = info.value
    assert e.ename == "ValueError" and e.evalue == "bad value"
    assert "boom" in e.traceback and e.engine_info["engine_id"] == 0
    assert "ValueError" in "\n".join(e._render_traceback_())
    with pytest.raises(error.CompositeError) as info:
        rc[:].apply_sync(boom)
    ce = info.value
    assert len(ce.elist) == 2
    assert "[engines [0, 1]] ValueError: bad value" in str(ce)  # identical errors collapse
    assert "[engines [0, 1]]" in "\n".join(ce.render_traceback())


def test_unpicklable_argument_fails_at_submit_and_sends_nothing(rc):
    n = len(rc.history)
    with pytest.raises(error.SerializationError, match=r"argument 0 \(type generator\)"):
        rc[0].apply_async(len, (i for i in range(3)))
    assert len(rc.history) == n


def test_unpicklable_result_is_a_remote_error_and_engine_lives(rc):
    with pytest.raises(error.RemoteError, match="lock"):
        rc[0].apply_sync(lambda: __import__("threading").Lock())
    assert rc[0].apply_sync(lambda: "alive") == "alive"


def test_client_records(rc):
    ar = rc[0].apply_async(lambda: 5)
    ar.get(5)
    msg_id = ar.msg_ids[0]
    assert msg_id in rc.history and rc.results[msg_id] == 5
    assert rc.metadata[msg_id]["engine_id"] == 0
    assert msg_id not in rc.outstanding
    assert rc.wait([ar], timeout=1)
    assert msg_id in rc.hub_history()
    assert rc.result_status([msg_id])["completed"] == [msg_id]
    qs = rc.queue_status()
    assert qs[0]["queue"] == 0 and qs[0]["completed"] >= 1 and "unassigned" in qs
    assert msg_id in rc.queue_status(verbose=True)[0]["completed"]


def test_get_result_from_another_client(cluster, rc):
    ar = rc[1].apply_async(lambda: "shared")
    ar.get(5)
    other = cluster[0].connect_client_sync()
    hub_ar = other.get_result(ar.msg_ids[0])
    assert isinstance(hub_ar, ipp.AsyncHubResult)
    assert hub_ar.get(timeout=5) == "shared"
    # a task still running elsewhere is polled until done
    slow = rc[1].apply_async(time.sleep, 0.3)
    assert other.get_result(slow.msg_ids[0]).get(timeout=5) is None
    other.close()


def test_purge_results(rc):
    ar = rc[0].apply_async(lambda: 1)
    ar.get(5)
    rc.purge_results(ar)
    assert ar.msg_ids[0] not in rc.hub_history() and ar.msg_ids[0] not in rc.results
    rc.purge_results("all")
    assert rc.hub_history() == []


def test_abort_queued_task(rc):
    busy = rc[0].apply_async(time.sleep, 0.5)
    queued = rc[0].apply_async(lambda: "ran")
    queued.abort()
    with pytest.raises(error.TaskAborted):
        queued.get(timeout=5)
    busy.get(timeout=5)
    assert rc[0].apply_sync(lambda: "after") == "after"


def test_clear_namespace(rc):
    rc[:]["to_clear"] = 1
    rc.clear(block=True)
    assert rc[0].apply_sync(lambda: "to_clear" in globals()) is False
    assert rc[0].apply_sync(lambda: 3) == 3


def test_signal_interrupts_running_code(rc):
    ar = rc[1].apply_async(time.sleep, 30)
    time.sleep(0.3)
    t0 = time.monotonic()
    rc.send_signal(signal.SIGINT, targets=[1])
    with pytest.raises(error.RemoteError) as info:
        ar.get(timeout=5)
    assert info.value.ename == "KeyboardInterrupt"
    assert time.monotonic() - t0 < 3
    assert rc[1].apply_sync(lambda: "still here") == "still here"


def test_connection_file_is_private(cluster):
    path = cluster[0].controller.file
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    info = __import__("json").load(open(path))
    assert info["client"].startswith("tcp://127.0.0.1:")


def test_engine_connection_file_attaches_a_stock_jupyter_client(rc):
    from jupyter_client import BlockingKernelClient

    rc[0]["shared_name"] = 1234
    cf = rc.engines[0]["connection_file"]
    assert stat.S_IMODE(os.stat(cf).st_mode) == 0o600
    kc = BlockingKernelClient(connection_file=cf)
    kc.load_connection_file()
    kc.start_channels()
    try:
        reply = kc.execute_interactive("shared_name + 1; print(shared_name + 1)", timeout=10)
        assert reply["content"]["status"] == "ok"
        kc.execute_interactive("from_console = 1", timeout=10)
    finally:
        kc.stop_channels()
    assert rc[0]["from_console"] == 1
    assert rc[0].apply_sync(lambda: __import__("ipykernel").get_connection_file()) == cf


def test_client_without_cluster_says_how_to_start_one(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(error.NoClusterError, match="ipyfarm start -n 4"):
        ipp.Client(profile="nothing-here")
    with pytest.raises(error.NoClusterError, match="no file"):
        ipp.Client(url_file=tmp_path / "missing.json")


def test_execute_with_top_level_await(rc):
    """A cell with top-level await runs on every engine and answers (ipykernel asks for
    the shell's thread there, which engines serving the shell on the main loop provide)."""
    ar = rc[:].execute("import asyncio\nawait asyncio.sleep(0.05)\nawaited = 'yes'",
                       block=False)
    ar.get(timeout=20)
    assert rc[:].pull("awaited", block=True) == ["yes"] * len(rc.ids)


def test_fan_out_is_one_message_and_each_engine_gets_its_own_copy(rc):
    sent = []
    real_send = rc._io.send

    def counting_send(frames, track=False, task=False):
        sent.append(frames)
        return real_send(frames, track, task)

    rc._io.send = counting_send
    try:
        ar = rc[:].execute("p = get_ipython().kernel.get_parent()\n"
                           "seen = (p['header']['msg_id'], p['metadata'])", block=False)
        ar.get(timeout=30)
    finally:
        del rc._io.send
    assert len(sent) == 1  # one message to the controller for both engines
    assert len(set(ar.msg_ids)) == 2
    seen = rc[:].pull("seen", block=True)
    for engine_id, msg_id, (got_id, md) in zip(rc.ids, ar.msg_ids, seen, strict=True):
        assert got_id == msg_id
        assert md["engine_id"] == engine_id
        assert "fanout" not in md
        assert rc.metadata[msg_id]["engine_id"] == engine_id
    records = rc.db_query({"msg_id": {"$in": ar.msg_ids}}, keys=["msg_id", "engine_uuid"])
    assert {r["msg_id"] for r in records} == set(ar.msg_ids)
    # apply, push and pull to several engines go the same way
    assert rc[:].apply_sync(lambda x: x + 1, 1) == [2, 2]


def test_fan_out_with_bad_metadata_fails_every_copy(cluster):
    import zmq

    from ipyfarm.protocol.session import FarmSession, split_identities

    info = cluster[0].controller.connection_info()
    session = FarmSession(key=info["key"].encode())
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(info["client"])
    try:
        def replies_to(md, n):
            msg = session.msg("execute_request", {"code": "1", "silent": False},
                              metadata=md)
            sock.send_multipart(session.serialize_with_buffers(msg, None, []))
            got = {}
            while len(got) < n and sock.poll(10_000):
                reply = session.deserialize(split_identities(sock.recv_multipart())[1])
                got[reply["parent_header"]["msg_id"]] = reply["content"]
            return msg["header"]["msg_id"], got

        first, got = replies_to({"engine_id": 0, "fanout": [[1, "copy-for-1"]],
                                 "time_limit": -1}, 2)
        assert set(got) == {first, "copy-for-1"}
        for content in got.values():
            assert content["ename"] == "InvalidTaskMetadata"
            assert "time_limit" in content["evalue"]
        first, got = replies_to({"engine_id": 0, "fanout": [[1, ""]]}, 1)
        assert got[first]["ename"] == "InvalidTaskMetadata"
        assert "fanout" in got[first]["evalue"]
    finally:
        sock.close(0)


def test_interactive_function_sent_again_after_its_global_changes(rc):
    # defined the way a notebook defines it: its module is __main__
    ns = {"__name__": "__main__"}
    exec("import math\nscale = 2\ndef f(x):\n    return math.sqrt(x) * scale * here\n", ns)
    rc[:].push({"here": 1}, block=True)
    assert rc[:].apply_sync(ns["f"], 9) == [6.0, 6.0]
    ns["scale"] = 5
    assert rc[:].apply_sync(ns["f"], 9) == [15.0, 15.0]
    rc[1].push({"here": -1}, block=True)  # names it does not capture resolve on each engine
    assert rc[:].apply_sync(ns["f"], 9) == [15.0, -15.0]
    lview = rc.load_balanced_view()
    assert lview.map_sync(ns["f"], [1, 4], chunksize=1) in ([5.0, 10.0], [5.0, -10.0],
                                                            [-5.0, 10.0], [-5.0, -10.0])


def test_switch_interval_is_short_while_the_client_runs(rc):
    import sys

    from ipyfarm import switching

    # the controller's and the client's threads of this process hold it lowered
    assert sys.getswitchinterval() <= switching.DEFAULT + 1e-9
    assert switching._users >= 1


def test_small_replies_resolve_on_the_controller_thread_callbacks_never_do(rc):
    import threading

    from ipyfarm.controller.embedded import hub_at

    hub_ident = hub_at(rc._info["inproc"]).thread_ident
    seen: list[int] = []
    original = rc._on_message

    def recording(item):
        seen.append(threading.get_ident())
        original(item)

    rc._on_message = rc._io.on_message = recording
    try:
        assert rc[0].apply_sync(lambda: 7) == 7
        # a small reply is handled where it arrives: no hop through the I/O thread
        assert seen[-1] == hub_ident
        big = rc[0].apply_sync(lambda: b"x" * 200_000)  # a big one is unpickled elsewhere
        assert len(big) == 200_000 and seen[-1] != hub_ident
    finally:
        rc._on_message = rc._io.on_message = original

    # a done-callback runs on the callback thread (not where results are delivered),
    # so it may even wait on results, small or big ones (which the I/O thread handles)
    ran: list = []
    done = threading.Event()

    def callback(ar):
        ran.append((threading.current_thread().name, ar.get(),
                    rc[1].apply_sync(lambda: 5), len(rc[1].apply_sync(lambda: b"y" * 100_000))))
        done.set()

    def slow_three():
        import time

        time.sleep(0.05)  # still running when the callback is added below
        return 3

    for _ in range(20):
        ran.clear()
        done.clear()
        ar = rc[0].apply_async(slow_three)
        ar.add_done_callback(callback)
        assert done.wait(10), "a done-callback that waits on other results hung"
        assert ran[0] == ("ipyfarm-callbacks", 3, 5, 100_000), ran
    # on a finished result, the callback runs at once in the caller's thread
    ar.add_done_callback(lambda a: ran.append(threading.current_thread().name))
    assert ran[-1] == threading.current_thread().name
    # a map's result (its pieces joined) is finished off the controller's thread too
    lview = rc.load_balanced_view()
    assert lview.map_sync(lambda x: x * 2, range(40), chunksize=3) == [x * 2 for x in range(40)]


def test_a_task_is_submitted_on_the_callers_thread_while_the_hub_waits(cluster, rc):
    import threading

    import ipyfarm.controller.commands as C

    hub = cluster[0].controller.hub
    table = hub._command_table
    dispatch = table[C.DispatchTask]
    threads: list[int] = []

    def recording(cmd):
        threads.append(threading.get_ident())
        dispatch(cmd)

    table[C.DispatchTask] = recording
    try:
        time.sleep(0.05)  # the hub is waiting for sockets: the caller does the work
        assert rc[0].apply_sync(lambda: 41) == 41
        assert threads == [threading.get_ident()]
    finally:
        table[C.DispatchTask] = dispatch

    # a deadline brought by an inline submission wakes the waiting hub: a dependency
    # timeout fires on time, not at the hub's next timer tick (every 0.5 s; the pauses
    # put the submissions at different points of that period)
    lview = rc.load_balanced_view()
    long = lview.apply_async(time.sleep, 2.5)
    late = []
    for pause in (0.1, 0.17, 0.23, 0.31):
        time.sleep(pause)
        t0 = time.monotonic()
        with lview.temp_flags(after=long, timeout=0.05):
            waiting = lview.apply_async(lambda: 1)
        with pytest.raises(error.DependencyTimeout):
            waiting.get(5)
        late.append(time.monotonic() - t0)
    long.get(10)
    assert sorted(late)[2] < 0.25, f"dependency timeouts of 0.05 s fired after {late} s"


def test_threads_submitting_at_once_lose_nothing(rc):
    import threading

    lview = rc.load_balanced_view()
    dview = rc[0]
    out: dict[int, list] = {}
    errors: list = []

    def submit(k):
        try:
            view = lview if k % 2 else dview
            ars = [view.apply_async(lambda a, b: a * 1000 + b, k, i) for i in range(300)]
            out[k] = [ar.get(60) for ar in ars]
        except Exception as e:  # reported below, with the thread's number
            errors.append((k, e))

    workers = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not any(w.is_alive() for w in workers), "a submitting thread hung"
    assert not errors, errors
    for k in range(4):
        assert out[k] == [k * 1000 + i for i in range(300)]


def test_a_big_result_is_freed_once_purged(rc):
    """Nothing of the client keeps a big reply alive after the result is gone, also when
    the replies after it are small ones, handled on the controller's thread (the I/O
    thread's loop once held on to the last message it had handled)."""
    import gc

    import psutil

    proc = psutil.Process()
    rc[0].execute("import numpy as np; big_result = np.ones(2**28 // 8)", block=True)
    gc.collect()
    base = proc.memory_info().rss
    back = rc[0].pull("big_result", block=True)
    assert back.nbytes == 2**28
    del back
    rc.purge_local_results("all")
    rc[0].execute("big_result = None", block=True)
    assert rc[0].apply_sync(lambda: 1) == 1
    gc.collect()
    grown = (proc.memory_info().rss - base) / 2**20
    assert grown < 100, f"the notebook's process kept {grown:.0f} MB after a 256 MB pull"


def test_get_tells_a_task_that_raised_timeouterror_from_a_result_not_ready(rc):
    def times_out():
        raise TimeoutError("the task's own timeout")

    ar = rc[0].apply_async(times_out)
    with pytest.raises(ipp.error.RemoteError, match="the task's own timeout"):
        ar.get(10)
    slow = rc[0].apply_async(time.sleep, 0.5)
    with pytest.raises(ipp.error.TimeoutError, match="results ready after 0.05 s"):
        slow.get(0.05)
    assert slow.get(5) is None


def test_memory_that_came_in_signed_is_not_hashed_again_to_go_back(rc, monkeypatch):
    """A pushed array pulled back, and a pulled array pushed again: the sending end
    reuses the digest it checked on receipt (the receiving end still checks)."""
    from ipyfarm.protocol import session as session_mod

    counting = """
from ipyfarm.protocol import session as _s
_big_hashes = [0]
_orig_blake3 = _s._ALGORITHMS["blake3"]
def _counted(view, _orig=_orig_blake3):
    if view.nbytes >= 2**20:
        _big_hashes[0] += 1
    return _orig(view)
_s._ALGORITHMS["blake3"] = _counted
"""
    e0 = rc[0]
    e0.execute(counting, block=True)
    here = [0]
    orig = session_mod._ALGORITHMS["blake3"]

    def counted(view):
        if view.nbytes >= 2**20:
            here[0] += 1
        return orig(view)

    monkeypatch.setitem(session_mod._ALGORITHMS, "blake3", counted)
    try:
        arr = np.arange(2**20, dtype=np.float64)  # 8 MB
        e0.push({"reuse_me": arr}, block=True)
        assert here[0] == 1  # hashed to sign the push
        assert e0.apply_sync(lambda: _big_hashes[0]) == 1  # noqa: F821  (checked on arrival)
        back = e0.pull("reuse_me", block=True)
        assert np.array_equal(back, arr) and not back.flags.writeable
        assert e0.apply_sync(lambda: _big_hashes[0]) == 1  # noqa: F821  (sent back: known)
        assert here[0] == 2  # checked on arrival here
        e0.push({"again": back}, block=True)
        assert here[0] == 2  # pushed again: known here
        assert e0.apply_sync(lambda: np.array_equal(again, reuse_me)) is True  # noqa: F821
        assert e0.apply_sync(lambda: _big_hashes[0]) == 2  # noqa: F821  (checked again)
        fresh = e0.apply_sync(lambda: reuse_me * 2)  # noqa: F821  (new memory: hashed)
        assert np.array_equal(fresh, arr * 2)
        assert e0.apply_sync(lambda: _big_hashes[0]) == 3  # noqa: F821
    finally:
        e0.execute("_s._ALGORITHMS['blake3'] = _orig_blake3; reuse_me = again = None",
                   block=True)


def _raw_peer(cluster, batch_replies):
    """A DEALER on the controller's client port that has sent its connection_request
    (saying whether it takes batched replies) and read the answer."""
    import zmq

    from ipyfarm.protocol.session import FarmSession

    info = cluster[0].controller.connection_info()
    session = FarmSession(key=info["key"].encode())
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(info["client"])
    session.send(sock, "connection_request", {"batch": True} if batch_replies else {})
    assert sock.poll(10_000)
    sock.recv_multipart()
    return session, sock


@pytest.mark.parametrize("batch_replies", [True, False])
def test_replies_queued_together_come_batched_only_to_a_client_that_takes_them(
        cluster, batch_replies):
    """The hub's lock is held while 40 requests arrive, so that it answers them all
    before it next waits: a client that said it takes batches gets them in a few frames
    (each reply signed as if alone, in order); any other peer gets 40 messages."""
    from ipyfarm.protocol import batch
    from ipyfarm.protocol.session import split_identities

    hub = cluster[0].controller.hub
    session, sock = _raw_peer(cluster, batch_replies)
    try:
        sent = []
        with hub._lock:  # the hub thread waits for it after its next wake-up
            for _ in range(40):
                msg = session.msg("queue_request", {"targets": None, "verbose": False})
                sock.send_multipart(session.serialize_with_buffers(msg, None, []))
                sent.append(msg["header"]["msg_id"])
            time.sleep(0.3)
        got, frames_seen = [], []
        while len(got) < 40 and sock.poll(10_000):
            frames = sock.recv_multipart()
            frames_seen.append(frames[0])
            for msg in batch.unpack(frames[1]) if frames[0] == batch.BATCH else [frames]:
                reply = session.deserialize(split_identities(msg)[1])  # signature checked
                assert reply["msg_type"] == "queue_reply"
                got.append(reply["parent_header"]["msg_id"])
        assert got == sent
        if batch_replies:  # (a batch also goes when its first reply is 2 ms old)
            assert batch.BATCH in frames_seen and len(frames_seen) <= 10, frames_seen
        else:
            assert batch.BATCH not in frames_seen and len(frames_seen) == 40
    finally:
        sock.close(0)


def test_a_client_over_tcp_gets_results_intact_through_batches(cluster):
    """A real Client over TCP (not the in-process path): two results that reach the
    controller together come to it in one batch, and every result, output and
    metadata is what it would be alone."""
    hub = cluster[0].controller.hub
    info = dict(cluster[0].controller.connection_info())
    info.pop("inproc")
    rc2 = ipp.Client(info)
    try:
        assert rc2._io._hub is None  # sockets, not the in-process path
        ids = rc2.ids[:2]
        before = hub.batches_sent
        ars = [rc2[e].apply_async(
            lambda e: (__import__("time").sleep(0.3), print("out", e), e * 10)[2], e)
            for e in ids]
        time.sleep(0.1)
        with hub._lock:  # both replies arrive while the hub is held
            time.sleep(0.6)
        assert [ar.get(10) for ar in ars] == [e * 10 for e in ids]
        assert hub.batches_sent > before
        for ar, e in zip(ars, ids, strict=True):
            assert ar.metadata["engine_id"] == e
            assert ar.stdout.strip() == f"out {e}"
        view = rc2.load_balanced_view()
        many = [view.apply_async(lambda i: i * i, i) for i in range(300)]
        assert [ar.get(30) for ar in many] == [i * i for i in range(300)]
    finally:
        rc2.close()


def test_the_controller_remembers_a_bounded_number_of_batching_clients():
    from ipyfarm.controller.hub import Hub
    from ipyfarm.protocol import batch

    hub = Hub()
    hub.start()
    try:
        with hub._lock:  # the hub's thread is then not using its sockets
            for i in range(batch.MAX_CLIENTS + 10):
                hub._q_connection_request(b"client-%d" % i, {"msg_id": str(i)},
                                          {"batch": True})
                if i == 0:  # a reply queued for the first goes out when it is dropped
                    hub._to_client([b"client-0", b"<IDS|MSG>", b"queued"])
                    assert b"client-0" in hub._outbox
            assert b"client-0" not in hub._outbox
            hub._q_connection_request(b"plain", {"msg_id": "p"}, {})
        assert len(hub.batching) == batch.MAX_CLIENTS
        assert b"client-0" not in hub.batching and b"client-9" not in hub.batching
        assert b"client-10" in hub.batching and b"plain" not in hub.batching
    finally:
        hub.stop()


def test_a_client_asks_again_when_its_connection_reply_is_lost(cluster):
    """A controller drops a reply whose receiving socket is not connected yet (the
    sending one can get there first over a slow link): the Client asks again instead of
    waiting out its timeout. Here the controller's first answer is withheld."""
    hub = cluster[0].controller.hub
    answer = hub._q_connection_request
    asked = []

    def first_one_lost(ident, header, content):
        asked.append(header["msg_id"])
        if len(asked) > 1:
            answer(ident, header, content)

    hub._q_connection_request = first_one_lost
    info = dict(cluster[0].controller.connection_info())
    info.pop("inproc")  # over TCP, as from another process
    try:
        t0 = time.monotonic()
        rc2 = ipp.Client(info, timeout=20)
        took = time.monotonic() - t0
    finally:
        del hub._q_connection_request
    try:
        assert len(asked) == 2 and 0.9 < took < 5, (asked, took)
        assert sorted(rc2.ids) == sorted(cluster[1].ids)
        assert rc2[rc2.ids[0]].apply_sync(lambda: 7) == 7
    finally:
        rc2.close()


def test_closing_a_client_whose_io_thread_already_ended_returns():
    """The I/O thread may see a Client closing and shut its end of the wake-up pair
    before close() sends the wake-up (seen once in CI as a hang in close()): a send
    to a peer that is gone must not wait for it. The order is forced here: the
    thread's last step waits on the lock that the closing thread holds."""
    import threading

    import zmq

    from ipyfarm import directzmq
    from ipyfarm.client.io import ClientIO

    ctx = zmq.Context()
    io = ClientIO(ctx, "tcp://127.0.0.1:9", lambda frames: None)
    io._wake_lock = threading.RLock()  # so that the closing thread can take it twice
    io.start()
    failed = []

    def close_late():
        with io._wake_lock:  # the I/O thread's last step waits for this
            io._stopping = True  # the thread ends its loop, as if close() had said so
            directzmq.wake(io._wake)
            deadline = time.monotonic() + 5
            while not io._wake_pull.closed:
                if time.monotonic() > deadline:
                    failed.append("the I/O thread did not close its end")
                    return
                time.sleep(0.01)
            time.sleep(0.2)  # (libzmq takes the closed end's pipe down asynchronously)
            io._stopping = False
            io.stop(timeout=0)  # ...and close() gets to its wake-up only now

    closer = threading.Thread(target=close_late, daemon=True)
    try:
        closer.start()
        closer.join(5)
        assert not failed, failed
        assert not closer.is_alive(), "close() waited for an I/O thread that had ended"
        assert io.closed.wait(5)
    finally:
        io._stopping = True
        if not closer.is_alive():  # (closing a socket a stuck thread uses aborts)
            ctx.destroy(0)
