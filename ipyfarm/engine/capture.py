"""Collect the outputs of one request while they are published on iopub.

Every iopub message of the engine goes through :meth:`EngineSession.send` (stdout and
stderr from the iopub thread, displays and errors from the main thread). While a request
is being captured (``OutputCapture.begin(msg_id)``), the ``stream``, ``display_data``,
``execute_result`` and ``error`` messages whose parent is that request are also recorded,
then ``end(msg_id)`` hands them back for the reply's metadata. Publishing is unchanged.

What is kept per request is capped (``EngineSession.max_output_text`` characters per
stream, ``EngineSession.max_outputs`` display outputs), so a task that prints 50 MB makes
a reply of about 1 MiB, not 50 MB in the engine, the controller's records and the
client. Cut text ends with :func:`truncation_marker`; the rest was still published live.
"""

from __future__ import annotations

import os
from typing import Any

from ipykernel.iostream import OutStream
from jupyter_client.session import extract_dates
from traitlets import Integer, observe

from ipyfarm import directzmq
from ipyfarm.protocol.session import FarmSession, frames_bytes

__all__ = [
    "CAPTURED_TYPES",
    "MAX_OUTPUTS",
    "MAX_OUTPUT_TEXT",
    "Captured",
    "CappedText",
    "EngineOutStream",
    "EngineSession",
    "OutputCapture",
    "truncation_marker",
]

CAPTURED_TYPES = frozenset({"stream", "display_data", "execute_result", "error"})

MAX_OUTPUT_TEXT = 2**20  # characters kept per stream per request
MAX_OUTPUTS = 1000  # display outputs kept per request


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def truncation_marker(name: str, dropped_bytes: int) -> str:
    """The line that ends a stream's kept text when the rest was not kept."""
    return (f"\n[ipyfarm: output truncated: {_size(dropped_bytes)} more of {name} "
            "were not kept]\n")


class CappedText:
    """Text of one stream: the first ``limit`` characters kept, the rest only counted."""

    __slots__ = ("name", "limit", "_parts", "_kept", "dropped")

    def __init__(self, name: str, limit: int = MAX_OUTPUT_TEXT) -> None:
        self.name = name
        self.limit = max(0, limit)
        self._parts: list[str] = []
        self._kept = 0
        self.dropped = 0  # UTF-8 bytes not kept

    def add(self, text: str) -> None:
        room = self.limit - self._kept
        if len(text) <= room:
            self._parts.append(text)
            self._kept += len(text)
            return
        if room > 0:
            self._parts.append(text[:room])
            self._kept += room
            text = text[room:]
        self.dropped += _utf8_len(text)

    def value(self) -> str:
        kept = "".join(self._parts)
        if self.dropped:
            kept += truncation_marker(self.name, self.dropped)
        return kept


class Captured:
    """Outputs of one request, in the shape of the reply metadata, within the caps."""

    __slots__ = ("_stdout", "_stderr", "_max_text", "outputs", "max_outputs",
                 "dropped_outputs", "execute_result", "error")

    def __init__(self, max_text: int = MAX_OUTPUT_TEXT, max_outputs: int = MAX_OUTPUTS) -> None:
        # the texts are made on the first output: most tasks print nothing
        self._stdout: CappedText | None = None
        self._stderr: CappedText | None = None
        self._max_text = max_text
        self.outputs: list[dict] = []
        self.max_outputs = max(0, max_outputs)
        self.dropped_outputs = 0
        self.execute_result: dict | None = None
        self.error: dict | None = None

    def add(self, msg_type: str, content: dict) -> None:
        if msg_type == "stream":
            if content.get("name") == "stderr":
                target = self._stderr
                if target is None:
                    target = self._stderr = CappedText("stderr", self._max_text)
            else:
                target = self._stdout
                if target is None:
                    target = self._stdout = CappedText("stdout", self._max_text)
            text = content.get("text", "")
            target.add(text if isinstance(text, str) else str(text))
        elif msg_type == "display_data":
            if len(self.outputs) >= self.max_outputs:
                self.dropped_outputs += 1
                return
            self.outputs.append(
                {"data": content.get("data", {}), "metadata": content.get("metadata", {})}
            )
        elif msg_type == "execute_result":
            self.execute_result = {
                "data": content.get("data", {}),
                "metadata": content.get("metadata", {}),
                "execution_count": content.get("execution_count"),
            }
        elif msg_type == "error":
            self.error = content

    def as_metadata(self) -> dict[str, Any]:
        outputs = self.outputs
        if self.dropped_outputs:
            note = (f"[ipyfarm: output truncated: {self.dropped_outputs} more display "
                    f"outputs were not kept (limit {self.max_outputs})]")
            outputs = [*outputs, {"data": {"text/plain": note}, "metadata": {}}]
        return {
            "stdout": "" if self._stdout is None else self._stdout.value(),
            "stderr": "" if self._stderr is None else self._stderr.value(),
            "outputs": outputs,
            "execute_result": self.execute_result,
            "error": self.error,
        }


class OutputCapture:
    """Requests being captured, by msg_id. Safe to feed from several threads."""

    def __init__(self, max_text: int = MAX_OUTPUT_TEXT, max_outputs: int = MAX_OUTPUTS) -> None:
        self.active: dict[str, Captured] = {}
        self.max_text = max_text
        self.max_outputs = max_outputs

    def begin(self, msg_id: str) -> Captured:
        captured = self.active[msg_id] = Captured(self.max_text, self.max_outputs)
        return captured

    def end(self, msg_id: str) -> Captured:
        return self.active.pop(msg_id, None) or Captured()

    def record(self, msg: dict) -> None:
        captured = self.active.get(msg["parent_header"].get("msg_id"))
        if captured is not None:
            captured.add(msg["header"]["msg_type"], msg["content"])


