"""Collect the outputs of one request while they are published on iopub.

Every iopub message of the engine goes through :meth:`EngineSession.send` (stdout and
stderr from the iopub thread, displays and errors from the main thread). While a request
is being captured (``OutputCapture.begin(msg_id)``), the ``stream``, ``display_data``,
``execute_result`` and ``error`` messages whose parent is that request are also recorded,
then ``end(msg_id)`` hands them back for the reply's metadata. Publishing is unchanged.
"""

from __future__ import annotations

from typing import Any

from ipykernel.iostream import OutStream
from jupyter_client.session import extract_dates

from ipyfarm.protocol.session import FarmSession, frames_bytes

__all__ = ["CAPTURED_TYPES", "Captured", "EngineOutStream", "EngineSession", "OutputCapture"]

CAPTURED_TYPES = frozenset({"stream", "display_data", "execute_result", "error"})


class Captured:
    """Outputs of one request, in the shape of the reply metadata."""

    __slots__ = ("_stdout", "_stderr", "outputs", "execute_result", "error")

    def __init__(self) -> None:
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self.outputs: list[dict] = []
        self.execute_result: dict | None = None
        self.error: dict | None = None

    def add(self, msg_type: str, content: dict) -> None:
        if msg_type == "stream":
            target = self._stderr if content.get("name") == "stderr" else self._stdout
            target.append(content.get("text", ""))
        elif msg_type == "display_data":
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
        return {
            "stdout": "".join(self._stdout),
            "stderr": "".join(self._stderr),
            "outputs": self.outputs,
            "execute_result": self.execute_result,
            "error": self.error,
        }


class OutputCapture:
    """Requests being captured, by msg_id. Safe to feed from several threads."""

    def __init__(self) -> None:
        self.active: dict[str, Captured] = {}

    def begin(self, msg_id: str) -> Captured:
        captured = self.active[msg_id] = Captured()
        return captured

    def end(self, msg_id: str) -> Captured:
        return self.active.pop(msg_id, None) or Captured()

    def record(self, msg: dict) -> None:
        captured = self.active.get(msg["parent_header"].get("msg_id"))
        if captured is not None:
            captured.add(msg["header"]["msg_type"], msg["content"])


class EngineSession(FarmSession):
    """The engine's :class:`FarmSession`: records captured outputs as it sends them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capture = OutputCapture()

    def deserialize(  # type: ignore[override]
        self, msg_list: list, content: bool = True, copy: bool = True
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
            msg = super().deserialize(msg_list, content=True, copy=copy)
        else:
            header = extract_dates(self.verify(msg_list, record=False, check_buffers=False))
            head = [frames_bytes(m) for m in msg_list[2:5]]
            msg = {
                "header": header,
                "msg_id": header["msg_id"],
                "msg_type": header["msg_type"],
                "parent_header": extract_dates(self.unpack(head[0])),
                "metadata": self.unpack(head[1]),
                "content": head[2],
                "buffers": [m if isinstance(m, bytes | memoryview) else m.buffer
                            for m in msg_list[5:]],
            }
        msg["header"].pop("buffer_digests", None)
        return msg

    def feed_identities(self, msg_list: list, copy: bool = True) -> tuple[list, list]:
        """Like Session's, but a message without a delimiter becomes ``([], [])``, which
        ``deserialize`` rejects: ipykernel calls this outside its error handling."""
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
        # not straight on stream.socket, though it would save a loop pass: the zmq fd
        # is edge-triggered, and a send the ZMQStream does not know of can swallow the
        # "readable" edge of the next request (seen: tasks left waiting)
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
