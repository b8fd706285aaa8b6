"""Jupyter message codec whose HMAC also covers the raw buffers.

Wire layout (Jupyter's, unchanged)::

    [ident, ..., b"<IDS|MSG>", signature, header, parent, metadata, content, buf0, buf1, ...]

Stock ``jupyter_client.Session`` signs only header, parent, metadata and
content; pickled functions and arguments travel in the buffers, so
:class:`FarmSession` signs ``header + parent + metadata + content + buffers``.
A message without buffers therefore has exactly the standard signature, which
keeps stock Jupyter clients (``jupyter console --existing``) working against
an engine.

Verification happens before anything is unpacked: :meth:`FarmSession.deserialize`
checks the signature over every frame, then JSON-decodes the four header parts;
buffers are handed out as memoryviews and never unpickled here.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from jupyter_client.session import DELIM, Session, extract_dates

__all__ = ["DELIM", "FarmSession", "SignatureError", "frames_bytes", "split_identities"]


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


class FarmSession(Session):
    """``jupyter_client.Session`` with a signature over every frame."""

    def _digest(self, parts: list) -> bytes:
        if self.auth is None:
            return b""
        h = self.auth.copy()
        for part in parts:
            h.update(part if isinstance(part, bytes | memoryview) else part.buffer)
        return h.hexdigest().encode()

    def sign_frames(self, parts: list) -> bytes:
        """Signature of ``[header, parent, metadata, content, *buffers]``."""
        return self._digest(parts)

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
        """Build, sign (buffers included) and send a message; same signature as Session.send."""
        if isinstance(msg_or_type, dict):
            msg = msg_or_type
            buffers = buffers or msg.get("buffers", [])
        else:
            msg = self.msg(
                msg_or_type, content=content, parent=parent, header=header, metadata=metadata
            )
        if self.check_pid and os.getpid() != self.pid:
            return None
        buffers = list(buffers or [])
        to_send = self.serialize_with_buffers(msg, ident, buffers)
        tracker = None
        if stream is not None:
            big = any(len(memoryview(b)) >= self.copy_threshold for b in buffers)
            if track and big and hasattr(stream, "send_multipart") and not hasattr(
                stream, "on_recv"
            ):
                tracker = stream.send_multipart(to_send, copy=False, track=True)
            else:
                stream.send_multipart(to_send, copy=not big)
        msg["tracker"] = tracker
        return msg

    def serialize_with_buffers(
        self, msg: dict[str, Any], ident: bytes | list[bytes] | None, buffers: list
    ) -> list:
        content = msg.get("content", {})
        if content is None:
            content = self.none
        elif isinstance(content, dict):
            content = self.pack(content)
        elif isinstance(content, str):
            content = content.encode("utf8")
        parts = [
            self.pack(msg["header"]),
            self.pack(msg["parent_header"]),
            self.pack(msg["metadata"]),
            content,
        ]
        views = []
        for i, buf in enumerate(buffers):
            view = buf if isinstance(buf, memoryview) else memoryview(buf)
            if not view.contiguous:
                raise ValueError(f"buffer {i} ({type(buf).__name__}) is not contiguous")
            views.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
        to_send: list = []
        if isinstance(ident, list):
            to_send.extend(ident)
        elif ident is not None:
            to_send.append(ident)
        to_send.append(DELIM)
        to_send.append(self._digest(parts + views))
        to_send.extend(parts)
        to_send.extend(views)
        return to_send

    def serialize(self, msg: dict[str, Any], ident: Any = None) -> list:  # type: ignore[override]
        return self.serialize_with_buffers(msg, ident, list(msg.get("buffers", [])))

    def send_raw(self, stream: Any, msg_list: list, flags: int = 0, copy: bool = True,
                 ident: Any = None) -> None:
        to_send: list = []
        if isinstance(ident, bytes):
            ident = [ident]
        if ident is not None:
            to_send.extend(ident)
        to_send.append(DELIM)
        to_send.append(self._digest(msg_list))
        to_send.extend(msg_list)
        stream.send_multipart(to_send, flags, copy=copy)

    def verify(self, msg_list: list, record: bool = True) -> None:
        """Check the signature of ``[sig, header, parent, metadata, content, *buffers]``.

        Raises :class:`SignatureError` for a missing, wrong or replayed signature.
        """
        if len(msg_list) < 5:
            raise SignatureError(f"malformed message: {len(msg_list)} frames, need at least 5")
        if self.auth is None:
            return
        signature = frames_bytes(msg_list[0])
        if not signature:
            raise SignatureError("unsigned message")
        if signature in self.digest_history:
            raise SignatureError("replayed message (duplicate signature)")
        check = self._digest(msg_list[1:])
        if not hmac.compare_digest(signature, check):
            raise SignatureError("invalid signature")
        if record:
            self._add_digest(signature)

    def deserialize(  # type: ignore[override]
        self, msg_list: list, content: bool = True, copy: bool = True
    ) -> dict[str, Any]:
        """Verify every frame, then decode the JSON parts; buffers stay memoryviews."""
        self.verify(msg_list, record=content)
        head = [frames_bytes(m) for m in msg_list[1:5]]
        header = extract_dates(self.unpack(head[0]))
        message: dict[str, Any] = {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": header["msg_type"],
            "parent_header": extract_dates(self.unpack(head[1])),
            "metadata": self.unpack(head[2]),
            "content": self.unpack(head[3]) if content else head[3],
        }
        message["buffers"] = [_view(m) for m in msg_list[5:]]
        return message
