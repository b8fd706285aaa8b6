"""%px, %%px, %autopx, %pxresult, %pxconfig and %farm in a real IPython shell, on real
engines (one 2-engine cluster for the module, activated with ``rc.activate()``)."""

import _thread
import io
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout

import psutil
import pytest

import ipyfarm as ipp

from .conftest import kernel_run, kill_pids, wait_until

pytest.importorskip("IPython")

from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from IPython.testing import tools  # noqa: E402
from IPython.utils.capture import capture_output  # noqa: E402

from ipyfarm.magics import ParallelMagics  # noqa: E402
from ipyfarm.widgets.progress import wait_interactive as progress_wait  # noqa: E402

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def ip(tmp_path_factory):
    hooks = sys.displayhook, sys.excepthook
    config = tools.default_config()
    shell = InteractiveShell.instance(config=config,
                                      ipython_dir=str(tmp_path_factory.mktemp("ipython")))
    shell.run_line_magic("load_ext", "ipyfarm")
    try:
        yield shell
    finally:
        for fn in list(shell.magics_manager.magics["line"].values()):
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, ParallelMagics):
                owner.stop_autopx()
        InteractiveShell.clear_instance()
        sys.displayhook, sys.excepthook = hooks


@pytest.fixture(scope="module")
def px(ip, cluster):
    """The %px magics, activated on the module's cluster."""
    _, rc = cluster
    rc.activate()  # a blocking view of all engines, as ipyparallel's Client.activate
    return ip.magics_manager.magics["line"]["px"].__self__


@pytest.fixture(autouse=True)
def _fresh_config(request):
    yield
    if "px" in request.fixturenames:
        magics = request.getfixturevalue("px")
        magics.stop_autopx()
        magics.config_.targets, magics.config_.block = None, None


def run(ip, cell):
    """Run a cell as a notebook would; its stdout, stderr, display outputs, result."""
    with capture_output() as cap:
        result = ip.run_cell(cell)
    return _ANSI.sub("", cap.stdout), _ANSI.sub("", cap.stderr), cap.outputs, result


def test_px_runs_on_all_engines_with_per_engine_stdout(ip, px, rc):
    out, err, _, result = run(ip, "%px import os; print(os.getpid())")
    assert result.success, out + err
    pids = rc[:].apply_sync(os.getpid)
    assert f"[stdout:0] {pids[0]}" in out
    assert f"[stdout:1] {pids[1]}" in out


def test_px_expression_shows_out_per_engine(ip, px):
    out, _, _, _ = run(ip, "%px 6 * 7")
    assert re.search(r"Out\[0:\d+\]: 42", out)
    assert re.search(r"Out\[1:\d+\]: 42", out)


def test_cell_targets_slice(ip, px):
    out, err, _, result = run(ip, "%%px --targets ::2\nprint('even engine')")
    assert result.success, out + err
    assert "[stdout:0] even engine" in out
    assert "[stdout:1]" not in out
    out, _, _, _ = run(ip, "%%px --targets 1:\nprint('from one')")
    assert "[stdout:1] from one" in out and "[stdout:0]" not in out


def test_group_outputs(ip, px):
    cell = "print('line')\n'value'"
    by_engine, _, _, _ = run(ip, f"%%px --no-stream --group-outputs=engine\n{cell}")
    by_type, _, _, _ = run(ip, f"%%px --no-stream --group-outputs=type\n{cell}")

    def order(text):
        return re.findall(r"\[stdout:(\d)\]|Out\[(\d):", text)

    assert order(by_engine) == [("0", ""), ("", "0"), ("1", ""), ("", "1")]
    assert order(by_type) == [("0", ""), ("1", ""), ("", "0"), ("", "1")]
    with pytest.raises(UsageError):
        ip.run_cell_magic("px", "--group-outputs=nope", "1")


