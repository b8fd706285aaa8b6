"""The dashboard's view model: pure data built from ``Client.farm_status()`` dicts.

No ipywidgets, no threads, no clock reads: the caller passes each status dict with the
time it was taken, and gets back a frozen :class:`FarmSnapshot` that a widget (or the
HTML / text fallback) renders as is::

    farm_status() dict ──► FarmModel.update(status, now) ──► FarmSnapshot
                               │ keeps the previous one        ├─ engines: EngineRow…
                               │ and a bounded deque of         ├─ tasks, totals
                               ▼ throughput points              ├─ throughput (tasks/s)
                         rate = Δfinished / Δt                  └─ to_html() / to_text()
"""

from __future__ import annotations

import html
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

__all__ = [
    "ENGINE_COLUMNS",
    "TASK_STATES",
    "EngineRow",
    "FarmModel",
    "FarmSnapshot",
    "ThroughputPoint",
    "launcher_summary",
    "throughput_svg",
]

TASK_STATES = ("running", "queued", "waiting", "ok", "error", "aborted")
# (header, EngineRow attribute) in display order
ENGINE_COLUMNS = (
    ("id", "engine_id"), ("host", "hostname"), ("pid", "pid"), ("state", "state"),
    ("queue", "queue"), ("done", "completed"), ("failed", "failed"), ("memory", "memory"),
)
HISTORY_WINDOW = 300.0  # seconds of throughput kept for the plot
HISTORY_POINTS = 600  # and never more points than this, however fast the refresh


@dataclass(frozen=True)
class EngineRow:
    """One engine as the dashboard shows it."""

    engine_id: int
    hostname: str
    pid: int | None
    state: str  # "idle" | "busy" | "dead"
    queue: int
    completed: int
    failed: int
    memory_mb: float | None  # resident memory, None until the engine reports it
    lost_reason: str = ""

    @classmethod
    def from_status(cls, row: Mapping[str, Any]) -> EngineRow:
        rss = row.get("rss")
        return cls(
            engine_id=int(row["engine_id"]),
            hostname=str(row.get("hostname") or ""),
            pid=row.get("pid"),
            state=str(row.get("state") or "idle"),
            queue=int(row.get("queue") or 0),
            completed=int(row.get("completed") or 0),
            failed=int(row.get("failed") or 0),
            memory_mb=None if rss is None else rss / 2**20,
            lost_reason=str(row.get("lost_reason") or ""),
        )

    @property
    def alive(self) -> bool:
        return self.state != "dead"

    @property
    def memory(self) -> str:
        """Memory as shown: ``"48.2 MB"``, or ``"–"`` when unknown."""
        return "–" if self.memory_mb is None else f"{self.memory_mb:.1f} MB"

    def cells(self) -> tuple[str, ...]:
        """The row's cells as strings, in :data:`ENGINE_COLUMNS` order."""
        return tuple("–" if (v := getattr(self, attr)) is None else str(v)
                     for _, attr in ENGINE_COLUMNS)


@dataclass(frozen=True)
class ThroughputPoint:
    t: float  # when (the caller's clock, seconds)
    rate: float  # tasks finished per second over the interval ending at t


