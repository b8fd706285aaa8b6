"""SSH: engines started through a real sshd, and Client(sshserver=...) tunnels.

Needs Debian's openssh-server and openssh-client (listed in .ci/run) and root (sshd
switches to the user who logs in). The module starts its own ``sshd -D -e`` on a free
port of 127.0.0.1 with a host key, an authorized client key and a known_hosts made for
it in a temporary directory; ssh uses that directory's config (``ssh -F``), so nothing
of the machine's own ssh setup is read or changed. sshd is stopped by its pid.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

import ipyfarm as ipp
from ipyfarm.client.tunnel import TunnelError, forward_target, tunnel_command
from ipyfarm.cluster.ssh import SSHEngineLauncher, SSHLaunchError
from ipyfarm.cluster.sshplan import (
    controller_payload,
    engine_address,
    engine_ssh_command,
    launch_error,
    plan_hosts,
    remote_engine_command,
)
from ipyfarm.sshcmd import SSHTarget, parse_target, ssh_command

from .conftest import kill_pids, running_cluster, wait_until

SSHD = shutil.which("sshd")
SSH_KEYGEN = shutil.which("ssh-keygen")

# the launcher's reader threads must not fail quietly
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


# ---------------------------------------------------------------------- pure builders
@pytest.mark.parametrize("spec, target, shown", [
    ("node1", SSHTarget("node1"), "node1"),
    ("me@node1", SSHTarget("node1", "me"), "me@node1"),
    ("node1:2222", SSHTarget("node1", None, 2222), "node1:2222"),
    ("me@node1.example.org:22", SSHTarget("node1.example.org", "me", 22),
     "me@node1.example.org:22"),
    ("10.0.0.7", SSHTarget("10.0.0.7"), "10.0.0.7"),
    ("me@[::1]:2200", SSHTarget("::1", "me", 2200), "me@[::1]:2200"),
    ("fe80::1", SSHTarget("fe80::1"), "fe80::1"),
    ({"host": "node2", "n": 4}, SSHTarget("node2"), "node2"),
    ({"host": "me@node2:23", "port": 24}, SSHTarget("node2", "me", 24), "me@node2:24"),
    ({"host": "node2", "user": "you"}, SSHTarget("node2", "you"), "you@node2"),
])
def test_parse_target(spec, target, shown):
    assert parse_target(spec) == target
    assert str(target) == shown


@pytest.mark.parametrize("spec, why", [
    ("-oProxyCommand=x", "not a host name"),
    ("node1:ssh", "not a number"),
    ("node1:70000", "out of range"),
    ("me;rm@node1", "not a user name"),
    ("[::1", "must end with"),
    ("", "not a host name"),
    ({"n": 2}, "needs a 'host' key"),
])
def test_parse_target_refuses_what_ssh_would_take_for_an_option(spec, why):
    with pytest.raises(ValueError, match=why) as e:
        parse_target(spec)
    assert "Write it as 'host', 'user@host'" in str(e.value)


def test_ssh_command_golden():
    t = SSHTarget("node1", "me", 2222)
    assert ssh_command(t, ["true"]) == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", "2222", "me@node1",
        "true"]
    # the user's options come first: ssh keeps the first value it sees
    assert ssh_command(SSHTarget("n"), (), ssh="/opt/ssh", ssh_args=["-F", "cfg"],
                       key="id", connect_timeout=None) == [
        "/opt/ssh", "-F", "cfg", "-o", "BatchMode=yes", "-i", "id", "n"]


def test_remote_engine_command_golden():
    assert remote_engine_command() == (
        'echo ipyfarm-engine-pid $$ "$(uname -n)"; exec env PYTHONUNBUFFERED=1 python3 -m '
        "ipyfarm.engine --controller-file - --log-level WARN")
    assert remote_engine_command(
        "/opt/py 3/bin/python", "DEBUG", {"OMP_NUM_THREADS": "1", "X": "a b"},
        ["--ip=10.0.0.7"]) == (
        'echo ipyfarm-engine-pid $$ "$(uname -n)"; exec env PYTHONUNBUFFERED=1 '
        "OMP_NUM_THREADS=1 'X=a b' '/opt/py 3/bin/python' -m ipyfarm.engine --controller-file - "
        "--log-level DEBUG --ip=10.0.0.7")
    with pytest.raises(ValueError, match="not an environment variable name"):
        remote_engine_command(env={"A;B": "1"})


def test_engine_ssh_command_golden():
    remote = remote_engine_command()
    assert engine_ssh_command(SSHTarget("node1", "me", 2222), remote, key="k",
                              ssh_args=["-o", "ConnectTimeout=3"]) == [
        "ssh", "-o", "ConnectTimeout=3", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
        "-T", "-p", "2222", "-i", "k", "me@node1", remote]


def test_plan_hosts_fills_slots_in_order_and_wraps():
    a, b = SSHTarget("a"), SSHTarget("b")
    assert plan_hosts([(a, 2), (b, 1)], 5) == [a, a, b, a, a]
    assert plan_hosts([(a, 2), (b, 1)], 2, start=2) == [b, a]
    assert plan_hosts([(a, 1), (b, 0)], 2) == [a, a]
    with pytest.raises(ValueError, match="no ssh host has room"):
        plan_hosts([(a, 0)], 1)


def test_controller_payload_is_one_json_line_without_local_fields():
    info = {"key": "k", "registration": "tcp://0.0.0.0:5001", "location": "0.0.0.0",
            "client": "tcp://0.0.0.0:5000", "inproc": "inproc://x", "embedded": True}
    assert controller_payload(info) == (
        b'{"client":"tcp://0.0.0.0:5000","key":"k","location":"0.0.0.0",'
        b'"registration":"tcp://0.0.0.0:5001"}\n')
    moved = json.loads(controller_payload(info, "10.0.0.2"))
    assert (moved["registration"], moved["location"]) == ("tcp://10.0.0.2:5001", "10.0.0.2")
    assert json.loads(controller_payload(info, "fd00::2"))["registration"] == \
        "tcp://[fd00::2]:5001"


def test_engine_address():
    local, remote = [SSHTarget("127.0.0.1")], [SSHTarget("node7")]
    facing = {"node7": "10.0.0.1"}.get
    assert engine_address("tcp://127.0.0.1:5", local, facing) is None
    assert engine_address("tcp://10.0.0.1:5", remote, facing) is None
    assert engine_address("tcp://0.0.0.0:5", remote, facing) == "10.0.0.1"
    assert engine_address("tcp://0.0.0.0:5", local, facing) == "127.0.0.1"
    assert engine_address("tcp://0.0.0.0:5", remote, facing, "ctl.example") == "ctl.example"
    with pytest.raises(ValueError, match=r"listens on 127\.0\.0\.1 only.*node7.*ip='0\.0\.0\.0'"):
        engine_address("tcp://127.0.0.1:5", remote, facing)


def test_launch_error_names_the_host_ssh_said_and_what_to_do():
    msg = launch_error(SSHTarget("node1", "me", 2222), 255, "ssh: connect to host node1 "
                       "port 2222: Connection refused\n", 25)
    assert msg.startswith("could not start an engine on me@node1:2222: ssh exited with code "
                          "255: ssh: connect to host node1 port 2222: Connection refused\n")
    assert "`ssh -p 2222 me@node1 true`" in msg
    assert "did not reach the remote shell within 25 s: (ssh printed nothing)" in \
        launch_error(SSHTarget("n"), None, "", 25)


def test_tunnel_command_golden():
    assert tunnel_command(SSHTarget("login", "me", 2200), 40001, "127.0.0.1", 5000,
                          key="k") == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-N", "-T", "-o",
        "ExitOnForwardFailure=yes", "-L", "127.0.0.1:40001:127.0.0.1:5000", "-p", "2200",
        "-i", "k", "me@login"]
    assert tunnel_command(SSHTarget("login"), 1, "fd00::5", 2)[-2] == \
        "127.0.0.1:1:[fd00::5]:2"
    assert forward_target("tcp://10.1.2.3:5000") == ("10.1.2.3", 5000)
    assert forward_target("tcp://0.0.0.0:5000") == ("127.0.0.1", 5000)
    assert forward_target("tcp://[fd00::5]:7") == ("fd00::5", 7)
    with pytest.raises(TunnelError, match="only tcp://"):
        forward_target("ipc:///x")


def test_launcher_options_are_checked_up_front(tmp_path):
    file = tmp_path / "ctl.json"
    file.write_text(json.dumps({"key": "k", "registration": "tcp://127.0.0.1:5"}))
    with pytest.raises(ValueError, match="needs hosts"):
        SSHEngineLauncher(file)
    with pytest.raises(ValueError, match="listens on 127.0.0.1 only"):
        SSHEngineLauncher(file, hosts=["node-that-is-not-here"]).start(1)
    with pytest.raises(ValueError, match="engines_per_host"):
        SSHEngineLauncher(file, hosts=["127.0.0.1"], engines_per_host=0)
    with pytest.raises(TypeError, match="workdir"):
        SSHEngineLauncher(file, hosts=["127.0.0.1"], workdir="/x")
    launcher = SSHEngineLauncher(file, hosts=["127.0.0.1", {"host": "localhost", "n": 2}])
    described = launcher.describe()
    assert described["hosts"] == ["127.0.0.1", "localhost"]
    # a host that is this machine runs this interpreter: the same environment
    assert described["command"].endswith(
        f"{sys.executable} -m ipyfarm.engine --controller-file - --log-level WARN'")


def test_an_engine_told_to_read_stdin_gets_nothing():
    out = subprocess.run([sys.executable, "-m", "ipyfarm.engine", "--controller-file", "-"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith(
        "ipyfarm engine: cannot read the controller's info from stdin (--controller-file -): "
        "stdin was closed before the controller info arrived. Likely cause:"), out.stderr


# ---------------------------------------------------------------------- a real sshd
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _refusing_port():
    """A port of 127.0.0.1 that refuses connections: bound (so nobody else takes it
    meanwhile), never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _keygen(path):
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, timeout=30)