def run_in_order(ip, cell):
    """Run a cell; what it printed and displayed, in the order shown, as one text (a
    display is ``<display HTML>``), and the cell's result."""
    shown = []

    class Stdout(io.StringIO):
        def write(self, text):
            shown.append(text)
            return len(text)

    def publish(data, metadata=None, **kwargs):
        shown.append(f"<display {data.get('text/html', data.get('text/plain'))}>\n")

    ip.display_pub.publish = publish
    try:
        with redirect_stdout(Stdout()):
            result = ip.run_cell(cell)
    finally:
        del ip.display_pub.publish
    return _ANSI.sub("", "".join(shown)), result


SHOWN = re.compile(r"\[(?:stdout|output):\d\]|<display <b>\w+ \d</b>>|Out\[\d:")
TWO_DISPLAYS = ("from IPython.display import HTML, display\nprint('printed', me)\n"
                "display(HTML(f'<b>first {me}</b>'))\ndisplay(HTML(f'<b>second {me}</b>'))\nme")


@pytest.fixture
def numbered(rc):
    """Each engine has ``me``, its engine id."""
    for engine_id in rc.ids:
        rc[engine_id].push({"me": engine_id}, block=True)


@pytest.mark.parametrize("options, expected", [
    ("--group-outputs=type", ["[stdout:0]", "[stdout:1]",
                              "[output:0]", "<display <b>first 0</b>>", "<display <b>second 0</b>>",
                              "[output:1]", "<display <b>first 1</b>>", "<display <b>second 1</b>>",
                              "Out[0:", "Out[1:"]),
    ("--group-outputs=order", ["[stdout:0]", "[stdout:1]",
                               "[output:0]", "<display <b>first 0</b>>",
                               "[output:1]", "<display <b>first 1</b>>",
                               "[output:0]", "<display <b>second 0</b>>",
                               "[output:1]", "<display <b>second 1</b>>",
                               "Out[0:", "Out[1:"]),
    ("--group-outputs=engine", ["[stdout:0]", "[output:0]", "<display <b>first 0</b>>",
                                "<display <b>second 0</b>>", "Out[0:",
                                "[stdout:1]", "[output:1]", "<display <b>first 1</b>>",
                                "<display <b>second 1</b>>", "Out[1:"]),
])
def test_group_outputs_orders_prints_and_displays(ip, px, numbered, options, expected):
    text, result = run_in_order(ip, f"%%px --no-stream {options}\n{TWO_DISPLAYS}")
    assert result.success, text
    assert SHOWN.findall(text) == expected, text
    short = {"--group-outputs=order": "-r", "--group-outputs=engine": "-e"}.get(options)
    if short:  # -r and -e are the short forms
        text, _ = run_in_order(ip, f"%%px --no-stream {short}\n{TWO_DISPLAYS}")
        assert SHOWN.findall(text) == expected, text


def test_streamed_displays_are_labelled_with_their_engine(ip, px, numbered):
    text, result = run_in_order(ip, f"%%px --stream --targets 1\n{TWO_DISPLAYS}")
    assert result.success, text
    assert SHOWN.findall(text) == ["[stdout:1]", "[output:1]", "<display <b>first 1</b>>",
                                   "<display <b>second 1</b>>", "Out[1:"], text


def test_noblock_then_pxresult(ip, px):
    out, _, _, result = run(ip, "%%px --noblock\nprint('later')\n5 + 5")
    assert isinstance(result.result, ipp.AsyncResult)
    assert "[stdout" not in out  # nothing shown until asked
    out, _, _, result = run(ip, "%pxresult")
    assert result.success
    assert "[stdout:0] later" in out and "[stdout:1] later" in out
    assert re.search(r"Out\[1:\d+\]: 10", out)


def test_out_stores_the_async_result(ip, px):
    _, _, _, result = run(ip, "%%px -o answer\nanswer = 6 * 7\nanswer")
    assert result.success
    ar = ip.user_ns["answer"]
    assert isinstance(ar, ipp.AsyncResult) and ar.done()
    assert [r.execute_result["data"]["text/plain"] for r in ar.get()] == ["42", "42"]


