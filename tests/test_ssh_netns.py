"""Two hosts for real over ssh: engines started through an sshd in a network namespace.

::

    root namespace (10.X.Y.1)                          namespace "remote host" (10.X.Y.2)
    this pytest: Cluster(engines="ssh", ip=10.X.Y.1)  sshd -D on 10.X.Y.2 (ip netns exec)
      ssh -T root@10.X.Y.2:PORT ... ────── veth ─────►   └─ 2 engines (python -m ipyfarm.engine)
      controller (Curve on: beyond loopback) ◄── ZeroMQ ──┘
    tcpdump on the root's veth end

Nothing but the veth joins the two namespaces: the engines' ssh sessions, their
registration and all task traffic cross it. The engines get the controller's info on
ssh's stdin (no file is read on the "host"); they register with the namespace's address,
run apply/map/push/pull, live in the namespace (``/proc/PID/ns/net``), and end when the
cluster stops. The capture shows the Curve handshake and neither a marker sent in tasks
nor the controller's key (which travels inside ssh).

Needs root (``ip netns``, sshd), ``ip`` (iproute2) and sshd (openssh-server); tcpdump for
the capture test. docs/ssh.md ("Two hosts for real") lists the commands.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

from ipyfarm.cli import _launcher_summary

from .conftest import gone, kill_pids, running_cluster, wait_until
from .test_netns import _add_netns, _ip, _stop, _tcpdump
from .test_ssh import _make_keys, _options, _start_sshd, _stop_sshd, _write_client_files

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                       reason="network namespaces and sshd need root; run the suite as root"),
    pytest.mark.skipif(shutil.which("ip") is None or shutil.which("sshd") is None
                       or shutil.which("ssh-keygen") is None,
                       reason="needs `ip` (iproute2) and sshd/ssh-keygen: apt-get install "
                       "iproute2 openssh-server openssh-client (.ci/run installs them)"),
]

TAG = os.getpid() % 100000
NS = f"ipf{TAG}s"  # "the remote host"
VETH_ROOT, VETH_NS = f"vsf{TAG}r", f"vsf{TAG}s"  # at most 15 characters
MARKER = f"IPYFARM-SSH-NETNS-MARKER-{TAG:05d}"


def _free_subnet():
    """A ``10.X.Y`` /24 that no address or route of this namespace uses yet, picked from
    our pid so that parallel runs differ (test_netns.py's lie in 10.77-176, all inside
    its own namespaces)."""
    used = _ip("-4", "addr").stdout + _ip("-4", "route", "show", "table", "all").stdout
    for i in range(500):
        k = TAG + i
        subnet = f"10.{200 + k % 50}.{(k // 50) % 250}"
        if not re.search(rf"(?<![\d.]){re.escape(subnet)}\.", used):
            return subnet
    raise AssertionError(f"no free 10.200-249.x.0/24 subnet here:\n{used}")


def _netns_inode(path):
    return os.stat(path).st_ino


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """The namespace, its veth to the root namespace, and an sshd inside it; all removed
    however the module ends (sshd and its sessions by pid)."""
    subnet = _free_subnet()
    root_ip, ns_ip = f"{subnet}.1", f"{subnet}.2"
    d = tmp_path_factory.mktemp("sshd-netns")
    proc = log = None
    try:
        _add_netns(NS)
        _ip("link", "add", VETH_ROOT, "type", "veth", "peer", "name", VETH_NS)
        _ip("link", "set", VETH_NS, "netns", NS)
        _ip("addr", "add", f"{root_ip}/24", "dev", VETH_ROOT)
        _ip("link", "set", VETH_ROOT, "up")
        _ip("-n", NS, "addr", "add", f"{ns_ip}/24", "dev", VETH_NS)
        _ip("-n", NS, "link", "set", VETH_NS, "up")
        _ip("-n", NS, "link", "set", "lo", "up")
        _make_keys(d)
        log = open(d / "sshd.log", "wb")  # noqa: SIM115
        proc, port = _start_sshd(d, log, listen=ns_ip, wrap=["ip", "netns", "exec", NS])
        _write_client_files(d, ns_ip, port)
        yield SimpleNamespace(pid=proc.pid, port=port, dir=d, root_ip=root_ip, ns_ip=ns_ip,
                              host=f"root@{ns_ip}:{port}", config=str(d / "ssh_config"),
                              netns=_netns_inode(f"/run/netns/{NS}"))
    finally:
        if proc is not None:
            _stop_sshd(proc)
        if log is not None:
            log.close()
        # deleting the namespace deletes the veth end in it, and with it the pair
        _ip("netns", "del", NS, check=False)
        _ip("link", "del", VETH_ROOT, check=False)  # still here if setup failed early
    assert NS not in _ip("netns", "list").stdout
    assert VETH_ROOT not in _ip("link").stdout


@pytest.fixture(scope="module")
def capture(remote, tmp_path_factory):
    """tcpdump on the root's veth end from before the cluster starts (None without
    tcpdump); stopped by the test that reads it, or here."""
    if shutil.which("tcpdump") is None:
        yield None
        return
    d = tmp_path_factory.mktemp("capture")
    out = open(d / "tcpdump.log", "wb")  # noqa: SIM115
    dump = subprocess.Popen(_tcpdump(VETH_ROOT, d / "veth.pcap"), stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT)
    out.close()
    try:
        assert wait_until(lambda: "listening on" in (d / "tcpdump.log").read_text()
                          or dump.poll() is not None, 30), "tcpdump did not start in 30 s"
        assert dump.poll() is None, f"tcpdump exited: {(d / 'tcpdump.log').read_text()}"
        yield SimpleNamespace(proc=dump, pcap=d / "veth.pcap")
    finally:
        _stop_capture(dump)


def _stop_capture(dump):
    if dump.poll() is None:
        dump.send_signal(signal.SIGINT)  # tcpdump writes out what it has
    _stop([dump], grace=10)


@pytest.fixture(scope="module")
def farm(remote, capture, tmp_path_factory):
    """A controller on the root's veth address, 2 engines through the namespace's sshd."""
    runtime = tmp_path_factory.mktemp("remote-runtime")
    # the namespace shares this machine's files, but not its address: ipyfarm would take
    # it for another host and run `python3` there; name this interpreter instead
    opts = _options(remote, python=sys.executable,
                    remote_env={"JUPYTER_RUNTIME_DIR": str(runtime)})
    t0 = time.monotonic()
    pids = []
    try:
        with running_cluster(2, engines="ssh", ip=remote.root_ip,
                             engine_options=opts) as (c, rc):
            started = time.monotonic() - t0
            pids += rc[:].apply_sync(os.getpid)
            yield SimpleNamespace(cluster=c, rc=rc, pids=pids, started=started)
    finally:
        kill_pids(pids)  # after running_cluster's stop: only engines that outlived it


def test_engines_register_from_the_namespace_address(remote, farm):
    c, rc = farm.cluster, farm.rc
    info = c.controller.connection_info()
    assert info["registration"].startswith(f"tcp://{remote.root_ip}:")
    assert info.get("curve_publickey"), "Curve is on beyond loopback"
    assert sorted(rc.ids) == [0, 1]
    assert [e["connection_info"]["ip"] for e in rc.engines.values()] == [remote.ns_ip] * 2
    # "client-ip client-port server-ip server-port": from the root's end to the sshd
    for conn in rc[:].apply_sync(lambda: os.environ.get("SSH_CONNECTION", "")):
        words = conn.split()
        assert (words[0], words[2:]) == (remote.root_ip, [remote.ns_ip, str(remote.port)]), \
            conn
    print(f"\nssh netns: 2 engines started and connected in {farm.started:.1f} s")


def test_engine_processes_live_in_the_other_namespace(remote, farm):
    here = _netns_inode("/proc/self/ns/net")
    assert here != remote.netns
    launcher = farm.cluster.launcher
    assert sorted(p for _, p in launcher.remote_pids.values()) == sorted(farm.pids)
    for pid in farm.pids:
        assert _netns_inode(f"/proc/{pid}/ns/net") == remote.netns, \
            f"engine {pid} is not in namespace {NS}"
        assert remote.pid in [p.pid for p in psutil.Process(pid).parents()], \
            f"engine {pid} was not started by the namespace's sshd"
    for handle in launcher.pids:  # the local ssh processes stay here
        assert _netns_inode(f"/proc/{handle}/ns/net") == here
        assert os.path.basename(psutil.Process(handle).cmdline()[0]) == "ssh"


def test_apply_map_push_pull_across_the_veth(farm):
    rc = farm.rc
    view = rc[:]
    assert view.apply_sync(lambda x: x * 2, 21) == [42, 42]
    assert rc.load_balanced_view().map_sync(lambda x: x * x, range(16)) == \
        [x * x for x in range(16)]
    a = np.arange(300_000, dtype=np.float64).reshape(600, 500)
    view.push({"a": a}, block=True)
    assert view.apply_sync(lambda: float(a.sum())) == [float(a.sum())] * 2  # noqa: F821
    view.execute("b = a.T * 2", block=True)
    for got in view.pull("b", block=True):
        np.testing.assert_array_equal(got, a.T * 2)


def test_the_launcher_description_names_the_host(remote, farm):
    desc = farm.rc.farm_status()["launcher"]
    assert desc["backend"] == "ssh" and desc["running"] == 2
    assert desc["hosts"] == [remote.host]
    assert sorted(e["pid"] for e in desc["engines"]) == sorted(farm.pids)
    assert {e["host"] for e in desc["engines"]} == {remote.host}
    assert _launcher_summary(desc) == f"ssh {remote.host}"  # what `ipyfarm list` shows


def test_the_wire_shows_curve_and_no_plaintext(remote, farm, capture):
    if capture is None:
        pytest.skip("needs tcpdump (apt-get install tcpdump; .ci/run installs it)")
    view = farm.rc[:]
    assert view.apply_sync(lambda m: m + "-result", MARKER) == [MARKER + "-result"] * 2
    view.execute(f"echoed = {MARKER!r} * 2; print(echoed)", block=True)
    assert view.pull("echoed", block=True) == [MARKER * 2] * 2
    _stop_capture(capture.proc)
    data = capture.pcap.read_bytes()
    assert len(data) > 20_000, len(data)
    assert b"SSH-2.0-" in data  # the engines' ssh sessions crossed this veth ...
    assert b"CURVE" in data and b"NULL\0" not in data  # ... and so did ZeroMQ, encrypted
    assert MARKER.encode() not in data
    key = farm.cluster.controller.connection_info()["key"]
    assert key.encode() not in data  # sent to the engines inside ssh only
    print(f"\nssh netns: {len(data)} bytes captured on the veth, no marker, no key")


def test_stopping_the_cluster_ends_the_engines_in_the_namespace(remote, farm):
    """Last: stops the module's cluster (running_cluster's own stop then finds it done)."""
    handles = farm.cluster.launcher.pids
    t0 = time.monotonic()
    farm.cluster.stop_cluster_sync()
    assert wait_until(lambda: gone(farm.pids + handles), 15), \
        f"engines {farm.pids} or their ssh {handles} outlived the stop by 15 s"
    took = time.monotonic() - t0
    sessions = [p.pid for p in psutil.Process(remote.pid).children(recursive=True)]
    assert wait_until(lambda: gone(sessions), 10), f"sshd sessions left: {sessions}"
    print(f"\nssh netns: stop_cluster_sync() and the engines gone in {took:.2f} s")