def _write_sshd_config(d, port, listen="127.0.0.1"):
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress {listen}\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile none\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nX11Forwarding no\n"
        "PrintMotd no\nMaxStartups 100\nMaxSessions 100\nLogLevel VERBOSE\n")


def _privsep_dir_made(config):
    """sshd refuses to run without its privilege-separation directory (made by the
    service's start script, which we do not run): create the one its test names."""
    check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True,
                           timeout=30)
    missing = re.search(r"Missing privilege separation directory: (\S+)", check.stderr)
    if missing:
        os.makedirs(missing.group(1), mode=0o755, exist_ok=True)
        check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True,
                               text=True, timeout=30)
    assert check.returncode == 0, f"sshd -t refused our config: {check.stderr}"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    assert SSHD and SSH_KEYGEN, ("these tests need Debian's openssh-server and "
                                 "openssh-client: apt-get install openssh-server "
                                 "openssh-client (the CI script does)")
    assert os.geteuid() == 0, "these tests start sshd, which needs root"
    d = tmp_path_factory.mktemp("sshd")
    _make_keys(d)
    log = open(d / "sshd.log", "wb")  # noqa: SIM115
    proc, port = _start_sshd(d, log)
    try:
        _write_client_files(d, "127.0.0.1", port)
        yield SimpleNamespace(pid=proc.pid, port=port, dir=d, key=str(d / "client_key"),
                              host=f"root@127.0.0.1:{port}", config=str(d / "ssh_config"),
                              log=d / "sshd.log")
    finally:
        _stop_sshd(proc)
        log.close()


