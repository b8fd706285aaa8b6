"""Injected faults: killed engines, a killed host, garbage and forged frames, the CLI's cleanup."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import zmq

import ipyfarm as ipp
from ipyfarm import error
from ipyfarm.protocol.session import DELIM, FarmSession, split_identities

from .conftest import alive, kill_pids, wait_until



def test_engine_killed_mid_task_raises_engine_error_fast(cluster, rc):
    c = cluster[0]
    (pid,) = c.start_engines_sync(1)
    try:
        rc.wait_for_engines(3, timeout=30)
        engine_id = max(rc.ids)
        assert rc[engine_id].apply_sync(os.getpid) == pid
        conn_file = rc[engine_id].apply_sync(_own_connection_file)
        assert os.path.exists(conn_file)
        ar = rc[engine_id].apply_async(time.sleep, 60)
        time.sleep(0.2)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(error.EngineError, match=r"SIGKILL"):
            ar.get(timeout=5)
        took = time.monotonic() - t0
        assert took < 3, took  # the promise for local engines (process watch)
        print(f"killed engine's task failed {took:.2f} s after SIGKILL")
        assert wait_until(lambda: engine_id not in rc.ids, 5)
        with pytest.raises(IndexError):
            rc[engine_id]
        assert rc[:].apply_sync(lambda: 1) == [1, 1]  # the others serve on
        # the killed engine could not remove its connection file: its launcher did
        assert wait_until(lambda: not os.path.exists(conn_file), 5), conn_file
    finally:
        kill_pids([pid])


def _own_connection_file():
    import ipykernel

    return ipykernel.get_connection_file()


def _send_raw(url, frames, kind=zmq.DEALER):
    ctx = zmq.Context.instance()
    s = ctx.socket(kind)
    s.linger = 0
    s.connect(url)
    time.sleep(0.05)
    s.send_multipart(frames)
    time.sleep(0.05)
    s.close(0)


def test_garbage_and_forged_messages_are_dropped(cluster, rc):
    hub = cluster[0].controller.hub
    info = cluster[0].controller.connection_info()
    before = sum(hub.dropped.values())
    forger = FarmSession(key=b"not-the-key")
    forged = forger.serialize_with_buffers(forger.msg("hub_shutdown_request",
                                                      {"targets": None, "hub": True}), None, [])
    garbage = [
        [b"hello"],
        [DELIM, b"sig"],
        [DELIM, b"sig", b"{", b"{}", b"{}", b"{}"],
        [b"\x00" * 100] * 50,
        forged,
    ]
    for url in (info["client"], info["registration"]):
        for frames in garbage:
            _send_raw(url, frames)
    assert wait_until(lambda: sum(hub.dropped.values()) - before >= 8, 5)
    # engines' shell ports too
    cf = json.load(open(rc.engines[0]["connection_file"]))
    for port in ("shell_port", "control_port", "stdin_port"):
        for frames in garbage:
            _send_raw(f"tcp://127.0.0.1:{cf[port]}", frames)
    # a message replayed verbatim is refused
    real = FarmSession(key=info["key"].encode())
    frames = real.serialize_with_buffers(real.msg("history_request", {}), None, [])
    _send_raw(info["client"], frames)
    n = hub.dropped["signature"]
    _send_raw(info["client"], frames)
    assert wait_until(lambda: hub.dropped["signature"] > n, 5)
    # so is a copy of a message from a client of this process, whose signature the
    # controller does not compute again but still remembers
    seen = []
    post_task = rc._io._post_task
    rc._io._post_task = lambda frames, *more: (seen.append(list(frames)),
                                               post_task(frames, *more))[1]
    try:
        marker = rc[0].apply_async(lambda: 41 + 1)
        assert marker.get(10) == 42
    finally:
        rc._io._post_task = post_task
    (local,) = seen
    _, rest = split_identities(local)
    n = hub.dropped["signature"]
    _send_raw(info["client"], [DELIM, *rest])
    assert wait_until(lambda: hub.dropped["signature"] > n, 5)
    # service continues everywhere
    assert rc[:].apply_sync(lambda: "ok") == ["ok", "ok"]
    assert not hub.stopped.is_set()


HOST = textwrap.dedent("""
    import os, sys, time, json
    import ipyfarm as ipp
    c = ipp.Cluster(n=2, profile="host-%d" % os.getpid())
    rc = c.start_and_connect_sync()
    print(json.dumps(c.launcher.pids), flush=True)
    time.sleep(120)
