"""Task databases: query matching (pure), the memory DB's payload budget, SQLite persistence."""

import os
import stat
import time
from datetime import datetime, timedelta, timezone

import pytest

from ipyfarm.controller.db import MemoryTaskDB, TaskRecord
from ipyfarm.controller.query import RECORD_KEYS, compile_query, matches, record_dict
from ipyfarm.controller.sqlitedb import SQLiteTaskDB, TaskDBError, pack_frames, unpack_frames

from .conftest import cli_cluster

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def rec(msg_id, engine_id=0, status="pending", **kw):
    r = TaskRecord(msg_id, "apply_request", b"client-1", engine_id, 1.0, **kw)
    r.status = status
    return r


def done(db, r, status="ok", frames=(b"h", b"content"), nbytes=None):
    """What the state machine does when a reply arrives."""
    r.status = status
    r.completed = T0.isoformat()
    if frames is not None:
        db.store_result(r, list(frames), sum(map(len, frames)) if nbytes is None else nbytes)
    db.finish(r)


# ---------------------------------------------------------------------- query matching
RECORD = {"msg_id": "a1", "engine_id": 3, "status": "ok", "label": "fit-3", "completed": T0,
          "started": None, "result_nbytes": 10}


@pytest.mark.parametrize("query, expected", [
    ({"status": "ok"}, True),
    ({"status": "error"}, False),
    ({"status": "ok", "engine_id": 3}, True),
    ({"engine_id": {"$lt": 4}}, True),
    ({"engine_id": {"$lt": 3}}, False),
    ({"engine_id": {"$lte": 3}}, True),
    ({"engine_id": {"$gt": 3}}, False),
    ({"engine_id": {"$gte": 3}}, True),
    ({"engine_id": {"$gt": 1, "$lt": 5}}, True),
    ({"engine_id": {"$gt": 1, "$lt": 3}}, False),
    ({"engine_id": {"$eq": 3}}, True),
    ({"engine_id": {"$ne": 3}}, False),
    ({"engine_id": {"$in": [1, 3]}}, True),
    ({"engine_id": {"$in": []}}, False),
    ({"engine_id": {"$nin": [1, 3]}}, False),
    ({"engine_id": {"$nin": [1, 2]}}, True),
    ({"label": {"$glob": "fit-*"}}, True),
    ({"label": {"$glob": "fit-?"}}, True),
    ({"label": {"$glob": "FIT-*"}}, False),
    ({"engine_id": {"$glob": "3*"}}, False),
    ({"completed": {"$gte": T0, "$lt": T0 + timedelta(seconds=1)}}, True),
    ({"completed": {"$gt": T0}}, False),
    ({"started": {"$lt": T0}}, False),  # None compares as no match, never TypeError
    ({"started": {"$gt": T0}}, False),
    ({"started": None}, True),
    ({"started": {"$ne": None}}, False),
    ({"label": {"$lt": 3}}, False),  # str vs int: no match
])
def test_query_operators(query, expected):
    assert matches(RECORD, query) is expected


def test_naive_datetime_in_a_query_means_local_time():
    local_naive = T0.astimezone().replace(tzinfo=None)
    assert matches(RECORD, {"completed": {"$eq": local_naive}})
    assert matches(RECORD, {"completed": {"$lte": local_naive}})


def test_unknown_operator_and_key_are_named():
    with pytest.raises(ValueError, match=r"'\$regex'.*\$lt.*\$glob"):
        compile_query({"label": {"$regex": "x"}})
    with pytest.raises(KeyError, match="'colour'.*msg_id"):
        compile_query({"colour": "red"})
    with pytest.raises(ValueError, match=r"\$in.*list"):
        compile_query({"engine_id": {"$in": 3}})
    with pytest.raises(TypeError, match="dict"):
        compile_query(["status"])


def test_record_dict_view():
    r = rec("m1", label="L", submitted_date="2026-01-02T03:04:05.000001Z")
    r.started = T0
    r.completed = "2026-01-02T03:04:06+00:00"
    r.received = 100.0
    r.client_ident = b"abcd-r"
    d = record_dict(r)
    assert list(d) == list(RECORD_KEYS)
    assert d["submitted"] == T0 + timedelta(microseconds=1)
    assert d["started"] == T0 and d["completed"] == T0 + timedelta(seconds=1)
    assert d["received"] is None  # a monotonic time: no wall clock without an offset
    assert d["client_uuid"] == "abcd-r"
    assert record_dict(r, clock_offset=T0.timestamp())["received"] == T0 + timedelta(seconds=100)
    assert record_dict(r, ["status"]) == {"msg_id": "m1", "status": "pending"}
    with pytest.raises(KeyError, match="'bogus'.*valid keys"):
        record_dict(r, ["bogus"])


