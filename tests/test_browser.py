"""notebooks/dashboard.ipynb in a real JupyterLab, driven in headless Chromium (Debian's,
by Playwright).

The test starts JupyterLab on 127.0.0.1 in a temporary folder holding a copy of the
committed notebook (a copy: JupyterLab saves outputs into what it opens), runs its cells
one by one as a user would (Shift+Enter), and checks what the notebook says happens:

* the dashboard shows a row per engine (2);
* *add engines* adds a row (3), and the new engine's pid and memory show;
* while the map cell runs, the rows update: the engines' *done* counts grow before the
  cell's result is shown, and the progress bar is drawn;
* the last cells run without error and leave the kernel without engines.

A screenshot of the dashboard is saved (to ``docs/dashboard.png`` only with
``IPYFARM_UPDATE_SCREENSHOT=1``). The kernel is shut down through Jupyter's REST API (its
engines exit with it) and JupyterLab is stopped. Everything it starts, it stops by PID.
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
ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NOTEBOOK = ROOT / "notebooks" / "dashboard.ipynb"
MAP_RESULT = str(sum(x * x for x in range(200)))  # what the notebook's map cell shows


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
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
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


# JavaScript run in the page
ROWS = "() => document.querySelectorAll('.ipyfarm-engine-row').length"
DONE = """() => [...document.querySelectorAll('.ipyfarm-engine-row')].reduce(
    (sum, row) => sum + parseInt(row.querySelectorAll('.widget-html')[5].textContent || '0'),
    0)"""
SHOWN = "(text) => [...document.querySelectorAll('.jp-OutputArea-output')]" \
        ".some(e => e.textContent.includes(text))"
PROMPTS = "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]" \
          ".map(e => e.textContent.trim())"


STARTED = "(e) => /\\[(\\*|\\d+)\\]/.test(e.textContent)"  # queued, running or run
SETTLED = "(e) => /\\[( |\\d+)\\]/.test(e.textContent)"  # run, or never ran (lost)


def _run_cell(page, index, wait=True):
    """Select cell ``index`` and press Shift+Enter, as a user does. Returns once the cell
    ran (``wait``) or once it is queued or running."""
    prompt = page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputPrompt")
    for _ in range(3):  # a key press while JupyterLab is still settling can be lost
        prompt.first.click()
        page.keyboard.press("Shift+Enter")
        try:
            page.wait_for_function(STARTED, arg=prompt.first.element_handle(),
                                   timeout=10_000)
        except Exception:
            continue
        if not wait:
            return
        page.wait_for_function(SETTLED, arg=prompt.first.element_handle(), timeout=120_000)
        if "[ ]" not in prompt.first.text_content():
            return
    raise AssertionError(f"cell {index} did not run after 3 tries with Shift+Enter")


@pytest.mark.timeout(480)  # JupyterLab, Chromium, a kernel and a cluster on 2 shared cores
def test_dashboard_notebook_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    base, token, tmp = lab
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells]
    assert any("ipp.Cluster(n=2)" in src for src in sources)  # the rows to expect: 2
    code = [i for i, c in enumerate(cells) if c["cell_type"] == "code"]
    dash = next(i for i in code if "ipp.Dashboard(rc)" in sources[i])
    work = next(i for i in code if "map_async(work" in sources[i])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            try:  # JupyterLab may ask which kernel to start: the notebook's own
                page.locator(".jp-Dialog .jp-mod-accept").click(timeout=10_000)
            except Exception:
                pass
            page.wait_for_selector(".jp-Dialog", state="detached", timeout=30_000)
            # JupyterLab has restored its layout (on a busy machine a late restore re-creates
            # the notebook's view, dropping what ran before) and the kernel is connected
            page.wait_for_selector("#jupyterlab-splash", state="detached", timeout=60_000)
            page.wait_for_function("() => document.body.innerText.includes('| Idle')",
                                   timeout=60_000)
            # start the cluster and show the dashboard: a row per engine
            for index in range(dash + 1):
                if cells[index]["cell_type"] == "code":
                    _run_cell(page, index)
            page.wait_for_function(f"() => ({SHOWN})('[0, 1]')", timeout=30_000)  # rc.ids
            page.wait_for_function(f"() => ({ROWS})() === 2", timeout=60_000)
            assert page.locator(".ipyfarm-dashboard").count() == 1
            page.wait_for_function(
                "() => [...document.querySelectorAll('.ipyfarm-engine-row')].map("
                "r => r.querySelector('.widget-html').textContent.trim()).join() === '0,1'",
                timeout=30_000)
            # "add engines" adds one (the count box says 1)
            page.wait_for_function(f"() => ({PROMPTS})().slice(0, 2)"
                                   ".every(p => /\\[\\d+\\]/.test(p))", timeout=60_000)
            page.locator(".ipyfarm-add-engines").first.click()
            page.wait_for_function(f"() => ({ROWS})() === 3", timeout=60_000)
            # its id (2), pid and memory show (the row's values follow the row itself)
            page.wait_for_function(
                "() => { const c = document.querySelectorAll('.ipyfarm-engine-row')[2]"
                ".querySelectorAll('.widget-html'); return c[0].textContent.trim() === '2'"
                " && /^\\d+$/.test(c[2].textContent.trim())"
                " && c[7].textContent.trim().endsWith('MB'); }", timeout=30_000)
            assert "started 1 engine" in page.locator(
                ".ipyfarm-dashboard-message").first.text_content()
            # the map: the rows' done counts grow while the cell still runs
            before = page.evaluate(DONE)
            _run_cell(page, work, wait=False)
            page.wait_for_function(
                f"() => ({DONE})() > {before} && !({SHOWN})('{MAP_RESULT}')", timeout=60_000)
            page.wait_for_selector(".ipyfarm-progress", timeout=30_000)
            page.wait_for_function(f"() => ({SHOWN})('{MAP_RESULT}')", timeout=120_000)
            page.wait_for_function(f"() => ({DONE})() >= {before} + 200", timeout=30_000)
            page.locator(".ipyfarm-dashboard").first.scroll_into_view_if_needed()
            # docs/dashboard.png is refreshed on request only, so test runs leave the tree clean
            where = DOCS if os.environ.get("IPYFARM_UPDATE_SCREENSHOT") else Path(tmp)
            shot = where / "dashboard.png"
            page.locator(".ipyfarm-dashboard").first.screenshot(path=str(shot))
            assert shot.stat().st_size > 5000
            # the rest of the notebook: the text form, then close and stop
            for index in range(work + 1, len(cells)):
                if cells[index]["cell_type"] == "code":
                    _run_cell(page, index)
            # (Shift+Enter on the last cell added an empty one below: not the notebook's)
            page.wait_for_function(f"() => ({PROMPTS})().slice(0, {len(code)})"
                                   ".every(p => /\\[\\d+\\]/.test(p))", timeout=120_000)
            assert page.evaluate(SHOWN, "ipyfarm farm:")  # the snapshot printed as text
            errors = page.locator(".jp-OutputArea-output[data-mime-type="
                                  "'application/vnd.jupyter.stderr']", has_text="Error")
            assert errors.count() == 0, errors.first.text_content()
        except Exception:
            page.screenshot(path=str(Path(tmp) / "browser-test-failure.png"))
            raise
        finally:
            browser.close()
