"""CurveZMQ encryption (docs/security.md): the policy, and a real cluster with curve=True.

On loopback Curve is off by default; ``curve=True`` forces it, so every socket of this
module's cluster (controller, engines, a TCP client) runs the Curve handshake. Peers
without the cluster's public key get no answer (bounded waits) and the cluster serves on.
The multi-host test, with a traffic capture, is tests/test_netns.py.
"""

import json
import logging
import os
import queue
import time

import numpy as np
import pytest
import zmq

from ipyfarm import curve
from ipyfarm.cli import _controller_argv, build_parser
from ipyfarm.client.client import Client
from ipyfarm.controller.hub import Hub
from ipyfarm.protocol.curve import is_loopback, keys_from, wanted
from ipyfarm.protocol.session import FarmSession

from .conftest import running_cluster

NO_ANSWER_WAIT = 3.0  # seconds a peer without the key waits for a reply that must not come


# ---------------------------------------------------------------- policy (pure)
@pytest.mark.parametrize("ip, on", [
    ("127.0.0.1", False), ("127.3.2.1", False), ("localhost", False), ("::1", False),
    ("[::1]", False), ("0.0.0.0", True), ("*", True), ("10.1.2.3", True),
    ("192.168.0.7", True), ("::", True), ("node17.cluster", True),
])
def test_curve_is_on_by_default_exactly_beyond_loopback(ip, on):
    assert wanted(ip) is on
    assert is_loopback(ip) is not on
    assert wanted(ip, curve=True) is True and wanted(ip, curve=False) is False


def test_keys_are_read_from_the_controller_file_fields():
    public, secret = curve.new_keypair()
    assert len(public) == len(secret) == 40 and public != secret
    assert keys_from(curve.record(public, secret)) == (public, secret)
    assert keys_from({"key": "abc"}) is None
    assert keys_from({"curve_publickey": public}) is None  # half a keypair: plain


def test_cli_switches_reach_the_daemonized_controller():
    for flags, expected in (([], None), (["--curve"], True), (["--no-curve"], False)):
        args = build_parser().parse_args(["start", "--daemonize", "--ip", "10.0.0.1", *flags])
        assert args.curve is expected
        argv = _controller_argv(args)
        again = build_parser().parse_args(argv[3:])
        assert again.curve is expected, argv


def test_a_hub_beyond_loopback_encrypts_and_curve_false_warns(caplog):
    hub = Hub(ip="0.0.0.0")
    try:
        info = hub.connection_info()
        assert keys_from(info) == hub.curve_keys and hub.curve_keys is not None
        assert hub.client_sock.curve_server and hub.reg_sock.curve_server
    finally:
        hub.start()
        hub.stop()
    with caplog.at_level(logging.WARNING, logger="ipyfarm.controller"):
        plain = Hub(ip="0.0.0.0", curve=False)
    try:
        assert plain.curve_keys is None and keys_from(plain.connection_info()) is None
        assert not plain.client_sock.curve_server
        assert any("plain text" in r.getMessage() for r in caplog.records)
    finally:
        plain.start()
        plain.stop()
    loop = Hub()  # loopback: plain, no warning
    try:
        assert loop.curve_keys is None
    finally:
        loop.start()
        loop.stop()


# ---------------------------------------------------------------- a real cluster
@pytest.fixture(scope="module")
def cluster():
    with running_cluster(2, profile=f"test-curve-{os.getpid()}", curve=True) as (c, rc):
        yield c, rc


@pytest.fixture(scope="module")
def tcp_client(cluster):
    """A client over TCP (its own zmq context: not the in-process hand-off)."""
    ctx = zmq.Context()
    rc = Client(cluster[0].controller.file, context=ctx, timeout=30)
    try:
        yield rc
    finally:
        rc.close()
        ctx.term()


def _info(cluster):
    with open(cluster[0].controller.file) as f:
        return json.load(f)


def test_the_cluster_runs_curve_everywhere(cluster, tcp_client):
    c, rc = cluster
    info = _info(cluster)
    keys = keys_from(info)
    assert keys is not None and keys == c.controller.hub.curve_keys
    assert oct(os.stat(c.controller.file).st_mode & 0o777) == "0o600"
    hub = c.controller.hub
    assert hub.client_sock.curve_server and hub.reg_sock.curve_server
    assert tcp_client._io.sock.mechanism == tcp_client._io.out.mechanism == zmq.CURVE
    assert len(hub._engine_socks) == 2
    for socks in hub._engine_socks.values():  # the controller's sockets to each engine
        assert [s.mechanism for s in socks[:3]] == [zmq.CURVE] * 3
        assert not any(s.curve_server for s in socks[:3])
    assert len(rc.engines) == 2
    for engine in rc.engines.values():
        with open(engine["connection_file"]) as f:
            kernel = json.load(f)
        # the engine's kernel serves Curve with the cluster keypair, recorded the way
        # Jupyter's own connection files record it
        assert (kernel["curve_publickey"], kernel["curve_secretkey"]) == keys


