"""Shared fixtures: an isolated runtime dir, one cluster per module, no leftover processes."""

import contextlib
import os
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
