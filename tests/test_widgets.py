"""The dashboard and progress widgets.

Pure tests of the snapshot model first (status dicts in, snapshots out: no widgets, no
clock), then the widget fed by a scripted client, then the real thing on a 2-engine
cluster: rows, CSS classes, buttons pressed with ``click()``, the refresh thread's life,
and what a refresh every 0.1 s costs the controller.
"""

import ast
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import ipyfarm as ipp
from ipyfarm.widgets.model import (
    ENGINE_COLUMNS,
    EngineRow,
    FarmModel,
    FarmSnapshot,
    ThroughputPoint,
    launcher_summary,
    throughput_svg,
)

from .conftest import wait_until

W = pytest.importorskip("ipywidgets")
from ipyfarm.widgets.dashboard import Dashboard  # noqa: E402
from ipyfarm.widgets.progress import in_notebook  # noqa: E402
from ipyfarm.widgets.progress import wait_interactive as progress_wait  # noqa: E402

MB = 2**20


def engine(engine_id, state="idle", rss=50 * MB, completed=0, failed=0, queue=0,
           hostname="node1", pid=None, lost_reason=""):
    return {"engine_id": engine_id, "hostname": hostname, "pid": pid or 1000 + engine_id,
            "state": state, "queue": queue, "completed": completed, "failed": failed,
            "rss": rss, "lost_reason": lost_reason}


def status(engines=(), finished=0, dispatched=None, **tasks):
    counts = {"running": 0, "queued": 0, "waiting": 0, "ok": 0, "error": 0, "aborted": 0}
    counts.update(tasks)
    return {"engines": list(engines), "tasks": counts, "finished": finished,
            "dispatched": finished if dispatched is None else dispatched,
            "scheme": "leastload", "hwm": 1}


# ---------------------------------------------------------------------- the pure model
def test_first_snapshot_has_no_rate_and_the_second_has_the_change_over_time():
    model = FarmModel()
    first = model.update(status([engine(0)], finished=100), now=10.0)
    assert first.throughput is None and first.history == ()
    second = model.update(status([engine(0)], finished=160), now=12.0)
    assert second.throughput == pytest.approx(30.0)
    assert second.history == (ThroughputPoint(12.0, 30.0),)
    assert second.finished == 160


def test_rate_from_two_snapshots_built_directly():
    a = FarmSnapshot.from_status(status(finished=10), taken_at=1.0)
    b = FarmSnapshot.from_status(status(finished=15), taken_at=1.5, previous=a)
    assert b.throughput == pytest.approx(10.0)


def test_a_counter_that_went_backwards_gives_zero_not_a_negative_rate():
    model = FarmModel()
    model.update(status(finished=500), now=1.0)
    assert model.update(status(finished=3), now=2.0).throughput == 0.0


def test_a_clock_that_did_not_move_gives_no_rate():
    model = FarmModel()
    model.update(status(finished=1), now=5.0)
    snap = model.update(status(finished=9), now=5.0)
    assert snap.throughput is None and snap.history == ()


def test_history_keeps_only_the_window_and_at_most_max_points():
    model = FarmModel(window=60.0, max_points=1000)
    for t in range(0, 301):
        snap = model.update(status(finished=t * 10), now=float(t))
    assert snap.history[-1] == ThroughputPoint(300.0, 10.0)
    assert snap.history[0].t >= 300.0 - 60.0
    assert len(snap.history) == 61
    small = FarmModel(window=1e9, max_points=5)
    for t in range(100):
        snap = small.update(status(finished=t), now=float(t))
    assert len(snap.history) == 5 and snap.history[0].t == 95.0


def test_engine_rows_memory_in_mb_sorted_by_id():
    snap = FarmSnapshot.from_status(
        status([engine(2, rss=100 * MB), engine(0, rss=int(48.25 * MB))]), taken_at=0.0)
    assert snap.engine_ids == (0, 2)
    assert snap.engines[0].memory_mb == pytest.approx(48.25)
    assert snap.engines[0].memory == "48.2 MB"
    assert snap.total_memory_mb == pytest.approx(148.25)