""")


def test_engines_exit_when_their_host_is_killed():
    proc = subprocess.Popen([sys.executable, "-c", HOST], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    pids = []
    try:
        line = proc.stdout.readline()
        pids = json.loads(line)
        assert len(pids) == 2 and all(alive(p) for p in pids)
        proc.kill()
        proc.wait(5)
        t0 = time.monotonic()
        assert wait_until(lambda: not any(alive(p) for p in pids), 10), "orphaned engines"
        print(f"engines gone {time.monotonic() - t0:.2f} s after SIGKILL of their host")
    finally:
        proc.kill()
        proc.wait(5)
        kill_pids(pids)


def _engine_pids_of(controller_pid):
    try:
        return [p.pid for p in psutil.Process(controller_pid).children()]
    except psutil.Error:
        return []


def test_cli_start_list_stop_leaves_nothing(tmp_path):
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path))
    cli = [sys.executable, "-m", "ipyfarm"]
    out = subprocess.run(cli + ["start", "-n", "2", "--daemonize", "--profile", "t"],
                         env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    info = json.load(open(tmp_path / "ipyfarm-cluster-t.json"))
    ctl_pid = info["pid"]
    engines = _engine_pids_of(ctl_pid)
    try:
        assert len(engines) == 2
        listing = subprocess.run(cli + ["list"], env=env, capture_output=True, text=True,
                                 timeout=30)
        assert "t " in listing.stdout and str(ctl_pid) in listing.stdout
        # a client in another process connects by profile
        code = ("import ipyfarm as ipp; rc = ipp.Client(profile='t'); "
                "print(sum(rc[:].apply_sync(lambda: 1))); rc.close()")
        got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=60)
        assert got.stdout.strip() == "2", got.stderr
        stop = subprocess.run(cli + ["stop", "--profile", "t"], env=env, capture_output=True,
                              text=True, timeout=30)
        assert stop.returncode == 0, stop.stderr
        assert wait_until(lambda: not any(alive(p) for p in [ctl_pid, *engines]), 10)
        assert not (tmp_path / "ipyfarm-cluster-t.json").exists()
    finally:
        kill_pids([ctl_pid, *engines])


def test_shutdown_hub_from_client_stops_everything(tmp_path):
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "ipyfarm", "start", "-n", "1", "--daemonize",
                          "--profile", "s"], env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    info = json.load(open(tmp_path / "ipyfarm-cluster-s.json"))
    engines = _engine_pids_of(info["pid"])
    try:
        rc = ipp.Client(url_file=tmp_path / "ipyfarm-cluster-s.json")
        rc.shutdown(hub=True)
        rc.close()
        assert wait_until(lambda: not any(alive(p) for p in [info["pid"], *engines]), 10)
    finally:
        kill_pids([info["pid"], *engines])


def test_kernelspec_installs_and_jupyter_starts_an_engine_kernel(tmp_path, monkeypatch):
    """The ipyfarm-engine kernelspec launches a real FarmKernel through jupyter_client."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import start_new_kernel

    from ipyfarm.cli import install_kernelspec

    where = install_kernelspec(prefix=str(tmp_path))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share" / "jupyter" / "kernels")])
    assert "ipyfarm-engine" in ksm.find_kernel_specs(), where
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    outputs = []
    km, kc = start_new_kernel(kernel_name="ipyfarm-engine", startup_timeout=30)
    try:
        reply = kc.execute_interactive(
            "print(type(get_ipython().kernel).__name__)", timeout=15,
            output_hook=lambda msg: outputs.append(msg))
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
    assert "FarmKernel" in text



# ---- malformed input at every port, counted ---------------------------------------------
# Kinds: garbage frames, a wrong signature (another cluster's key), a replay of a message
# that was accepted once, a correctly signed message of a type the port does not serve.
# An oversize kind is not sent: no port has a frame or message size limit yet.

GARBAGE = [
    [b"hello"],
    [DELIM, b"sig"],
    [DELIM, b"sig", b"{", b"{}", b"{}", b"{}"],
    [b"\x00" * 100] * 50,
    [DELIM, b"0" * 64, b"{}", b"{}", b"{}", b"{}", b"buffer"],
]


class _Peer:
    """A DEALER connected to one port: sends frames, counts what comes back."""

    def __init__(self, url):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(url)

    def send(self, frames):
        self.sock.send_multipart(frames)

    def replies(self, wait=0.3, upto=None):
        n = 0
        while (upto is None or n < upto) and self.sock.poll(int(wait * 1000)):
            self.sock.recv_multipart()
            n += 1
        return n

    def close(self):
        self.sock.close(0)


