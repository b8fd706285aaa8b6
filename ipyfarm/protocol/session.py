"""Jupyter message codec whose signature also covers the raw buffers.

Wire layout (Jupyter's, unchanged)::

    [ident, ..., b"<IDS|MSG>", signature, header, parent, metadata, content, buf0, buf1, ...]

The signature is Jupyter's own HMAC over header, parent, metadata and content.
Pickled functions and arguments travel in the buffers, which stock Jupyter does
not sign, so a message with buffers carries ``header["buffer_digests"]``: the
digest of each buffer, space-separated (BLAKE3, or SHA-256 where the blake3 package
is missing; each digest names its algorithm). The HMAC covers the header, hence the digests, hence
every buffer byte.

Why this shape rather than one HMAC over all frames: the controller routes
payloads it never unpickles, so it checks only the small header parts (a
100 MB push is not hashed three times), while the two ends that do unpickle
(client and engine) check every buffer against its digest before anything is
decoded. And a message is, byte for byte, a standard Jupyter message: stock
clients (``jupyter console --existing``) verify it as usual.

A big buffer that arrived signed and is sent on unchanged (a pushed array pulled back)
reuses the digest checked on arrival rather than hashing it again: see
:mod:`ipyfarm.protocol.received`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, NamedTuple

from jupyter_client.jsonutil import json_default
from jupyter_client.session import DELIM, Session, extract_dates, json_packer, protocol_version
from traitlets import observe

from . import received
from .memo import remember
from .replay import ReplayGuard

__all__ = [
    "DELIM",
    "COPY_THRESHOLD",
    "Parsed",
    "FarmSession",
    "SignatureError",
    "buffer_digest",
    "frames_bytes",
    "iso_now",
    "send_plain",
    "split_identities",
    "unpack_json",
]


class SignatureError(ValueError):
    """A message's signature is missing, wrong, or replayed."""


def frames_bytes(frame: Any) -> bytes:
    """The bytes of a frame that may be ``bytes``, a memoryview or a ``zmq.Frame``."""
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, memoryview):
        return frame.tobytes()
    return frame.bytes


def _view(frame: Any) -> memoryview:
    if isinstance(frame, memoryview):
        return frame
    if isinstance(frame, bytes | bytearray):
        return memoryview(frame)
    return frame.buffer


def split_identities(frames: list) -> tuple[list[bytes], list]:
    """Split ``[idents..., DELIM, rest...]``; raise ValueError without a delimiter.

    Only the first 16 frames are searched, so a garbage message of thousands of
    frames costs nothing.
    """
    for i, frame in enumerate(frames[:16]):
        b = frames_bytes(frame)
        if b == DELIM:
            return [frames_bytes(f) for f in frames[:i]], frames[i + 1 :]
    raise ValueError("no <IDS|MSG> delimiter in the first 16 frames")


CHUNK = 4 * 2**20
_pool: ThreadPoolExecutor | None = None


def _byte_views(buffers: list) -> list[memoryview]:
    """Flat byte views of message buffers (no copies); ValueError names a non-contiguous one."""
    views = []
    for i, buf in enumerate(buffers):
        view = _view(buf)
        if not view.contiguous:
            raise ValueError(f"buffer {i} ({type(buf).__name__}) is not contiguous")
        views.append(view if view.ndim == 1 and view.format == "B" else view.cast("B"))
    return views


def _chunk_digest(view: memoryview) -> bytes:
    return hashlib.sha256(view).digest()


def _flat(buf: Any) -> memoryview:
    view = _view(buf)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _sha256(view: memoryview) -> str:
    n = view.nbytes
    if n <= 2 * CHUNK:
        return "sha256:" + hashlib.sha256(view).hexdigest()
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2), "ipyfarm-hash")
    parts = list(_pool.map(_chunk_digest, (view[i:i + CHUNK] for i in range(0, n, CHUNK))))
    return "sha256t4m:" + hashlib.sha256(b"".join(parts)).hexdigest()


def _blake3(view: memoryview) -> str:
    if view.nbytes > 2 * CHUNK:
        return "blake3:" + _blake3_mod.blake3(view, max_threads=_blake3_mod.blake3.AUTO
                                              ).hexdigest()
    return "blake3:" + _blake3_mod.blake3(view).hexdigest()  # one thread, the default


try:
    import blake3 as _blake3_mod
except ImportError:  # sha256 then: slower, same guarantees
    _blake3_mod = None

