"""Progress for ``AsyncResult.wait_interactive()`` and ``%%px --progress-after``: a widget
bar in notebooks, a text line in terminals.

A notebook is an IPython kernel with a frontend (``get_ipython()`` is a
``ZMQInteractiveShell``); there an ``IntProgress`` (CSS class ``ipyfarm-progress``) shows
done/total and the elapsed time. Anywhere else (a terminal IPython, a script) it is the text
line ``"\\r3/10 tasks finished after 2s"``. Either is updated every ``interval`` seconds::

    wait_interactive(ar, interval, timeout, widget, return_when, poll)
        display = TextProgress(ar) | WidgetProgress(ar)      (widget=None: which fits)
        until ar is done / return_when is met / timeout:     (ALL_COMPLETED, FIRST_...)
            ar.wait(interval); poll(display); display.update()
        display.close()

``poll`` is how ``%%px`` keeps printing the engines' output lines while the bar runs; it
calls ``display.clear()`` before it prints, so a text line never ends up mid-output.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION
from typing import Any, Callable

__all__ = ["TextProgress", "WidgetProgress", "in_notebook", "make_progress",
           "wait_interactive"]

RETURN_WHEN = (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION)


def in_notebook() -> bool:
    """Whether we run in a kernel that a notebook frontend talks to."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and any(
        cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__)


def _failed(ar: Any) -> int:
    """How many of ``ar``'s messages finished with an error (0 where it cannot tell)."""
    count = getattr(ar, "_failed_count", None)
    return count() if count is not None else 0


def _outcome(ar: Any, done: bool) -> str:
    """``done``, ``failed``, ``still running`` or ``2 failed, still running``."""
    failed = _failed(ar)
    if done:
        return "failed" if failed or ar.exception(0) is not None else "done"
    return f"{failed} failed, still running" if failed else "still running"


class TextProgress:
    """``\\r3/10 tasks finished after 2s`` on one line of ``file`` (redrawn on change)."""

    def __init__(self, ar: Any, file: Any = None):
        self._ar = ar
        self._file = file
        self._start = time.monotonic()
        self._open = False
        self._last: tuple[int, int] | None = None
        self.update()

    def _write(self, text: str) -> None:
        file = self._file or sys.stdout
        file.write(text)
        file.flush()

    def update(self) -> None:
        state = (self._ar.progress, int(time.monotonic() - self._start))
        if state != self._last or not self._open:
            self._last = state
            self._write(f"\r{state[0]}/{len(self._ar)} tasks finished after {state[1]}s")
            self._open = True

    def clear(self) -> None:
        """Blank the line so other output can be printed there (update() redraws it)."""
        if self._open:
            self._write("\r" + " " * 60 + "\r")
            self._open = False

    def close(self, done: bool) -> None:
        left = "" if done else f" ({_outcome(self._ar, done)})"
        self._write(f"\r{self._ar.progress}/{len(self._ar)} tasks finished after "
                    f"{self._ar.elapsed:.1f}s{left}\n")
        self._open = False


class WidgetProgress:
    """An ``IntProgress`` bar and a label in an ``HBox`` (CSS classes ``ipyfarm-progress``,
    ``ipyfarm-progress-label``, ``ipyfarm-progress-box``), displayed at once."""

    def __init__(self, ar: Any):
        import ipywidgets as W
        from IPython.display import display

        self._ar = ar
        n = len(ar)
        self.bar = W.IntProgress(value=ar.progress, min=0, max=max(n, 1), description="",
                                 bar_style="info", layout=W.Layout(width="300px"))
        self.bar.add_class("ipyfarm-progress")
        self.label = W.Label(self._text())
        self.label.add_class("ipyfarm-progress-label")
        self.box = W.HBox([self.bar, self.label])
        self.box.add_class("ipyfarm-progress-box")
        display(self.box)

    def _text(self) -> str:
        return f"{self._ar.progress}/{len(self._ar)} tasks · {self._ar.elapsed:.1f} s"

    def update(self) -> None:
        self.bar.value = self._ar.progress
        self.label.value = self._text()

    def clear(self) -> None:
        """Nothing to do: a widget has its own place in the output."""

    def close(self, done: bool) -> None:
        self.update()
        outcome = _outcome(self._ar, done)
        self.bar.bar_style = ("success" if outcome == "done" else
                              "danger" if "failed" in outcome else "warning")
        self.label.value = f"{self._text()} · {outcome}"
        if not done and not self._ar.done():
            # the wait ended first (timeout, return_when, Ctrl-C): the bar still finishes
            # when the results come in (on the client's I/O thread)
            self._ar.add_done_callback(self._finish_later)

    def _finish_later(self, _future: Any) -> None:
        try:
            self.close(True)
        except Exception:  # a widget closed meanwhile has nothing left to show
            pass


def make_progress(ar: Any, widget: bool | None = None) -> TextProgress | WidgetProgress:
    """The widget bar (``widget`` True, or None in a notebook) or the text line."""
    if widget is None:
        widget = in_notebook()
    if widget:
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            widget = False  # no ipywidgets here: the text line still tells the progress
    return WidgetProgress(ar) if widget else TextProgress(ar)


def _reached(ar: Any, return_when: str) -> bool:
    if return_when == FIRST_COMPLETED:
        return ar.progress > 0
    if return_when == FIRST_EXCEPTION:
        return _failed(ar) > 0
    return False


def wait_interactive(ar: Any, interval: float = 0.1, timeout: float | None = None,
                     widget: bool | None = None, return_when: str = ALL_COMPLETED,
                     poll: Callable[[Any], None] | None = None) -> Any:
    """Wait for ``ar`` (up to ``timeout`` s; None: forever), showing its progress.

    ``widget=None`` picks the widget bar in a notebook, the text line elsewhere.
    ``return_when`` (``concurrent.futures``' constants): ``ALL_COMPLETED`` waits for every
    task, ``FIRST_COMPLETED`` for one, ``FIRST_EXCEPTION`` for one to fail (or all to
    finish). ``poll(display)`` is called every ``interval`` s. Returns the widget box, or
    None for the text line.
    """
    if return_when not in RETURN_WHEN:
        raise ValueError(f"return_when must be one of {', '.join(RETURN_WHEN)}, "
                         f"not {return_when!r}")
    display = make_progress(ar, widget)
    start = time.monotonic()
    done = False
    try:
        while True:
            done = ar.wait(interval)
            if poll is not None:
                poll(display)
            if done or _reached(ar, return_when):
                break
            if timeout is not None and time.monotonic() - start > timeout:
                break
            display.update()
    finally:
        display.close(done)
    return display.box if isinstance(display, WidgetProgress) else None