def _signed(session, msg_type, content, buffers=()):
    return session.serialize_with_buffers(session.msg(msg_type, content), None, list(buffers))


def _controller_row(hub, peer, kind, messages, legit=None):
    """Send ``messages`` of one kind; accepted = sent - newly dropped (or answered)."""
    if legit is not None:  # the original of a replay: accepted once, as it should be
        peer.send(legit)
        assert peer.replies(wait=5, upto=1) == 1
    before = sum(hub.dropped.values())
    for frames in messages:
        peer.send(frames)
    sent = len(messages)
    wait_until(lambda: sum(hub.dropped.values()) - before >= sent, 5)
    answered = peer.replies()
    dropped = sum(hub.dropped.values()) - before
    return kind, sent, max(sent - dropped, answered)


def _controller_rows(cluster, rc):
    hub = cluster[0].controller.hub
    key = cluster[0].controller.connection_info()["key"].encode()
    info = cluster[0].controller.connection_info()
    real, forger = FarmSession(key=key), FarmSession(key=b"not-the-key")
    engine_uuid = rc.engines[0]["uuid"] if "uuid" in rc.engines[0] else "x"
    rows = []
    for port, replayed, wrong_types in [
        ("client", ("history_request", {}),
         [("unregistration_request", {"uuid": engine_uuid}),
          ("registration_request", {"uuid": "intruder"}), ("heartbeat_request", {"uuid": "x"})]),
        ("registration", ("heartbeat_request", {"uuid": "nobody"}),
         [("hub_shutdown_request", {"targets": None, "hub": True}),
          ("hub_clear_request", {"targets": None}), ("apply_request", {}),
          ("history_request", {})]),
    ]:
        peer = _Peer(info[port])
        try:
            forged = [_signed(forger, "hub_shutdown_request", {"targets": None, "hub": True}),
                      _signed(forger, *replayed)]
            legit = _signed(real, *replayed)
            wrong = [_signed(real, t, c) for t, c in wrong_types]
            for kind, messages, first in [("garbage frames", GARBAGE, None),
                                          ("wrong signature", forged, None),
                                          ("replayed", [legit, legit], legit),
                                          ("type not served here", wrong, None)]:
                rows.append((f"controller {port}", *_controller_row(hub, peer, kind, messages,
                                                                      first)))
        finally:
            peer.close()
    return rows


def _trace_code(flag, kind):
    return f"open({str(flag)!r}, 'a').write({kind!r} + '\\n')"


def _trace_apply(flag, kind):
    from ipyfarm.protocol.serialize import pack_apply

    def leave_trace():
        open(flag, "a").write(kind + "\n")

    leave_trace.__module__ = "__main__"  # pickled by value: the engine can't import tests
    return pack_apply(leave_trace, (), {})


def _engine_rows(rc, tmp_path):
    """Shell, control and stdin of one engine; accepted = replies + traces left."""
    cf = json.load(open(rc.engines[0]["connection_file"]))
    engine_id = rc.ids[0]
    real, forger = FarmSession(key=cf["key"].encode()), FarmSession(key=b"not-the-key")
    flag = tmp_path / "traces"
    rc[engine_id].push({"canary": 42}).get(timeout=10)
    rows = []
    for port in ("shell", "control", "stdin"):
        peer = _Peer(f"tcp://127.0.0.1:{cf[port + '_port']}")
        try:
            def traced(kind, session=real, port=port):
                return _signed(session, "execute_request",
                               {"code": _trace_code(flag, f"{port} {kind}"), "silent": True,
                                "store_history": False, "user_expressions": {},
                                "allow_stdin": False})

            if port == "shell":  # control-only and controller-only types
                wrong = [_signed(real, "clear_request", {}),
                         _signed(real, "hub_shutdown_request", {"targets": None, "hub": True})]
            elif port == "control":  # apply is served on shell only
                wrong = [_signed(real, "apply_request", {},
                                 _trace_apply(str(flag), "control wrong type"))]
            else:  # stdin carries input replies only, and only while a task asks
                wrong = [traced("wrong type")]
            legit = traced("replayed")
            for kind, messages in [("garbage frames", GARBAGE),
                                   ("wrong signature", [traced("wrong signature", forger)]),
                                   ("replayed", [legit]),
                                   ("type not served here", wrong)]:
                if kind == "replayed":
                    peer.send(legit)
                    if port != "stdin":
                        assert peer.replies(wait=5, upto=1) == 1, f"engine {port}: not served"
                        assert wait_until(lambda: flag.exists(), 5)
                for frames in messages:
                    peer.send(frames)
                answered = peer.replies(wait=0.5)
                traces = flag.read_text().splitlines() if flag.exists() else []
                left = sum(1 for t in traces if t == f"{port} {kind}")
                if kind == "replayed" and port != "stdin":
                    left -= 1  # the original's own trace
                rows.append((f"engine {port}", kind, len(messages), answered + left))
        finally:
            peer.close()
    assert rc[engine_id].pull("canary").get(timeout=10) == 42, "a clear_request on the shell was served"
    return rows


