"""The dashboard in a real JupyterLab, driven in headless Chromium (Debian's, by Playwright).

The test starts JupyterLab on 127.0.0.1 in a temporary folder with a notebook that starts
a cluster and shows ``ipp.Dashboard(rc)``, runs it from the Run menu, checks the engine
rows appear, presses "add engine" and sees a row more, saves a screenshot (to
``docs/dashboard.png`` with ``IPYFARM_UPDATE_SCREENSHOT=1``), then shuts the kernel down
through Jupyter's REST API (its engines exit with it) and stops JupyterLab. Everything it starts, it stops by PID.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from .conftest import kill_pids, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parent.parent / "docs"

NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "import ipyfarm as ipp\ncluster = ipp.Cluster(n=2)\n"
                   "rc = cluster.start_and_connect_sync()"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "dash = ipp.Dashboard(rc)\ndash"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": "view = rc.load_balanced_view()\n"
                   "sum(view.map_sync(lambda x: x * x, range(10_000)))"},
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url, method="GET"):
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
    return json.loads(body) if body else None


@pytest.fixture
def lab(tmp_path):
    assert CHROMIUM, ("the browser test needs Debian's chromium: apt-get install chromium "
                      "(.ci/run installs it)")
    root = tmp_path / "lab"
    root.mkdir()
    (root / "dashboard_test.ipynb").write_text(json.dumps(NOTEBOOK))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
           f"--port={port}", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
           f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"]
    if os.geteuid() == 0:  # CI runs as root
        cmd.append("--allow-root")
    log = open(tmp_path / "lab.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            return True  # exited: stop waiting, the assertion below says why
        try:
            return _api(f"{base}/api/status?token={token}") is not None
        except OSError:
            return False

    try:
        ready = wait_until(up, 60, interval=0.2) and proc.poll() is None
        assert ready, (tmp_path / "lab.log").read_text()[-3000:]
        yield base, token, str(tmp_path)
    finally:
        try:
            for kernel in _api(f"{base}/api/kernels?token={token}") or []:
                _api(f"{base}/api/kernels/{kernel['id']}?token={token}", "DELETE")
        except OSError:
            pass
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        # the kernel's engines leave with their parent; allow them the lifeline's 10 s
        wait_until(lambda: len(psutil.Process(proc.pid).children(recursive=True)) == 0, 15)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        kill_pids(tree)
        log.close()


def test_dashboard_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    base, token, _ = lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/dashboard_test.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            try:  # JupyterLab may ask which kernel to start: the notebook's own
                page.locator(".jp-Dialog .jp-mod-accept").click(timeout=15_000)
            except Exception:
                pass
            page.wait_for_selector(".jp-Dialog", state="detached", timeout=30_000)
            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
            rows = page.locator(".ipyfarm-engine-row")
            page.wait_for_function(
                "() => document.querySelectorAll('.ipyfarm-engine-row').length >= 2",
                timeout=90_000)
            assert page.locator(".ipyfarm-dashboard").count() == 1
            before = rows.count()
            page.locator(".ipyfarm-add-engines").first.click()
            page.wait_for_function(
                f"() => document.querySelectorAll('.ipyfarm-engine-row').length > {before}",
                timeout=60_000)
            # the map in the last cell ran while the dashboard refreshed
            page.wait_for_function(
                "() => [...document.querySelectorAll('.jp-OutputArea-output')]"
                ".some(e => e.textContent.includes('333283335000'))", timeout=60_000)
            page.locator(".ipyfarm-dashboard").first.scroll_into_view_if_needed()
            # docs/dashboard.png is refreshed on request only, so test runs leave the tree clean
            where = DOCS if os.environ.get("IPYFARM_UPDATE_SCREENSHOT") else Path(lab[2])
            shot = where / "dashboard.png"
            page.locator(".ipyfarm-dashboard").first.screenshot(path=str(shot))
            assert shot.stat().st_size > 5000
        except Exception:
            page.screenshot(path=str(Path(os.environ.get("JUPYTER_RUNTIME_DIR", "/tmp"))
                                     / "browser-test-failure.png"))
            raise
        finally:
            browser.close()