def test_local_runs_here_too(ip, px, rc):
    out, err, _, result = run(ip, "%%px --local\nboth_places = 17\nprint('ran', both_places)")
    assert result.success, out + err
    assert ip.user_ns["both_places"] == 17
    assert rc[:].pull("both_places", block=True) == [17, 17]
    assert "ran 17" in out.replace("[stdout:0] ran 17", "").replace("[stdout:1] ran 17", "")


def test_identical_errors_collapse_into_one_traceback(ip, px):
    out, _, _, result = run(ip, "%%px\nprint('before')\n1/0")
    assert isinstance(result.error_in_exec, ipp.CompositeError)
    assert "[stdout:0] before" in out and "[stdout:1] before" in out
    assert "[engines [0, 1]]" in out
    assert out.count("ZeroDivisionError: division by zero") == 1
    assert "1/0" in out  # the remote traceback shows the failing line


def test_identical_errors_collapse_after_engines_ran_different_cells(ip, px):
    """Engine 0 has run one cell more, so its traceback says ``Cell In[n+1]``: still the
    same error, shown once for both engines."""
    run(ip, "%px -o probe pass")
    count = [r.execution_count for r in ip.user_ns["probe"].get()]
    for _ in range(max(count[1] - count[0] + 1, 1)):  # engine 0 ahead, whatever ran before
        run(ip, "%px --targets 0 x = 1")
    out, _, _, result = run(ip, "%px 1/0")
    assert isinstance(result.error_in_exec, ipp.CompositeError)
    counts = {re.search(r"In\[(\d+)\]", e.traceback.replace("\x1b", "")).group(1)
              for e in result.error_in_exec.elist}
    assert len(counts) == 2, "the engines should be at different cell numbers"
    assert out.count("[engines [0, 1]]") == 1 and "[engine 0]" not in out
    assert out.count("ZeroDivisionError: division by zero") == 1
    assert out.count("Traceback (most recent call last)") == 1


def test_distinct_errors_stay_apart_and_colours_do_not_count():
    def err(engine_id, tb, evalue="division by zero"):
        return ipp.RemoteError("ZeroDivisionError", evalue, tb, {"engine_id": engine_id})

    same = "Cell In[3], line 1\n----> 1 1/0\n"
    coloured = "\x1b[36mCell\x1b[39m \x1b[32mIn[9]\x1b[39m, line 1\n----> 1 1/0\n"
    other = "Cell In[3], line 2\n----> 2 2/0\n"
    e = ipp.CompositeError("boom", [err(0, same), err(1, coloured), err(2, other),
                                    err(3, same, "other value")])
    assert [engines for engines, _ in e._groups()] == [[0, 1], [2], [3]]
    text = "\n".join(e.render_traceback())
    assert "[engines [0, 1]]" in text and "[engine 2]" in text and "[engine 3]" in text


def test_error_on_one_engine_names_it(ip, px):
    out, _, _, result = run(ip, "%px --targets 1 raise ValueError('only here')")
    assert isinstance(result.error_in_exec, ipp.RemoteError)
    assert "[engine 1]" in out and "ValueError: only here" in out


def test_rich_display_from_engines(ip, px):
    code = "from IPython.display import HTML, display; display(HTML('<b>bold</b>'))"
    out, _, outputs, result = run(ip, f"%px --targets 0 {code}")
    assert result.success
    assert [o.data.get("text/html") for o in outputs] == ["<b>bold</b>"]
    assert "[output:0]" in out


def test_pxconfig_sets_defaults(ip, px):
    run(ip, "%pxconfig --targets 0")
    out, _, _, _ = run(ip, "%px print('configured')")
    assert "[stdout:0] configured" in out and "[stdout:1]" not in out
    run(ip, "%pxconfig --noblock --targets all")
    _, _, _, result = run(ip, "%px 1")
    assert isinstance(result.result, ipp.AsyncResult)
    assert len(result.result) == 2
    out, _, _, _ = run(ip, "%pxconfig")
    assert "block=False" in out