@dataclass(frozen=True)
class FarmSnapshot:
    """Everything the dashboard shows at one moment."""

    taken_at: float
    engines: tuple[EngineRow, ...]
    tasks: Mapping[str, int]
    dispatched: int
    finished: int
    scheme: str = ""
    hwm: int | None = None
    throughput: float | None = None  # tasks/s since the previous snapshot; None for the first
    history: tuple[ThroughputPoint, ...] = field(default=())
    window: float = HISTORY_WINDOW
    launcher: str = ""  # how the engines were started: "slurm job 12 RUNNING"; "" unknown

    @classmethod
    def from_status(cls, status: Mapping[str, Any], taken_at: float,
                    previous: FarmSnapshot | None = None,
                    history: Iterable[ThroughputPoint] = (),
                    window: float = HISTORY_WINDOW) -> FarmSnapshot:
        """A snapshot of ``status`` (a ``farm_status()`` dict) taken at ``taken_at``.

        With ``previous``, the throughput is the change of ``finished`` over the time
        between the two; a counter that went backwards (a new controller) gives 0.
        """
        finished = int(status.get("finished") or 0)
        tasks = {k: int((status.get("tasks") or {}).get(k) or 0) for k in TASK_STATES}
        engines = tuple(sorted((EngineRow.from_status(r) for r in status.get("engines") or ()),
                               key=lambda r: r.engine_id))
        return cls(
            taken_at=taken_at, engines=engines, tasks=tasks,
            dispatched=int(status.get("dispatched") or 0), finished=finished,
            scheme=str(status.get("scheme") or ""), hwm=status.get("hwm"),
            throughput=rate_between(previous, finished, taken_at),
            history=tuple(history), window=window,
            launcher=launcher_summary(status.get("launcher")),
        )

    # ------------------------------------------------------------------ derived
    @property
    def engine_ids(self) -> tuple[int, ...]:
        return tuple(r.engine_id for r in self.engines)

    @property
    def live_engines(self) -> int:
        return sum(r.alive for r in self.engines)

    @property
    def busy_engines(self) -> int:
        return sum(r.state == "busy" for r in self.engines)

    @property
    def total_memory_mb(self) -> float | None:
        known = [r.memory_mb for r in self.engines if r.alive and r.memory_mb is not None]
        return sum(known) if known else None

    @property
    def peak_throughput(self) -> float:
        return max((p.rate for p in self.history), default=0.0)

    def summary(self) -> str:
        """One line: engines, throughput, scheme."""
        rate = "–" if self.throughput is None else f"{self.throughput:.1f}"
        dead = len(self.engines) - self.live_engines
        engines = f"{self.live_engines} engines ({self.busy_engines} busy"
        engines += f", {dead} dead)" if dead else ")"
        hwm = f", hwm {self.hwm}" if self.hwm else ""
        return f"{engines} · {rate} tasks/s · {self.finished} finished · {self.scheme}{hwm}"

    def totals_line(self) -> str:
        return " · ".join(f"{k} {self.tasks[k]}" for k in TASK_STATES)

    # ------------------------------------------------------------------ renderings
    def to_text(self) -> str:
        """A plain-text table, for terminals and ``repr``."""
        header = tuple(h for h, _ in ENGINE_COLUMNS)
        rows = [header] + [r.cells() for r in self.engines]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [f"ipyfarm farm: {self.summary()}"]
        if self.launcher:
            lines.append(f"launcher: {self.launcher}")
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                  for row in rows]
        if not self.engines:
            lines.append("(no engines registered)")
        lines.append(f"tasks: {self.totals_line()}")
        return "\n".join(lines)

    def to_html(self) -> str:
        """A plain HTML form (same CSS classes as the widget), where widgets can't render."""
        esc = html.escape
        head = "".join(f"<th>{esc(h)}</th>" for h, _ in ENGINE_COLUMNS)
        body = "".join(
            f'<tr class="ipyfarm-engine-row ipyfarm-engine-{esc(r.state)}"'
            f'{_title(r)}>' + "".join(f"<td>{esc(c)}</td>" for c in r.cells()) + "</tr>"
            for r in self.engines
        ) or f'<tr><td colspan="{len(ENGINE_COLUMNS)}">no engines registered</td></tr>'
        totals = "".join(f"<th>{k}</th>" for k in TASK_STATES)
        counts = "".join(f"<td>{self.tasks[k]}</td>" for k in TASK_STATES)
        return (
            '<div class="ipyfarm-dashboard">'
            f'<div class="ipyfarm-summary"><b>ipyfarm</b> · {esc(self.summary())}</div>'
            f'{self.launcher_html()}'
            f'<table class="ipyfarm-engines"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>"
            f'<table class="ipyfarm-task-totals"><tr>{totals}</tr><tr>{counts}</tr></table>'
            f'<div class="ipyfarm-throughput">{self.plot_svg()}</div>'
            "</div>"
        )

    def launcher_html(self) -> str:
        """``<div class="ipyfarm-launcher">launcher: …</div>``, or "" when unknown."""
        if not self.launcher:
            return ""
        return f'<div class="ipyfarm-launcher">launcher: {html.escape(self.launcher)}</div>'

    def plot_svg(self, width: int = 360, height: int = 60) -> str:
        """The throughput history as an inline SVG (see :func:`throughput_svg`)."""
        return throughput_svg(self.history, self.taken_at, self.window, width, height)


