"""Widgets made on engines, shown and used in the notebook: comms relayed both ways.

An ipywidget created by code on an engine opens a *comm* from the engine's kernel. The
controller relays the engine's comm messages to the client whose task opened it; here,
when the client runs inside a notebook kernel, each engine comm gets a proxy comm with
the same id in the notebook kernel, so the frontend builds the widget model::

    engine comm_open/comm_msg ─► controller ─► client ─► proxy comm ─► frontend
    frontend comm_msg ─► proxy comm ─► client ─► controller ─► the engine's shell

Outside a kernel (a script, a terminal) nothing is relayed to a frontend.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("ipyfarm.client")

__all__ = ["CommBridge"]


def _notebook_kernel() -> Any:
    try:
        from ipykernel.kernelbase import Kernel
    except ImportError:
        return None
    return Kernel.instance() if Kernel.initialized() else None


class CommBridge:
    """Proxy comms in this kernel for comms that engines opened."""

    def __init__(self, client: Any):
        self.client = client
        self.proxies: dict[str, tuple[Any, int | None]] = {}  # comm_id -> (comm, engine)

    def from_engine(self, msg: dict) -> None:
        """A relayed engine comm message (on the client's I/O thread)."""
        if _notebook_kernel() is None:
            return
        mt, content = msg["msg_type"], msg["content"]
        comm_id = content.get("comm_id")
        try:
            if mt == "comm_open":
                self._open(comm_id, content, msg)
            elif comm_id in self.proxies:
                proxy = self.proxies[comm_id][0]
                if mt == "comm_msg":
                    proxy.send(data=content.get("data"), metadata=msg.get("metadata"),
                               buffers=msg.get("buffers"))
                else:  # the engine closed it: close the frontend's side too
                    del self.proxies[comm_id]
                    proxy.close(data=content.get("data"))
        except Exception:
            log.exception("ipyfarm: could not relay %s of comm %s to the frontend", mt, comm_id)

    def _open(self, comm_id: str, content: dict, msg: dict) -> None:
        from comm import create_comm

        task = self.client.metadata.get(msg["parent_header"].get("msg_id", ""))
        engine_id = task.get("engine_id") if task is not None else None
        proxy = create_comm(
            comm_id=comm_id, target_name=content.get("target_name", ""),
            data=content.get("data", {}), metadata=msg.get("metadata"),
            buffers=msg.get("buffers"), target_module=content.get("target_module"))
        proxy.on_msg(lambda m, cid=comm_id: self._to_engine("comm_msg", cid, m))
        proxy.on_close(lambda m, cid=comm_id: self._to_engine("comm_close", cid, m))
        self.proxies[comm_id] = (proxy, engine_id)

    def _to_engine(self, msg_type: str, comm_id: str, msg: dict) -> None:
        """The frontend's message for a proxy: on to the engine that owns the comm."""
        if msg_type == "comm_close":
            if self.proxies.pop(comm_id, None) is None:
                return  # closed by the engine: nothing to tell it
        content = {"comm_id": comm_id, "data": (msg.get("content") or {}).get("data", {})}
        self.client._send_comm(msg_type, content, msg.get("buffers") or [])
