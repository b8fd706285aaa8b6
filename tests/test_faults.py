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
from ipyfarm.protocol.session import DELIM, FarmSession

from .conftest import kill_pids, wait_until


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_engine_killed_mid_task_raises_engine_error_fast(cluster, rc):
    c = cluster[0]
    (pid,) = c.start_engines_sync(1)
    try:
        rc.wait_for_engines(3, timeout=30)
        engine_id = max(rc.ids)
        assert rc[engine_id].apply_sync(os.getpid) == pid
        ar = rc[engine_id].apply_async(time.sleep, 60)
        time.sleep(0.2)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(error.EngineError, match=r"SIGKILL"):
            ar.get(timeout=5)
        assert time.monotonic() - t0 < 5
        assert wait_until(lambda: engine_id not in rc.ids, 5)
        with pytest.raises(IndexError):
            rc[engine_id]
        assert rc[:].apply_sync(lambda: 1) == [1, 1]  # the others serve on
    finally:
        kill_pids([pid])


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
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        proc.kill()
        proc.wait(5)
        t0 = time.monotonic()
        assert wait_until(lambda: not any(_alive(p) for p in pids), 10), "orphaned engines"
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
        assert wait_until(lambda: not any(_alive(p) for p in [ctl_pid, *engines]), 10)
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
        assert wait_until(lambda: not any(_alive(p) for p in [info["pid"], *engines]), 10)
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