def test_autopx_toggles(ip, px, rc):
    out, _, _, _ = run(ip, "%autopx")
    assert "%autopx enabled" in out
    out, err, _, result = run(ip, "autopx_value = 11\nprint('remote', autopx_value)")
    assert result.success, out + err
    assert "[stdout:0] remote 11" in out and "[stdout:1] remote 11" in out
    assert "autopx_value" not in ip.user_ns
    run(ip, "%pxconfig --targets 1")  # this family's magics still run here
    out, _, _, _ = run(ip, "print('on one')")
    assert "[stdout:1] on one" in out and "[stdout:0]" not in out
    run(ip, "%pxconfig --targets all")
    out, _, _, _ = run(ip, "%autopx")
    assert "%autopx disabled" in out
    out, _, _, result = run(ip, "local_value = 3\nprint('local', local_value)")
    assert ip.user_ns["local_value"] == 3 and "[stdout" not in out
    assert rc[:].pull("autopx_value", block=True) == [11, 11]


def test_targets_are_parsed_never_evaluated(ip, px, rc, tmp_path):
    marker = tmp_path / "evaluated"
    before = len(rc.history)
    for bad in (f"__import__('pathlib').Path({str(marker)!r}).touch()", "ids[0]", "1.5"):
        with pytest.raises(UsageError, match="bad targets"):
            ip.run_cell_magic("px", f'--targets "{bad}"', "1")
    with pytest.raises(UsageError, match="bad targets"):
        ip.run_line_magic("pxconfig", "--targets __import__('os')")
    assert not marker.exists()
    assert len(rc.history) == before  # nothing was sent
    with pytest.raises(UsageError, match="no engine 7"):
        ip.run_cell_magic("px", "--targets 7", "1")
    out, _, _, _ = run(ip, "%%px --targets [0,1] -v\nprint('listed')")
    assert "Parallel execution on engine(s): [0, 1]" in out
    out, _, _, _ = run(ip, "%px --targets=-1 print('last')")
    assert "[stdout:1] last" in out and "[stdout:0]" not in out


def test_farm_status(ip, px, rc):
    out, _, _, result = run(ip, "%farm status")
    assert result.success
    assert "2 engines" in out and "embedded" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+", line)]
    assert [int(r[0]) for r in rows] == rc.ids
    with pytest.raises(UsageError):
        ip.run_line_magic("farm", "bogus")


def test_stream_prints_lines_as_they_arrive(ip, px, tmp_path):
    gate = tmp_path / "gate"

    class Watcher(io.StringIO):
        def write(self, text):
            if "[stdout:0] first" in self.getvalue() + text:
                gate.touch()  # engines go on only once the first line was shown
            return super().write(text)

    code = (f"import os, time\nprint('first', flush=True)\ndeadline = time.monotonic() + 20\n"
            f"while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:\n"
            f"    time.sleep(0.01)\nprint('second', os.path.exists({str(gate)!r}))")
    shown = Watcher()
    start = time.monotonic()
    with redirect_stdout(shown):
        ip.run_cell_magic("px", "--stream --targets 0", code)
    assert time.monotonic() - start < 15
    text = shown.getvalue()
    assert text.index("[stdout:0] first") < text.index("[stdout:0] second True")


def _gated(gate, before="", after=""):
    """Engine code: print ``before``, wait (20 s at most) for the file ``gate``, print
    ``after``."""
    return (f"import os, time\nprint({before!r}, flush=True)\ndeadline = time.monotonic() + 20\n"
            f"while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:\n"
            f"    time.sleep(0.01)\nprint({after!r}, os.path.exists({str(gate)!r}))")


def test_progress_after_shows_wait_interactive_and_keeps_streaming(ip, px, tmp_path):
    gate = tmp_path / "gate"

    class Watcher(io.StringIO):
        def write(self, text):
            if "tasks finished after" in text:
                gate.touch()  # the engines go on once the progress line shows
            return super().write(text)

    shown = Watcher()
    with redirect_stdout(shown):
        ip.run_cell_magic("px", "--progress-after 0 --stream",
                          _gated(gate, "waiting", "through"))
    text = shown.getvalue()
    assert text.index("\r0/2 tasks finished after") < text.index("[stdout:0] through True")
    assert text.endswith("\n") and "\r2/2 tasks finished after" in text
    for engine_id in (0, 1):
        assert text.count(f"[stdout:{engine_id}] waiting") == 1
        assert text.count(f"[stdout:{engine_id}] through True") == 1
    # a streamed line never lands on the progress line: it is blanked first
    assert not re.search(r"finished after [\d.]+s\[std", text), repr(text)
    out, _, _, _ = run(ip, "%px --progress-after 30 1")
    assert "tasks finished" not in out  # done before the 30 s: no progress at all