@pytest.mark.parametrize("which", ["embedded", "tcp"])
def test_work_runs_end_to_end(cluster, tcp_client, which):
    rc = cluster[1] if which == "embedded" else tcp_client
    dview = rc[:]
    assert dview.apply_sync(lambda x: x * 2, 21) == [42, 42]
    arr = np.arange(1_000_000, dtype=np.float64)  # 8 MB: zero-copy buffer frames
    dview.push({"arr": arr, "tag": which}, block=True)
    assert dview.pull("tag", block=True) == [which, which]
    back = rc[0].pull("arr", block=True)
    assert np.array_equal(back, arr)
    dview.execute("total = float(arr.sum())", block=True)
    assert rc[1]["total"] == float(arr.sum())
    lview = rc.load_balanced_view()
    assert lview.map_sync(lambda x: x * x, range(40)) == [x * x for x in range(40)]


def _signed(session, msg_type, content):
    return session.serialize_with_buffers(session.msg(msg_type, content), None, [])


def _answered(probes, wait):
    """Send each ``(url, frames, server_key or None)`` from a fresh DEALER, all at once;
    for each, whether anything came back within ``wait`` s."""
    socks = []
    try:
        for url, frames, server_key in probes:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.linger = 0
            socks.append(sock)
            curve.connect_as_client(sock, server_key)
            sock.connect(url)
            sock.send_multipart(frames)
        poller = zmq.Poller()
        for sock in socks:
            poller.register(sock, zmq.POLLIN)
        answered: set = set()
        deadline = time.monotonic() + wait
        while len(answered) < len(socks) and time.monotonic() < deadline:
            for sock, _ in poller.poll(max(0, deadline - time.monotonic()) * 1000):
                answered.add(sock)
                poller.unregister(sock)
        return [sock in answered for sock in socks]
    finally:
        for sock in socks:
            sock.close(0)


def test_peers_without_the_server_key_get_no_answer(cluster, tcp_client):
    c, rc = cluster
    info = _info(cluster)
    session = FarmSession(key=info["key"].encode())  # the right HMAC key, even
    wrong_key, _ = curve.new_keypair()
    kernel = json.load(open(rc.engines[0]["connection_file"]))
    shell = f"tcp://{kernel['ip']}:{kernel['shell_port']}"
    t0 = time.monotonic()
    # correctly signed requests: plain text and Curve with a wrong server key to the
    # controller, plain text to an engine's shell (an execute_request that must not run)
    probes = [
        (info["client"], _signed(session, "connection_request", {}), None),
        (info["client"], _signed(session, "connection_request", {}), wrong_key),
        (info["registration"], _signed(session, "heartbeat_request",
                                       {"uuid": "x", "rss": None}), None),
        (shell, _signed(session, "execute_request", {"code": "pwned = 1", "silent": False}),
         None),
    ]
    assert _answered(probes, NO_ANSWER_WAIT) == [False] * len(probes)
    assert time.monotonic() - t0 < NO_ANSWER_WAIT + 10
    # with the right key the same request is answered: the wait above was long enough
    right = [(info["client"], _signed(session, "connection_request", {}), keys_from(info)[0])]
    assert _answered(right, 30) == [True]
    # and the cluster serves on, untouched
    assert rc[0].apply_sync(lambda: "pwned" in globals()) is False
    assert tcp_client[:].apply_sync(lambda: "ok") == ["ok", "ok"]
    assert not c.controller.hub.stopped.is_set()


def test_a_jupyter_client_attaches_with_the_engine_connection_file(cluster, tmp_path):
    """Jupyter clients that read Curve keys from a connection file attach to an engine;
    one that leaves them out gets no answer (docs/security.md)."""
    from jupyter_client import BlockingKernelClient

    rc = cluster[1]
    cf = rc.engines[1]["connection_file"]
    kc = BlockingKernelClient(connection_file=cf)
    kc.load_connection_file()
    if getattr(kc, "curve_publickey", None) is None:
        pytest.skip("this jupyter_client does not read Curve keys from connection files")
    kc.start_channels()
    try:
        kc.execute("attached_value = 6 * 7")
        reply = kc.get_shell_msg(timeout=30)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
    assert rc[1].pull("attached_value", block=True) == 42
    with open(cf) as f:
        plain_info = {k: v for k, v in json.load(f).items() if not k.startswith("curve_")}
    plain_file = tmp_path / "plain.json"
    plain_file.write_text(json.dumps(plain_info))
    plain = BlockingKernelClient(connection_file=str(plain_file))
    plain.load_connection_file()
    plain.start_channels()
    # once the refused handshake has dropped the connection, a DEALER with no peer
    # blocks on send: bound it (refused either way: nothing goes out, or no answer)
    plain.shell_channel.socket.setsockopt(zmq.SNDTIMEO, int(NO_ANSWER_WAIT * 1000))
    try:
        try:
            plain.execute("attached_value = 0")
        except zmq.Again:
            pass
        else:
            with pytest.raises(queue.Empty):  # the kernel never answers plain text
                plain.get_shell_msg(timeout=NO_ANSWER_WAIT)
    finally:
        plain.stop_channels()
    assert rc[1].pull("attached_value", block=True) == 42


def test_an_engine_without_the_curve_key_is_refused_and_told_why(cluster):
    """--url/--key carry no Curve key: the handshake fails, registration times out and
    the engine exits saying what to pass instead."""
    import subprocess
    import sys

    info = _info(cluster)
    before = set(cluster[1].ids)
    proc = subprocess.run(
        [sys.executable, "-m", "ipyfarm.engine", "--url", info["registration"], "--key",
         info["key"], "--registration-timeout", "2"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "registration failed" in proc.stderr and "--controller-file" in proc.stderr
    assert set(cluster[1].ids) == before
