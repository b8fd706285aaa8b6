"""The pure codec and serializer, round-tripped without sockets."""

import ast
import pathlib

import numpy as np
import pytest

from ipyfarm.protocol import serialize
from ipyfarm.protocol.messages import SchemaError, validate
from ipyfarm.protocol.session import FarmSession, SignatureError, split_identities


@pytest.fixture
def session():
    return FarmSession(key=b"secret")


def test_signature_covers_buffers(session):
    msg = session.msg("apply_request", {}, metadata={"engine_id": 0})
    frames = session.serialize_with_buffers(msg, [b"ident"], [b"payload" * 300])
    idents, rest = split_identities(frames)
    assert idents == [b"ident"]
    back = FarmSession(key=b"secret").deserialize(rest)
    assert bytes(back["buffers"][0]) == b"payload" * 300
    tampered = list(rest)
    tampered[-1] = b"Payload" * 300
    with pytest.raises(SignatureError, match="buffer 0 does not match its signed digest"):
        FarmSession(key=b"secret").deserialize(tampered)
    # the controller's check (header parts only) passes it on; the receiver rejects it
    FarmSession(key=b"secret").verify(tampered, check_buffers=False)
    dropped = list(rest[:-1])
    with pytest.raises(SignatureError, match="0 buffers but 1|1 buffers but 0|digests"):
        FarmSession(key=b"secret").deserialize(dropped + [b"extra", b"extra2"])


def test_buffer_digests_name_their_algorithm_and_both_verify():
    from ipyfarm.protocol.session import buffer_digest, check_digest

    big = bytes(range(256)) * (40 * 4096)  # 40 MiB: threaded paths
    for algorithm in ("blake3", "sha256"):
        d = buffer_digest(big, algorithm)
        assert d == buffer_digest(memoryview(big), algorithm)
        assert check_digest(big, d) and not check_digest(big[:-1] + b"x", d)
    assert buffer_digest(big, "sha256").startswith("sha256t4m:")
    assert buffer_digest(b"x").startswith("blake3:")
    with pytest.raises(SignatureError, match="unknown buffer digest algorithm"):
        check_digest(b"x", "md5:abc")


def test_without_buffers_the_signature_is_standard_jupyter(session):
    from jupyter_client.session import Session

    msg = session.msg("execute_request", {"code": "1"})
    frames = session.serialize_with_buffers(msg, None, [])
    _, rest = split_identities(frames)
    assert Session(key=b"secret").deserialize(rest)["content"] == {"code": "1"}
    # with buffers too: stock Jupyter verifies the signature and ignores the digests
    msg = session.msg("comm_msg", {"data": {}})
    _, rest = split_identities(session.serialize_with_buffers(msg, None, [b"raw"]))
    assert bytes(Session(key=b"secret").deserialize(rest)["buffers"][0]) == b"raw"


