"""A real engine process against a tiny fake controller, over real zmq sockets.

The fake controller is a ROUTER on 127.0.0.1 that answers ``registration_request`` and
heartbeats with :class:`FarmSession`; the tests talk to the engine's shell, control and
iopub ports directly, as the controller would. Every wait is bounded; every engine started
here is killed by PID in teardown.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import zmq
from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file

from ipyfarm.engine import ops
from ipyfarm.protocol.serialize import interactive, loads, pack_apply
from ipyfarm.protocol.session import DELIM, FarmSession, split_identities

# the engine cannot import this test module: send its functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

KEY = uuid.uuid4().hex
HEARTBEAT = 0.2
WAIT = 10.0  # seconds: the bound on any single expected reply
REPO = Path(__file__).resolve().parent.parent


def _session() -> FarmSession:
    return FarmSession(key=KEY.encode(), signature_scheme="hmac-sha256", username="test")


def _recv(sock: zmq.Socket, session: FarmSession, timeout: float = WAIT) -> dict:
    if not sock.poll(timeout * 1000):
        raise TimeoutError(f"no message within {timeout} s")
    idents, rest = split_identities(sock.recv_multipart())
    msg = session.deserialize(rest)
    msg["idents"] = idents
    return msg


class FakeController:
    """Answers registration and heartbeats; can go silent or forget engines."""

    def __init__(self, tmp: Path, name: str = "fake"):
        self.session = _session()
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.url = f"tcp://127.0.0.1:{port}"
        self.file = tmp / f"ipyfarm-{name}.json"
        self.file.write_text(json.dumps({
            "key": KEY, "signature_scheme": "hmac-sha256", "location": "127.0.0.1",
            "registration": self.url, "client": "tcp://127.0.0.1:1", "pid": os.getpid(),
            "profile": name, "embedded": False, "created": "now",
        }))
        self.answer = True  # answer heartbeats at all
        self.heartbeat_status = "ok"
        self.registrations: list[dict] = []
        self.received: list[str] = []
        self.registered = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            frames = self.sock.recv_multipart()
            idents, rest = split_identities(frames)
            msg = self.session.deserialize(rest)
            self.received.append(msg["msg_type"])
            if msg["msg_type"] == "registration_request":
                self.registrations.append(msg["content"])
                reply = {"status": "ok", "engine_id": len(self.registrations) - 1,
                         "heartbeat_period": HEARTBEAT}
                self.session.send(self.sock, "registration_reply", reply, msg, ident=idents)
                self.registered.set()
            elif msg["msg_type"] == "heartbeat_request" and self.answer:
                self.session.send(self.sock, "heartbeat_reply",
                                  {"status": self.heartbeat_status}, msg, ident=idents)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        self.context.term()


class Engine:
    """One engine process and sockets to its shell, control and iopub."""

    def __init__(self, controller: FakeController, tmp: Path, *extra: str):
        self.controller = controller
        self.tmp = tmp
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
        env["JUPYTER_RUNTIME_DIR"] = str(tmp / "runtime")
        env["IPYTHONDIR"] = str(tmp / "ipython")
        self.stderr_path = tmp / f"engine-{uuid.uuid4().hex[:6]}.err"
        cmd = [sys.executable, "-m", "ipyfarm.engine", "--controller-file",
               str(controller.file), *extra]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=err, stderr=err)
        self.session = _session()
        self.context = zmq.Context()
        self.info: dict = {}

    def wait_registered(self, timeout: float = 30) -> dict:
        if not self.controller.registered.wait(timeout):
            raise TimeoutError(f"engine did not register:\n{self.stderr()}")
        self.info = self.controller.registrations[-1]
        ci = self.info["connection_info"]
        addr = f"tcp://{ci['ip']}:"
        self.shell = self._socket(zmq.DEALER, addr + str(ci["shell_port"]))
        self.control = self._socket(zmq.DEALER, addr + str(ci["control_port"]))
        self.iopub = self._socket(zmq.SUB, addr + str(ci["iopub_port"]))
        self.iopub.subscribe(b"")
        # the XPUB greets each subscription: from then on nothing published is missed
        self.iopub_until(lambda m: m["msg_type"] == "iopub_welcome")
        return self.info

    def _socket(self, kind: int, url: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.linger = 0
        sock.connect(url)
        return sock

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def send(self, sock, msg_type, content=None, buffers=None, msg_id=None, ident=None,
             metadata=None):
        msg = self.session.msg(msg_type, content or {}, metadata=metadata)
        if msg_id:
            msg["header"]["msg_id"] = msg_id
            msg["msg_id"] = msg_id
        self.session.send(sock, msg, buffers=buffers, ident=ident)
        return msg["header"]["msg_id"]

    def reply(self, sock, msg_id, timeout=WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = _recv(sock, self.session, max(0.01, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def apply(self, f, *args, **kwargs) -> dict:
        msg_id = self.send(self.shell, "apply_request", {}, pack_apply(f, args, kwargs))
        return self.reply(self.shell, msg_id)

    def apply_value(self, f, *args, **kwargs):
        reply = self.apply(f, *args, **kwargs)
        assert reply["content"]["status"] == "ok", reply["content"]
        return loads(reply["buffers"])

    def execute(self, code: str) -> dict:
        msg_id = self.send(self.shell, "execute_request", {"code": code, "silent": False,
                                                          "stop_on_error": False})
        return self.reply(self.shell, msg_id)

    def iopub_until(self, pred, timeout=WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = _recv(self.iopub, self.session, max(0.01, deadline - time.monotonic()))
            if pred(msg):
                return msg

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.context.destroy(linger=0)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def controller(tmp):
    c = FakeController(tmp)
    yield c
    c.close()


@pytest.fixture(scope="module")
def engine(controller, tmp):
    e = Engine(controller, tmp)
    try:
        e.wait_registered()
        yield e
    finally:
        e.kill()


def test_registration(engine):
    info = engine.info
    assert info["pid"] == engine.proc.pid
    assert set(info["connection_info"]) >= {
        "transport", "ip", "shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"
    }
    assert info["connection_info"]["ip"] == "127.0.0.1"
    assert set(info["properties"]) >= {"hostname", "pid", "cpu_count", "memory_total",
                                       "gpu_count"}
    path = Path(info["connection_file"])
    assert path.name == f"ipyfarm-engine-{info['uuid']}.json"
    assert path.parent == engine.tmp / "runtime"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["shell_port"] == info["connection_info"]["shell_port"]
    # inside the engine, ipykernel finds the same file
    assert engine.apply_value(_connection_file) == str(path)
    assert engine.apply_value(ops.get_properties)["pid"] == engine.proc.pid
    ids = engine.apply_value(lambda: (ops._kernel.engine_id, ops._kernel.engine_uuid))
    assert ids == (0, info["uuid"])
    assert "without encryption" not in engine.stderr()


def _connection_file():
    import ipykernel

    return ipykernel.get_connection_file()


def test_apply_reads_pushed_global_and_captures_stdout(engine):
    assert engine.apply_value(ops.push, {"a": 21}) is None

    @interactive
    def f(x):
        print("hello from", x)
        return a * x  # noqa: F821 - a global on the engine

    msg_id = engine.send(engine.shell, "apply_request", {}, pack_apply(f, (2,), {}),
                         ident=b"client-7")
    reply = engine.reply(engine.shell, msg_id)
    assert reply["idents"] == [b"client-7"]  # the controller's extra routing frame returns
    assert reply["msg_type"] == "apply_reply"
    assert reply["content"]["status"] == "ok", reply["content"]
    assert loads(reply["buffers"]) == 42
    md = reply["metadata"]
    assert md["stdout"] == "hello from 2\n"
    assert md["stderr"] == "" and md["outputs"] == [] and md["error"] is None
    assert md["execute_result"] is None
    assert md["status"] == "ok" and md["engine_id"] == 0
    assert md["engine_uuid"] == engine.info["uuid"]
    assert md["msg_type"] == "apply_request"
    assert md["started"] <= md["completed"]
    assert engine.apply_value(ops.pull, "a") == 21
    assert engine.apply_value(ops.pull, ["a", "a"]) == [21, 21]


def test_output_spread_over_timed_flushes_is_all_captured(engine):
    def chatty():
        import sys
        import time

        for i in range(4):
            print(i)
            print(f"e{i}", file=sys.stderr)
            time.sleep(0.08)  # ipykernel also flushes on its own every 0.2 s

    md = engine.apply(chatty)["metadata"]
    assert md["stdout"] == "0\n1\n2\n3\n"
    assert md["stderr"] == "e0\ne1\ne2\ne3\n"
    assert engine.apply(lambda: None)["metadata"]["stdout"] == ""  # nothing carried over


def test_numpy_argument_is_a_read_only_view(engine):
    arr = np.arange(100_000, dtype=np.float64)

    def inspect(x):
        return x.flags.writeable, x.flags.owndata, float(x.sum())

    writeable, owndata, total = engine.apply_value(inspect, arr)
    assert not writeable and not owndata  # a view on the message buffer, not a copy
    assert total == float(arr.sum())
    back = engine.apply_value(lambda x: x, arr)
    assert np.array_equal(back, arr)


def test_execute_captures_print_display_and_result(engine):
    code = (
        "import sys\nfrom IPython.display import display\n"
        "print('out')\nprint('err', file=sys.stderr)\n"
        "display({'text/plain': 'shown'}, raw=True)\n6 * 7"
    )
    reply = engine.execute(code)
    assert reply["content"]["status"] == "ok"
    md = reply["metadata"]
    assert md["stdout"] == "out\n" and md["stderr"] == "err\n"
    assert [o["data"] for o in md["outputs"]] == [{"text/plain": "shown"}]
    assert md["execute_result"]["data"] == {"text/plain": "42"}
    assert md["execute_result"]["execution_count"] == reply["content"]["execution_count"]
    assert md["msg_type"] == "execute_request" and md["error"] is None
    # outputs still go out on iopub, with the request as parent
    msg_id = reply["parent_header"]["msg_id"]
    stream = engine.iopub_until(
        lambda m: m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id
    )
    assert stream["content"]["text"] in ("out\n", "err\n")


def test_execute_error_fills_metadata(engine):
    reply = engine.execute("1/0")
    content = reply["content"]
    assert content["status"] == "error" and content["ename"] == "ZeroDivisionError"
    assert content["engine_info"]["method"] == "execute"
    assert reply["metadata"]["error"]["ename"] == "ZeroDivisionError"


def test_apply_error_reply(engine):
    def boom(x):
        raise ValueError(f"bad value {x}")

    reply = engine.apply(boom, 3)
    content = reply["content"]
    assert content["status"] == "error"
    assert content["ename"] == "ValueError" and content["evalue"] == "bad value 3"
    assert content["traceback"] and all(isinstance(line, str) for line in content["traceback"])
    assert "bad value 3" in "".join(content["traceback"])
    assert content["engine_info"] == {"engine_id": 0, "engine_uuid": engine.info["uuid"],
                                      "method": "apply"}
    assert reply["metadata"]["error"] == content and reply["metadata"]["status"] == "error"
    assert reply["buffers"] == []


def test_unpicklable_result_is_an_error_and_engine_lives(engine):
    reply = engine.apply(lambda: threading.Lock())
    content = reply["content"]
    assert content["status"] == "error"
    assert "lock" in content["evalue"]  # names the result's type
    assert engine.apply_value(lambda: 5) == 5


def test_argument_that_fails_to_unpickle_is_an_error(engine):
    frames = pack_apply(len, ([1, 2],), {})
    frames[0] = frames[0].replace(b"builtins", b"nosuchmd")  # a module the engine lacks
    msg_id = engine.send(engine.shell, "apply_request", {}, frames)
    content = engine.reply(engine.shell, msg_id)["content"]
    assert content["status"] == "error" and "nosuchmd" in content["evalue"]
    assert engine.apply_value(lambda: 6) == 6


def test_abort_request(engine):
    doomed = str(uuid.uuid4())
    ctl = engine.send(engine.control, "abort_request", {"msg_ids": [doomed]})
    assert engine.reply(engine.control, ctl)["content"] == {"status": "ok"}
    engine.send(engine.shell, "apply_request", {}, pack_apply(lambda: 1, (), {}),
                msg_id=doomed)
    reply = engine.reply(engine.shell, doomed)
    assert reply["msg_type"] == "apply_reply"
    assert reply["content"] == {"status": "aborted"}
    assert reply["metadata"]["status"] == "aborted"
    # execute requests are aborted the same way
    ctl = engine.send(engine.control, "abort_request", {"msg_ids": [doomed + "x"]})
    engine.reply(engine.control, ctl)
    engine.send(engine.shell, "execute_request", {"code": "1"}, msg_id=doomed + "x")
    assert engine.reply(engine.shell, doomed + "x")["content"]["status"] == "aborted"
    assert engine.apply_value(lambda: 7) == 7  # later tasks run


def test_clear_request(engine):
    engine.apply_value(ops.push, {"zz": 1})
    ctl = engine.send(engine.control, "clear_request", {})
    assert engine.reply(engine.control, ctl)["content"]["status"] == "ok"
    reply = engine.apply(ops.pull, "zz")
    assert reply["content"]["ename"] == "NameError" and "'zz'" in reply["content"]["evalue"]
    assert engine.execute("ip = get_ipython(); ip.user_ns['ip'] is ip")["content"][
        "status"] == "ok"


def _sleeper():
    import time

    print("started", flush=True)
    time.sleep(30)


@pytest.mark.parametrize("kind", ["apply", "execute"])
def test_sigint_interrupts_running_code(engine, kind):
    if kind == "apply":
        msg_id = engine.send(engine.shell, "apply_request", {}, pack_apply(_sleeper, (), {}))
    else:
        code = "import time\nprint('started', flush=True)\ntime.sleep(30)"
        msg_id = engine.send(engine.shell, "execute_request", {"code": code})
    engine.iopub_until(
        lambda m: m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id
    )
    t0 = time.monotonic()
    ctl = engine.send(engine.control, "signal_request", {"signum": int(signal.SIGINT)})
    assert engine.reply(engine.control, ctl)["content"]["status"] == "ok"
    reply = engine.reply(engine.shell, msg_id, timeout=2.0)
    assert time.monotonic() - t0 < 2.0
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert engine.apply_value(lambda: 8) == 8


def test_stock_jupyter_client_shares_the_namespace(engine):
    engine.apply_value(ops.push, {"shared": 123})
    kc = BlockingKernelClient(connection_file=engine.info["connection_file"])
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=WAIT)
        reply = kc.execute_interactive("seen = shared + 1", timeout=WAIT,
                                       user_expressions={"v": "shared"})
        assert reply["content"]["status"] == "ok"
        assert reply["content"]["user_expressions"]["v"]["data"]["text/plain"] == "123"
    finally:
        kc.stop_channels()
    assert engine.apply_value(ops.pull, "seen") == 124


def test_apply_behind_an_async_cell_waits_for_it(engine):
    """Applies idle engines answer at once (not through ipykernel's task queue); one that
    arrives while an async cell awaits must still run after that cell, in order."""
    cell = engine.send(engine.shell, "execute_request", {
        "code": "import asyncio\nawait asyncio.sleep(0.5)\norder_marker = 'cell done'",
        "silent": False, "stop_on_error": False})
    time.sleep(0.1)  # the cell is awaiting now
    msg_id = engine.send(engine.shell, "apply_request", {},
                         pack_apply(interactive(lambda: order_marker), (), {}))  # noqa: F821
    first = _recv(engine.shell, engine.session)
    assert first["parent_header"]["msg_id"] == cell, (first["content"], first["metadata"])
    reply = engine.reply(engine.shell, msg_id)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert loads(reply["buffers"]) == "cell done"
    # and with nothing queued, applies come back at once, each with its own reply
    ids = [engine.send(engine.shell, "apply_request", {}, pack_apply(pow, (2, i), {}))
           for i in range(20)]
    got = [engine.reply(engine.shell, m) for m in ids]
    assert [loads(r["buffers"]) for r in got] == [2**i for i in range(20)]
    assert all(r["parent_header"]["msg_id"] == m for r, m in zip(got, ids, strict=True))


def test_execute_behind_an_async_cell_waits_for_it(engine):
    """A cell that awaits holds the shell: the executes and applies sent while it
    waits run after it, in order."""
    async_cell = engine.send(engine.shell, "execute_request", {
        "code": "import asyncio\nawait asyncio.sleep(0.4)\nafter_await = 'cell done'",
        "silent": False, "stop_on_error": False}, metadata={"engine_id": 0})
    time.sleep(0.1)  # the cell is awaiting now
    behind = engine.send(engine.shell, "execute_request", {
        "code": "seen_behind = after_await", "silent": False, "stop_on_error": False},
        metadata={"engine_id": 0})
    pull = engine.send(engine.shell, "apply_request", {},
                       pack_apply(ops.pull, ("seen_behind",), {}))
    got = [_recv(engine.shell, engine.session) for _ in range(3)]
    assert [r["parent_header"]["msg_id"] for r in got] == [async_cell, behind, pull]
    assert [r["content"]["status"] for r in got] == ["ok", "ok", "ok"], got[1]["content"]
    assert loads(got[2]["buffers"]) == "cell done"


def test_async_cells_run_inside_a_task_and_context_variables_persist(engine):
    """Top-level await cells still run inside an asyncio task (asyncio.timeout and
    TaskGroup need one), and what a cell sets in a context variable (decimal's
    context, say) is there for the next cell."""

    def run(code):
        reply = engine.execute(code)
        assert reply["content"]["status"] == "ok", reply["content"]

    run("import asyncio\n"
        "async with asyncio.timeout(5):\n"
        "    await asyncio.sleep(0)\n"
        "async with asyncio.TaskGroup() as tg:\n"
        "    t = tg.create_task(asyncio.sleep(0, 'tg'))\n"
        "tg_result = t.result()")
    assert engine.apply_value(ops.pull, "tg_result") == "tg"
    run("import contextvars, decimal\n"
        "cv_marker = contextvars.ContextVar('cv_marker')\n"
        "cv_marker.set('set by a cell')\n"
        "decimal.setcontext(decimal.Context(prec=50))")
    for _ in range(5):  # several executes, each read on its own
        run("seen_cv = cv_marker.get('lost'); seen_prec = decimal.getcontext().prec")
        assert engine.apply_value(ops.pull, "seen_cv") == "set by a cell"
        assert engine.apply_value(ops.pull, "seen_prec") == 50
    # and for one that waits behind an awaiting cell
    cell = engine.send(engine.shell, "execute_request", {
        "code": "import asyncio\nawait asyncio.sleep(0.3)", "silent": False,
        "stop_on_error": False})
    time.sleep(0.1)
    behind = engine.send(engine.shell, "execute_request", {
        "code": "seen_cv = cv_marker.get('lost'); seen_prec = decimal.getcontext().prec",
        "silent": False, "stop_on_error": False})
    for msg_id in (cell, behind):
        assert engine.reply(engine.shell, msg_id)["content"]["status"] == "ok"
    assert engine.apply_value(ops.pull, "seen_cv") == "set by a cell"
    assert engine.apply_value(ops.pull, "seen_prec") == 50


def test_an_execute_error_aborts_the_executes_already_queued(engine):
    """stop_on_error: executes that reached the engine before a failing cell ended are
    aborted, as ipykernel does it; the engine takes new ones again afterwards."""
    ids = [engine.send(engine.shell, "execute_request",
                       {"code": code, "silent": False, "stop_on_error": True},
                       metadata={"engine_id": 0})
           for code in ("import time; time.sleep(0.3)", "1/0", "never_run = 1")]
    replies = [engine.reply(engine.shell, m) for m in ids]
    assert [r["content"]["status"] for r in replies] == ["ok", "error", "aborted"]
    assert replies[1]["content"]["ename"] == "ZeroDivisionError"
    deadline = time.monotonic() + WAIT
    while engine.execute("ran_again = 1")["content"]["status"] == "aborted":
        assert time.monotonic() < deadline, "the engine kept aborting executes"
        time.sleep(0.05)
    assert engine.apply_value(ops.pull, "ran_again") == 1
    assert engine.execute("never_run")["content"]["ename"] == "NameError"


def test_burst_of_mixed_requests_is_read_directly_and_kept_in_order(engine):
    """The engine drains its shell socket itself (not one message per loop turn through
    the ZMQStream); executes and applies sent back to back still run in order."""
    ids = []
    for i in range(10):
        ids.append(engine.send(engine.shell, "apply_request", {},
                               pack_apply(ops.push, ({"burst": i},), {})))
        ids.append(engine.send(engine.shell, "execute_request", {
            "code": f"burst = burst * 10 + {i}", "silent": False, "stop_on_error": False}))
        ids.append(engine.send(engine.shell, "apply_request", {},
                               pack_apply(ops.pull, ("burst",), {})))
    replies = [engine.reply(engine.shell, m) for m in ids]
    assert all(r["content"]["status"] == "ok" for r in replies), [r["content"] for r in replies]
    assert [loads(replies[3 * i + 2]["buffers"]) for i in range(10)] == [
        i * 10 + i for i in range(10)]
    reader = engine.apply_value(_shell_reader_name)
    assert reader == "on_events", reader


def test_a_burst_longer_than_one_drain_stays_with_the_direct_reader(engine):
    """Past one drain (256 messages) the reader gives the loop a turn and reads on
    itself; the ZMQStream, which reads one message per turn through a slower path and
    keeps reading while any is left, gets none of them."""
    engine.apply_value(_count_stream_reads)
    ids = [engine.send(engine.shell, "apply_request", {},
                       pack_apply(ops.push, ({"deep": i},), {})) for i in range(700)]
    replies = [engine.reply(engine.shell, m, timeout=30) for m in ids]
    assert [r["parent_header"]["msg_id"] for r in replies] == ids
    assert all(r["content"]["status"] == "ok" for r in replies)
    assert engine.apply_value(ops.pull, "deep") == 699
    assert engine.apply_value(ops.pull, "_stream_reads") == 0


def _count_stream_reads():
    from ipyfarm.engine import ops as engine_ops

    stream = engine_ops._kernel.shell_stream
    ns = engine_ops._kernel.shell.user_ns
    ns["_stream_reads"] = 0
    original = stream._handle_recv

    def counted():
        ns["_stream_reads"] += 1
        return original()

    stream._handle_recv = counted


def _shell_reader_name():
    from ipyfarm.engine import ops as engine_ops

    stream = engine_ops._kernel.shell_stream
    fd = stream.socket.getsockopt(zmq.FD)
    return stream.io_loop.handlers[fd][1].__name__


def test_execute_replies_sent_straight_miss_no_request(engine):
    """Execute replies go straight to the socket; a request whose readable edge such a
    send takes is still read (on the next loop pass), so bursts and ping-pong alike
    are all answered."""
    ids = [engine.send(engine.shell, "execute_request",
                       {"code": f"straight = {i}", "silent": True, "stop_on_error": False},
                       metadata={"engine_id": 0}) for i in range(200)]
    replies = [engine.reply(engine.shell, m, timeout=20) for m in ids]
    assert [r["parent_header"]["msg_id"] for r in replies] == ids
    assert all(r["content"]["status"] == "ok" for r in replies)
    for i in range(100):  # one at a time, with applies between
        engine.execute(f"straight = {i}")
        assert engine.apply_value(ops.pull, "straight") == i


def test_controller_tasks_publish_no_status_other_clients_requests_do(engine):
    """busy/idle go through the iopub thread while the reply is written, and the
    controller drops them: its tasks (metadata with engine_id) get none; a request from
    any other client gets both, and execute_input is published either way."""

    def iopub_of(msg_id, until_idle, timeout=WAIT):
        """(msg_type, execution_state) of msg_id's iopub messages: until its idle status,
        or (until_idle=False) until nothing came for 0.3 s."""
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = _recv(engine.iopub, engine.session, 0.3)
            except TimeoutError:
                if not until_idle:
                    return seen
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                seen.append((msg["msg_type"], msg["content"].get("execution_state")))
                if seen[-1] == ("status", "idle"):
                    return seen
        raise AssertionError(f"no idle status for {msg_id} in {timeout} s: {seen}")

    code = {"code": "task_marker = 1", "silent": False, "stop_on_error": False}
    task = engine.send(engine.shell, "execute_request", code, metadata={"engine_id": 0})
    assert engine.reply(engine.shell, task)["content"]["status"] == "ok"
    assert iopub_of(task, until_idle=False) == [("execute_input", None)]
    other = engine.send(engine.shell, "execute_request", code)
    assert engine.reply(engine.shell, other)["content"]["status"] == "ok"
    assert iopub_of(other, until_idle=True) == [
        ("status", "busy"), ("execute_input", None), ("status", "idle")]


def test_a_cell_is_transformed_once_per_execute(engine):
    setup = ("transform_calls = []\n"
             "def _count(lines):\n"
             "    transform_calls.append(''.join(lines))\n"
             "    return lines\n"
             "get_ipython().input_transformers_post.append(_count)")
    assert engine.execute(setup)["content"]["status"] == "ok"
    for code in ("x_once = 1", "%time y_once = 2", "import asyncio\nawait asyncio.sleep(0)"):
        engine.apply_value(ops.push, {"transform_calls": []})
        assert engine.execute(code)["content"]["status"] == "ok"
        calls = engine.apply_value(ops.pull, "transform_calls")
        # (%time transforms the statement it times itself: another text, once too)
        assert calls and len(calls) == len(set(calls)), (code, calls)
    assert engine.apply_value(ops.pull, ("x_once", "y_once")) == [1, 2]
    # the shell's own methods are back after each request
    assert engine.apply_value(lambda: "transform_cell" in vars(get_ipython())) is False  # noqa: F821
    engine.execute("get_ipython().input_transformers_post.remove(_count)")


def test_static_transforms_are_remembered_and_dynamic_ones_still_run(engine):
    # a cleanup transform that counts its calls (adding it is a new configuration)
    setup = ("static_calls = []\n"
             "def _static(lines):\n"
             "    static_calls.append(''.join(lines))\n"
             "    return [line.replace('SEVEN', '7') for line in lines]\n"
             "get_ipython().input_transformers_cleanup.append(_static)\n"
             "magic_runs = []\n"
             "def _probe(line):\n"
             "    magic_runs.append(line)\n"
             "get_ipython().register_magic_function(_probe, 'line', 'probe_magic')\n")
    assert engine.execute(setup)["content"]["status"] == "ok"
    try:
        for _ in range(3):
            assert engine.execute("seven = SEVEN")["content"]["status"] == "ok"
        calls = engine.apply_value(ops.pull, "static_calls")
        assert calls.count("seven = SEVEN\n") == 1  # transformed once, then remembered
        assert engine.apply_value(ops.pull, "seven") == 7
        # the namespace-dependent part runs every time: a bare name is an automagic
        # call while no variable has that name, then the variable
        assert engine.execute("probe_magic")["content"]["status"] == "ok"
        assert engine.apply_value(ops.pull, "magic_runs") == [""]
        engine.apply_value(ops.push, {"probe_magic": 5})
        assert engine.execute("probe_magic")["content"]["status"] == "ok"
        assert engine.apply_value(ops.pull, "magic_runs") == [""]
    finally:
        engine.execute("get_ipython().input_transformers_cleanup.remove(_static)")
    # another configuration: the same text is transformed again, the new way
    engine.execute("seven = 'SEVEN'")
    assert engine.apply_value(ops.pull, "seven") == "SEVEN"


def test_forged_and_garbage_messages_are_dropped(engine):
    forged = engine.session.msg("apply_request", {})
    frames = engine.session.serialize(forged)
    frames[1] = b"0" * len(frames[1])  # wrong signature
    engine.shell.send_multipart(frames)
    other = FarmSession(key=b"not-the-key", signature_scheme="hmac-sha256")
    other.send(engine.shell, "execute_request", {"code": "forged = 1"})
    for garbage in ([b"garbage"], [DELIM], [DELIM, b"sig", b"{", b"}", b"x", b"y"],
                    [b"\xff" * 10] * 40):
        engine.shell.send_multipart(garbage)
    assert not engine.shell.poll(300)  # nothing answered
    assert engine.apply_value(lambda: 9) == 9  # still serving
    assert engine.apply(ops.pull, "forged")["content"]["ename"] == "NameError"


def test_kernelspec_standalone_kernel(tmp):
    spec = json.loads((REPO / "jupyter-config/kernels/ipyfarm-engine/kernel.json").read_text())
    assert spec["display_name"] == "ipyfarm engine"
    cf = str(tmp / "standalone.json")
    write_connection_file(cf, ip="127.0.0.1", key=KEY.encode())
    argv = [sys.executable if a == "python" else a for a in spec["argv"]]
    argv = [cf if a == "{connection_file}" else a for a in argv]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=open(str(tmp / "sa.out"), "wb"),
                            stderr=subprocess.STDOUT)
    try:
        kc = BlockingKernelClient(connection_file=cf)
        kc.load_connection_file()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=20)
            reply = kc.execute_interactive("x = 2 ** 10", timeout=WAIT,
                                           user_expressions={"x": "x"})
            assert reply["content"]["user_expressions"]["x"]["data"]["text/plain"] == "1024"
            kc.shutdown()
            proc.wait(10)
        finally:
            kc.stop_channels()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _extra_engine(tmp, name, *extra):
    controller = FakeController(tmp, name)
    return controller, Engine(controller, tmp, *extra)


@pytest.mark.parametrize("how", ["SIGTERM", "shutdown_request"])
def test_clean_exit_unregisters_and_removes_connection_file(tmp, how):
    controller, engine = _extra_engine(tmp, how)
    try:
        path = Path(engine.wait_registered()["connection_file"])
        if how == "SIGTERM":
            engine.proc.send_signal(signal.SIGTERM)
        else:
            ctl = engine.send(engine.control, "shutdown_request", {"restart": False})
            assert engine.reply(engine.control, ctl)["msg_type"] == "shutdown_reply"
        try:
            code = engine.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the engine did not exit within 10 s:\n{engine.stderr()}")
        assert code == 0, engine.stderr()
        if "Python's exit did not finish" in engine.stderr():
            # a clean stop whose interpreter teardown hung and was ended by TERM_GRACE:
            # not a failure for the user, but where it hung is worth knowing
            warnings.warn(f"engine teardown was forced:\n{engine.stderr()}", stacklevel=1)
        assert not path.exists()
        _wait_unregistered(controller, 2)
    finally:
        engine.kill()
        controller.close()


def _wait_unregistered(controller, timeout):
    deadline = time.monotonic() + timeout
    while "unregistration_request" not in controller.received:
        assert time.monotonic() < deadline, controller.received
        time.sleep(0.02)


def test_sigterm_forces_out_a_task_that_swallows_the_stop(tmp):
    """A task that catches BaseException keeps SIGTERM's EngineExit from ending the
    engine; after TERM_GRACE the engine reports where it was, unregisters, removes its
    connection file and exits (before the launcher's SIGKILL would, at 5 s), with 0 as
    a stop that was asked for (a cluster with restart_engines does not replace it)."""
    from ipyfarm.engine.app import TERM_GRACE

    controller, engine = _extra_engine(tmp, "stubborn")
    try:
        path = Path(engine.wait_registered()["connection_file"])
        engine.send(engine.shell, "execute_request", {"code": (
            "import time\n"
            "print('looping', flush=True)\n"
            "while True:\n"
            "    try:\n"
            "        time.sleep(0.02)\n"
            "    except BaseException:\n"
            "        pass\n")})
        engine.iopub_until(lambda m: m["msg_type"] == "stream"
                           and "looping" in m["content"]["text"])
        sent = time.monotonic()
        engine.proc.send_signal(signal.SIGTERM)
        assert engine.proc.wait(TERM_GRACE + 5) == 0, engine.stderr()
        took = time.monotonic() - sent
        assert TERM_GRACE - 0.5 < took < TERM_GRACE + 4, took
        err = engine.stderr()
        assert f"did not stop within {TERM_GRACE:g} s of SIGTERM" in err, err
        assert "catches BaseException" in err, err
        assert "most recent call first" in err, err  # faulthandler's dump of the threads
        assert not path.exists()
        _wait_unregistered(controller, 5)
    finally:
        engine.kill()
        controller.close()


def test_exits_when_controller_forgets_it_or_parent_dies(tmp):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    c1, forgotten = _extra_engine(tmp, "unknown")
    c2, orphan = _extra_engine(tmp, "parent", "--parent-pid", str(sleeper.pid))
    try:
        c1.heartbeat_status = "unknown"
        forgotten.wait_registered()
        orphan.wait_registered()
        assert forgotten.proc.wait(10) == 1
        assert "no longer knows" in forgotten.stderr()
        sleeper.kill()
        sleeper.wait(5)
        assert orphan.proc.wait(10) == 1
        assert "parent process" in orphan.stderr()
    finally:
        sleeper.kill()
        for e, c in ((forgotten, c1), (orphan, c2)):
            e.kill()
            c.close()


def test_exits_when_controller_stops_answering(engine, controller):
    # runs last: it ends the module's engine
    path = Path(engine.info["connection_file"])
    controller.answer = False
    t0 = time.monotonic()
    assert engine.proc.wait(15) == 1
    assert time.monotonic() - t0 < 15
    assert "has not answered heartbeats" in engine.stderr()
    assert not path.exists()

