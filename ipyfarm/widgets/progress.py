"""Progress for ``AsyncResult.wait_interactive()``: a widget bar in notebooks, a text line
in terminals.

A notebook is an IPython kernel with a frontend (``get_ipython()`` is a
``ZMQInteractiveShell``); there an ``IntProgress`` (CSS class ``ipyfarm-progress``) shows
done/total and the elapsed time, updated every ``interval`` seconds until the result is
ready or ``timeout`` seconds pass. Anywhere else (a terminal IPython, a script) the text
line ``"\\r3/10 tasks finished after 2s"`` is kept.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["in_notebook", "wait_interactive"]


def in_notebook() -> bool:
    """Whether we run in a kernel that a notebook frontend talks to."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and any(
        cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__)


def wait_interactive(ar: Any, interval: float = 0.1, timeout: float | None = None,
                     widget: bool | None = None) -> Any:
    """Wait for ``ar`` (up to ``timeout`` s; None: forever), showing its progress.

    ``widget=None`` picks the widget bar in a notebook, the text line elsewhere; the
    widget (an ipywidgets box) is returned, or None for the text line.
    """
    if widget is None:
        widget = in_notebook()
    if widget:
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            widget = False
    if widget:
        return _wait_widget(ar, interval, timeout)
    _wait_text(ar, interval, timeout)
    return None


def _wait_text(ar: Any, interval: float, timeout: float | None) -> None:
    start = time.monotonic()
    n = len(ar)
    while not ar.wait(interval):
        sys.stdout.write(f"\r{ar.progress}/{n} tasks finished after "
                         f"{time.monotonic() - start:.0f}s")
        sys.stdout.flush()
        if timeout is not None and time.monotonic() - start > timeout:
            break
    sys.stdout.write(f"\r{ar.progress}/{n} tasks finished after {ar.elapsed:.1f}s\n")
    sys.stdout.flush()


def _label(ar: Any, n: int) -> str:
    return f"{ar.progress}/{n} tasks · {ar.elapsed:.1f} s"


def _wait_widget(ar: Any, interval: float, timeout: float | None) -> Any:
    import ipywidgets as W
    from IPython.display import display

    n = len(ar)
    bar = W.IntProgress(value=ar.progress, min=0, max=max(n, 1), description="",
                        bar_style="info", layout=W.Layout(width="300px"))
    bar.add_class("ipyfarm-progress")
    label = W.Label(_label(ar, n))
    label.add_class("ipyfarm-progress-label")
    box = W.HBox([bar, label])
    box.add_class("ipyfarm-progress-box")
    display(box)
    start = time.monotonic()
    while not ar.wait(interval):
        bar.value = ar.progress
        label.value = _label(ar, n)
        if timeout is not None and time.monotonic() - start > timeout:
            bar.bar_style = "warning"
            label.value = _label(ar, n) + " · still running"
            return box
    bar.value = ar.progress
    bar.bar_style = "success" if ar.exception(0) is None else "danger"
    label.value = _label(ar, n) + (" · done" if ar.exception(0) is None else " · failed")
    return box
