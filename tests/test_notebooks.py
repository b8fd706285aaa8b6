"""Every notebook in notebooks/ runs top to bottom in a real kernel, without errors.

Notebooks are committed without outputs; this is what makes what they show true. Each
one starts its own cluster and stops it in its last cell: the test checks that the
kernel is left without child processes (engines) before it shuts the kernel down.
"""

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
