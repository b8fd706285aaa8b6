"""Output floods: what a task prints is kept only up to a cap, with a marker, everywhere."""

import gc
import re

import psutil

from ipyfarm.engine.capture import MAX_OUTPUT_TEXT, MAX_OUTPUTS, Captured, truncation_marker

MARKER = re.compile(r"\n\[ipyfarm: output truncated: [0-9.]+ (MB|kB|GB|bytes) more of "
                    r"(stdout|stderr) were not kept\]\n$")
SLACK = 100  # the marker's length, at most


def _rss():
    gc.collect()
    return psutil.Process().memory_info().rss


# ---- the capture itself, no engine ------------------------------------------------------

def test_capture_keeps_the_head_and_counts_the_rest():
    c = Captured(max_text=10, max_outputs=2)
    c.add("stream", {"name": "stdout", "text": "abcdefgh"})
    c.add("stream", {"name": "stdout", "text": "ij" + "x" * 4998})
    c.add("stream", {"name": "stderr", "text": "é" * 20})
    for i in range(5):
        c.add("display_data", {"data": {"text/plain": str(i)}})
    md = c.as_metadata()
    assert md["stdout"] == "abcdefghij" + truncation_marker("stdout", 4998)
    assert "4.998 kB" not in md["stdout"] and "5.0 kB more of stdout" in md["stdout"]
    assert md["stderr"] == "é" * 10 + truncation_marker("stderr", 20)  # UTF-8 bytes
    assert [o["data"]["text/plain"] for o in md["outputs"][:2]] == ["0", "1"]
    assert "3 more display outputs were not kept" in md["outputs"][2]["data"]["text/plain"]
    assert len(md["outputs"]) == 3


def test_capture_under_the_cap_is_unchanged():
    c = Captured()
    c.add("stream", {"name": "stdout", "text": "a\n"})
    c.add("stream", {"name": "stdout", "text": "b\n"})
    md = c.as_metadata()
    assert md["stdout"] == "a\nb\n" and md["stderr"] == "" and md["outputs"] == []


def test_engine_session_limits_are_settings():
    from traitlets.config import Config

    from ipyfarm.engine.capture import EngineSession

    cfg = Config()
    cfg.EngineSession.max_output_text = 123
    cfg.EngineSession.max_outputs = 7
    s = EngineSession(key=b"k", config=cfg)
    captured = s.capture.begin("m")
    captured.add("stream", {"name": "stdout", "text": "x" * 200})
    captured.add("stream", {"name": "stderr", "text": "y" * 200})
    md = captured.as_metadata()
    assert md["stdout"].startswith("x" * 123) and not md["stdout"].startswith("x" * 124)
    assert md["stderr"].startswith("y" * 123) and not md["stderr"].startswith("y" * 124)
    assert captured.max_outputs == 7
    s.max_output_text = 5
    later = s.capture.begin("n")
    later.add("stream", {"name": "stdout", "text": "z" * 10})
    assert later.as_metadata()["stdout"].startswith("z" * 5 + "\n")
    # nothing printed: empty texts
    assert s.capture.begin("o").as_metadata()["stdout"] == ""


# ---- real engines -----------------------------------------------------------------------

def _print_lots(nbytes, line):
    import sys

    n = nbytes // len(line)
    for _ in range(n):
        sys.stdout.write(line)
    return n


def _print_once(nbytes):
    print("y" * nbytes)
    return nbytes


def test_a_50_mb_print_flood_is_capped_and_the_engine_lives_on(rc):
    view = rc[rc.ids[0]]
    view.apply_sync(lambda: 1)
    before = _rss()
    ar = view.apply_async(_print_lots, 50_000_000, "x" * 99 + "\n")
    assert ar.get(timeout=90) == 500_000
    out = ar.stdout
    assert MARKER.search(out), out[-200:]
    assert len(out) <= MAX_OUTPUT_TEXT + SLACK
    assert "49.0 MB more of stdout" in out  # 50 MB printed, 1 MiB kept
    assert out.startswith("x" * 99 + "\n")
    # a single 50 MB write, and a million short lines
    ar2 = view.apply_async(_print_once, 50_000_000)
    ar3 = view.execute("import sys\nfor i in range(1_000_000): sys.stderr.write(f'{i}\\n')")
    assert ar2.get(timeout=90) == 50_000_000
    ar3.get(timeout=90)
    assert MARKER.search(ar2.stdout) and len(ar2.stdout) <= MAX_OUTPUT_TEXT + SLACK
    assert MARKER.search(ar3.stderr) and len(ar3.stderr) <= MAX_OUTPUT_TEXT + SLACK
    assert ar3.stderr.startswith("0\n1\n2\n")
    grown = (_rss() - before) / 1e6
    print(f"client+controller RSS grew {grown:.1f} MB over 150 MB of printed output")
    assert grown < 150
    assert view.apply_sync(lambda: "alive") == "alive"  # the engine serves on
    # what the controller keeps for get_result is the capped reply
    res = rc.get_result(ar.msg_ids[0]).get(timeout=30)
    assert res == 500_000


def test_a_display_flood_keeps_the_first_outputs(rc):
    view = rc[rc.ids[-1]]
    ar = view.execute("from IPython.display import display\n"
                      f"for i in range({MAX_OUTPUTS + 500}): display(i)")
    ar.get(timeout=60)
    outputs = ar.outputs
    assert len(outputs) == MAX_OUTPUTS + 1
    assert outputs[0]["data"]["text/plain"] == "0"
    assert "500 more display outputs were not kept" in outputs[-1]["data"]["text/plain"]


def test_live_stream_text_is_capped_in_the_client(rc):
    """Before the reply arrives, iopub stream text gathered by the client is capped too."""
    from ipyfarm.client.asyncresult import Metadata

    md = rc.metadata["live-flood-test"] = Metadata(msg_id="live-flood-test")
    try:
        for _ in range(30):
            rc._on_iopub({"parent_header": {"msg_id": "live-flood-test"}, "msg_type": "stream",
                          "content": {"name": "stdout", "text": "z" * 100_000}})
        assert len(md["stdout"]) <= MAX_OUTPUT_TEXT + SLACK
        assert md["stdout"].endswith("was not kept]\n")
        for _ in range(MAX_OUTPUTS + 10):
            rc._on_iopub({"parent_header": {"msg_id": "live-flood-test"},
                          "msg_type": "display_data", "content": {"data": {}}})
        assert len(md["outputs"]) == MAX_OUTPUTS
    finally:
        rc.metadata.pop("live-flood-test", None)
