"""``Dashboard(client)``: a live ipywidgets view of the farm.

One refresh = one ``client.farm_status()`` request, folded into a pure
:class:`~ipyfarm.widgets.model.FarmModel`; the resulting snapshot is written into the
widgets that already exist (only their ``.value`` changes; engine rows are rebuilt only
when the set of engines changes). A daemon thread refreshes every ``interval`` seconds
while other cells run, until :meth:`Dashboard.close`, the widget's comm closing, or the
client closing. Buttons call public client / cluster methods and then refresh.

Stable CSS classes (the browser tests rely on them): ``ipyfarm-dashboard`` on the box,
``ipyfarm-engine-row`` on each engine row, ``ipyfarm-launcher`` on the line that says how
the engines were started (``slurm job 12 RUNNING``), and one per button:
``ipyfarm-add-engines``, ``ipyfarm-stop-engine``, ``ipyfarm-interrupt``, ``ipyfarm-abort``,
``ipyfarm-clear``.
"""

from __future__ import annotations

import html
import signal
import threading
import time
from typing import Any, Callable

import ipywidgets as W

from .model import ENGINE_COLUMNS, EngineRow, FarmModel, FarmSnapshot

__all__ = ["Dashboard"]

_WIDTHS = {"engine_id": "40px", "hostname": "140px", "pid": "70px", "state": "60px",
           "queue": "60px", "completed": "70px", "failed": "60px", "memory": "90px"}
_STATE_COLOURS = {"idle": "#2a7d2a", "busy": "#c76a00", "dead": "#999999"}


def _cell(text: str, attr: str, bold: bool = False) -> W.HTML:
    value = f"<b>{html.escape(text)}</b>" if bold else html.escape(text)
    return W.HTML(value, layout=W.Layout(width=_WIDTHS[attr], margin="0 4px 0 0"))


def _state_html(state: str) -> str:
    colour = _STATE_COLOURS.get(state, "inherit")
    return f'<span style="color:{colour}">{html.escape(state)}</span>'


class _EngineRowView:
    """The widgets of one engine's row; :meth:`show` writes a row's values into them."""

    def __init__(self, engine_id: int, on_stop: Callable[[int], None]):
        self.cells = {attr: _cell("", attr) for _, attr in ENGINE_COLUMNS}
        self.stop = W.Button(description="stop", tooltip=f"stop engine {engine_id}",
                             layout=W.Layout(width="60px"))
        self.stop.add_class("ipyfarm-stop-engine")
        self.stop.on_click(lambda _button: on_stop(engine_id))
        self.box = W.HBox([*self.cells.values(), self.stop])
        self.box.add_class("ipyfarm-engine-row")

    def show(self, row: EngineRow) -> None:
        for (_, attr), text in zip(ENGINE_COLUMNS, row.cells(), strict=True):
            value = _state_html(text) if attr == "state" else html.escape(text)
            if self.cells[attr].value != value:
                self.cells[attr].value = value
        self.stop.disabled = not row.alive
        if not row.alive and "ipyfarm-engine-dead" not in self.box._dom_classes:
            self.box.add_class("ipyfarm-engine-dead")
            self.box.tooltip = row.lost_reason or "dead"

    def close(self) -> None:
        for w in (*self.cells.values(), self.stop, self.box):
            w.close()