def test_wait_interactive_return_when(rc, tmp_path, capsys):
    from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION

    gate = str(tmp_path / "gate")

    def task(i):
        import os
        import time

        if i == 1:
            raise ValueError("task 1 fails")
        deadline = time.monotonic() + 30
        while i and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return i

    view = rc.load_balanced_view()
    ar = view.map_async(task, [0, 2], chunksize=1)
    ar.wait_interactive(interval=0.01, widget=False, return_when=FIRST_COMPLETED)
    assert ar.progress == 1 and not ar.done()
    out = capsys.readouterr().out
    assert re.search(r"\r1/2 tasks finished after [\d.]+s \(still running\)\n$", out), out
    open(gate, "w").close()
    assert ar.get(30) == [0, 2]
    os.remove(gate)
    capsys.readouterr()

    ar = view.map_async(task, [1, 2], chunksize=1)
    box = progress_wait(ar, interval=0.01, widget=True, return_when=FIRST_EXCEPTION)
    assert not ar.done() and ar.progress == 1
    bar, label = box.children
    assert "ipyfarm-progress" in bar._dom_classes
    assert (bar.value, bar.max, bar.bar_style) == (1, 2, "danger")
    assert label.value.endswith("· 1 failed, still running")
    box.close()
    open(gate, "w").close()
    assert ar.wait(30)
    with pytest.raises(ValueError, match="return_when must be one of"):
        ar.wait_interactive(return_when="SOMETIMES")


SLEEPER = "print('started', flush=True)\nimport time\ntime.sleep(60)"


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _streamed(msgs, name="stdout"):
    return "".join(m["content"]["text"] for m in msgs
                   if m["msg_type"] == "stream" and m["content"]["name"] == name)


@pytest.fixture(scope="module")
def notebook(cluster):
    """A real notebook kernel (jupyter_client) whose %px runs on this module's cluster."""
    from jupyter_client.manager import start_new_kernel

    c, _ = cluster
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        kernel_run(kc, f"import ipyfarm as ipp\nrc = ipp.Client(profile={c.profile!r})\n"
                        "rc.activate()")
        yield km, kc
        kernel_run(kc, "rc.close()")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def test_progress_after_is_a_widget_in_a_notebook(notebook):
    """In a notebook kernel ``--progress-after`` shows ``wait_interactive``'s widget bar,
    which ends full and green."""
    _, kc = notebook
    msgs = kernel_run(kc, "%%px --progress-after 0\nimport time\ntime.sleep(0.5)\n"
                           "print('slept')")
    opened = {m["content"]["comm_id"]: m["content"]["data"]["state"]
              for m in msgs if m["msg_type"] == "comm_open"}
    bars = [i for i, state in opened.items() if state.get("_model_name") == "IntProgressModel"]
    assert len(bars) == 1, [m["msg_type"] for m in msgs]
    shown = [m["content"]["data"][WIDGET_VIEW]["model_id"] for m in msgs
             if m["msg_type"] == "display_data" and WIDGET_VIEW in m["content"]["data"]]
    assert len(shown) == 1  # the box holding the bar and its label
    bar = dict(opened[bars[0]])  # its state as the frontend ends up with it
    for m in msgs:
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == bars[0]:
            bar.update(m["content"]["data"].get("state", {}))
    assert "ipyfarm-progress" in bar["_dom_classes"]
    assert (bar["value"], bar["max"], bar["bar_style"]) == (2, 2, "success")
    text = _streamed(msgs)
    assert "[stdout:0] slept" in text and "[stdout:1] slept" in text
    assert "tasks finished" not in text  # no text line where the widget shows


