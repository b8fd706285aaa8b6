"""No orphans, whatever ends the host: a real notebook kernel restarted or SIGKILLed, and a
standalone controller that crashes (SIGKILL). Every engine the host started must exit
within 10 s.
"""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
from jupyter_client import KernelManager

from .conftest import alive, kill_pids, wait_until

START = (
    "import ipyfarm as ipp, json\n"
    "c = ipp.Cluster(n=2, profile='orphans-%d' % __import__('os').getpid())\n"
    "rc = c.start_and_connect_sync()\n"
    "print(json.dumps(c.launcher.pids))\n"
)



def _engines_of_a_kernel(kc):
    """Run START in the kernel; the engine pids it printed."""
    msg_id = kc.execute(START)
    out = ""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=deadline - time.monotonic())
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out += msg["content"]["text"]
        elif msg["msg_type"] == "error":
            raise AssertionError("\n".join(msg["content"]["traceback"]))
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    pids = json.loads(out.strip().splitlines()[-1])
    assert len(pids) == 2 and all(alive(p) for p in pids)
    return pids


@pytest.mark.parametrize("how", ["restart", "forced restart", "sigkill"])
def test_engines_exit_when_their_notebook_kernel_is_restarted_or_killed(how):
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    pids = []
    try:
        kc.wait_for_ready(timeout=60)
        pids = _engines_of_a_kernel(kc)
        t0 = time.monotonic()
        if how == "restart":
            km.restart_kernel()  # the notebook's "Restart kernel": a shutdown_request first
        elif how == "forced restart":
            km.restart_kernel(now=True)  # a kernel that does not answer: killed, restarted
        else:
            os.kill(km.provisioner.process.pid, 9)
        assert wait_until(lambda: not any(alive(p) for p in pids), 10), "orphaned engines"
        print(f"engines gone {time.monotonic() - t0:.2f} s after the kernel's {how}")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        kill_pids(pids)


def test_engines_exit_when_their_standalone_controller_crashes(tmp_path):
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path))
    cli = [sys.executable, "-m", "ipyfarm"]
    out = subprocess.run(cli + ["start", "-n", "2", "--daemonize", "--profile", "crash"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ctl_pid = json.load(open(tmp_path / "ipyfarm-cluster-crash.json"))["pid"]
    pids = []
    try:
        pids = [p.pid for p in psutil.Process(ctl_pid).children()]
        assert len(pids) == 2
        os.kill(ctl_pid, 9)
        t0 = time.monotonic()
        assert wait_until(lambda: not any(alive(p) for p in pids), 10), "orphaned engines"
        print(f"engines gone {time.monotonic() - t0:.2f} s after the controller's SIGKILL")
    finally:
        kill_pids([ctl_pid, *pids])