def test_json_parts_take_what_jupyters_packer_takes(session):
    """orjson writes the parts; what it refuses goes through the json module, so no
    message that packed before fails now, and every part reads back as it was."""
    import datetime

    from jupyter_client.session import json_unpacker

    from ipyfarm.protocol.session import _pack, _unpack

    naive = datetime.datetime(2026, 11, 26, 8, 0, 0, 123456)
    aware = datetime.datetime(2026, 11, 26, 9, 0, tzinfo=datetime.timezone(
        datetime.timedelta(hours=1)))
    content = {"text": "caf\u00e9 \u2603", "nested": [1, (2, 3), {"a": None}],
               "naive": naive, "aware": aware, 1: "int key"}
    packed = _pack(content)
    back = json_unpacker(packed)  # stock Jupyter reads it
    assert back["text"] == "caf\u00e9 \u2603" and back["nested"] == [1, [2, 3], {"a": None}]
    # naive means UTC, as in jupyter_client's own orjson packer
    assert back["naive"] == "2026-11-26T08:00:00.123456Z"
    assert back["aware"] == "2026-11-26T09:00:00+01:00"
    assert back["1"] == "int key"
    assert _unpack(packed) == back
    # what orjson refuses goes through the json module: ints beyond 64 bits...
    big = {"big": 2**70, "neg": -(2**65), "aware": aware}
    assert _unpack(_pack(big)) == {"big": 2**70, "neg": -(2**65),
                                   "aware": "2026-11-26T09:00:00+01:00"}
    # ...and a lone surrogate, written as the json path always wrote it (one byte that
    # reads back as the replacement character)
    assert _unpack(_pack({"s": "\udcff"})) == {"s": "\ufffd"}
    # text only the json module reads (NaN, invalid UTF-8) still reads
    assert _unpack(b'{"x": NaN}')["x"] != _unpack(b'{"x": NaN}')["x"]
    assert _unpack(b'{"x": "\xff"}') == {"x": "\ufffd"}
    assert _unpack(b"{}") == {}
    # a part holds its text, not a packer's spare capacity: a controller keeps the parts
    # of thousands of requests (orjson's bytes came with 4 kB each)
    import sys

    part = _pack({"msg_id": "x" * 40, "engine_id": 3})
    assert sys.getsizeof(part) < len(part) + 64
    # a message of such parts verifies and decodes through the session
    msg = session.msg("apply_reply", content=big)
    _, rest = split_identities(session.serialize_with_buffers(msg, None, []))
    assert session.deserialize(rest)["content"]["big"] == 2**70


def test_the_plain_copies_of_session_traits_follow_the_traits():
    from jupyter_client.session import Session

    farm, stock = FarmSession(key=b"one", session="S1", username="u1"), Session(key=b"one")
    parts = [b'{"a": 1}', b"{}", b"{}", b"{}"]
    assert farm.sign(parts) == stock.sign(parts)
    farm.key = stock.key = b"two"  # a new key: a new HMAC, for signing and verifying
    assert farm.sign(parts) == stock.sign(parts)
    farm.session, farm.username = "S2", "u2"
    header = farm.msg_header("apply_request")
    assert header["session"] == "S2" and header["username"] == "u2"
    assert header["msg_id"].startswith("S2_")
    assert list(header) == list(stock.msg_header("apply_request"))
    # the hmac module's pure-Python path (no OpenSSL object): still signed, the same way
    import hmac as hmac_module

    pure = hmac_module.HMAC(b"two", digestmod="sha256")
    if hasattr(pure, "_init_old"):  # (CPython's hmac module up to 3.13)
        pure._init_old(b"two", None, "sha256")
        assert pure._hmac is None
        farm.auth = pure
        assert farm.sign(parts) == stock.sign(parts)
    farm.key = b""  # no key: unsigned messages, as Jupyter's Session
    assert farm.sign(parts) == b""
    seen = []
    farm.pack = lambda obj: seen.append(obj) or b"{}"
    farm.serialize_with_buffers(farm.msg("x", content={"c": 1}), None, [])
    assert {"c": 1} in seen


def test_wrong_key_and_replay_are_rejected(session):
    frames = session.serialize_with_buffers(session.msg("connection_request", {}), None, [])
    _, rest = split_identities(frames)
    with pytest.raises(SignatureError):
        FarmSession(key=b"other").deserialize(rest)
    receiver = FarmSession(key=b"secret")
    receiver.deserialize(rest)
    with pytest.raises(SignatureError, match="replayed"):
        receiver.deserialize(rest)


def test_garbage_is_rejected_before_decoding():
    with pytest.raises(ValueError):
        split_identities([b"x"] * 100)
    with pytest.raises(SignatureError, match="malformed"):
        FarmSession(key=b"k").verify([b"sig", b"{}"])


def test_numpy_arrays_travel_out_of_band_and_arrive_read_only():
    a = np.arange(100_000, dtype="float64")
    frames = serialize.dumps({"a": a, "small": np.arange(3)})
    assert len(frames) == 2 and len(frames[0]) < 1000  # the big array is its own frame
    assert frames[1].obj is a or np.shares_memory(np.frombuffer(frames[1], "float64"), a)
    back = serialize.loads([bytes(frames[0]), bytes(frames[1])])["a"]
    assert (back == a).all() and not back.flags.writeable