class Dashboard(W.VBox):
    """A live view of ``client``'s farm, refreshed every ``interval`` seconds.

    ``autostart=False`` leaves the background refresh off; call :meth:`refresh`
    (or :meth:`start`) yourself.
    """

    def __init__(self, client: Any, interval: float = 1.0, autostart: bool = True,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.client = client
        self.interval = float(interval)
        self.model = FarmModel()
        self._lock = threading.RLock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._rows: dict[int, _EngineRowView] = {}
        self._dashboard_closed = False
        self.refreshes = 0  # how many refreshes ran (tests and the curious read it)
        self._build()
        self.add_class("ipyfarm-dashboard")
        if self.comm is not None:  # the frontend closed the widget: stop refreshing
            self.comm.on_close(lambda _msg: self._stop_event.set())
        self.refresh()
        if autostart:
            self.start()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        self.header = W.HTML(layout=W.Layout(margin="0 0 4px 0"))
        self.header.add_class("ipyfarm-summary")
        self.launcher_line = W.HTML()
        self.launcher_line.add_class("ipyfarm-launcher")
        self.add_count = W.BoundedIntText(value=1, min=1, max=256, description="",
                                          layout=W.Layout(width="60px"))
        self.add_count.add_class("ipyfarm-add-count")
        cluster = getattr(self.client, "cluster", None)
        self.add_button = self._button(
            "add engines", "ipyfarm-add-engines", self._add_engines, "plus",
            "start more engines" if cluster is not None else
            "this client did not come from a Cluster: start engines with `ipyfarm engine`")
        self.add_button.disabled = cluster is None
        self.interrupt_button = self._button(
            "interrupt", "ipyfarm-interrupt", self._interrupt, "stop",
            "send SIGINT to every engine: running code raises KeyboardInterrupt")
        self.abort_button = self._button(
            "abort queued", "ipyfarm-abort", self._abort, "ban",
            "abort every task that has not started yet")
        self.clear_button = self._button(
            "clear namespaces", "ipyfarm-clear", self._clear, "eraser",
            "empty the engines' namespaces")
        toolbar = W.HBox([self.add_count, self.add_button, self.interrupt_button,
                          self.abort_button, self.clear_button])
        toolbar.add_class("ipyfarm-toolbar")
        heading = W.HBox([_cell(h, attr, bold=True) for h, attr in ENGINE_COLUMNS])
        heading.add_class("ipyfarm-engine-heading")
        self.table = W.VBox([heading])
        self.table.add_class("ipyfarm-engines")
        self.totals = W.HTML()
        self.totals.add_class("ipyfarm-task-totals")
        self.plot = W.HTML()
        self.plot.add_class("ipyfarm-throughput")
        self.message = W.HTML()
        self.message.add_class("ipyfarm-dashboard-message")
        self._static = [self.header, self.add_count, self.add_button, self.interrupt_button,
                        self.abort_button, self.clear_button, toolbar, *heading.children,
                        heading, self.table, self.totals, self.plot, self.message,
                        self.launcher_line]
        self.children = [self.header, self.launcher_line, toolbar, self.table, self.totals,
                         self.plot, self.message]

    def _button(self, label: str, css: str, action: Callable[[], str], icon: str,
                tooltip: str) -> W.Button:
        button = W.Button(description=label, icon=icon, tooltip=tooltip,
                          layout=W.Layout(width="auto"))
        button.add_class(css)
        button.on_click(lambda _button: self._run(label, action))
        return button

    # ------------------------------------------------------------------ refreshing
    @property
    def snapshot(self) -> FarmSnapshot | None:
        """The last snapshot shown."""
        return self.model.snapshot

    @property
    def rows(self) -> dict[int, W.HBox]:
        """The engine rows shown now, by engine id."""
        return {i: v.box for i, v in self._rows.items()}

    def refresh(self) -> FarmSnapshot | None:
        """Ask the controller for one status snapshot and show it; returns the snapshot
        (None when the controller could not be asked; the reason is shown)."""
        with self._lock:
            if self._dashboard_closed:
                return None
            if self.client.closed:
                self._say("the client is closed; the dashboard stopped refreshing")
                self._stop_event.set()
                return None
            try:
                status = self.client.farm_status()
            except Exception as e:  # a dead controller must not kill the refresh thread
                self._say(f"could not reach the controller: {e}", error=True)
                return None
            snap = self.model.update(status, time.monotonic())
            self._show(snap)
            self.refreshes += 1
            return snap

    def _show(self, snap: FarmSnapshot) -> None:
        self._set(self.header, f"<b>ipyfarm</b> · {html.escape(snap.summary())}")
        self._set(self.launcher_line,
                  f"launcher: {html.escape(snap.launcher)}" if snap.launcher else "")
        if tuple(self._rows) != snap.engine_ids:
            self._rebuild_rows(snap.engine_ids)
        for row in snap.engines:
            self._rows[row.engine_id].show(row)
        self._set(self.totals, "tasks: " + html.escape(snap.totals_line()))
        self._set(self.plot, snap.plot_svg())

    def _rebuild_rows(self, ids: tuple[int, ...]) -> None:
        for gone in set(self._rows) - set(ids):
            self._rows.pop(gone).close()
        self._rows = {i: self._rows.get(i) or _EngineRowView(i, self._stop_engine)
                      for i in ids}
        self.table.children = [self.table.children[0], *(v.box for v in self._rows.values())]

    @staticmethod
    def _set(widget: W.HTML, value: str) -> None:
        if widget.value != value:
            widget.value = value

    def _say(self, text: str, error: bool = False) -> None:
        colour = "#b00020" if error else "#555"
        self._set(self.message, f'<span style="color:{colour}">{html.escape(text)}</span>')

    # ------------------------------------------------------------------ the background thread
    def start(self) -> None:
        """Start refreshing every ``interval`` seconds on a daemon thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._loop, name="ipyfarm-dashboard",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the background refresh (the widget stays, showing its last snapshot)."""
        self._stop_event.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the background refresh thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop_event.wait(self.interval):
            if self.comm is None or getattr(self.comm, "_closed", False):
                break  # the widget was closed, here or by the frontend
            self.refresh()  # says so and stops when the client has closed

    def close(self) -> None:
        """Stop refreshing and close the widget and its parts."""
        self.stop()
        with self._lock:
            self._dashboard_closed = True
            for view in self._rows.values():
                view.close()
            self._rows = {}
            for w in self._static:
                w.close()
        super().close()

    # ------------------------------------------------------------------ buttons
    def _run(self, label: str, action: Callable[[], str]) -> None:
        try:
            self._say(action())
        except Exception as e:
            self._say(f"{label} failed: {type(e).__name__}: {e}", error=True)
        self.refresh()

    def _add_engines(self) -> str:
        n = int(self.add_count.value)
        pids = self.client.cluster.start_engines_sync(n)
        return f"started {n} engine{'s' * (n != 1)} (pid {', '.join(map(str, pids))})"

    def _stop_engine(self, engine_id: int) -> None:
        def stop() -> str:
            cluster = getattr(self.client, "cluster", None)
            if cluster is not None:
                cluster.stop_engines_sync(engine_id)
            else:
                self.client.shutdown(targets=[engine_id])
            return f"stopping engine {engine_id}"

        self._run(f"stop engine {engine_id}", stop)

    def _interrupt(self) -> str:
        self.client.send_signal(signal.SIGINT)
        return "sent SIGINT to every engine"

    def _abort(self) -> str:
        self.client.abort()
        return "aborted the tasks that had not started"

    def _clear(self) -> str:
        self.client.clear()
        return "cleared the engines' namespaces"

    # ------------------------------------------------------------------ fallbacks
    def to_text(self) -> str:
        snap = self.snapshot
        return "ipyfarm Dashboard (no snapshot yet)" if snap is None else snap.to_text()

    def to_html(self) -> str:
        snap = self.snapshot
        if snap is None:
            return '<div class="ipyfarm-dashboard">ipyfarm dashboard: no snapshot yet</div>'
        return snap.to_html()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        """The widget view, plus HTML and text forms for frontends without widgets."""
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = self.to_text()
        data["text/html"] = self.to_html()
        return data

    def _repr_html_(self) -> str:
        return self.to_html()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.to_text())

    def __repr__(self) -> str:
        return self.to_text()
