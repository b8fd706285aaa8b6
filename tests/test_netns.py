"""Two hosts for real: Linux network namespaces joined by a veth pair, traffic captured.

::

    namespace "controller" (10.N.M.1)            namespace "engines" (10.N.M.2)
    ipyfarm controller --ip 10.N.M.1  ◄── veth ──►  2 engines (python -m ipyfarm.engine)
    tcpdump on its veth end                          a client (Client(url_file=...))

Every byte between controller, engines and client crosses the veth, where tcpdump
captures it. With Curve on (the default beyond loopback) engines register, work runs,
the ZMTP greetings name the CURVE mechanism, and a distinctive marker that travels in
code, arguments, results and output never appears in the capture. The same run with
``--no-curve`` finds the marker in the capture (the capture does see the traffic).

Needs root (``ip netns``) and tcpdump (Debian package ``tcpdump``, in .ci/run).
docs/security.md explains what this proves.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ipyfarm import paths

from .conftest import kill_pids, wait_until

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                       reason="network namespaces need root (ip netns); run the suite as root"),
    pytest.mark.skipif(shutil.which("ip") is None or shutil.which("tcpdump") is None,
                       reason="needs `ip` (iproute2) and tcpdump: apt-get install iproute2 "
                       "tcpdump (.ci/run installs them)"),
]

TAG = os.getpid() % 100000
NS_CTL, NS_ENG = f"ipf{TAG}c", f"ipf{TAG}e"
VETH_CTL, VETH_ENG = f"vpf{TAG}c", f"vpf{TAG}e"  # at most 15 characters
SUBNET = f"10.{77 + TAG % 100}.{TAG % 250}"
CTL_IP, ENG_IP = f"{SUBNET}.1", f"{SUBNET}.2"
MARKER = f"IPYFARM-PLAINTEXT-MARKER-{TAG:05d}"

# runs in the engines' namespace: argv = controller file, marker; prints one JSON line
CLIENT = r"""
import json, os, sys
import zmq
from ipyfarm.client.client import Client

file, marker = sys.argv[1], sys.argv[2]
rc = Client(url_file=file, timeout=60)
rc.wait_for_engines(2, timeout=60)
dview = rc[:]
out = {"ids": rc.ids,
       "engine_ips": [e["connection_info"]["ip"] for e in rc.engines.values()],
       "curve": rc._io.sock.mechanism == zmq.CURVE}
out["apply"] = dview.apply_sync(lambda m: m + "-result", marker)
out["map"] = rc.load_balanced_view().map_sync(lambda s: s[::-1][::-1] + "-mapped",
                                              [marker + str(i) for i in range(6)])
dview.execute(f"echoed = {marker!r} * 2; print({marker!r})", block=True)
out["pulled"] = dview.pull("echoed", block=True)
out["pids"] = dview.apply_sync(os.getpid)
rc.close()
print(json.dumps(out), flush=True)
"""


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=check)


def _add_netns(name):
    """``ip netns add name``; skips the module where this root may not make one."""
    made = _ip("netns", "add", name, check=False)
    if made.returncode and "Operation not permitted" in made.stderr:
        pytest.skip(f"this root may not make network namespaces (a container without "
                    f"CAP_SYS_ADMIN?): {made.stderr.strip()}")
    made.check_returncode()


def _tcpdump(dev, pcap):
    """tcpdump writing every TCP packet on ``dev`` to ``pcap`` as it comes.

    --immediate-mode: without it libpcap hands packets over a ring-buffer block at a
    time, and a block not yet full when tcpdump is stopped is lost (a run of a few
    seconds then captured nothing, about one time in two)."""
    return ["tcpdump", "-i", dev, "-n", "-U", "--immediate-mode", "-s", "0", "-Z", "root",
            "-w", str(pcap), "tcp"]


@pytest.fixture(scope="module")
def hosts():
    """Two namespaces and a veth pair between them; removed however the module ends."""
    try:
        _add_netns(NS_CTL)
        _ip("netns", "add", NS_ENG)
        _ip("link", "add", VETH_CTL, "type", "veth", "peer", "name", VETH_ENG)
        for ns, dev, ip in ((NS_CTL, VETH_CTL, CTL_IP), (NS_ENG, VETH_ENG, ENG_IP)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        # deleting a namespace deletes the veth end in it, and with it the pair
        _ip("netns", "del", NS_CTL, check=False)
        _ip("netns", "del", NS_ENG, check=False)
        _ip("link", "del", VETH_CTL, check=False)  # still here if setup failed early
    assert NS_CTL not in _ip("netns", "list").stdout


def _in(ns, *cmd):
    """The command line running ``cmd`` in namespace ``ns`` (ip execs it: same pid)."""
    return ["ip", "netns", "exec", ns, *cmd]


def _stop(procs, grace=5.0):
    """SIGTERM then, after ``grace`` s, SIGKILL each process we started; reap them all."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    kill_pids([p.pid for p in procs if p.poll() is None])
    for p in procs:
        p.wait(10)


