"""The ``ipyfarm-engine`` Jupyter kernelspec, built by one function for both places it goes.

* ``jupyter-config/kernels/ipyfarm-engine/kernel.json``: shipped in the wheel as a data
  file (``share/jupyter/kernels/``), so Jupyter sees the kernel right after
  ``pip install``; its ``argv`` runs ``python`` from the PATH, as ipykernel's own does.
* ``ipyfarm kernelspec`` (:func:`ipyfarm.cli.install_kernelspec`): for editable installs,
  which skip data files; its ``argv`` runs the Python that ran the command.

``tests/test_kernelspec.py`` checks that the committed file is ``kernelspec_json()``.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["KERNEL_NAME", "engine_kernelspec", "kernelspec_json"]

KERNEL_NAME = "ipyfarm-engine"


def engine_kernelspec(python: str = "python") -> dict[str, Any]:
    """The kernelspec dict of an ipyfarm engine run by the interpreter ``python``."""
    return {
        "argv": [python, "-m", "ipyfarm.engine", "-f", "{connection_file}"],
        "display_name": "ipyfarm engine",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"debugger": False},
    }


def kernelspec_json(python: str = "python") -> str:
    """``kernel.json``'s text, exactly as committed and as installed."""
    return json.dumps(engine_kernelspec(python), indent=2) + "\n"