def test_large_bytes_and_memoryviews_travel_out_of_band():
    blob = b"x" * 100_000
    frames = serialize.pack_apply(len, (blob, memoryview(blob)), {"k": {"v": blob}})
    assert len(frames) == 4 and len(frames[0]) < 1000
    _, (b, m), kw = serialize.unpack_apply(frames, {})
    assert kw["k"]["v"] == blob
    assert b == blob and isinstance(b, bytes)
    assert isinstance(m, memoryview) and m.tobytes() == blob


def test_unpicklable_argument_is_named_with_position():
    with pytest.raises(serialize.SerializationError, match=r"argument 1 \(type generator\)"):
        serialize.pack_apply(print, (1, (x for x in "ab")), {})
    with pytest.raises(serialize.SerializationError, match=r"keyword argument 'lock'"):
        import threading

        serialize.pack_apply(print, (), {"lock": threading.Lock()})


def test_apply_roundtrip_resolves_references_and_binds_interactive_globals():
    ns = {"a": 5}

    def f(x, y):
        return a + x + y  # noqa: F821  (a is the engine's)

    f.__module__ = "__main__"
    frames = serialize.pack_apply(f, (serialize.Reference("a"),), {"y": 1})
    g, args, kwargs = serialize.unpack_apply(frames, ns)
    assert g(*args, **kwargs) == 11


def test_schemas_reject_missing_and_mistyped_keys():
    validate("registration_reply", {"status": "ok"})
    with pytest.raises(SchemaError, match="missing key 'status'"):
        validate("registration_reply", {})
    with pytest.raises(SchemaError, match="'signum' must be int"):
        validate("signal_request", {"signum": "INT"})
    with pytest.raises(SchemaError, match="unknown message type"):
        validate("nope", {})


PURE = ["ipyfarm/protocol", "ipyfarm/controller/state.py", "ipyfarm/controller/events.py",
        "ipyfarm/controller/commands.py", "ipyfarm/controller/db.py"]
FORBIDDEN = {"zmq", "asyncio", "threading", "IPython", "ipywidgets", "ipykernel", "tornado"}


def test_pure_layers_import_no_io():
    root = pathlib.Path(__file__).parent.parent
    files = []
    for p in PURE:
        path = root / p
        files += sorted(path.glob("*.py")) if path.is_dir() else [path]
    for file in files:
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{file} imports {name}"


def test_replay_guard_remembers_the_last_n_signatures():
    from ipyfarm.protocol.replay import ReplayGuard

    guard = ReplayGuard(size=100)
    sigs = [f"{i:064x}".encode() for i in range(1, 1001)]
    for sig in sigs[:100]:
        guard.add(sig)
    assert all(sig in guard for sig in sigs[:100]) and len(guard) == 100
    for sig in sigs[100:1000]:  # many rounds of forgetting (and table rebuilds)
        guard.add(sig)
        assert sig in guard
    assert len(guard) == 100
    assert all(sig in guard for sig in sigs[900:]) and not any(sig in guard for sig in sigs[:900])
    guard.add(sigs[-1])  # adding a known one changes nothing
    assert len(guard) == 100 and sigs[900] in guard
    off = ReplayGuard(size=0)
    off.add(sigs[0])
    assert sigs[0] not in off


def test_session_rejects_a_replay_after_many_messages():
    from ipyfarm.protocol.session import FarmSession, SignatureError

    s = FarmSession(key=b"k" * 32)
    first = s.serialize(s.msg("x", {}))[1:]
    s.deserialize(first)
    for _ in range(500):
        s.deserialize(s.serialize(s.msg("x", {}))[1:])
    with pytest.raises(SignatureError, match="replayed"):
        s.deserialize(first)