def test_dead_engines_and_unknown_memory():
    snap = FarmSnapshot.from_status(status([
        engine(0, state="busy", queue=2, rss=None),
        engine(1, state="dead", rss=60 * MB, completed=7, failed=1,
               lost_reason="exit code -9"),
    ], running=2), taken_at=0.0)
    busy, dead = snap.engines
    assert busy.memory_mb is None and busy.memory == "–" and busy.alive
    assert not dead.alive and dead.lost_reason == "exit code -9"
    assert snap.live_engines == 1 and snap.busy_engines == 1
    assert snap.total_memory_mb is None  # the dead engine's last memory does not count
    assert "1 engines (1 busy, 1 dead)" in snap.summary()
    assert dead.cells() == ("1", "node1", "1001", "dead", "0", "7", "1", "60.0 MB")


def test_text_form_is_an_aligned_table_with_totals():
    snap = FarmSnapshot.from_status(
        status([engine(0, completed=12), engine(1, state="dead", rss=None)], finished=12,
               ok=11, error=1), taken_at=0.0)
    text = snap.to_text()
    lines = text.splitlines()
    assert lines[0].startswith("ipyfarm farm: 1 engines")
    assert lines[1].split() == [h for h, _ in ENGINE_COLUMNS]
    assert lines[2].split() == ["0", "node1", "1000", "idle", "0", "12", "0", "50.0", "MB"]
    assert lines[3].split()[3] == "dead" and lines[3].split()[-1] == "–"
    assert lines[-1] == "tasks: running 0 · queued 0 · waiting 0 · ok 11 · error 1 · aborted 0"
    empty = FarmSnapshot.from_status(status(), taken_at=0.0).to_text()
    assert "(no engines registered)" in empty


def test_html_form_has_the_css_classes_escapes_and_a_plot():
    model = FarmModel()
    model.update(status([engine(0)], finished=0), now=0.0)
    snap = model.update(status([engine(0, hostname="<b>evil</b>"), engine(1, state="dead",
                                lost_reason='said "bye"')], finished=20), now=1.0)
    page = snap.to_html()
    assert page.startswith('<div class="ipyfarm-dashboard">')
    assert page.count('class="ipyfarm-engine-row') == 2
    assert "ipyfarm-engine-dead" in page and 'title="said &quot;bye&quot;"' in page
    assert "<b>evil</b>" not in page and "&lt;b&gt;evil&lt;/b&gt;" in page
    assert "<svg" in page and "<polyline" in page and "ipyfarm-task-totals" in page
    assert "no engines registered" in FarmSnapshot.from_status(status(), 0.0).to_html()


def test_throughput_plot_puts_the_newest_point_at_the_right_and_the_peak_at_the_top():
    points = [ThroughputPoint(39.0, 5.0), ThroughputPoint(70.0, 5.0), ThroughputPoint(100.0, 10.0)]
    svg = throughput_svg(points, now=100.0, window=60.0, width=120, height=50)
    coords = svg.split('points="')[1].split('"')[0]
    assert coords == "60.0,25.0 120.0,2.0"  # t=39 is out of the 60 s window
    assert 'points=""' in throughput_svg([], now=0.0)


def test_engine_row_from_a_status_row_with_missing_fields():
    row = EngineRow.from_status({"engine_id": 3})
    assert (row.engine_id, row.state, row.queue, row.memory) == (3, "idle", 0, "–")