def _make_keys(d):
    """In ``d``: a host key, an authorized client key and a stranger key (not authorized)."""
    _keygen(d / "host_key")
    _keygen(d / "client_key")
    _keygen(d / "stranger_key")
    shutil.copy(d / "client_key.pub", d / "authorized_keys")


def _write_client_files(d, host, port):
    """``known_hosts`` with our sshd's host key for ``[host]:port``, and the ssh configs
    that read only it: ``ssh_config`` (with the client key) and ``ssh_config_nokey``."""
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[{host}]:{port} {host_pub[0]} {host_pub[1]}\n")
    common = (f"Host *\n  UserKnownHostsFile {d / 'known_hosts'}\n"
              "  StrictHostKeyChecking yes\n  IdentitiesOnly yes\n  LogLevel ERROR\n")
    (d / "ssh_config").write_text(common + f"  IdentityFile {d / 'client_key'}\n")
    (d / "ssh_config_nokey").write_text(common)


def _stop_sshd(proc):
    """Stop the sshd we started (by its pid), then what its sessions left."""
    try:
        sessions = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        sessions = []
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    kill_pids(sessions)


def _start_sshd(d, log, tries=3, listen="127.0.0.1", wrap=()):
    """``sshd -D -e`` on a free port of ``listen`` (another one if that port was taken
    meanwhile), run under ``wrap`` (e.g. ``ip netns exec NS``); returns (process, port)
    once it listens."""
    for _ in range(tries):
        port = _free_port()
        _write_sshd_config(d, port, listen)
        _privsep_dir_made(d / "sshd_config")
        proc = subprocess.Popen([*wrap, SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)

        def listening(proc=proc, port=port):
            if proc.poll() is not None:
                return True  # ended: no use waiting
            try:
                socket.create_connection((listen, port), timeout=1).close()
                return True
            except OSError:
                return False

        ok = wait_until(listening, 20, 0.05)
        if ok and proc.poll() is None:
            return proc, port
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    raise AssertionError(f"sshd did not start: {(d / 'sshd.log').read_text()}")


def _options(sshd, **extra):
    """Engine options for the test sshd; engine files go to a temporary runtime dir
    (a killed engine cannot remove its own)."""
    runtime = {"JUPYTER_RUNTIME_DIR": str(sshd.dir / "remote-runtime")}
    return {"hosts": [sshd.host], "ssh_args": ["-F", sshd.config], "remote_env": runtime,
            **extra}


@pytest.fixture(scope="module")
def ssh_cluster(sshd, tmp_path_factory):
    """Two engines through sshd; the remote side has its own runtime dir."""
    remote_runtime = tmp_path_factory.mktemp("remote-runtime")
    opts = _options(sshd, remote_env={"JUPYTER_RUNTIME_DIR": str(remote_runtime)})
    with running_cluster(2, engines="ssh", engine_options=opts) as (c, rc):
        yield SimpleNamespace(cluster=c, rc=rc, runtime=remote_runtime)


def test_engines_come_through_sshd(sshd, ssh_cluster):
    rc = ssh_cluster.rc
    pids = rc[:].apply_sync(os.getpid)
    conns = rc[:].apply_sync(lambda: os.environ.get("SSH_CONNECTION", ""))
    for pid, conn in zip(pids, conns, strict=True):
        # "client-ip client-port server-ip server-port": our sshd's port
        assert conn.split()[2:] == ["127.0.0.1", str(sshd.port)], conn
        ancestors = [p.pid for p in psutil.Process(pid).parents()]
        assert sshd.pid in ancestors, f"engine {pid} is not under our sshd: {ancestors}"
    launcher = ssh_cluster.cluster.launcher
    assert sorted(p for _, p in launcher.remote_pids.values()) == sorted(pids)
    # handles are the local ssh processes, children of this process
    for handle in launcher.pids:
        assert psutil.Process(handle).ppid() == os.getpid()
        assert os.path.basename(psutil.Process(handle).cmdline()[0]) == "ssh"
    described = launcher.describe()
    assert described["backend"] == "ssh" and described["running"] == 2
    assert described["hosts"] == [sshd.host]


def test_the_controller_info_travels_on_stdin_not_the_command_line(ssh_cluster):
    rc, c = ssh_cluster.rc, ssh_cluster.cluster
    key = c.controller.connection_info()["key"]
    for pid in rc[:].apply_sync(os.getpid):
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
        assert cmdline[cmdline.index("--controller-file") + 1] == "-", cmdline
        assert key not in " ".join(cmdline)
        assert str(c.controller.file) not in " ".join(cmdline)
        assert key not in json.dumps(proc.environ())
        # the engine wrote its own kernel file in the remote side's runtime dir
        assert proc.environ()["JUPYTER_RUNTIME_DIR"] == str(ssh_cluster.runtime)
    assert len(list(ssh_cluster.runtime.glob("ipyfarm-engine-*.json"))) == 2


def test_apply_map_push_pull_over_ssh_engines(ssh_cluster):
    rc = ssh_cluster.rc
    view = rc[:]
    assert view.apply_sync(lambda x: x * 2, 21) == [42, 42]
    assert rc.load_balanced_view().map_sync(lambda x: x * x, range(20)) == \
        [x * x for x in range(20)]
    view.push({"a": 5, "b": [1, 2]}, block=True)
    assert view.pull(("a", "b"), block=True) == [[5, [1, 2]], [5, [1, 2]]]
    assert view.apply_sync(lambda: a + len(b)) == [7, 7]  # noqa: F821


def test_a_controller_on_all_interfaces_with_curve(sshd):
    """ip='0.0.0.0': engines get a dialable address instead of the wildcard, and the Curve
    keys travel on stdin with the rest of the controller's info."""
    with running_cluster(1, engines="ssh", ip="0.0.0.0",
                         engine_options=_options(sshd)) as (c, rc):
        info = c.controller.connection_info()
        assert info["registration"].startswith("tcp://0.0.0.0:")
        assert info.get("curve_publickey"), "Curve is on beyond loopback"
        sent = json.loads(c.launcher.payload)
        assert sent["registration"] == info["registration"].replace("0.0.0.0", "127.0.0.1")
        assert sent["curve_publickey"] == info["curve_publickey"]
        assert rc[:].apply_sync(lambda: os.environ["SSH_CONNECTION"].split()[3]) == \
            [str(sshd.port)]


def test_signal_reaches_the_engine_over_ssh(ssh_cluster, tmp_path):
    """launcher.signal: ``kill -INT pid`` on the engine's host interrupts its task; the
    engine lives on."""
    rc, launcher = ssh_cluster.rc, ssh_cluster.cluster.launcher
    target = rc.ids[0]
    pid = rc[target].apply_sync(os.getpid)
    handle = next(h for h, (_, p) in launcher.remote_pids.items() if p == pid)
    running = tmp_path / "running"  # the "host" is this machine: the task says it began

    def mark_and_sleep(path, seconds):
        import pathlib
        import time

        pathlib.Path(path).touch()
        time.sleep(seconds)

    ar = rc[target].apply_async(mark_and_sleep, str(running), 60)
    assert wait_until(running.exists, 20), "the task did not start"
    launcher.signal(signal.SIGINT, [handle])
    with pytest.raises(ipp.error.RemoteError, match="KeyboardInterrupt"):
        ar.get(20)
    assert rc[target].apply_sync(os.getpid) == pid


def test_engine_starts_with_no_controller_file_on_disk(sshd, tmp_path):
    """Moving the controller's file away before the engine's Python starts changes
    nothing: the engine has the info from stdin. Stopping leaves no engine, no engine file behind."""
    runtime = tmp_path / "remote"
    runtime.mkdir()
    c = ipp.Cluster(n=1, profile=f"ssh-nofile-{os.getpid()}", engines="ssh",
                    engine_options=_options(sshd, log_dir=str(tmp_path / "logs"),
                                            remote_env={"JUPYTER_RUNTIME_DIR": str(runtime)}))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    pids = []
    try:
        c.start_controller_sync()
        # start() returns once the remote shell runs (before the engine's Python does)
        c.start_engines_sync(1)
        moved = c.controller.file.with_suffix(".away")
        c.controller.file.rename(moved)
        try:
            rc = c.connect_client_sync()
            rc.wait_for_engines(1, timeout=60)
        finally:
            moved.rename(c.controller.file)
        pids = rc[:].apply_sync(os.getpid)
        assert rc[:].apply_sync(lambda: 6 * 7) == [42]
        assert list(runtime.glob("ipyfarm-engine-*.json"))
        c.stop_cluster_sync()
        assert wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), 10), \
            f"engine {pids} outlived the cluster's stop"
        assert not list(runtime.glob("ipyfarm-engine-*.json")), "engine file left behind"
        logs = list((tmp_path / "logs").glob("engine-ssh-127.0.0.1-*.log"))
        assert len(logs) == 1 and "ipyfarm-engine-pid" in logs[0].read_text()
        assert c.launcher.exited and all(rc == 0 for rc in c.launcher.exited.values()), \
            c.launcher.exited  # a clean exit: stdin closed -> unregistered
    finally:
        c.stop_cluster_sync()
        kill_pids(pids)
        left = {p.pid for p in psutil.Process().children(recursive=True)} - before
        kill_pids(left - {sshd.pid})