def test_send_reply_makes_the_message_send_makes(session):
    """The engine's one-pass reply: same parts as Session.send, parent = request header."""
    import zmq

    from ipyfarm.protocol.session import DELIM, Parsed

    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://send-reply")
        b.connect("inproc://send-reply")
        request = session.msg("apply_request", {}, metadata={"engine_id": 0})
        req_frames = session.serialize_with_buffers(request, None, [b"x" * 100])
        receiver = FarmSession(key=b"secret")
        got_request = receiver.deserialize(req_frames[1:])
        big = np.arange(100_000, dtype="f8")
        session.send_reply(a, [b"client-r"], req_frames[2], "apply_reply", {"status": "ok"},
                           {"engine_id": 3, "started": "2026-01-01T00:00:00Z"},
                           [b"small", memoryview(big)])
        frames = b.recv_multipart()
        idents, rest = split_identities(frames)
        assert idents == [b"client-r"]
        reply = receiver.deserialize(rest)
        assert reply["msg_type"] == "apply_reply"
        assert reply["parent_header"]["msg_id"] == got_request["msg_id"]
        assert reply["content"] == {"status": "ok"}
        assert reply["metadata"]["engine_id"] == 3
        assert reply["header"]["date"].tzinfo is not None
        assert set(reply["header"]) >= {"msg_id", "msg_type", "username", "session", "date",
                                        "version"}
        assert bytes(reply["buffers"][0]) == b"small"
        assert np.array_equal(np.frombuffer(reply["buffers"][1], "f8"), big)
        # a reply handed over already decoded (controller -> client of its process)
        # still has its buffers checked against the signed digests
        header = FarmSession(key=b"secret").verify(rest, record=False, check_buffers=False)
        parsed = Parsed(header, reply["parent_header"], reply["metadata"], reply["content"],
                        [b"small", memoryview(big)])
        assert bytes(receiver.from_parsed(parsed)["buffers"][0]) == b"small"
        with pytest.raises(SignatureError, match="buffer 0 does not match"):
            receiver.from_parsed(parsed._replace(buffers=[b"SMALL", memoryview(big)]))
        with pytest.raises(SignatureError, match="1 buffers but 2"):
            receiver.from_parsed(parsed._replace(buffers=[b"small"]))
        assert DELIM in frames
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def _main_functions(source: str) -> dict:
    """Functions defined as a notebook defines them: in a namespace called __main__."""
    ns = {"__name__": "__main__"}
    exec(source, ns)
    return ns


def _run(frames, namespace=None):
    f, args, kwargs = serialize.unpack_apply(frames, {} if namespace is None else namespace)
    return f(*args, **kwargs)


def test_interactive_function_pickle_is_reused_while_nothing_it_captures_changed():
    from ipyfarm.protocol import fncache

    ns = _main_functions("import math\nK = 3\ndef f(x, scale=2):\n    return math.sqrt(x) * K * scale\n")
    f = ns["f"]
    first = fncache.pickled(f)
    assert first is not None and fncache.pickled(f) is first  # reused, not pickled again
    assert _run(serialize.pack_apply(f, (4,), {})) == 12.0
    ns["K"] = 10  # a global rebound: pickled again, with the new value
    assert fncache.pickled(f) is not first
    assert _run(serialize.pack_apply(f, (4,), {})) == 40.0
    f.__defaults__ = (1,)
    assert _run(serialize.pack_apply(f, (4,), {})) == 20.0
    f.__code__ = _main_functions("def g(x, scale=2):\n    return -x\n")["g"].__code__
    assert _run(serialize.pack_apply(f, (4,), {})) == -4
    ns["K"] = (1, "a", None)  # immutable containers count as values too
    assert fncache.pickled(ns["f"]) is not None