def test_launcher_line_from_the_launchers_description():
    slurm = {"backend": "slurm", "job_id": 12, "state": "RUNNING", "running": 1,
             "jobs": [{"job_id": 12, "state": "RUNNING"}]}
    assert launcher_summary(slurm) == "slurm job 12 RUNNING"
    assert launcher_summary({"backend": "ssh", "hosts": ["n1", "n2"]}) == "ssh n1,n2"
    assert launcher_summary({"backend": "local", "running": 2}) == "local"
    assert launcher_summary({"error": "SlurmError: no squeue"}) == "? (SlurmError: no squeue)"
    assert launcher_summary(None) == launcher_summary({}) == ""
    snap = FarmSnapshot.from_status(dict(status([engine(0)]), launcher=slurm), taken_at=0.0)
    assert snap.launcher == "slurm job 12 RUNNING"
    assert snap.to_text().splitlines()[1] == "launcher: slurm job 12 RUNNING"
    assert '<div class="ipyfarm-launcher">launcher: slurm job 12 RUNNING</div>' in snap.to_html()
    hostile = dict(status(), launcher={"backend": "<i>x</i>", "state": "R&D"})
    page = FarmSnapshot.from_status(hostile, 0.0).to_html()
    assert "<i>x</i>" not in page and "&lt;i&gt;x&lt;/i&gt; R&amp;D" in page
    bare = FarmSnapshot.from_status(status(), 0.0)  # an older controller: no launcher key
    assert bare.launcher == "" and "ipyfarm-launcher" not in bare.to_html()
    assert not any(ln.startswith("launcher:") for ln in bare.to_text().splitlines())


