"""Engines' output and comm messages relayed to the clients that own them.

``Hub`` mixes this in. An engine's iopub messages for a task (``stream``,
``display_data``, ``execute_result``, ``error``, …) go to the client that submitted the
task, found through the task's record; status and execute_input messages are dropped by
topic before anything is decoded. Comm messages travel both ways between an engine's
comm (an ipywidget, say) and the client whose task opened it.
"""

from __future__ import annotations

from typing import Any

from .. import directzmq
from ..protocol.session import DELIM, frames_bytes

__all__ = ["COMM_TYPES", "IOPUB_RELAYED", "OutputRelay"]

COMM_TYPES = frozenset({"comm_open", "comm_msg", "comm_close"})
IOPUB_RELAYED = frozenset(
    {"stream", "display_data", "update_display_data", "execute_result", "error", "clear_output"}
)


class OutputRelay:
    """The relay half of :class:`~ipyfarm.controller.hub.Hub` (a mixin: ``self`` is the
    hub, with its ``state``, ``session``, sockets and decoding)."""

    state: Any
    session: Any
    poller: Any
    _comms: dict
    _engine_socks: dict

    def _on_iopub(self, frames: list) -> None:
        topic = frames_bytes(frames[0])
        if topic.endswith((b".status", b".execute_input")) or topic == b"iopub_welcome":
            return
        decoded = self._decode(frames, "iopub")
        if decoded is None:
            return
        _, rest, header = decoded
        if header["msg_type"] in COMM_TYPES:
            self._relay_comm(header["msg_type"], rest)
            return
        if header["msg_type"] not in IOPUB_RELAYED:
            return
        parent = self.session.unpack_part(frames_bytes(rest[2]))
        rec = self.state.record(parent.get("msg_id", "")) if isinstance(parent, dict) else None
        if rec is not None:
            self._to_client([rec.client_ident, DELIM, *rest])

    def _relay_comm(self, msg_type: str, rest: list) -> None:
        """An engine's comm message (an ipywidget's, say) to the client that owns the comm."""
        content = self.session.unpack_part(frames_bytes(rest[4]))
        comm_id = content.get("comm_id") if isinstance(content, dict) else None
        if not isinstance(comm_id, str):
            return
        if msg_type == "comm_open":
            parent = self.session.unpack_part(frames_bytes(rest[2]))
            rec = self.state.record(parent.get("msg_id", "")) if isinstance(parent, dict) \
                else None
            if rec is None or rec.engine_id is None:
                return
            self._comms[comm_id] = (rec.client_ident, rec.engine_id)
        owner = self._comms.get(comm_id)
        if owner is None:
            return
        if msg_type == "comm_close":
            del self._comms[comm_id]
        self._to_client([owner[0], DELIM, *rest])

    def _forward_comm(self, ident: bytes, msg_type: str, rest: list, content: dict) -> None:
        """A client's comm message for an engine's comm: straight to that engine's shell."""
        owner = self._comms.get(content.get("comm_id", ""))
        socks = self._engine_socks.get(owner[1]) if owner else None
        if socks is None:
            return
        if self._dispatch_out:
            self._flush_dispatches()  # tasks queued before it reach the engine first
        directzmq.send(socks[0], [ident, DELIM, *rest])
        self.poller.recheck(socks[0])
        if msg_type == "comm_close":
            self._comms.pop(content["comm_id"], None)