def test_notebook_stop_button_interrupts_the_engines(notebook):
    """The notebook's stop button (an interrupt of the kernel) during a blocking %%px:
    the engines get SIGINT, their KeyboardInterrupt shows once for both, no line twice."""
    km, kc = notebook
    pressed = []

    def press_stop_once_started(msgs):
        text = _streamed(msgs)
        if not pressed and "[stdout:0] started" in text and "[stdout:1] started" in text:
            pressed.append(time.monotonic())
            km.interrupt_kernel()

    start = time.monotonic()
    msgs = kernel_run(kc, f"%%px --progress-after -1\n{SLEEPER}", timeout=40,
                       status="error", until=press_stop_once_started)
    assert pressed and time.monotonic() - start < 30
    errors = [m["content"] for m in msgs if m["msg_type"] == "error"]
    assert [e["ename"] for e in errors] == ["CompositeError"], errors
    shown = _ANSI.sub("", "\n".join(errors[0]["traceback"]))
    assert shown.count("[engines [0, 1]]") == 1 and "KeyboardInterrupt" in shown
    assert "sent SIGINT to engine(s) [0, 1]" in _streamed(msgs, "stderr")
    text = _streamed(msgs)
    assert text.count("[stdout:0] started") == 1 and text.count("[stdout:1] started") == 1


def _ctrl_c_once_running(px, rc):
    """A thread that presses Ctrl-C (in this, the main thread) once every engine running
    the next %px has printed 'started'."""
    def interrupt_when_running():
        def running():
            ar = px.last_result
            return ar is not None and not ar.done() and all(
                "started" in (rc.metadata[m]["stdout"] or "") for m in ar.msg_ids)
        if wait_until(running, 20):
            _thread.interrupt_main()

    px.last_result = None
    helper = threading.Thread(target=interrupt_when_running)
    helper.start()
    return helper


def test_ctrl_c_interrupts_the_engines(ip, px, rc):
    """Ctrl-C sends SIGINT to the engines, shows their KeyboardInterrupt once for both,
    prints nothing twice, and raises no local KeyboardInterrupt on top."""
    start = time.monotonic()
    helper = _ctrl_c_once_running(px, rc)
    out, err, _, result = run(ip, f"%%px --signal-on-interrupt SIGINT\n{SLEEPER}")
    helper.join(30)
    assert time.monotonic() - start < 30
    ar = px.last_result
    assert ar.done()
    assert [md["error"]["ename"] for md in ar.metadata] == ["KeyboardInterrupt"] * 2
    assert isinstance(result.error_in_exec, ipp.CompositeError), result.error_in_exec
    assert "sent SIGINT to engine(s) [0, 1]" in err
    assert out.count("[stdout:0] started") == 1 and out.count("[stdout:1] started") == 1
    assert out.count("[engines [0, 1]]") == 1
    assert out.count("KeyboardInterrupt") >= 1 and "[engine 0]" not in out
    with pytest.raises(UsageError, match="unknown signal"):
        ip.run_cell_magic("px", "--signal-on-interrupt SIGNOPE", "1")


def test_ctrl_c_with_no_signal_leaves_the_engines_running(ip, px, rc):
    helper = _ctrl_c_once_running(px, rc)
    try:
        with capture_output() as cap, pytest.raises(KeyboardInterrupt):
            ip.run_cell_magic("px", "--signal-on-interrupt 0 --targets 0", SLEEPER)
        helper.join(30)
        ar = px.last_result
        assert "engine(s) [0] go on running" in cap.stderr
        assert _ANSI.sub("", cap.stdout).count("[stdout:0] started") == 1
        assert not ar.done()
    finally:
        rc.send_signal("SIGINT", targets=[0])
        assert px.last_result.wait(20)


def test_activate_with_suffix(ip, px, rc):
    view = rc[1]
    view.block = True
    view.activate("one")
    out, _, _, _ = run(ip, "%pxone print('suffixed')")
    assert "[stdout:1] suffixed" in out and "[stdout:0]" not in out
    out, _, _, _ = run(ip, "%%pxone\nprint('cell')")
    assert "[stdout:1] cell" in out
    out, _, _, _ = run(ip, "%pxconfigone")
    assert "%pxconfigone:" in out and "block=True" in out