_ALGORITHMS = {"sha256": _sha256, "sha256t4m": _sha256}
if _blake3_mod is not None:
    _ALGORITHMS["blake3"] = _blake3


def buffer_digest(buf: Any, algorithm: str | None = None) -> str:
    """Self-describing digest of a buffer, ``"<algorithm>:<hex>"``.

    BLAKE3 (multi-threaded above 8 MiB: ~4 GB/s on two cores) when the ``blake3`` package is
    there, else SHA-256 (a tree hash of 4 MiB chunks on threads above 8 MiB).

    Work already done is not done again: the digest of a whole ``bytes`` object of up
    to 4 kB is remembered by content (the same request or result comes back again and
    again), and a digest to sign (no ``algorithm`` given) of received memory that was
    checked on arrival is the one it was checked against (:mod:`.received`).
    """
    view = _flat(buf)
    if algorithm is None:  # (a digest to sign; a check names its algorithm)
        algorithm = "blake3" if _blake3_mod is not None else "sha256"
        digest = received.known(view)  # memory that came in signed, sent on whole
        if digest is not None and digest.startswith(algorithm + ":"):
            return digest
    owner = view.obj
    if type(owner) is bytes and len(owner) <= _MEMO_BYTES and view.nbytes == len(owner):
        # small immutable bytes: the same content again (the request of an f() task,
        # a None result) has the same digest
        key = (algorithm, owner)
        digest = _memo.get(key)
        if digest is None:
            digest = remember(_memo, key, _digest_with(algorithm, view), _MEMO_ENTRIES)
        return digest
    return _digest_with(algorithm, view)


def _digest_with(algorithm: str, view: memoryview) -> str:
    try:
        return _ALGORITHMS[algorithm](view)
    except KeyError:
        raise SignatureError(f"unknown buffer digest algorithm {algorithm!r}") from None


_MEMO_BYTES = 4096
_MEMO_ENTRIES = 256
_memo: dict[tuple[str, bytes], str] = {}


def check_digest(buf: Any, signed: str) -> bool:
    """Whether ``buf`` matches ``signed``, computed with the algorithm it names."""
    algorithm = signed.split(":", 1)[0]
    return hmac.compare_digest(buffer_digest(buf, algorithm), signed)


_encoder = json.JSONEncoder(default=json_default, ensure_ascii=False, allow_nan=False)
_decoder = json.JSONDecoder()

try:  # jupyter_client prefers orjson too where it is installed
    import orjson
except ImportError:  # pragma: no cover - a dependency, but the codec works without it
    orjson = None  # type: ignore[assignment]
else:
    # dates as Jupyter writes them (naive means UTC, "Z" for UTC); keys that are not
    # strings converted as json.dumps converts them
    _ORJSON_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS
    _orjson_dumps, _orjson_loads = orjson.dumps, orjson.loads


def _json_pack(obj: Any) -> bytes:
    """Jupyter's JSON packing, with one encoder reused (json.dumps builds one per call)."""
    try:
        return _encoder.encode(obj).encode("utf8", "surrogateescape")
    except (TypeError, ValueError):
        return json_packer(obj)  # jupyter_client's, with its fallbacks


def _json_unpack(data: Any) -> Any:
    if isinstance(data, bytes):
        data = data.decode("utf8", "replace")
    return _decoder.decode(data)


def _pack(obj: Any) -> bytes:
    """A message part as JSON: orjson (a tenth of the json module's time for a header),
    and the json module for what orjson refuses (ints beyond 64 bits, lone surrogates),
    so that anything Jupyter's packer takes is taken. One difference, shared with
    jupyter_client's own orjson packer: NaN and infinities become ``null``."""
    if orjson is not None:
        try:
            data = _orjson_dumps(obj, default=json_default, option=_ORJSON_OPTIONS)
        except (TypeError, ValueError):
            pass
        else:
            # orjson's bytes keep the capacity of its 4 kB starting buffer: a copy holds
            # only the text (a controller keeps the parts of thousands of requests)
            return bytes(memoryview(data)) if len(data) < 65536 else data
    return _json_pack(obj)


def _unpack(data: Any) -> Any:
    """Jupyter's JSON unpacking (``json_unpacker``), through orjson where it takes the
    text (the json module reads what it refuses: ``NaN``, ints beyond 64 bits, invalid
    UTF-8, replaced). An empty object, half the parts of a task's request, skips both."""
    if data == b"{}":
        return {}
    if orjson is not None:
        try:
            return _orjson_loads(data)
        except (TypeError, ValueError):
            pass
    return _json_unpack(data)