def test_a_call_without_arguments_is_pickled_once_while_its_function_may_be_reused():
    ns = _main_functions("K = 3\ndef f():\n    return K\ndef g():\n    return ITEMS\n"
                         "ITEMS = [1]\n")
    f = ns["f"]
    first = serialize.pack_apply(f, (), {})
    assert serialize.pack_apply(f, (), {})[0] is first[0]  # the same bytes, not re-pickled
    assert _run(first) == 3
    ns["K"] = 4  # what f captures changed: a new request
    again = serialize.pack_apply(f, (), {})
    assert again[0] != first[0] and _run(again) == 4
    # with arguments, or capturing something mutable: pickled each time, as before
    assert _run(serialize.pack_apply(f, (), {})) == 4
    g = ns["g"]
    assert serialize.pack_apply(g, (), {})[0] is not serialize.pack_apply(g, (), {})[0]
    ns["ITEMS"].append(2)
    assert _run(serialize.pack_apply(g, (), {})) == [1, 2]


def test_the_engine_rebuilds_a_repeated_call_once_and_gives_each_task_its_own_function():
    ns = _main_functions("import math\nK = 3\ndef f(scale=2):\n    return math.floor(K * scale)\n"
                         "def h():\n    h.calls = getattr(h, 'calls', 0) + 1\n"
                         "    return h.calls\n"
                         "def counter():\n    n = 0\n    def g():\n        nonlocal n\n"
                         "        n += 1\n        return n\n    return g\n")
    frames = serialize.pack_apply(ns["f"], (), {})
    engine_ns: dict = {}
    f1, args, kwargs = serialize.unpack_apply([memoryview(frames[0])], engine_ns)
    f2, _, _ = serialize.unpack_apply([memoryview(frames[0])], engine_ns)
    assert args == () and kwargs == {}
    assert f1 is not f2 and f1.__code__ is f2.__code__  # rebuilt once, a function each
    assert f1() == 6 and f2() == 6
    engine_ns["K"] = 7  # set on the engine: wins over the captured value, as before
    f3, _, _ = serialize.unpack_apply([memoryview(frames[0])], engine_ns)
    assert f3() == 14
    # rebuilt for every task, as before: a function naming another function (itself
    # here, whose attribute it sets), and one with a closure (its cells start afresh)
    h_frames = serialize.pack_apply(ns["h"], (), {})
    assert [serialize.unpack_apply(h_frames, engine_ns)[0]() for _ in range(3)] == [1, 1, 1]
    g_frames = serialize.pack_apply(ns["counter"](), (), {})
    assert [serialize.unpack_apply(g_frames, engine_ns)[0]() for _ in range(3)] == [1, 1, 1]


def test_functions_capturing_mutable_state_are_pickled_afresh_each_time():
    from ipyfarm.protocol import fncache

    ns = _main_functions(
        "data = [1, 2]\n"
        "def count():\n    return len(data)\n"
        "def make():\n    box = {'n': 1}\n    def inner():\n        return box['n']\n"
        "    return inner, box\n"
        "def helper():\n    return 5\n"
        "def calls_helper():\n    return helper()\n"
        "def with_default(x=[]):\n    return len(x)\n"
    )
    count, (inner, box) = ns["count"], ns["make"]()
    for f in (count, inner, ns["calls_helper"], ns["with_default"]):
        assert fncache.pickled(f) is None, f.__name__
    assert _run(serialize.pack_apply(count, (), {})) == 2
    ns["data"].append(3)  # same list object, new content: the engine must see it
    assert _run(serialize.pack_apply(count, (), {})) == 3
    box["n"] = 7
    assert _run(serialize.pack_apply(inner, (), {})) == 7
    # attributes and annotations are captured too: cached only while they are plain
    ns2 = _main_functions("import numpy\ndef h(x: int) -> 'int':\n    return x\n"
                          "def h3(x: numpy.ndarray):\n    return x\n")
    before = fncache.pickled(ns2["h"])
    assert before is not None and fncache.pickled(ns2["h"]) is before
    ns2["h"].__annotations__["x"] = "str"  # changed in place: pickled again
    after = fncache.pickled(ns2["h"])
    assert after is not before and after is fncache.pickled(ns2["h"])
    import pickle

    assert pickle.loads(after).__annotations__["x"] == "str"
    assert _run(serialize.pack_apply(ns2["h"], (5,), {})) == 5
    assert fncache.pickled(ns2["h3"]) is None  # a class from a module: not assumed fixed
    ns3 = _main_functions("def h2():\n    return 1\n")
    ns3["h2"].tag = []
    assert fncache.pickled(ns3["h2"]) is None