def test_engines_end_when_their_ssh_dies_or_are_killed_over_ssh(sshd):
    """A killed local ssh ends its engine (stdin EOF); kill_engine reaches one over ssh;
    stop_engines_sync(engine_id) takes the registered engine id; a task past its
    time_limit that ignores the interrupt has its engine killed over ssh."""
    with running_cluster(4, engines="ssh", engine_options=_options(sshd)) as (c, rc):
        launcher = c.launcher
        by_remote = {pid: h for h, (_, pid) in launcher.remote_pids.items()}
        ids_pids = dict(zip(rc.ids, rc[:].apply_sync(os.getpid), strict=True))
        (e0, p0), (e1, p1), (e2, p2), (e3, p3) = sorted(ids_pids.items())

        def ignore_sigint_and_sleep(seconds):  # defined here: sent by value (the
            import signal  # remote engine's cwd is not this repo)
            import time

            signal.signal(signal.SIGINT, signal.SIG_IGN)
            time.sleep(seconds)

        view = rc.load_balanced_view(targets=[e3], time_limit=1)
        with pytest.raises(ipp.error.TaskTimeout, match="was killed"):
            view.apply_async(ignore_sigint_and_sleep, 60).get(20)
        assert wait_until(lambda: not psutil.pid_exists(p3), 15), \
            "the controller's kill did not reach the engine over ssh"
        assert wait_until(lambda: e3 not in rc.ids, 15)

        reported = []
        cluster_on_exit = launcher.on_exit
        launcher.on_exit = lambda *args: (reported.append(args), cluster_on_exit(*args))
        os.kill(by_remote[p0], signal.SIGKILL)  # the local ssh only
        assert wait_until(lambda: not psutil.pid_exists(p0), 15), \
            "the engine outlived its ssh session"
        assert wait_until(lambda: e0 not in rc.ids, 15)
        # reported by the engine's own pid and host name, as the controller knows it
        assert wait_until(lambda: (p0, -9, socket.gethostname()) in reported or
                          (p0, 255, socket.gethostname()) in reported, 5), reported

        assert launcher.kill_engine(p1, socket.gethostname())
        assert wait_until(lambda: not psutil.pid_exists(p1), 15)
        assert wait_until(lambda: e1 not in rc.ids, 15)
        assert not launcher.kill_engine(12345678, socket.gethostname())

        c.stop_engines_sync(e2)
        assert wait_until(lambda: not psutil.pid_exists(p2), 15)
        assert wait_until(lambda: e2 not in rc.ids, 15)
        assert wait_until(lambda: launcher.pids == [], 10), launcher.remote_pids


