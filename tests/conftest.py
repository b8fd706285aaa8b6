"""Shared fixtures: an isolated runtime dir, one cluster per module, no leftover processes."""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

# every test session gets its own Jupyter runtime dir: no clash with a user's clusters
_RUNTIME = tempfile.mkdtemp(prefix="ipyfarm-test-runtime-")
os.environ["JUPYTER_RUNTIME_DIR"] = _RUNTIME


def wait_until(predicate, timeout, interval=0.02):
    """Poll ``predicate`` until true or ``timeout`` s pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def alive(pid):
    """Is process ``pid`` running (a zombie counts as gone)?"""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def gone(pids):
    """Have all of ``pids`` exited?"""
    return not any(alive(p) for p in pids)


def kill_pids(pids):
    """SIGKILL the given processes we started, if they still live."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


class CliCluster:
    """Standalone clusters started and stopped with the CLI (``ipyfarm start --daemonize``)
    in a private runtime dir, and clients run as separate Python processes.

    Every process a start made (the controller and its descendants, e.g. engines or
    ``mpiexec`` and its ranks) is remembered, so :meth:`close` can kill what is left by
    PID; :meth:`stop` checks that ``ipyfarm stop`` left none.
    """

    def __init__(self, tmp_path, profile):
        self.env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path))
        self.profile = profile
        self.info_file = tmp_path / f"ipyfarm-cluster-{profile}.json"
        self.controller_pid = None
        self.pids = []

    def cli(self, *args, timeout=60):
        return subprocess.run([sys.executable, "-m", "ipyfarm", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args, timeout=90):
        out = self.cli("start", "--daemonize", "--profile", self.profile, *args,
                       timeout=timeout)
        if self.info_file.exists():  # even a failed start may have left a controller
            self.controller_pid = json.loads(self.info_file.read_text())["pid"]
            self.track()
        assert out.returncode == 0, out.stderr
        return out

    def track(self, more=()):
        """Remember the controller's descendants as they are now (and ``more`` pids)."""
        found = [self.controller_pid] if self.controller_pid else []
        with contextlib.suppress(psutil.Error, TypeError):
            found += [p.pid for p in psutil.Process(self.controller_pid).children(True)]
        for pid in [*found, *more]:
            if pid not in self.pids:
                self.pids.append(pid)

    def client(self, code, timeout=60):
        """stdout of ``code`` run in a new Python after ``rc = ipp.Client(profile=...)``."""
        got = subprocess.run(
            [sys.executable, "-c",
             f"import ipyfarm as ipp\nrc = ipp.Client(profile={self.profile!r})\n{code}"],
            env=self.env, capture_output=True, text=True, timeout=timeout)
        assert got.returncode == 0, got.stderr
        return got.stdout

    def stop(self, gone_within=15, timeout=30):
        """``ipyfarm stop``; everything the cluster ran must be gone within ``gone_within``."""
        self.track()
        out = self.cli("stop", "--profile", self.profile, timeout=timeout)
        assert out.returncode == 0, out.stderr
        assert wait_until(lambda: gone(self.pids), gone_within), \
            [p for p in self.pids if alive(p)]

    def close(self):
        kill_pids(self.pids)


@contextlib.contextmanager
def cli_cluster(tmp_path, profile):
    """A :class:`CliCluster`; whatever it started is killed by PID on the way out."""
    cluster = CliCluster(tmp_path, profile)
    try:
        yield cluster
    finally:
        cluster.close()


def kernel_run(kc, code, timeout=60, status="ok", until=None, comm_opens=False):
    """Execute ``code`` in a Jupyter kernel (a jupyter_client client ``kc``); return the
    iopub messages it caused, up to its idle status, and check its reply's status.

    ``until(msgs)``, if given, is called with the messages so far as each one comes;
    ``comm_opens`` also keeps ``comm_open`` messages of other parents (a widget an engine
    opened reaches the notebook with the engine's task as its parent)."""
    msg_id = kc.execute(code)
    msgs = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except Exception:  # queue.Empty: nothing yet
            continue
        mine = msg["parent_header"].get("msg_id") == msg_id
        if not mine and not (comm_opens and msg["msg_type"] == "comm_open"):
            continue
        msgs.append(msg)
        if until is not None:
            until(msgs)
        if mine and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            reply = kc.get_shell_msg(timeout=timeout)
            assert reply["content"]["status"] == status, reply["content"]
            return msgs
    raise AssertionError(f"the kernel did not finish {code!r} within {timeout} s")


def _children():
    return {p.pid for p in psutil.Process().children(recursive=True)}


@contextlib.contextmanager
def running_cluster(n=2, profile=None, **kwargs):
    """An embedded cluster of ``n`` engines, stopped on exit with no process left behind."""
    import ipyfarm as ipp

    before = _children()
    c = ipp.Cluster(n=n, profile=profile or f"test-{os.getpid()}-{time.monotonic_ns()}",
                    **kwargs)
    rc = c.start_and_connect_sync()
    pids = list(c.launcher.pids)
    try:
        yield c, rc
    finally:
        c.stop_cluster_sync()
        left = wait_until(lambda: not (_children() - before), 10)
        kill_pids(_children() - before)
        assert left, f"processes left behind by the cluster: {_children() - before}"
        for pid in pids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


@pytest.fixture(scope="module")
def cluster():
    """A 2-engine embedded cluster for the whole module, always stopped."""
    with running_cluster(2, profile=f"test-{os.getpid()}") as (c, rc):
        yield c, rc


@pytest.fixture
def rc(cluster):
    return cluster[1]


def pytest_sessionfinish(session, exitstatus):
    left = [p for p in psutil.Process().children(recursive=True) if p.is_running()]
    if left:
        for p in left:
            p.kill()
        raise RuntimeError(f"tests left processes running: {[p.pid for p in left]}")