def test_reused_function_pickle_still_resolves_names_on_the_engine():
    from ipyfarm.protocol import fncache

    ns = _main_functions("def use_a():\n    return a * 2\n")  # `a` exists only remotely
    f = ns["use_a"]
    assert fncache.pickled(f) is not None
    for value in (1, 5):
        assert _run(serialize.pack_apply(f, (), {}), {"a": value}) == value * 2
    ns["a"] = 100  # defined here now: captured (and sent) like any global
    assert _run(serialize.pack_apply(f, (), {}), {}) == 200


def test_captured_globals_follow_the_client_unless_set_on_the_engine():
    ns = _main_functions("threshold = 0.5\ndef over(x):\n    return x > threshold\n")
    engine_ns = {}
    assert _run(serialize.pack_apply(ns["over"], (0.6,), {}), engine_ns) is True
    assert engine_ns["threshold"] == 0.5  # added, as if pushed
    ns["threshold"] = 0.8  # changed in the notebook: the next task sees it
    assert _run(serialize.pack_apply(ns["over"], (0.6,), {}), engine_ns) is False
    assert engine_ns["threshold"] == 0.8
    engine_ns["threshold"] = 0.1  # set on the engine (a push): that value wins
    ns["threshold"] = 0.9
    assert _run(serialize.pack_apply(ns["over"], (0.6,), {}), engine_ns) is True
    assert engine_ns["threshold"] == 0.1
    serialize.forget_added(engine_ns)  # what clearing an engine's namespace does
    engine_ns.clear()
    assert _run(serialize.pack_apply(ns["over"], (0.6,), {}), engine_ns) is False
    assert engine_ns["threshold"] == 0.9


def test_functions_passed_as_arguments_resolve_names_on_the_engine():
    ns = _main_functions("def scaled(x):\n    return x * factor\n")

    def apply_to(g, *xs, key=None):
        return [g(x) for x in xs] + ([key(1)] if key else [])

    frames = serialize.pack_apply(apply_to, (ns["scaled"], 1, 2), {"key": ns["scaled"]})
    assert _run(frames, {"factor": 10}) == [10, 20, 10]


def _received(nbytes: int, fill: bytes = b"\x07"):
    """Memory as ipyfarm.directzmq hands out a big received frame: a marked ctypes
    array, seen through a read-only byte view."""
    import ctypes

    from ipyfarm.protocol import received

    buf = (ctypes.c_char * nbytes)()
    ctypes.memset(buf, fill[0], nbytes)
    setattr(buf, received.MARK, True)
    return buf, memoryview(buf).cast("B").toreadonly()


def test_a_checked_received_buffer_is_sent_on_with_its_known_digest():
    import ctypes
    import gc
    import pickle

    import numpy as np

    from ipyfarm.protocol import received
    from ipyfarm.protocol.session import buffer_digest

    n = received.MIN_BYTES
    buf, view = _received(n)
    key = (ctypes.addressof(buf), n)
    received.remember(view, "blake3:not-computed-here")
    assert received._known.get(key) == "blake3:not-computed-here"
    # the whole memory, read-only (an array over it, as unpickling makes, pickled again
    # to be sent on): known
    arr = np.frombuffer(view, dtype=np.uint8)
    assert not arr.flags.writeable
    assert buffer_digest(pickle.PickleBuffer(arr).raw()) == "blake3:not-computed-here"
    # a part of it, or a check (which names its algorithm), is always hashed
    assert buffer_digest(view[1:]) != "blake3:not-computed-here"
    assert buffer_digest(view, "blake3") != "blake3:not-computed-here"
    # gone with the memory
    del arr, view, buf
    gc.collect()
    assert key not in received._known