def _clean_start_fails(sshd, hosts, match, n=1, **extra):
    c = ipp.Cluster(n=n, profile=f"ssh-bad-{os.getpid()}-{time.monotonic_ns()}",
                    engines="ssh", engine_options={**_options(sshd, **extra), "hosts": hosts})
    t0 = time.monotonic()
    try:
        with pytest.raises(SSHLaunchError, match=match) as e:
            c.start_and_connect_sync()
    finally:
        c.stop_cluster_sync()
    took = time.monotonic() - t0
    assert c.controller is None, "the controller was left running after a failed start"
    assert c.launcher.pids == []
    return str(e.value), took


def test_unreachable_host_is_a_clear_error_in_bounded_time(sshd):
    with _refusing_port() as port:  # ten engines: more than the handshakes run at once
        msg, took = _clean_start_fails(sshd, [f"root@127.0.0.1:{port}"], "Connection refused",
                                       n=10)
    assert took < 30, took
    assert msg.count("could not start an engine on") == 10
    assert msg.startswith(f"could not start an engine on root@127.0.0.1:{port}: ssh exited "
                          "with code 255: ssh: connect to host 127.0.0.1 port")
    assert "What to do: check that `ssh -p" in msg


def test_unauthorized_key_is_a_clear_error(sshd):
    msg, took = _clean_start_fails(sshd, [sshd.host], "Permission denied",
                                   ssh_key=str(sshd.dir / "stranger_key"),
                                   ssh_args=["-F", str(sshd.dir / "ssh_config_nokey")])
    assert took < 30, took
    assert "this machine's key is not authorized there" in msg