def launcher_summary(desc: Mapping[str, Any] | None) -> str:
    """One line from a launcher's ``describe()`` (``farm_status()["launcher"]``):
    ``"slurm job 12 RUNNING"``, ``"ssh node1,node2"``, ``"local"``; "" without one."""
    if not desc:
        return ""
    if "error" in desc:
        return f"? ({desc['error']})"
    words = [str(desc.get("backend") or "?")]
    if desc.get("job_id") is not None:
        words.append(f"job {desc['job_id']}")
    if desc.get("state"):
        words.append(str(desc["state"]))
    hosts = desc.get("hosts")
    if hosts:
        words.append(",".join(map(str, hosts)) if isinstance(hosts, (list, tuple))
                     else str(hosts))
    return " ".join(words)


def _title(row: EngineRow) -> str:
    return f' title="{html.escape(row.lost_reason)}"' if row.lost_reason else ""


def rate_between(previous: FarmSnapshot | None, finished: int, now: float) -> float | None:
    """Tasks/s finished since ``previous``; None without one or with no time between."""
    if previous is None:
        return None
    dt = now - previous.taken_at
    if dt <= 0:
        return None
    return max(finished - previous.finished, 0) / dt


class FarmModel:
    """Turns successive ``farm_status()`` dicts into snapshots, keeping the throughput
    history of the last ``window`` seconds (at most ``max_points`` points)."""

    def __init__(self, window: float = HISTORY_WINDOW, max_points: int = HISTORY_POINTS):
        self.window = window
        self.history: deque[ThroughputPoint] = deque(maxlen=max_points)
        self.snapshot: FarmSnapshot | None = None

    def update(self, status: Mapping[str, Any], now: float) -> FarmSnapshot:
        """Fold in ``status`` taken at ``now``; return the new snapshot."""
        previous = self.snapshot
        if previous is not None and now <= previous.taken_at:
            previous = None  # a clock that did not move: no rate from this pair
        rate = rate_between(previous, int(status.get("finished") or 0), now)
        if rate is not None:
            self.history.append(ThroughputPoint(now, rate))
        while self.history and self.history[0].t < now - self.window:
            self.history.popleft()
        self.snapshot = FarmSnapshot.from_status(status, now, previous, self.history,
                                                 self.window)
        return self.snapshot


def throughput_svg(history: Iterable[ThroughputPoint], now: float,
                   window: float = HISTORY_WINDOW, width: int = 360, height: int = 60) -> str:
    """An inline SVG line of tasks/s over the last ``window`` seconds (newest at right)."""
    points = [p for p in history if p.t >= now - window]
    top = max((p.rate for p in points), default=0.0)
    scale = top if top > 0 else 1.0
    pad = 2
    coords = " ".join(
        f"{width - (now - p.t) / window * width:.1f},"
        f"{height - pad - p.rate / scale * (height - 2 * pad):.1f}"
        for p in points
    )
    label = f"peak {top:.1f} tasks/s, last {window / 60:.0f} min"
    return (
        f'<svg class="ipyfarm-throughput-plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'aria-label="throughput: {label}">'
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="none" '
        'stroke="#ccc" stroke-width="1"/>'
        f'<polyline points="{coords}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>'
        f'<text x="4" y="12" font-size="10" fill="#666">{label}</text>'
        "</svg>"
    )