def _hb_row(rc):
    """The heartbeat port echoes bytes by design and interprets nothing."""
    cf = json.load(open(rc.engines[0]["connection_file"]))
    s = zmq.Context.instance().socket(zmq.REQ)
    s.linger = 0
    s.connect(f"tcp://127.0.0.1:{cf['hb_port']}")
    try:
        for frames in GARBAGE:
            s.send_multipart(frames)
            assert s.poll(5000) and s.recv_multipart() == frames  # echoed, nothing more
    finally:
        s.close(0)
    return ("engine hb", "garbage frames (echoed)", len(GARBAGE), 0)


def test_malformed_input_at_every_port_is_never_accepted(cluster, rc, tmp_path):
    hub = cluster[0].controller.hub
    ids, history = list(rc.ids), set(rc.hub_history())
    rows = _controller_rows(cluster, rc) + _engine_rows(rc, tmp_path) + [_hb_row(rc)]
    lines = ["| port | kind | sent | accepted |", "|---|---|---:|---:|"]
    lines += [f"| {port} | {kind} | {sent} | {accepted} |" for port, kind, sent, accepted in rows]
    print("\n" + "\n".join(lines))
    assert all(accepted == 0 for *_, accepted in rows), rows
    # no state changed, and service continues everywhere
    assert not hub.stopped.is_set()
    assert rc.ids == ids
    assert set(rc.hub_history()) - history <= set(rc.history)  # only this test's push, pull
    assert rc[:].apply_sync(lambda: "ok") == ["ok"] * len(ids)



TWENTY = textwrap.dedent("""
    import json, os, sys, time
    from concurrent.futures import ThreadPoolExecutor, wait
    import ipyfarm as ipp

    def one(i):
        c = ipp.Cluster(n=1, profile="many-%d-%d" % (os.getpid(), i))
        try:
            rc = c.start_and_connect_sync()
            pid = rc[:].apply_sync(os.getpid)[0]
            rc.close()
            return pid
        finally:
            c.stop_cluster_sync()

    t0 = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(one, i) for i in range(20)]
        done, pending = wait(futures, timeout=100)
        if pending:
            sys.exit("%d of 20 clusters did not finish within 100 s" % len(pending))
    print(json.dumps({"pids": [f.result() for f in futures],
                      "seconds": time.monotonic() - t0}), flush=True)
""")


@pytest.mark.timeout(150)
def test_twenty_clusters_started_at_once_leave_nothing_behind(tmp_path):
    """In a child process, so that a crash (or a hang) fails this test, not the suite."""
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", TWENTY], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the engines it started too
        out, err = proc.communicate()
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-3000:]}"
    got = json.loads(out.strip().splitlines()[-1])
    pids = got["pids"]
    print(f"20 clusters started, ran a task and stopped in {got['seconds']:.1f} s")
    assert len(set(pids)) == 20  # twenty distinct engines ran the tasks
    assert wait_until(lambda: not any(alive(p) for p in pids), 10), \
        "engines left behind"
    assert not [f for f in os.listdir(tmp_path) if f.startswith("ipyfarm-")], \
        os.listdir(tmp_path)


def test_an_engine_uuid_given_on_the_command_line_must_be_a_uuid():
    from traitlets import TraitError

    from ipyfarm.engine.app import FarmEngineApp

    app = FarmEngineApp()
    with pytest.raises(TraitError, match="must be a UUID"):
        app.engine_uuid = "../../etc/passwd"  # names a file: no paths
    app.engine_uuid = "65C859B5-E05C-4C6B-9FA7-FF0CA564F129"
    assert app.engine_uuid == "65c859b5-e05c-4c6b-9fa7-ff0ca564f129"