# ---------------------------------------------------------------------- memory DB
def test_memory_query_oldest_first_with_keys():
    db = MemoryTaskDB()
    for i in range(5):
        r = rec(f"m{i}", engine_id=i % 2)
        db.add(r)
        if i != 4:
            done(db, r)
    got = db.query({"engine_id": 0, "status": "ok"}, ["engine_id"])
    assert got == [{"msg_id": "m0", "engine_id": 0}, {"msg_id": "m2", "engine_id": 0}]
    assert [d["msg_id"] for d in db.query({"status": {"$ne": "ok"}})] == ["m4"]
    with pytest.raises(KeyError):
        db.query({}, ["nope"])


def test_results_and_requests_share_the_byte_budget():
    # the payloads' own bytes only here; the overheads: the test below
    db = MemoryTaskDB(max_total_bytes=100, max_result_bytes=60, frame_overhead=0,
                      payload_overhead=0)
    a, b, c = rec("a"), rec("b"), rec("c")
    for r in (a, b, c):
        db.add(r)
    db.store_result(a, ["ra"], 40)
    db.store_request(a, ["qa"], 40)
    assert db.stored_bytes == 80 and a.request_frames == ["qa"]
    db.store_request(b, ["qb"], 61)  # over the per-payload cap: not kept
    assert b.request_frames is None and b.request_nbytes == 61 and db.stored_bytes == 80
    db.store_result(b, ["rb"], 30)  # 110 > 100: the oldest payload (a's result) goes
    assert a.result_frames is None and a.released
    assert a.request_frames == ["qa"] and b.result_frames == ["rb"]
    assert db.stored_bytes == 70
    db.store_request(c, ["qc"], 40)  # 110: a's request goes; results stay unreleased
    assert a.request_frames is None and not b.released and db.stored_bytes == 70
    for r in (a, b, c):
        r.status = "ok"
    assert db.purge() == 3 and db.stored_bytes == 0


def test_the_byte_budget_counts_what_payloads_take_in_memory():
    """Python's objects around the frames count too (a no-op task's ~1.9 kB of frames
    take ~2.6 kB): the default budget bounds memory, not just the frames' lengths."""
    from ipyfarm.controller.db import FRAME_OVERHEAD, PAYLOAD_OVERHEAD

    frames = [b"s" * 64, b"h" * 300, b"{}", b"m" * 90, b"{}", b"b" * 500]
    nbytes = sum(map(len, frames))
    cost = nbytes + PAYLOAD_OVERHEAD + FRAME_OVERHEAD * len(frames)
    db = MemoryTaskDB(max_total_bytes=2 * cost)
    recs = [rec(f"t{i}") for i in range(3)]
    for r in recs:
        db.add(r)
        db.store_result(r, frames, nbytes)
    assert recs[0].released and recs[0].result_frames is None  # 3 x cost > budget
    assert recs[1].result_frames == frames and recs[2].result_frames == frames
    assert db.stored_bytes == 2 * cost
    assert recs[2].result_nbytes == nbytes  # what queries report: the frames' bytes
    # the real cost of holding them, measured: the overheads do not overstate it
    import sys

    held = sum(sys.getsizeof(f) for f in frames) + sys.getsizeof(list(frames))
    assert held <= cost


def test_memory_purge_by_engine_keeps_pending():
    db = MemoryTaskDB()
    for i in range(4):
        db.add(rec(f"m{i}", engine_id=i % 2))
    for i in range(3):
        done(db, db.get(f"m{i}"))
    assert db.purge(engine_ids=[0]) == 2
    assert db.purge(["m3"]) == 0  # still pending
    assert [r.msg_id for r in db] == ["m1", "m3"]


def test_past_the_record_cap_a_tenth_of_the_oldest_finished_records_go():
    db = MemoryTaskDB(max_records=100)
    db.add(rec("pending"))  # never finishes: never dropped
    for i in range(100):
        db.add(rec(f"m{i}"))
        done(db, db.get(f"m{i}"))
    # the 101st record passed the cap: the ten oldest finished ones went at once
    assert len(db) == 91
    assert [r.msg_id for r in db][:2] == ["pending", "m10"]
    for i in range(100, 109):  # room for nine more before the next cull
        db.add(rec(f"m{i}"))
        done(db, db.get(f"m{i}"))
    assert len(db) == 100
    db.add(rec("m109"))
    assert len(db) == 91 and "pending" in db and "m20" in db and "m19" not in db
    # many rounds of culls stay cheap: the dict of records is not walked from its start
    # past every removed entry once per task
    t0 = time.perf_counter()
    big = MemoryTaskDB(max_records=20_000)
    for i in range(200_000):
        r = rec(f"t{i}")
        big.add(r)
        done(big, r)
    assert len(big) <= 20_000
    assert time.perf_counter() - t0 < 20