class EngineSession(FarmSession):
    """The engine's :class:`FarmSession`: records captured outputs as it sends them."""

    # replies go out with the GIL kept, as the controller's messages do (pyzmq releases
    # it for each frame, letting the kernel's other threads in mid-message)
    send_frames = staticmethod(directzmq.send)

    max_output_text = Integer(
        MAX_OUTPUT_TEXT,
        help="characters of stdout (and of stderr) kept per task for its reply; the rest "
             "is still published live, then replaced by a truncation marker",
    ).tag(config=True)
    max_outputs = Integer(
        MAX_OUTPUTS, help="display outputs kept per task for its reply"
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capture = OutputCapture(self.max_output_text, self.max_outputs)
        #: set by the kernel: ``(stream) -> socket or None``, the socket an execute reply
        #: for ``stream`` may go straight to, and what to call after such a send
        self.direct_socket: Any = None
        self.after_direct_send: Any = None

    @observe("max_output_text", "max_outputs")
    def _limits_changed(self, change: Any) -> None:
        if hasattr(self, "capture"):  # applies to requests captured from now on
            self.capture.max_text = self.max_output_text
            self.capture.max_outputs = self.max_outputs

    def deserialize(  # type: ignore[override]
        self, msg_list: list, content: bool = True, copy: bool = True, dates: bool = True
    ) -> dict[str, Any]:
        """FarmSession's, with two engine-specific changes.

        - ``content=False`` is ipykernel's routing peek (the shell channel thread reads the
          header to pick a subshell): the signed header parts are verified, but buffers
          are hashed only once, by the full ``deserialize`` in the handling thread,
          before anything is unpickled.
        - ``buffer_digests`` leaves the header once checked: ipykernel keys output
          buffers by ``frozenset(parent_header.items())``, which a list breaks.
        """
        if content:
            msg = super().deserialize(msg_list, content=True, copy=copy, dates=dates)
        else:
            header = extract_dates(self.verify(msg_list, record=False, check_buffers=False))
            head = [frames_bytes(m) for m in msg_list[2:5]]
            msg = {
                "header": header,
                "msg_id": header["msg_id"],
                "msg_type": header["msg_type"],
                "parent_header": extract_dates(self.unpack_part(head[0])),
                "metadata": self.unpack_part(head[1]),
                "content": head[2],
                "buffers": [m if isinstance(m, bytes | memoryview) else m.buffer
                            for m in msg_list[5:]],
            }
        msg["header"].pop("buffer_digests", None)
        return msg

    def feed_identities(self, msg_list: list, copy: bool = True) -> tuple[list, list]:
        """Like Session's, but a message without a delimiter becomes ``([], [])``, which
        ``deserialize`` rejects: ipykernel calls this outside its error handling."""
        if msg_list and type(msg_list[0]) is bytes:
            copy = True  # frames already bytes (the engine's direct shell reader)
        try:
            return super().feed_identities(msg_list, copy)
        except ValueError:
            return [], []

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
        if self.capture.active:
            if isinstance(msg_or_type, str):
                if msg_or_type in CAPTURED_TYPES:
                    msg_or_type = self.msg(
                        msg_or_type, content=content, parent=parent, header=header,
                        metadata=metadata,
                    )
                    self.capture.record(msg_or_type)
            elif msg_or_type["header"]["msg_type"] in CAPTURED_TYPES:
                self.capture.record(msg_or_type)
        if msg_or_type == "execute_reply" and not buffers and self.direct_socket is not None:
            sock = self.direct_socket(stream)
            if sock is not None and not (self._check_pid and os.getpid() != self._pid):
                # straight to the socket, not queued on the stream for a later loop pass.
                # The zmq fd is edge-triggered, and this send can swallow the "readable"
                # edge of a request that arrived meanwhile: the kernel's after_direct_send
                # has the socket read again on the next loop pass
                msg = self.msg(msg_or_type, content=content, parent=parent, header=header,
                               metadata=metadata)
                self.send_frames(sock, self.serialize_with_buffers(msg, ident, []),
                                 self._copy_threshold)
                self.after_direct_send()
                msg["tracker"] = None
                return msg
        return super().send(
            stream, msg_or_type, content, parent, ident, buffers, track, header, metadata
        )


class EngineOutStream(OutStream):
    """ipykernel's stdout/stderr, whose ``flush()`` returns at once when nothing is pending.

    ipykernel flushes both streams after every request, and each flush is a round trip
    to the iopub thread; for a task that printed nothing that was most of the engine's
    time per task. ``_written`` counts completed writes, ``_flushed`` the writes that an
    already finished flush has sent (and so captured); equal counts mean nothing to do.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._written = 0
        self._flushed = 0
        super().__init__(*args, **kwargs)

    def write(self, string: str) -> int | None:  # type: ignore[override]
        n = super().write(string)
        with self._buffer_lock:  # after the text is buffered: a flush counting it sends it
            self._written += 1
        return n

    def _flush(self) -> None:
        upto = self._written  # before the buffers are rotated out
        super()._flush()
        if upto > self._flushed:
            self._flushed = upto

    def flush(self) -> None:
        if self._flushed >= self._written:
            return
        super().flush()