def test_px_follows_the_views_block_flag(ip, px, rc):
    """As in ipyparallel: a view activated with block=False (a view's default) makes %px
    return the AsyncResult at once; %pxresult shows it; --block or %pxconfig override."""
    rc[0].activate("async")
    assert rc[0].block is False
    out, _, _, result = run(ip, "%pxasync print('not yet shown')")
    ar = result.result
    assert isinstance(ar, ipp.AsyncResult) and "not yet shown" not in out
    assert ar.wait(20)
    out, _, _, _ = run(ip, "%pxresultasync")
    assert "[stdout:0] not yet shown" in out
    out, _, _, result = run(ip, "%pxasync --block print('now')")
    assert result.result is None and "[stdout:0] now" in out
    out, _, _, _ = run(ip, "%pxconfigasync")
    assert "block=False" in out
    run(ip, "%pxconfigasync --block")
    out, _, _, result = run(ip, "%pxasync print('configured')")
    assert result.result is None and "[stdout:0] configured" in out


def _children():
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_a_client_made_in_the_session_activates_px(ip, px, rc):
    saved = px.view
    px.view = None
    try:
        out, err, _, result = run(ip, "%px import os; os.getpid()")
        assert result.success, out + err
        assert "runs on the 2 engines of the Client created in this session" in out
        assert px.view is not None and px.view.client is rc
    finally:
        px.view = saved


def test_first_px_without_a_view_starts_a_cluster(ip, px, rc, monkeypatch):
    from ipyfarm.client import client as client_module

    monkeypatch.setattr(client_module, "latest_client", lambda: None)  # no Client yet
    before = _children()
    saved = px.view
    px.view = None
    try:
        out, err, _, result = run(ip, "%px import os; os.getpid()")
        assert result.success, out + err
        n = os.cpu_count()
        assert f"started a cluster of {n} engines (one per core)" in out
        assert px.view is not None and px.view.client is not rc
        assert len(re.findall(r"Out\[\d+:\d+\]: \d+", out)) == n
        with pytest.raises(UsageError, match="already active"):
            ip.run_line_magic("farm", "start")
        out, _, _, _ = run(ip, "%farm add 1")
        assert f"added 1 engine, ids [{n}]; {n + 1} in all" in out
    finally:
        out, _, _, _ = run(ip, "%farm stop")
        left = wait_until(lambda: not (_children() - before), 10)
        kill_pids(_children() - before)
        saved.activate()
    assert "stopped the cluster" in out
    assert left, "engines of the cluster %px started are still running"
    out, _, _, _ = run(ip, "%farm status")
    assert "2 engines" in out  # back on the module's cluster


def test_farm_without_cluster(ip, px):
    saved = px.view
    px.view = None
    try:
        out, _, _, _ = run(ip, "%farm status")
        assert "no cluster is active" in out
        with pytest.raises(UsageError, match="no cluster is active"):
            ip.run_line_magic("farm", "stop")
        with pytest.raises(UsageError, match="-n must be at least 1"):
            ip.run_line_magic("farm", "start -n 0")
    finally:
        px.view = saved



# ---------------------------------------------------------------------- a Client activates %px
FRESH_SHELL = """
import sys
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

ip = InteractiveShell.instance()
assert "px" not in ip.magics_manager.magics["line"], "a fresh shell has no %px"
with capture_output() as cap:
    ok = ip.run_cell("import ipyfarm as ipp\\nrc = ipp.Client(profile=PROFILE)").success
    ok = ok and ip.run_cell("%px import os; os.getpid()").success
    ok = ok and ip.run_cell("%farm status").success
    ok = ok and ip.run_cell("rc.close()").success
print(cap.stdout)
print(cap.stderr, file=sys.stderr)
sys.exit(0 if ok else 1)
"""