def test_only_marked_read_only_big_memory_is_remembered():
    import ctypes

    from ipyfarm.protocol import received

    n = received.MIN_BYTES
    plain = (ctypes.c_char * n)()  # not received: unmarked
    received.remember(memoryview(plain).cast("B").toreadonly(), "blake3:x")
    buf, view = _received(n)
    received.remember(memoryview(buf).cast("B"), "blake3:x")  # writable view
    small_buf, small = _received(1024)
    received.remember(small, "blake3:x")  # small: hashing is cheaper
    for owner, size in ((plain, n), (buf, n), (small_buf, 1024)):
        assert (ctypes.addressof(owner), size) not in received._known


def test_a_wrong_known_digest_gets_the_message_refused_not_accepted():
    """The receiver always hashes: a remembered digest that no longer matched its memory
    would make the message fail its check, never pass a changed buffer."""
    import ctypes

    from ipyfarm.protocol import received
    from ipyfarm.protocol.session import FarmSession, SignatureError

    a, b = FarmSession(key=b"k" * 32), FarmSession(key=b"k" * 32)
    buf, view = _received(received.MIN_BYTES)
    b.deserialize(a.serialize_with_buffers(a.msg("x", {}), None, [view])[1:])  # remembers
    ctypes.memset(buf, 0, 16)  # (only possible here, through the raw owner)
    frames = a.serialize_with_buffers(a.msg("x", {}), None, [view])
    with pytest.raises(SignatureError, match="buffer 0 does not match"):
        FarmSession(key=b"k" * 32).deserialize(frames[1:])


def test_digests_of_small_bytes_are_remembered_by_content_and_bounded():
    from ipyfarm.protocol import session as s

    data = b"the same request" * 10
    first = s.buffer_digest(data)
    assert s.buffer_digest(bytes(bytearray(data))) == first  # equal content, new object
    assert s._memo[("blake3", data)] == first
    assert first == s._digest_with("blake3", memoryview(data))  # the real digest
    assert s.check_digest(data, first) and not s.check_digest(data + b"!", first)
    # a view of part of an object, or a mutable one, is never remembered
    n = len(s._memo)
    s.buffer_digest(memoryview(data)[1:])
    s.buffer_digest(bytearray(data))
    assert len(s._memo) == n
    for i in range(2 * s._MEMO_ENTRIES):
        s.buffer_digest(b"%d" % i)
    assert len(s._memo) <= s._MEMO_ENTRIES


def test_a_memo_table_is_emptied_when_full_and_keeps_the_new_entry():
    from ipyfarm.protocol.memo import remember

    table: dict = {}
    for i in range(3):
        assert remember(table, i, str(i), 3) == str(i)
    assert table == {0: "0", 1: "1", 2: "2"}
    assert remember(table, 3, "3", 3) == "3"
    assert table == {3: "3"}


def test_batches_carry_whole_messages_and_refuse_anything_else():
    from ipyfarm.protocol import batch

    msgs = [[b"<IDS|MSG>", b"sig", b'{"a":1}', b"{}", b"{}", b"{}"],
            [b"<IDS|MSG>", b"", b"", b"x" * 1000],
            [b"one frame"]]
    packed = batch.pack(msgs)
    assert batch.unpack(packed) == msgs
    assert batch.unpack(memoryview(packed)) == msgs  # as a big frame is received
    assert all(type(f) is bytes for m in batch.unpack(packed) for f in m)
    bad = [b"", packed[:3], packed[:-1], packed + b"x",
           b"\x00\x00\x00\x00",  # no messages
           b"\x01\x00\x00\x00\x00\x00\x00\x00",  # a message of no frames
           b"\xff\xff\xff\xff" + packed[4:],  # more messages than bytes
           b"\x01\x00\x00\x00\x02\x00\x00\x00\x05\x00\x00\x00\xff\xff\xff\xff abcd"]
    for data in bad:
        with pytest.raises(ValueError, match="batch"):
            batch.unpack(data)