# ---------------------------------------------------------------------- SQLite DB
def test_pack_frames_round_trip():
    import zmq

    frames = [b"", b"abc", memoryview(b"xyz"), zmq.Frame(b"frame"), bytearray(b"\x00" * 70000)]
    assert unpack_frames(pack_frames(frames)) == [b"", b"abc", b"xyz", b"frame", b"\x00" * 70000]
    assert unpack_frames(pack_frames([])) == []
    with pytest.raises(ValueError, match="corrupt"):
        unpack_frames(pack_frames([b"ab"]) + b"!")


def test_sqlite_round_trip_survives_reopen(tmp_path):
    path = tmp_path / "new" / "tasks.sqlite"
    db = SQLiteTaskDB(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    ok, err, big, pend = rec("ok", label="L"), rec("err", 1), rec("big"), rec("pend")
    ok.submitted_date = T0.isoformat()
    for r in (ok, err, big, pend):
        db.add(r)
    assert db.get("pend") is pend and "pend" in db  # the live object while pending
    ok.started = T0
    ok.received = 5.0
    done(db, ok, frames=[b"header", b"\x00\x01" * 10])
    db.store_request(ok, [b"req"], 3)
    err.ename, err.evalue = "ZeroDivisionError", "division by zero"
    done(db, err, status="error")
    done(db, big, frames=[b"x"], nbytes=db.max_result_bytes + 1)
    assert db.query({"label": {"$glob": "*"}}, ["label"]) == [{"msg_id": "ok", "label": "L"}]
    db.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    db = SQLiteTaskDB(path)
    try:
        assert len(db) == 4 and db.restarted == 1
        assert [r.msg_id for r in db] == ["ok", "err", "big", "pend"]
        got = db.get("ok")
        assert got.status == "ok" and got.label == "L" and got.engine_id == 0
        assert got.result_frames == [b"header", b"\x00\x01" * 10]
        assert got.request_frames == [b"req"] and not got.released
        assert got.client_ident == b"client-1" and got.submitted_date == T0.isoformat()
        assert abs(got.received - 5.0) < 1e-3  # wall-clock on disk, monotonic in memory
        assert db.get("err").ename == "ZeroDivisionError"
        b = db.get("big")
        assert b.released and b.result_frames is None and b.result_nbytes > db.max_result_bytes
        p = db.get("pend")
        assert p.status == "error" and p.ename == "ControllerRestarted"
        assert "restarted" in p.evalue
        view = db.query({"msg_id": "ok"})[0]
        assert view["started"] == T0 and view["completed"] == T0 and view["submitted"] == T0
        assert view["client_uuid"] == "client-1" and view["result_nbytes"] == 26
        assert db.get("nope") is None and "nope" not in db
        # a finished record changed later is written again by finish()
        got.resubmitted = "ok2"
        db.finish(got)
        db.flush()
        assert db.query({"resubmitted": "ok2"}, []) == [{"msg_id": "ok"}]
        assert db.get("ok").result_frames == [b"header", b"\x00\x01" * 10]
    finally:
        db.close()


def test_sqlite_purge_and_flush_triggers(tmp_path):
    now = [0.0]
    db = SQLiteTaskDB(tmp_path / "t.sqlite", flush_rows=3, flush_interval=10.0,
                      clock=lambda: now[0])
    try:
        for i in range(3):
            db.add(rec(f"m{i}", engine_id=i))
        assert db._waiting  # 3 rows wait: not more than flush_rows
        db.add(rec("m3", engine_id=3))
        assert not db._waiting  # the 4th flushed them
        done(db, db.get("m0"))
        assert db._waiting
        now[0] = 10.0
        done(db, db.get("m1"))  # the oldest waiting row is flush_interval old
        assert not db._waiting and db.get("m0") is not db.get("m0")  # read from disk
        done(db, db.get("m2"))
        assert db.purge(engine_ids=[0]) == 1
        assert db.purge(["m3"]) == 0  # pending: kept
        assert db.purge(["m1", "m9"], [7]) == 1
        assert db.purge() == 1
        assert [r.msg_id for r in db] == ["m3"]
        assert db._db.execute("SELECT COUNT(*) FROM payloads").fetchone()[0] == 0
    finally:
        db.close()


def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(TaskDBError, match="junk.sqlite.*not an ipyfarm SQLite database"):
        SQLiteTaskDB(path)
    db = SQLiteTaskDB(tmp_path / "ok.sqlite")
    db.close()
    with pytest.raises(TaskDBError, match="closed"):
        db.get("x")


def test_sqlite_100k_tasks(tmp_path):
    t0 = time.perf_counter()
    db = SQLiteTaskDB(tmp_path / "big.sqlite")
    frames = [b"h" * 100, b"c" * 50]
    try:
        for i in range(100_000):
            r = TaskRecord(f"task-{i:06d}", "apply_request", b"c", i % 8, float(i))
            db.add(r)
            r.status = "ok" if i % 10 else "error"
            db.store_result(r, frames, 150)
            db.finish(r)
            assert len(db._waiting) <= db.flush_rows + 1  # memory stays bounded
        t_write = time.perf_counter() - t0
        assert len(db) == 100_000
        errors = db.query({"status": "error", "engine_id": {"$in": [0, 1]}}, ["status"])
        assert len(errors) == 2_500
        t_query = time.perf_counter() - t0 - t_write
        assert db.get("task-099999").result_frames == frames
        assert db.purge(engine_ids=[0]) == 12_500
        assert db.purge() == 87_500 and len(db) == 0
        total = time.perf_counter() - t0
    finally:
        db.close()
    print(f"100k sqlite: write {t_write:.2f}s, query {t_query:.2f}s, total {total:.2f}s")
    assert total < 20


# ---------------------------------------------------------------------- the CLI
def test_cli_start_with_sqlite_db_keeps_task_records(tmp_path):
    profile = f"db-{os.getpid()}"
    with cli_cluster(tmp_path, profile) as cluster:
        cluster.start("-n", "1", "--db", "sqlite")
        value, msg_id = cluster.client("ar = rc[0].apply_async(lambda x: x * 2, 21)\n"
                                       "print(ar.get(30), ar.msg_ids[0])\n"
                                       "rc.close()\n").split()
        assert value == "42"
        cluster.stop(gone_within=10)
    path = tmp_path / f"ipyfarm-{profile}.sqlite"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with SQLiteTaskDB(path) as db:
        r = db.get(msg_id)
        assert r is not None and r.status == "ok" and r.engine_id == 0
        assert r.result_frames and r.result_nbytes > 0
        assert [d["msg_id"] for d in db.query({"status": "ok"})] == [msg_id]


def test_start_daemonize_forwards_db_and_scheduler_flags(tmp_path):
    from ipyfarm.cli import _controller_argv, build_parser

    db_file = str(tmp_path / "x.sqlite")
    args = build_parser().parse_args(["start", "-n", "2", "--daemonize", "--db", "sqlite",
                                      "--db-file", db_file, "--scheme", "lru", "--hwm", "0"])
    argv = _controller_argv(args)
    assert argv[1:4] == ["-m", "ipyfarm", "controller"]
    again = build_parser().parse_args(argv[3:])
    assert (again.n, again.db, again.db_file, again.scheme, again.hwm) == (
        2, "sqlite", db_file, "lru", 0)
    plain = build_parser().parse_args(["controller"])
    assert (plain.db, plain.db_file, plain.scheme, plain.hwm) == (
        "memory", None, "leastload", 1)


def test_open_db_and_make_state(tmp_path):
    import inspect

    from ipyfarm.controller.app import db_path, make_state, open_db
    from ipyfarm.controller.state import ControllerState

    mem = open_db("memory", "p")
    assert isinstance(mem, MemoryTaskDB) and mem.clock_offset is not None
    db = open_db("sqlite", "p")
    try:
        assert isinstance(db, SQLiteTaskDB) and db.path == db_path("p")
        assert db.path.name == "ipyfarm-p.sqlite"
    finally:
        db.close()
    other = open_db("memory", "p", tmp_path / "own.sqlite")  # --db-file implies sqlite
    other.close()
    assert other.path == tmp_path / "own.sqlite"
    assert make_state(1.0, 10.0, mem).db is mem
    if "scheme" in inspect.signature(ControllerState).parameters:
        assert make_state(1.0, 10.0, mem, "lru", 2).db is mem
    else:
        with pytest.raises(ValueError, match="--scheme"):
            make_state(1.0, 10.0, mem, "lru")


def test_restarted_standalone_controller_serves_its_sqlite_results(tmp_path):
    profile = f"dbr-{os.getpid()}"
    with cli_cluster(tmp_path, profile) as cluster:
        cluster.start("-n", "1", "--db", "sqlite")
        (msg_id,) = cluster.client("ar = rc.load_balanced_view().apply_async(pow, 6, 7)\n"
                                   "ar.get(30)\nprint(ar.msg_ids[0])\nrc.close()\n").split()
        cluster.stop()
        cluster.start("-n", "1", "--db", "sqlite")  # a new controller and key, same records
        got = cluster.client(f"print(rc.get_result({msg_id!r}).get(30))\nrc.close()\n")
        assert got.split() == ["279936"]
        cluster.stop()