def test_creating_a_client_registers_the_magics_in_a_fresh_shell(cluster):
    """No %load_ext: a Client created in a real IPython shell (a fresh process) gives %px
    on all engines and %farm, as in ipyparallel."""
    c, rc = cluster
    script = FRESH_SHELL.replace("PROFILE", repr(c.profile))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    out = _ANSI.sub("", proc.stdout)
    assert proc.returncode == 0, out + proc.stderr
    pids = rc[:].apply_sync(os.getpid)
    assert "runs on the 2 engines of the Client created in this session" in out
    for engine_id, pid in enumerate(pids):
        assert re.search(rf"Out\[{engine_id}:\d+\]: {pid}", out), out
    assert "2 engines, controller external" in out


def test_a_client_outside_ipython_stays_light(cluster):
    c, _ = cluster
    code = (f"import sys, ipyfarm as ipp; rc = ipp.Client(profile={c.profile!r}); "
            "assert len(rc.ids) == 2; rc.close(); "
            "assert 'ipyfarm.magics' not in sys.modules, 'magics imported outside IPython'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_registration_keeps_the_active_view(ip, px, rc):
    view = px.view
    ipp.Client(profile=rc.profile).close()  # in a shell that has %px already
    from ipyfarm.magics import load_ipython_extension

    load_ipython_extension(ip)  # %load_ext again
    assert ip.magics_manager.magics["line"]["px"].__self__ is px and px.view is view
    farm = [fn.__self__ for name, fn in ip.magics_manager.magics["line"].items()
            if name == "farm"]
    assert len(farm) == 1


def test_client_activate_returns_a_blocking_view(ip, px, rc):
    view = rc.activate(targets=[1], suffix="second")
    assert isinstance(view, ipp.DirectView) and view.block and view.targets == [1]
    out, err, _, result = run(ip, "%pxsecond print('from', 'one')")
    assert result.success, out + err
    assert "[stdout:1] from one" in out and "[stdout:0]" not in out
    assert ip.magics_manager.magics["line"]["pxsecond"].__self__.view is view
    everyone = rc.activate()  # targets='all', suffix '': %px itself
    try:
        assert px.view is everyone and everyone.targets == "all"
        out, _, _, _ = run(ip, "%px print('all of them')")
        assert "[stdout:0] all of them" in out and "[stdout:1] all of them" in out
    finally:
        rc.activate()


# ---------------------------------------------------------------------- %farm dashboard
def test_farm_dashboard_shows_the_engines(ip, px, rc):
    _, _, _, result = run(ip, "%farm dashboard")
    dash = result.result
    try:
        from ipyfarm.widgets.dashboard import Dashboard

        assert isinstance(dash, Dashboard) and dash.client is rc
        assert dash.running  # refreshing itself in the background
        assert list(dash.rows) == rc.ids
        assert [r.pid for r in dash.snapshot.engines] == rc[:].apply_sync(os.getpid)
        assert all("ipyfarm-engine-row" in row._dom_classes for row in dash.rows.values())
    finally:
        dash.close()
    assert not dash.running
    saved = px.view
    px.view = None
    try:
        with pytest.raises(UsageError, match="no cluster is active"):
            ip.run_line_magic("farm", "dashboard")
    finally:
        px.view = saved


def test_a_line_cut_short_by_ctrl_c_is_not_printed_again(monkeypatch):
    """Ctrl-C mostly lands in the print's flush (in a kernel, a wait on the output
    thread), after the text was written: the streamer must not print it again."""
    from ipyfarm.pxwait import Streamer

    class CutFlush:
        def __init__(self):
            self.text, self.cut = "", True

        def write(self, text):
            self.text += text

        def flush(self):
            if self.cut:
                self.cut = False
                raise KeyboardInterrupt

    out = CutFlush()
    monkeypatch.setattr(sys, "stdout", out)
    streamer = Streamer([{"engine_id": 1, "stdout": "started\n", "outputs": []}])
    with pytest.raises(KeyboardInterrupt):
        streamer.poll()
    streamer.poll()
    assert out.text.count("[stdout:1] started") == 1
    assert streamer.remaining()[0]["stdout"] == ""
