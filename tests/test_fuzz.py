"""Fuzzing the decoder: garbage and mutated frames are refused, never half-decoded or unpickled.

Every receiver (controller: ``verify`` of the header parts; client: ``deserialize``;
engine: ``EngineSession.deserialize``, also its routing peek) must, for any list of
frames, either give back exactly the message that was signed or raise ``ValueError``
(``SignatureError`` is one). Buffers carry a pickle whose unpickling would set a flag:
decoding never unpickles, so the flag stays down.
"""

import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipyfarm.engine.capture import EngineSession
from ipyfarm.protocol.session import DELIM, FarmSession, SignatureError, split_identities

KEY = b"fuzz-key-" + b"k" * 23
UNPICKLED = []


def _tripwire():
    UNPICKLED.append(True)
    return "tripped"


class Tripwire:
    def __reduce__(self):
        return (_tripwire, ())


TRAP = pickle.dumps(Tripwire(), protocol=5)
SETTINGS = settings(max_examples=400, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _original():
    s = FarmSession(key=KEY)
    msg = s.msg("apply_request", {"code": "x = 1", "n": [1, 2, 3]},
                parent={"msg_id": "p-1", "msg_type": "x", "session": "s", "username": "u",
                        "version": "5.3", "date": "2024-01-01T00:00:00Z"},
                metadata={"engine_id": 3, "retries": 0})
    return s.serialize_with_buffers(msg, [b"client-7-s"], [TRAP, b"\x00\x01" * 50])


ORIGINAL = [bytes(f) for f in _original()]
IDENTS = 1  # routing frames before DELIM: not signed (zmq sets them), free to change


# The controller, which never unpickles, checks the signed header parts and the number of
# buffers, not their bytes (docs/protocol.md); so does the engine's routing peek, whose
# message is fully decoded (every buffer hashed) before anything in it is used.
HEADER_ONLY = {"controller verify", "engine peek"}


def _decoders():
    """(name, decode) pairs; each takes the frames after the delimiter."""
    return [
        ("controller verify", lambda rest: FarmSession(key=KEY).verify(rest,
                                                                         check_buffers=False)),
        ("client deserialize", lambda rest: FarmSession(key=KEY).deserialize(rest)),
        ("engine deserialize", lambda rest: EngineSession(key=KEY).deserialize(rest)),
        ("engine peek", lambda rest: EngineSession(key=KEY).deserialize(rest, content=False)),
    ]


def _comparable(name, decoded):
    if name == "controller verify":
        return {k: v for k, v in decoded.items()}
    msg = {k: decoded[k] for k in ("header", "parent_header", "metadata", "content")}
    msg["header"] = {k: v for k, v in msg["header"].items() if k != "buffer_digests"}
    if name not in HEADER_ONLY:
        msg["buffers"] = [bytes(b) for b in decoded["buffers"]]
    return msg


EXPECTED = {}
for _name, _decode in _decoders():
    EXPECTED[_name] = _comparable(_name, _decode(split_identities(ORIGINAL)[1]))
assert not UNPICKLED


def _check(frames, signed):
    """Feed ``frames`` to every receiver: the original message back, or ValueError.

    ``signed(header_only)`` says whether the frames still carry the signed message.
    """
    try:
        _, rest = split_identities(frames)
    except ValueError:
        return
    for name, decode in _decoders():
        try:
            decoded = decode(rest)
        except (SignatureError, ValueError):
            continue
        assert signed(name in HEADER_ONLY), f"{name} accepted a message that was never signed"
        got, want = _comparable(name, decoded), EXPECTED[name]
        if len(rest) == 5:  # the known gap: buffers gone, the rest must be intact
            got.pop("buffers", None)
            want = {k: v for k, v in want.items() if k != "buffers"}
        assert got == want, f"{name} decoded a changed message"
    assert not UNPICKLED, "something was unpickled while decoding"


frame = st.one_of(st.binary(max_size=64), st.just(DELIM), st.just(b"{}"),
                  st.sampled_from(ORIGINAL))


@pytest.mark.timeout(60)
@SETTINGS
@given(st.lists(frame, max_size=24))
def test_random_frames_are_refused(frames):
    _check(frames, _same_message(frames))
    # as the head of a well-formed list too: delimiter, then garbage
    _check([DELIM, *frames], _same_message([DELIM, *frames]))


@pytest.mark.timeout(60)
@SETTINGS
@given(st.lists(st.binary(max_size=32), min_size=17, max_size=2000))
def test_long_garbage_without_delimiter_is_refused_quickly(frames):
    with pytest.raises(ValueError, match="delimiter"):
        split_identities([f for f in frames if f != DELIM])


def _flip(frames, data):
    i = data.draw(st.integers(0, len(frames) - 1), label="frame")
    if not frames[i]:
        return frames
    pos = data.draw(st.integers(0, len(frames[i]) - 1), label="pos")
    bit = data.draw(st.integers(1, 255), label="xor")
    f = bytearray(frames[i])
    f[pos] ^= bit
    return [*frames[:i], bytes(f), *frames[i + 1:]]


def _drop(frames, data):
    i = data.draw(st.integers(0, len(frames) - 1), label="drop")
    return frames[:i] + frames[i + 1:]


def _duplicate(frames, data):
    i = data.draw(st.integers(0, len(frames) - 1), label="dup")
    return frames[:i + 1] + frames[i:]


def _swap(frames, data):
    i = data.draw(st.integers(0, len(frames) - 1), label="i")
    j = data.draw(st.integers(0, len(frames) - 1), label="j")
    out = list(frames)
    out[i], out[j] = out[j], out[i]
    return out


def _truncate(frames, data):
    i = data.draw(st.integers(0, len(frames) - 1), label="frame")
    n = data.draw(st.integers(0, max(0, len(frames[i]) - 1)), label="len")
    return [*frames[:i], frames[i][:n], *frames[i + 1:]]


def _cut(frames, data):
    return frames[:data.draw(st.integers(0, len(frames)), label="keep")]


MUTATIONS = [_flip, _drop, _duplicate, _swap, _truncate, _cut]


def _same_message(frames):
    """``signed(header_only)`` for ``frames``: whether they still carry the signed message
    (only routing frames changed; for a header-only check, buffer bytes may change too)."""
    original = ORIGINAL[IDENTS + 1:]

    def signed(header_only):
        try:
            _, rest = split_identities(frames)
        except ValueError:
            return False
        if header_only:
            return rest[:5] == original[:5] and len(rest) == len(original)
        return rest == original

    return signed


@pytest.mark.timeout(60)
@SETTINGS
@given(st.data())
def test_mutated_signed_messages_are_refused(data):
    frames = list(ORIGINAL)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        if frames:
            frames = data.draw(st.sampled_from(MUTATIONS), label="how")(frames, data)
    _check(frames, _same_message(frames))


def test_the_unmutated_message_decodes_once_and_its_replay_is_refused():
    _, rest = split_identities(ORIGINAL)
    for name, decode in _decoders():
        assert _comparable(name, decode(rest)) == EXPECTED[name]
    receiver = FarmSession(key=KEY)
    receiver.deserialize(rest)
    with pytest.raises(SignatureError, match="replayed"):
        receiver.deserialize(rest)
    assert not UNPICKLED
    # the trap is live: what decoding must never do, unpickling does
    assert pickle.loads(bytes(receiver.deserialize(
        split_identities(_original())[1])["buffers"][0])) == "tripped"
    assert UNPICKLED
    UNPICKLED.clear()


def test_a_message_stripped_of_all_its_buffers_is_refused():
    _, rest = split_identities(ORIGINAL)
    with pytest.raises(SignatureError, match="0 buffers but 2"):
        FarmSession(key=KEY).deserialize(rest[:5])