def test_the_model_is_pure():
    tree = ast.parse(Path(ipp.widgets.model.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    forbidden = {"ipywidgets", "IPython", "threading", "time", "zmq", "asyncio"}
    assert not imported & forbidden, imported & forbidden


def test_import_ipyfarm_does_not_import_ipywidgets():
    code = ("import sys, ipyfarm; assert 'ipywidgets' not in sys.modules; "
            "ipyfarm.Dashboard; assert 'ipywidgets' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with pytest.raises(AttributeError):
        ipp.NoSuchThing  # noqa: B018


# ---------------------------------------------------------------------- widget, scripted client
class ScriptedClient:
    """Answers farm_status() from a list; records the button calls."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.closed = False
        self.cluster = None
        self.calls = []
        self.asked = 0

    def farm_status(self):
        self.asked += 1
        item = self.statuses[min(self.asked - 1, len(self.statuses) - 1)]
        if isinstance(item, Exception):
            raise item
        return item

    def send_signal(self, sig, targets=None):
        self.calls.append(("signal", sig))

    def abort(self, jobs=None, targets=None):
        self.calls.append(("abort",))

    def clear(self, targets=None):
        self.calls.append(("clear",))

    def shutdown(self, targets="all"):
        self.calls.append(("shutdown", targets))


def texts(row):
    return [c.value for c in row.children[:-1]]


def test_launcher_line_follows_the_job_state():
    running = dict(status([engine(0)]), launcher={"backend": "slurm", "job_id": 7,
                                                  "state": "RUNNING"})
    gone = dict(status(), launcher={"backend": "slurm", "job_id": 7, "state": "CANCELLED"})
    client = ScriptedClient([running, gone])
    d = Dashboard(client, autostart=False)
    try:
        assert "ipyfarm-launcher" in d.launcher_line._dom_classes
        assert d.launcher_line in d.children
        assert d.launcher_line.value == "launcher: slurm job 7 RUNNING"
        d.refresh()
        assert d.launcher_line.value == "launcher: slurm job 7 CANCELLED"
    finally:
        d.close()


def test_rows_are_updated_in_place_and_rebuilt_only_when_the_engines_change():
    client = ScriptedClient([
        status([engine(0), engine(1)]),
        status([engine(0, state="busy", queue=1, completed=4), engine(1)], finished=4),
        status([engine(0), engine(1), engine(2)], finished=9),
    ])
    d = Dashboard(client, autostart=False)
    try:
        assert "ipyfarm-dashboard" in d._dom_classes
        first = d.rows
        assert list(first) == [0, 1]
        assert all("ipyfarm-engine-row" in r._dom_classes for r in first.values())
        cell = first[0].children[5]
        d.refresh()
        assert d.rows == first and first[0].children[5] is cell  # the same widgets
        assert cell.value == "4" and "busy" in first[0].children[3].value
        d.refresh()
        assert list(d.rows) == [0, 1, 2]
        assert d.rows[0] is first[0] and d.rows[1] is first[1]
        assert texts(d.rows[2])[:3] == ["2", "node1", "1002"]
        assert "tasks: running 0" in d.totals.value and "<svg" in d.plot.value
        assert client.asked == 3  # one status request per refresh
    finally:
        d.close()


def test_dead_engine_row_cannot_be_stopped_again_and_stop_uses_shutdown_without_a_cluster():
    client = ScriptedClient([status([engine(0), engine(1, state="dead", rss=None,
                                                        lost_reason="it shut down")])])
    d = Dashboard(client, autostart=False)
    try:
        stop0, stop1 = (d.rows[i].children[-1] for i in (0, 1))
        assert "ipyfarm-stop-engine" in stop0._dom_classes
        assert not stop0.disabled and stop1.disabled
        assert "ipyfarm-engine-dead" in d.rows[1]._dom_classes
        assert texts(d.rows[1])[-1] == "–"
        stop0.click()
        assert ("shutdown", [0]) in client.calls
        assert d.add_button.disabled  # no Cluster behind this client: nothing to add with
    finally:
        d.close()


def test_buttons_call_the_public_client_methods():
    client = ScriptedClient([status([engine(0)])])
    d = Dashboard(client, autostart=False)
    try:
        for cls in ("ipyfarm-interrupt", "ipyfarm-abort", "ipyfarm-clear",
                    "ipyfarm-add-engines"):
            assert sum(cls in b._dom_classes for b in d._static) == 1, cls
        d.interrupt_button.click()
        d.abort_button.click()
        d.clear_button.click()
        assert client.calls == [("signal", signal.SIGINT), ("abort",), ("clear",)]
    finally:
        d.close()


def test_a_failing_controller_is_reported_and_does_not_stop_the_refresh():
    client = ScriptedClient([status([engine(0)]), TimeoutError("no answer"),
                             status([engine(0), engine(1)])])
    d = Dashboard(client, autostart=False)
    try:
        assert d.refresh() is None
        assert "could not reach the controller: no answer" in d.message.value
        assert d.refresh() is not None and list(d.rows) == [0, 1]
    finally:
        d.close()


def test_fallback_forms_for_frontends_without_widgets():
    d = Dashboard(ScriptedClient([status([engine(0)])]), autostart=False)
    try:
        bundle = d._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle
        assert bundle["text/html"] == d._repr_html_() == d.snapshot.to_html()
        assert bundle["text/plain"] == repr(d) == d.snapshot.to_text()
        from IPython.lib.pretty import pretty

        assert pretty(d) == d.snapshot.to_text()
    finally:
        d.close()


def test_refresh_thread_stops_on_close_on_client_close_and_on_frontend_close():
    for how in ("close", "client", "comm"):
        client = ScriptedClient([status([engine(0)])])
        d = Dashboard(client, interval=0.01)
        assert wait_until(lambda d=d: d.refreshes >= 3, 10), how
        if how == "close":
            d.close()
        elif how == "client":
            client.closed = True
        else:
            d.comm.handle_close({})  # what the kernel calls when the frontend closes it
        assert wait_until(lambda d=d: not d.running, 10), how
        asked = client.asked
        assert not d.running and client.asked == asked
        d.close()
    assert not [t for t in threading.enumerate() if t.name == "ipyfarm-dashboard"]


# ---------------------------------------------------------------------- progress
class FakeResult:
    """An AsyncResult stand-in that finishes one task per wait()."""

    def __init__(self, n):
        self.n, self.progress, self.elapsed = n, 0, 0.0

    def __len__(self):
        return self.n

    def wait(self, timeout):
        self.progress = min(self.progress + 1, self.n)
        self.elapsed += 0.5
        return self.progress == self.n

    def exception(self, timeout=None):
        return None


def test_progress_outside_a_notebook_is_a_text_line(capsys):
    assert not in_notebook()
    assert progress_wait(FakeResult(3), interval=0) is None
    out = capsys.readouterr().out
    assert out.endswith("\r3/3 tasks finished after 1.5s\n")
    assert "\r1/3 tasks finished" in out


def test_progress_widget_counts_to_the_total():
    box = progress_wait(FakeResult(4), interval=0, widget=True)
    bar, label = box.children
    assert "ipyfarm-progress" in bar._dom_classes
    assert (bar.value, bar.max, bar.bar_style) == (4, 4, "success")
    assert label.value == "4/4 tasks · 2.0 s · done"
    box.close()


def test_wait_interactive_in_a_terminal_prints_text(rc, capsys):
    ar = rc.load_balanced_view().map_async(lambda x: x, range(20), chunksize=1)
    ar.wait_interactive(interval=0.01)
    assert ar.ready()
    out = capsys.readouterr().out
    assert out.endswith("\n") and "20/20 tasks finished after" in out


# ---------------------------------------------------------------------- real engines
def started(paths, timeout=30):
    return wait_until(lambda: all(os.path.exists(p) for p in paths), timeout)


def mark_and_sleep(path, seconds):
    import time

    open(path, "w").close()
    time.sleep(seconds)
    return "slept"


@pytest.fixture
def dashboard(rc):
    d = Dashboard(rc, autostart=False)
    yield d
    d.close()


def live_rows(d):
    return [i for i, r in zip(d.snapshot.engine_ids, d.snapshot.engines, strict=True)
            if r.alive]


def wait_for_file(path, timeout=30):
    import os
    import time

    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not created within {timeout} s")
        time.sleep(0.01)
    return path


def fail(message):
    raise ValueError(message)


def cell(row, header):
    return texts(row)[[h for h, _ in ENGINE_COLUMNS].index(header)]


def test_rows_show_the_engines(rc, dashboard, tmp_path):
    """Every column against the real engines: id, host, pid, state, queue, done, failed,
    memory (shown from the first refresh: the engine's registration carries it)."""
    pids = dict(zip(rc.ids, rc[:].apply_sync(os.getpid), strict=True))
    snap = dashboard.refresh()
    assert "ipyfarm-dashboard" in dashboard._dom_classes
    assert live_rows(dashboard) == rc.ids
    before = {r.engine_id: (r.completed, r.failed) for r in snap.engines}
    for engine_id in rc.ids:
        row = dashboard.rows[engine_id]
        assert "ipyfarm-engine-row" in row._dom_classes
        assert cell(row, "id") == str(engine_id)
        assert cell(row, "host") == socket.gethostname()
        assert cell(row, "pid") == str(pids[engine_id])
        assert "idle" in cell(row, "state") and cell(row, "queue") == "0"
        shown = float(cell(row, "memory").removesuffix(" MB"))
        real = psutil.Process(pids[engine_id]).memory_info().rss / MB
        assert 0.5 * real < shown < 1.5 * real, (shown, real)
    assert snap.tasks.keys() == {"running", "queued", "waiting", "ok", "error", "aborted"}
    # engine 0: 3 ok and 1 failed; engine 1: 1 ok and 2 failed
    plan = {0: (3, 1), 1: (1, 2)}
    ars = [rc[e].apply_async(noop) for e, (ok, _) in plan.items() for _ in range(ok)]
    ars += [rc[e].apply_async(fail, "on purpose") for e, (_, bad) in plan.items()
            for _ in range(bad)]
    for ar in ars:
        ar.wait(30)
    snap = dashboard.refresh()
    for engine_id, (ok, bad) in plan.items():
        row = dashboard.rows[engine_id]
        assert int(cell(row, "done")) - before[engine_id][0] == ok
        assert int(cell(row, "failed")) - before[engine_id][1] == bad
    # a queue: engine 0 runs one task held by a gate and holds two more
    gate = tmp_path / "gate"
    held = [rc[0].apply_async(wait_for_file, str(gate)) for _ in range(3)]
    try:
        assert wait_until(lambda: dashboard.refresh().engines[0].state == "busy", 30)
        assert cell(dashboard.rows[0], "queue") == "3" and "busy" in cell(dashboard.rows[0],
                                                                          "state")
        assert cell(dashboard.rows[1], "queue") == "0"
    finally:
        gate.touch()
    for ar in held:
        assert ar.get(30) == str(gate)
    snap = dashboard.refresh()
    assert cell(dashboard.rows[0], "queue") == "0" and "idle" in cell(dashboard.rows[0],
                                                                      "state")
    assert int(cell(dashboard.rows[0], "done")) - before[0][0] == 3 + 3


def test_progress_widget_follows_a_real_async_result(rc, tmp_path):
    gates = [tmp_path / f"gate{i}" for i in range(4)]
    ar = rc.load_balanced_view().map_async(wait_for_file, [str(g) for g in gates],
                                           chunksize=1)
    for g in gates[:2]:  # hwm 1 on 2 engines: these two are the running ones
        g.touch()
    assert wait_until(lambda: ar.progress == 2, 30)
    early = progress_wait(ar, interval=0.02, timeout=0.3, widget=True)
    bar, label = early.children
    assert (bar.value, bar.max, bar.bar_style) == (2, 4, "warning")
    assert label.value.startswith("2/4 tasks") and label.value.endswith("still running")
    for g in gates[2:]:
        g.touch()
    # the bar of the wait that gave up finishes by itself once the results are in
    assert wait_until(lambda: bar.bar_style == "success", 30), (bar.bar_style, label.value)
    assert bar.value == 4 and label.value.startswith("4/4 tasks")
    assert label.value.endswith("done")
    early.close()
    box = progress_wait(ar, interval=0.02, widget=True)
    bar, label = box.children
    assert (bar.value, bar.max, bar.bar_style) == (4, 4, "success")
    assert label.value.startswith("4/4 tasks") and label.value.endswith("done")
    assert ar.get(10) == [str(g) for g in gates]
    box.close()
    failing = rc.load_balanced_view().map_async(fail, ["a", "b"], chunksize=1)
    box = progress_wait(failing, interval=0.02, widget=True)
    bar, label = box.children
    assert (bar.value, bar.bar_style) == (2, "danger") and label.value.endswith("failed")
    box.close()


def test_add_engines_then_stop_one(cluster, rc, dashboard):
    c, _ = cluster
    n = len(rc.ids)
    dashboard.add_count.value = 1
    dashboard.add_button.click()
    assert "started 1 engine" in dashboard.message.value, dashboard.message.value
    rc.wait_for_engines(n + 1, timeout=60)
    new = max(rc.ids)
    assert wait_until(lambda: new in live_rows(dashboard) if dashboard.refresh() else False,
                      10)
    assert texts(dashboard.rows[new])[0] == str(new)
    assert cell(dashboard.rows[new], "memory").endswith(" MB")  # known from registration
    dashboard.rows[new].children[-1].click()
    assert "stopping engine" in dashboard.message.value, dashboard.message.value
    assert wait_until(lambda: dashboard.refresh() and new not in live_rows(dashboard), 30)
    assert "dead" in dashboard.rows[new].children[3].value
    assert dashboard.rows[new].children[-1].disabled
    assert wait_until(lambda: new not in rc.ids, 10)


def test_abort_queued_work_then_interrupt_the_running_tasks(rc, dashboard, tmp_path):
    lv = rc.load_balanced_view()
    n = len(rc.ids)
    marks = [str(tmp_path / f"running{i}") for i in range(n)]
    running = [lv.apply_async(mark_and_sleep, m, 60) for m in marks]
    queued = [lv.apply_async(mark_and_sleep, str(tmp_path / f"queued{i}"), 60)
              for i in range(6)]
    assert started(marks)  # every engine is busy with one (hwm 1 keeps the rest queued)
    snap = dashboard.refresh()
    assert snap.tasks["running"] == n and snap.tasks["queued"] == 6
    assert snap.busy_engines == n
    aborted_before = snap.tasks["aborted"]
    dashboard.abort_button.click()
    for ar in queued:
        with pytest.raises(ipp.RemoteError) as info:
            ar.get(timeout=10)
        assert info.value.ename == "TaskAborted"
    t0 = time.monotonic()
    dashboard.interrupt_button.click()
    for ar in running:
        with pytest.raises(ipp.RemoteError) as info:
            ar.get(timeout=10)
        assert info.value.ename == "KeyboardInterrupt"
    assert time.monotonic() - t0 < 10
    snap = dashboard.refresh()
    assert snap.tasks["aborted"] - aborted_before == 6
    assert snap.tasks["running"] == snap.tasks["queued"] == 0
    assert not any(os.path.exists(tmp_path / f"queued{i}") for i in range(6))


def test_clear_empties_the_namespaces(rc, dashboard):
    dv = rc[:]
    dv.push({"to_clear_by_dashboard": 1}, block=True)
    assert dv.apply_sync(lambda: "to_clear_by_dashboard" in globals()) == [True] * len(rc)
    dashboard.clear_button.click()
    assert "cleared" in dashboard.message.value
    assert dv.apply_sync(lambda: "to_clear_by_dashboard" in globals()) == [False] * len(rc)


def test_background_refresh_follows_the_farm_and_stops_on_close(rc):
    d = Dashboard(rc, interval=0.05)
    try:
        before = d.snapshot.finished
        rc.load_balanced_view().map_sync(lambda x: x, range(30), chunksize=1)
        assert wait_until(lambda: d.snapshot.finished >= before + 30, 10)
        assert d.running
    finally:
        d.close()
    assert not d.running
    count = d.refreshes
    rc.load_balanced_view().apply_sync(lambda: None)
    assert d.refreshes == count


def test_refresh_stops_when_the_client_closes(cluster):
    c, _ = cluster
    other = c.connect_client_sync()
    d = Dashboard(other, interval=0.02)
    try:
        assert wait_until(lambda: d.refreshes >= 2, 10)
        other.close()
        assert wait_until(lambda: not d.running, 10)
        assert "client is closed" in d.message.value
    finally:
        d.close()


def noop():
    pass


def _run_tasks(lv, n):
    t0 = time.perf_counter()
    ars = [lv.apply_async(noop) for _ in range(n)]
    for ar in ars:
        ar.get(120)
    return time.perf_counter() - t0


def test_refresh_cost_on_the_controller(rc, capsys):
    """5,000 load-balanced no-op tasks with and without a dashboard refreshing every
    0.1 s (10x the default rate). Reported, not tightly asserted: timings are noisy."""
    lv = rc.load_balanced_view()
    _run_tasks(lv, 200)  # warm up
    n = 5000
    without = _run_tasks(lv, n)
    d = Dashboard(rc, interval=0.1)
    try:
        with_dashboard = _run_tasks(lv, n)
        refreshes = d.refreshes
    finally:
        d.close()
    without_again = _run_tasks(lv, n)
    base = (without + without_again) / 2
    with capsys.disabled():
        print(f"\nrefresh cost: {n} tasks without dashboard {without:.2f} s / "
              f"{without_again:.2f} s, with a 0.1 s dashboard {with_dashboard:.2f} s "
              f"({refreshes} refreshes); {(with_dashboard / base - 1) * 100:+.1f}%")
    assert refreshes >= 1
    assert with_dashboard < 2 * base + 5