def test_an_engine_that_fails_on_its_host_is_explained(sshd):
    """ssh got through, but the engine could not start there: the cluster's error carries
    what the host said."""
    c = ipp.Cluster(n=1, profile=f"ssh-nopy-{os.getpid()}", engines="ssh",
                    engine_options=_options(sshd, python="python-that-is-not-here"))
    try:
        with pytest.raises(ipp.error.EngineError) as e:
            c.start_and_connect_sync()
    finally:
        c.stop_cluster_sync()
    msg = str(e.value)
    assert "1 engine(s) exited during start-up (exit codes [127])" in msg
    assert f"The engine on {sshd.host} exited with code 127; its last words: " in msg
    assert "python-that-is-not-here" in msg.rsplit("its last words:", 1)[1]
    assert c.controller is None and c.launcher.pids == []


def _engines_under(pid):
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "ipyfarm.engine" in p.cmdline():
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def _start_cli(sshd, runtime, profile, n=1):
    """``ipyfarm start --daemonize --engines ssh`` (the commands of docs/ssh.md); returns
    (controller pid, its ssh pids, the new engine pids under the test sshd)."""
    remote_runtime = runtime / "remote"
    remote_runtime.mkdir(exist_ok=True)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime))
    others = set(_engines_under(sshd.pid))  # the module's other clusters
    start = [sys.executable, "-m", "ipyfarm", "start", "-n", str(n), "--daemonize",
             "--profile", profile, "--engines", "ssh",
             "--engine-opt", f'hosts=["{sshd.host}"]',
             "--engine-opt", f'ssh_args=["-F", "{sshd.config}"]',
             "--engine-opt", f'remote_env={{"JUPYTER_RUNTIME_DIR": "{remote_runtime}"}}']
    out = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    ctl = json.loads((runtime / f"ipyfarm-cluster-{profile}.json").read_text())["pid"]
    ssh = [p.pid for p in psutil.Process(ctl).children(recursive=True)]
    return ctl, ssh, [p for p in _engines_under(sshd.pid) if p not in others]


