"""Every notebook in notebooks/ runs top to bottom in a real kernel, without errors, and
shows what its text says it shows.

Notebooks are committed without outputs; this is what makes what they show true. Each
one starts its own cluster and stops it in its last cell: the test checks that the
kernel is left without child processes (engines) before it shuts the kernel down.
:data:`EXPECTED` holds, per notebook, the outputs its cells must show, each cell found by
a piece of its source.
"""

import re
from pathlib import Path

import psutil
import pytest

from .conftest import kill_pids, wait_until

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 120  # seconds per cell
KERNEL = "python3"

#: notebook -> {a piece of a cell's source: patterns its text output must match};
#: a pattern starting with "!" must not match. Outputs are the cell's stream text,
#: the text/plain of its results and displays, and "ERROR <ename>" for an error.
EXPECTED = {
    "quickstart.ipynb": {
        "rc = cluster.start_and_connect_sync()\nrc.ids": [r"^\[0, 1\]$"],
        "dview.apply(os.getpid)": [r"^\[\d+, \d+\]$"],
        "math.sqrt(a * 20)": [r"^10\.0$"],
        "apply_async(pow, 2, 10)": [r"^\(1024, 1, datetime\.timedelta\("],
        "apply_sync(lambda: 1 / 0)": [r"^RemoteError ZeroDivisionError \{'engine_id': 0"],
        "range(10_000)": [r"^333283335000$"],
        '["connection_file"]': [r"ipyfarm-engine-[0-9a-f-]+\.json"],
    },
    "data_movement.ipynb": {
        'dview.pull(["x", "y"])': [r"^\[\[1, \[1, 2, 3\]\], \[1, \[1, 2, 3\]\]\]$"],
        'dview["z"] = "hello"': [r"^\['hello', 'hello'\]$"],
        "part.flags.writeable": [r"^\[\(\(500000,\), False\), \(\(500000,\), False\)\]$"],
        "np.array_equal(back, 2 * a)": [r"^True$"],
        "v.sum()": [r"^249999500000\.0$"],
        "GB/s": [r"GB/s, equal: True, read-only: True"],
    },
    "dashboard.ipynb": {
        "rc.ids": [r"^\[0, 1\]$"],
        "dashboard = ipp.Dashboard(rc)": [r"2 engines", r"(?m)^0 +\S+ +\d+ +idle",
                                          r"(?m)^1 +\S+ +\d+ +idle"],
        "sum(ar.get())": [r"2646700$"],
        "snap.to_text()": [r"200 finished"],
    },
    "magics.ipynb": {
        "%px import os; os.getpid()": [r"Out\[0:\d+\]: \d+", r"Out\[1:\d+\]: \d+"],
        "print('pid'": [r"\[stdout:0\] pid \d+", r"\[stdout:1\] pid \d+"],
        "--targets ::2": [r"\[stdout:0\] even engines", r"Out\[0:\d+\]: 'done'",
                          r"!\[stdout:1\]"],
        'values["missing"]': [r"ERROR (CompositeError|KeyError)"],
        "%pxresult": [r"\[stdout:0\] slept", r"\[stdout:1\] slept",
                      r"Out\[1:\d+\]: \[0, 1, 4, 9, 16\]"],
        "execute_result['data']": [r"^\['\[0, 1, 4, 9, 16\]', '\[0, 1, 4, 9, 16\]'\]$"],
        "%%px --local": [r"^threshold is 10", r"\[stdout:1\] threshold is 10"],
        "--progress-after 0": [r"\[stdout:0\] step 2", r"\[stdout:1\] step 2"],
        "print('only engine 0')": [r"^\[stdout:0\] only engine 0\s*$"],
        "%pxconfig --targets all": [r"targets='all'"],
        "remote_only = sum": [r"\[stdout:0\] 45", r"\[stdout:1\] 45"],
        "'remote_only' in globals()": [r"^False$"],
        "%farm add 1": [r"added 1 engine, ids \[2\]"],
        "%farm status": [r"3 engines"],
        "%farm dashboard": [r"3 engines"],
        "%px_even print": [r"\[stdout:0\] even engine\s+\[stdout:2\] even engine", r"!\[stdout:1\]"],
        "%farm stop": [r"stopped the cluster \(3 engines\)"],
    },
    "task_farming.ipynb": {
        "serial = list(map": [r"serial \d+\.\d+ s, load-balanced on 2 engines \d+\.\d+ s"],
        "x**10, range(1000)": [r"^\d+ tasks for 1000 items"],
        "f.map(range(8))": [r"^\[0\.0, 10\.0, 160\.0, 810\.0, 2560\.0, 6250\.0, 12960\.0, "
                            r"24010\.0\]$"],
        "temp_flags(follow=first)": [r"made by the first task"],
        "never.get(10)": [r"^ImpossibleDependency: task \S+ can never run"],
        "retries=1": [r"\[\('done', 1\), \('done', 1\), \('done', 1\), \('done', 1\)\]"],
        "placement=lambda": [r"^\{1\}", r"'role': 'special'"],
        "db_query": [r"'label': 'demo-ok'", r"'ename': 'ZeroDivisionError'"],
    },
}


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
        elif out.output_type == "error":
            parts.append(f"ERROR {out.ename}")
    return "".join(parts).strip()


def _check_outputs(path, nb) -> None:
    """Each cell :data:`EXPECTED` names (by a piece of its source) shows what it should."""
    for snippet, patterns in EXPECTED.get(path.name, {}).items():
        cells = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
        assert len(cells) == 1, (f"{path.name}: {len(cells)} code cells contain {snippet!r}; "
                                 "update EXPECTED in this test to match the notebook")
        text = _text(cells[0])
        for pattern in patterns:
            if pattern.startswith("!"):
                assert not re.search(pattern[1:], text), (
                    f"{path.name}, cell with {snippet!r}: {pattern[1:]!r} should not be in "
                    f"its output:\n{text}")
            else:
                assert re.search(pattern, text), (
                    f"{path.name}, cell with {snippet!r}: no match for {pattern!r} in its "
                    f"output:\n{text}")


def test_every_notebook_has_expected_outputs():
    assert {p.name for p in NOTEBOOKS} == set(EXPECTED), (
        "each notebook needs its entry in EXPECTED (what its cells must show)")


def test_there_are_notebooks_to_run():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}: the notebook tests ran nothing"


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        dirty = [
            i
            for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
        ]
        assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


def _kernel_pid(client):
    provisioner = getattr(client.km, "provisioner", None)
    process = getattr(provisioner, "process", None)
    return getattr(process, "pid", None)


def _descendants(pid):
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


@pytest.mark.parametrize(
    "path",
    NOTEBOOKS
    or [
        pytest.param(
            None,
            marks=pytest.mark.skip(reason="no notebooks (test_there_are_notebooks_to_run fails)"),
        )
    ],
    ids=lambda p: p.name if p else "none",
)
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    left: set = set()
    with client.setup_kernel():
        kernel_pid = _kernel_pid(client)
        assert kernel_pid is not None, "could not find the kernel's process"
        try:
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
        finally:
            # the notebook's last cell stops its cluster: no engine may outlive it
            if not wait_until(lambda: not _descendants(kernel_pid), 10, interval=0.1):
                left = _descendants(kernel_pid)
                kill_pids(left)
    assert not left, f"{path.name} left processes running under its kernel: {sorted(left)}"
    _check_outputs(path, nb)