def _run_two_hosts(tmp_path, curve):
    """Controller in one namespace, engines and client in the other, tcpdump on the veth.

    Returns (client output, controller file contents, capture bytes, seconds taken,
    the controller's log).
    """
    name = "curve" if curve else "plain"
    profile = f"netns-{TAG}-{name}"
    pcap, logs = tmp_path / f"{name}.pcap", tmp_path / name
    logs.mkdir()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = []
    t0 = time.monotonic()

    def start(cmd, log):
        out = open(logs / log, "wb")  # noqa: SIM115
        try:
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, env=env))
        finally:
            out.close()
        return procs[-1]

    def log_text():
        return "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(logs.iterdir()))

    try:
        dump = start(_in(NS_CTL, *_tcpdump(VETH_CTL, pcap)), "tcpdump.log")
        assert wait_until(lambda: "listening on" in (logs / "tcpdump.log").read_text()
                          or dump.poll() is not None, 30), log_text()
        assert dump.poll() is None, f"tcpdump did not start:\n{log_text()}"
        ctl_cmd = [sys.executable, "-m", "ipyfarm", "controller", "-n", "0", "--profile",
                   profile, "--ip", CTL_IP]
        ctl = start(_in(NS_CTL, *ctl_cmd, *([] if curve else ["--no-curve"])),
                    "controller.log")
        file = paths.cluster_file(profile)
        assert wait_until(lambda: file.exists() or ctl.poll() is not None, 60), log_text()
        assert ctl.poll() is None, f"the controller exited:\n{log_text()}"
        info = paths.read_json(file)
        engine = [sys.executable, "-m", "ipyfarm.engine", "--controller-file", str(file),
                  "--parent-pid", str(ctl.pid)]
        start(_in(NS_ENG, *engine), "engine0.log")  # its address found by routing
        start(_in(NS_ENG, *engine, f"--ip={ENG_IP}"), "engine1.log")
        client = subprocess.run(_in(NS_ENG, sys.executable, "-c", CLIENT, str(file), MARKER),
                                capture_output=True, text=True, timeout=180, env=env)
        assert client.returncode == 0, f"client failed:\n{client.stderr}\n{log_text()}"
        out = json.loads(client.stdout.strip().splitlines()[-1])
        elapsed = time.monotonic() - t0
    finally:
        # the capture last: it must see everything the others sent, shutdown included
        _stop(procs[1:])
        if procs:
            procs[0].send_signal(signal.SIGINT)  # tcpdump writes out what it has
            _stop(procs[:1], grace=10)
    assert not file.exists(), "the controller left its connection file behind"
    return out, info, pcap.read_bytes(), elapsed, (logs / "controller.log").read_text()


def _check_work(out):
    assert out["ids"] == [0, 1]
    assert out["engine_ips"] == [ENG_IP, ENG_IP]  # engines listen in their own namespace
    assert out["apply"] == [MARKER + "-result"] * 2
    assert out["map"] == [f"{MARKER}{i}-mapped" for i in range(6)]
    assert out["pulled"] == [MARKER * 2] * 2
    assert len(set(out["pids"])) == 2


def test_curve_on_beyond_loopback_no_plaintext_on_the_wire(hosts, tmp_path):
    out, info, capture, elapsed, log = _run_two_hosts(tmp_path, curve=True)
    _check_work(out)
    assert info["client"].startswith(f"tcp://{CTL_IP}:")
    assert info.get("curve_publickey") and info.get("curve_secretkey")  # on by default
    assert "plain text" not in log
    assert out["curve"] is True
    # the capture holds the traffic (the greetings name the mechanism) but not the marker
    assert len(capture) > 20_000, len(capture)
    assert b"CURVE" in capture and b"NULL\0" not in capture
    assert MARKER.encode() not in capture
    assert info["key"].encode() not in capture  # the HMAC key never travels either
    print(f"\nnetns, Curve on: 2 engines registered, work ran, {len(capture)} bytes "
          f"captured, marker absent; {elapsed:.1f} s")


def test_no_curve_sends_plaintext_that_the_capture_sees(hosts, tmp_path):
    out, info, capture, elapsed, log = _run_two_hosts(tmp_path, curve=False)
    _check_work(out)
    assert "without CurveZMQ encryption" in log and "plain text" in log  # warned
    assert "curve_publickey" not in info and out["curve"] is False
    assert b"NULL\0" in capture and b"CURVE" not in capture
    assert capture.count(MARKER.encode()) >= 6  # code, arguments, results, output
    print(f"\nnetns, --no-curve: marker seen {capture.count(MARKER.encode())} times in "
          f"{len(capture)} bytes; {elapsed:.1f} s")