def test_engines_exit_when_the_controller_process_is_killed(sshd, tmp_path):
    """SIGKILL of the process that launched them: their ssh loses its stdin, the engine
    sees end-of-file and exits, well before its heartbeat would notice (>= 10 s)."""
    pids = []
    try:
        ctl, ssh, engines = _start_cli(sshd, tmp_path, f"ssh-kill-{os.getpid()}")
        pids = [ctl, *ssh, *engines]
        assert len(engines) == 1 and ssh, (ssh, engines)
        t0 = time.monotonic()
        os.kill(ctl, signal.SIGKILL)
        assert wait_until(lambda: not any(psutil.pid_exists(p) for p in engines + ssh), 8), \
            "the engine or its ssh outlived the controller by 8 s"
        print(f"engine and ssh gone {time.monotonic() - t0:.2f} s after the SIGKILL")
    finally:
        kill_pids(pids)


# ---------------------------------------------------------------------- tunnels
@pytest.fixture(scope="module")
def standalone(sshd, tmp_path_factory):
    """``ipyfarm start --daemonize --engines ssh``: a controller on 127.0.0.1 and one
    engine started through sshd (the commands of docs/ssh.md)."""
    runtime = tmp_path_factory.mktemp("runtime")
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime))
    profile = f"ssh-tunnel-{os.getpid()}"
    pids, engines = [], []
    try:
        ctl, ssh, engines = _start_cli(sshd, runtime, profile)
        pids += [ctl, *ssh]
        assert len(engines) == 1, engines
        info_file = runtime / f"ipyfarm-cluster-{profile}.json"
        yield info_file
    finally:
        stop = subprocess.run([sys.executable, "-m", "ipyfarm", "stop", "--profile", profile],
                              env=env, capture_output=True, text=True, timeout=60)
        gone = wait_until(lambda: not any(psutil.pid_exists(p) for p in pids + engines), 15)
        kill_pids(pids + engines)
        assert stop.returncode == 0, stop.stderr
        assert gone, "`ipyfarm stop` left the controller or its ssh engine running"