#: a JSON message part read as the sessions read it (for peeks before verification)
unpack_json = _unpack

_ISO_SECOND: tuple[int, str] = (-1, "")  # (a whole second, its ISO text): rebound whole


def iso_now() -> str:
    """The current UTC time as Jupyter's JSON writes a datetime (``...Z``), already text;
    always with microseconds. The text of the current second is formatted once."""
    global _ISO_SECOND
    now = time.time()
    second = int(now)
    cached = _ISO_SECOND
    if cached[0] != second:
        cached = _ISO_SECOND = (second, datetime.fromtimestamp(second, timezone.utc)
                                .strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{int((now - second) * 1e6):06d}Z"


_MORE = 2  # zmq.SNDMORE as a plain int: the enum's | costs more than the send
COPY_THRESHOLD = 65536  # smaller frames are copied into zmq, bigger ones sent zero-copy


def send_plain(sock: Any, frames: list, copy_threshold: int = COPY_THRESHOLD) -> None:
    """Send a multipart message on a zmq socket with the fewest Python steps
    (``send_multipart`` asks the enum for each frame's flags).

    bytes frames are copied (small by construction); other frames (flat byte views, zmq
    Frames) below ``copy_threshold`` bytes are copied, bigger ones go zero-copy.
    """
    last = len(frames) - 1
    send = sock.send
    for i, frame in enumerate(frames):
        flags = 0 if i == last else _MORE
        if isinstance(frame, bytes):
            send(frame, flags)
        else:
            send(frame, flags, copy=len(frame) < copy_threshold)


def parse_date(value: Any) -> Any:
    """An ISO 8601 string as an aware datetime (fast path); anything else unchanged."""
    if not isinstance(value, str):
        return value
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return extract_dates(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def _header_dates(header: Any) -> Any:
    """``header["date"]`` as a datetime (what ``extract_dates`` gives, without its
    regex-and-dateutil walk over every string of the header)."""
    if isinstance(header, dict):
        date = header.get("date")
        if isinstance(date, str):
            try:
                parsed = datetime.fromisoformat(date.replace("Z", "+00:00"))
            except ValueError:
                return extract_dates(header)
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            header = dict(header, date=parsed)
    return header


class Parsed(NamedTuple):
    """A signed message already verified and decoded by the controller of this process,
    handed to a client of the same process instead of its frames, so that the client
    does not check the signature and decode the JSON a second time."""

    header: dict
    parent: dict
    metadata: dict
    content: dict
    buffers: list


class FarmSession(Session):
    """``jupyter_client.Session`` whose signed header commits to every buffer."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # jupyter_client names its default "orjson" where orjson is installed
        if self.packer in ("json", "orjson"):
            self.pack = _pack
        if self.unpacker in ("json", "orjson"):
            self.unpack = _unpack
        self._replay = ReplayGuard(self.digest_history_size)
        self._sync_plain()

    # The per-message paths read these plain copies of traits: a trait's read costs
    # ~0.4 us, and a message read ~15 of them. They follow the traits' changes.
    #: ``pack`` / ``unpack`` as plain attributes
    pack_part: Any = staticmethod(_pack)
    unpack_part: Any = staticmethod(_unpack)
    _hmac_base: Any = None

    @observe("pack", "unpack", "auth", "check_pid", "pid", "session", "username",
             "copy_threshold")
    def _plain_trait_changed(self, change: Any) -> None:
        self._sync_plain()

    def _sync_plain(self) -> None:
        self.pack_part = self.pack
        self.unpack_part = self.unpack
        auth = self.auth
        # the HMAC's own C object where the hmac module has one (its Python wrapper's
        # copy/update/hexdigest are three more calls a signature); the wrapper itself
        # where it has none (its pure-Python path sets ``_hmac`` to None)
        self._hmac_base = None if auth is None else (getattr(auth, "_hmac", None) or auth)
        self._check_pid = self.check_pid
        self._pid = self.pid
        self._session_id = self.session
        self._username = self.username
        self._copy_threshold = self.copy_threshold

    def sign(self, msg_list: list) -> bytes:
        """Jupyter's signature (HMAC of the parts, hex), from the plain copy of ``auth``."""
        base = self._hmac_base
        if base is None:
            return b""
        h = base.copy()
        for m in msg_list:
            h.update(m)
        return h.hexdigest().encode()

    def msg_header(self, msg_type: str) -> dict[str, Any]:
        """Jupyter's header for a new message (same keys and values as
        ``Session.msg_header``), from the plain copies of the session's traits."""
        return {"msg_id": self._next_msg_id(), "msg_type": msg_type,
                "username": self._username, "session": self._session_id,
                "date": datetime.now(timezone.utc), "version": protocol_version}

    def _next_msg_id(self) -> str:
        """``msg_id`` (jupyter_client's format) without its trait reads."""
        number = self.message_count
        self.message_count = number + 1
        return f"{self._session_id}_{os.getpid()}_{number}"

    def record_signature(self, signature: bytes) -> None:
        """Remember the signature of a message built and signed in this process that
        is not verified here (see ``verify(signed_here=True)``), so that a copy of it
        replayed from outside is refused."""
        if self._hmac_base is not None:
            self._add_digest(signature)

    def _add_digest(self, signature: bytes) -> None:
        """Remember a signature to reject replays (the last ``digest_history_size``).

        Kept in :class:`~ipyfarm.protocol.replay.ReplayGuard`'s flat arrays rather than
        jupyter_client's set of bytes, whose survivors, spread over the heap, keep freed
        memory from going back to the system (and whose culling sorts the whole set).
        """
        self._replay.add(signature)

    def send(  # type: ignore[override]
        self,
        stream: Any,
        msg_or_type: dict[str, Any] | str,
        content: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
        ident: bytes | list[bytes] | None = None,
        buffers: list | None = None,
        track: bool = False,
        header: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Build, sign and send a message; same signature as ``Session.send``."""
        if isinstance(msg_or_type, dict):
            msg = msg_or_type
            buffers = buffers or msg.get("buffers", [])
        else:
            msg = self.msg(
                msg_or_type, content=content, parent=parent, header=header, metadata=metadata
            )
        if self._check_pid and os.getpid() != self._pid:
            return None
        buffers = list(buffers or [])
        to_send = self.serialize_with_buffers(msg, ident, buffers)
        tracker = None
        if stream is not None:
            big = any(_view(b).nbytes >= self._copy_threshold for b in buffers)
            if track and big and not hasattr(stream, "on_recv"):
                tracker = stream.send_multipart(to_send, copy=False, track=True)
            else:
                stream.send_multipart(to_send, copy=not big)
        msg["tracker"] = tracker
        return msg

    #: how :meth:`send_reply` puts frames on a socket: ``(sock, frames, copy_threshold)``
    send_frames = staticmethod(send_plain)

    def send_reply(self, sock: Any, idents: list, parent_header: bytes, msg_type: str,
                   content: dict[str, Any], metadata: dict[str, Any], buffers: list) -> None:
        """Build, sign and send a reply in one pass (an engine's per-task path).

        The same wire message as :meth:`send` makes, with three steps saved: the parent
        header is the request's own (verified) header bytes rather than a re-encoding of
        it, the date is written as text directly, and frames go out through
        :attr:`send_frames`. ``sock`` is a zmq socket (not a stream).
        """
        if self._check_pid and os.getpid() != self._pid:
            return
        views = _byte_views(buffers)
        header = {"msg_id": self._next_msg_id(), "msg_type": msg_type,
                  "username": self._username, "session": self._session_id,
                  "date": iso_now(), "version": protocol_version}
        if views:
            header["buffer_digests"] = " ".join(buffer_digest(v) for v in views)
        base = self.metadata
        pack = self.pack_part
        parts = [pack(header), parent_header, pack({**base, **metadata} if base else metadata),
                 pack(content)]
        self.send_frames(sock, [*idents, DELIM, self.sign(parts), *parts, *views],
                         self._copy_threshold)

    def serialize_with_buffers(
        self, msg: dict[str, Any], ident: bytes | list[bytes] | None, buffers: list
    ) -> list:
        """``[idents..., DELIM, signature, header, parent, metadata, content, *buffers]``."""
        pack = self.pack_part
        content = msg.get("content", {})
        if content is None:
            content = self.none
        elif isinstance(content, dict):
            content = pack(content)
        elif isinstance(content, str):
            content = content.encode("utf8")
        views = _byte_views(buffers)
        header = msg["header"]
        if views:
            # one string, not a list: ipykernel hashes parent headers (frozenset of items)
            header = dict(header, buffer_digests=" ".join(buffer_digest(v) for v in views))
        parts = [pack(header), pack(msg["parent_header"]), pack(msg["metadata"]), content]
        to_send: list = []
        if isinstance(ident, list):
            to_send.extend(ident)
        elif ident is not None:
            to_send.append(ident)
        to_send.append(DELIM)
        to_send.append(self.sign(parts))
        to_send.extend(parts)
        to_send.extend(views)
        return to_send

    def serialize(self, msg: dict[str, Any], ident: Any = None) -> list:  # type: ignore[override]
        return self.serialize_with_buffers(msg, ident, list(msg.get("buffers", [])))

    def verify(self, msg_list: list, record: bool = True, check_buffers: bool = True,
               signed_here: bool = False) -> dict:
        """Check ``[sig, header, parent, metadata, content, *buffers]``; return the header.

        Raises :class:`SignatureError` for a missing, wrong or replayed signature, or a
        buffer that does not match its signed digest. ``check_buffers=False`` (the
        controller, which never unpickles payloads) checks the header parts only.
        ``signed_here``: the message was built and signed in this process and never
        crossed a socket (a client of an embedded controller): the signature is not
        computed again, only remembered, so that a copy replayed from outside is still
        refused.
        """
        if len(msg_list) < 5:
            raise SignatureError(f"malformed message: {len(msg_list)} frames, need at least 5")
        head = [frames_bytes(m) for m in msg_list[1:5]]
        signed = self._hmac_base is not None
        if signed and not signed_here:
            signature = frames_bytes(msg_list[0])
            if not signature:
                raise SignatureError("unsigned message")
            if signature in self._replay:
                raise SignatureError("replayed message (duplicate signature)")
            if not hmac.compare_digest(signature, self.sign(head)):
                raise SignatureError("invalid signature")
        try:
            header = self.unpack_part(head[0])
        except Exception as e:
            raise SignatureError(f"undecodable header: {e}") from None
        if not isinstance(header, dict):
            raise SignatureError("header is not a JSON object")
        self._check_buffers(header, msg_list[5:], check_buffers)
        if record and signed:
            self._add_digest(frames_bytes(msg_list[0]))
        return header

    def _check_buffers(self, header: dict, buffers: list, hash_them: bool = True) -> None:
        """Raise SignatureError unless ``buffers`` match the header's signed digests."""
        if self._hmac_base is not None and (buffers or "buffer_digests" in header):
            # (a message stripped of all its buffers is refused too)
            signed = header.get("buffer_digests")
            digests = signed.split() if isinstance(signed, str) else []
            if len(digests) != len(buffers):
                raise SignatureError(
                    f"{len(buffers)} buffers but {len(digests)} signed digests")
            if hash_them:
                for i, (buf, want) in enumerate(zip(buffers, digests, strict=True)):
                    view = _flat(buf)
                    if not check_digest(view, want):
                        raise SignatureError(f"buffer {i} does not match its signed digest")
                    received.remember(view, want)

    def from_parsed(self, parsed: Parsed) -> dict[str, Any]:
        """The message :meth:`deserialize` would give for a reply the controller of this
        process has already verified and decoded (see :class:`Parsed`).

        The header parts were checked by the controller; the buffers, which it forwards
        without hashing, are checked here against their signed digests. The parent
        header (the client's own request) keeps its date as text.
        """
        self._check_buffers(parsed.header, parsed.buffers)
        header = _header_dates(parsed.header)
        return {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": header["msg_type"],
            # the parent is the client's own request: its date is never read again
            "parent_header": parsed.parent,
            "metadata": parsed.metadata,
            "content": parsed.content,
            "buffers": [_view(m) for m in parsed.buffers],
        }

    def deserialize(  # type: ignore[override]
        self, msg_list: list, content: bool = True, copy: bool = True, dates: bool = True
    ) -> dict[str, Any]:
        """Verify signature and buffers, then decode the JSON parts; buffers stay memoryviews.

        ``dates=False`` leaves the headers' dates as the text that came (a reader that
        never looks at them saves parsing two)."""
        header = self.verify(msg_list, record=content)
        head = [frames_bytes(m) for m in msg_list[2:5]]
        unpack = self.unpack_part
        parent = unpack(head[0])
        if dates:
            header, parent = _header_dates(header), _header_dates(parent)
        message: dict[str, Any] = {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": header["msg_type"],
            "parent_header": parent,
            "metadata": unpack(head[1]),
            "content": unpack(head[2]) if content else head[2],
        }
        message["buffers"] = [_view(m) for m in msg_list[5:]]
        return message