def test_client_through_an_ssh_tunnel(sshd, standalone):
    info = json.loads(standalone.read_text())
    rc = ipp.Client(url_file=standalone, sshserver=sshd.host, sshkey=sshd.key,
                    ssh_args=["-F", str(sshd.dir / "ssh_config_nokey")], timeout=30)
    tunnel = rc._tunnel
    try:
        ssh = psutil.Process(tunnel.proc.pid)
        assert ssh.ppid() == os.getpid()
        host, port = forward_target(info["client"])
        assert f"127.0.0.1:{tunnel.local_port}:{host}:{port}" in ssh.cmdline()
        assert tunnel.local_port != port
        rc.wait_for_engines(1, timeout=30)
        assert rc[:].apply_sync(lambda x: x + 1, 41) == [42]
        conn = rc[:].apply_sync(lambda: os.environ.get("SSH_CONNECTION", ""))[0]
        assert conn.split()[2:] == ["127.0.0.1", str(sshd.port)]  # the engine came by ssh
        assert rc.load_balanced_view().map_sync(str, range(3)) == ["0", "1", "2"]
        # the connection really runs through sshd: its session process dialled the port
        def sshd_dials_controller():
            for p in psutil.Process(sshd.pid).children(recursive=True):
                try:
                    conns = p.net_connections(kind="tcp")
                except psutil.Error:
                    continue
                if any(c.raddr and c.raddr.port == port for c in conns):
                    return True
            return False

        assert wait_until(sshd_dials_controller, 5), "no sshd process connects to the port"
    finally:
        rc.close()
    assert wait_until(lambda: not psutil.pid_exists(ssh.pid) or
                      ssh.status() == psutil.STATUS_ZOMBIE, 10), "the tunnel outlived close()"
    assert not tunnel.alive


def test_tunnel_failure_shows_what_ssh_said(sshd, standalone):
    t0 = time.monotonic()
    with _refusing_port() as port, pytest.raises(TunnelError, match="Connection refused") as e:
        ipp.Client(url_file=standalone, sshserver=f"root@127.0.0.1:{port}",
                   sshkey=sshd.key, ssh_args=["-F", str(sshd.dir / "ssh_config_nokey")])
    assert time.monotonic() - t0 < 30
    assert str(e.value).startswith(f"cannot open an ssh tunnel through root@127.0.0.1:{port} "
                                   "to the controller at tcp://127.0.0.1:")
    assert "ssh exited with code 255" in str(e.value)
