"""The controller's answers to clients' requests (everything but tasks and comms).

``Hub`` mixes this in: each ``_q_<msg_type>`` handles one request type, found by name in
:meth:`Hub._on_client`, and answers through the hub's state machine and sockets. Kept
apart from :mod:`.hub` so that module stays the I/O loop: receiving, decoding, sending.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Any

from ..protocol import batch
from ..protocol.session import DELIM, frames_bytes
from . import commands as C
from . import events as E

__all__ = ["ClientRequests", "give_back_memory"]


def give_back_memory() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ClientRequests:
    """Request handlers of :class:`~ipyfarm.controller.hub.Hub` (a mixin: ``self`` is the
    hub, with its ``state``, ``session`` and sending methods)."""

    state: Any
    session: Any
    launcher_info: Any
    on_shutdown: Any
    _stop: Any
    _sent_control: list
    _local: dict
    _outbox: dict
    _flush_client: Any
    batching: dict

    def _reply(self, ident: bytes, header: dict, msg_type: str, content: dict,
               buffers: list | None = None) -> None:
        self._send_to_client(ident, msg_type, content, parent=header, buffers=buffers)

    def _q_connection_request(self, ident: bytes, header: dict, content: dict) -> None:
        if content.get("batch") is True and ident not in self._local:
            batching = self.batching  # it unpacks batched replies (protocol/batch.py)
            batching[ident] = None
            if len(batching) > batch.MAX_CLIENTS:  # the oldest one goes
                oldest = next(iter(batching))
                if oldest in self._outbox:
                    self._flush_client(oldest)  # what it has queued goes before the rest
                del batching[oldest]
        self._execute(self.state.handle(E.ClientConnected(time.monotonic(), ident)))
        self._reply(ident, header, "connection_reply",
                    {"status": "ok", "engines": self.state.engine_table()})

    def _q_queue_request(self, ident: bytes, header: dict, content: dict) -> None:
        status = self.state.queue_status(content["targets"], bool(content.get("verbose")))
        reply = {str(k): v for k, v in status.items()}
        reply["status"] = "ok"
        self._reply(ident, header, "queue_reply", reply)

    def _q_result_request(self, ident: bytes, header: dict, content: dict) -> None:
        pending, completed, missing, released = [], [], [], []
        status_only = bool(content.get("status_only"))
        for msg_id in content["msg_ids"]:
            rec = self.state.record(msg_id)
            if rec is None:
                missing.append(msg_id)
            elif not rec.done:
                pending.append(msg_id)
            else:
                completed.append(msg_id)
                if status_only:
                    continue
                if rec.result_frames is not None:
                    self._to_client([ident, DELIM, *self._resigned(rec.result_frames)[0]])
                elif rec.ename and not rec.released:  # failed here, never ran: say so again
                    self._do_FailTask(C.FailTask(ident, rec.msg_id, rec.msg_type,
                                                 rec.engine_id, rec.ename, rec.evalue or "",
                                                 rec.status))
                else:
                    released.append(msg_id)
        self._reply(ident, header, "result_reply", {
            "status": "ok", "pending": pending, "completed": completed,
            "missing": missing, "released": released,
        })

    def _resigned(self, frames: list) -> tuple[list, dict]:
        """A stored reply as a fresh message: new header msg_id and date, signed now.

        Each delivery must be a message of its own: a client rejects a signature it has
        seen (so a second fetch of the same result would be taken for a replay), and a
        controller restarted on its SQLite records signs with a new key. The buffers and
        their signed digests are unchanged.
        """
        header = self.session.unpack_part(frames_bytes(frames[1]))
        header = dict(header, msg_id=self.session.msg_id,
                      date=datetime.now(timezone.utc).isoformat())
        parts = [self.session.pack_part(header), *(frames_bytes(f) for f in frames[2:5])]
        return [self.session.sign(parts), *parts, *frames[5:]], header

    def _q_history_request(self, ident: bytes, header: dict, content: dict) -> None:
        self._reply(ident, header, "history_reply",
                    {"status": "ok", "history": self.state.history()})

    def _q_purge_request(self, ident: bytes, header: dict, content: dict) -> None:
        ev = E.PurgeRequested(time.monotonic(), content["msg_ids"], content["engine_ids"])
        self._execute(self.state.handle(ev))
        self._reply(ident, header, "purge_reply", {"status": "ok"})
        if content["msg_ids"] == "all":
            give_back_memory()

    def _q_resubmit_request(self, ident: bytes, header: dict, content: dict) -> None:
        """Run finished tasks again under new msg_ids (the request is re-signed here)."""
        resubmitted: dict[str, str] = {}
        problems: list[str] = []
        for old_id in content["msg_ids"]:
            rec = self.state.record(old_id)
            if rec is None:
                problems.append(f"{old_id}: no record (unknown or purged)")
            elif not rec.done:
                problems.append(f"{old_id}: still pending")
            elif rec.request_frames is None:
                problems.append(f"{old_id}: its request was not kept (too large, or pushed "
                                "out by newer tasks)")
        if problems:
            self._reply(ident, header, "resubmit_reply", {
                "status": "error", "ename": "ValueError",
                "evalue": "cannot resubmit: " + "; ".join(problems), "resubmitted": {}})
            return
        now = time.monotonic()
        for old_id in content["msg_ids"]:
            rec = self.state.record(old_id)
            assert rec is not None
            frames, new_header = self._resigned(rec.request_frames)
            resubmitted[old_id] = new_header["msg_id"]
            self._submit(ident, new_header, frames, now, resubmit_of=old_id)
        self._reply(ident, header, "resubmit_reply",
                    {"status": "ok", "resubmitted": resubmitted})

    def _q_status_request(self, ident: bytes, header: dict, content: dict) -> None:
        farm = self.state.status_snapshot()
        if self.launcher_info is not None:
            try:
                farm["launcher"] = self.launcher_info()
            except Exception as e:  # a resource manager's command failing must not hurt
                farm["launcher"] = {"error": f"{type(e).__name__}: {e}"}
        self._reply(ident, header, "status_reply", {"status": "ok", "farm": farm})

    def _q_db_request(self, ident: bytes, header: dict, content: dict) -> None:
        try:
            records = self.state.db.query(content["query"], content.get("keys"))
        except (KeyError, ValueError, TypeError) as e:
            self._reply(ident, header, "db_reply", {
                "status": "error", "ename": type(e).__name__, "evalue": str(e),
                "records": []})
            return
        self._reply(ident, header, "db_reply", {"status": "ok", "records": records})

    def _q_hub_abort_request(self, ident: bytes, header: dict, content: dict) -> None:
        ev = E.AbortRequested(time.monotonic(), content["msg_ids"], content["targets"])
        self._sent_control = []
        self._execute(self.state.handle(ev))
        self._reply_when_done(ident, header, "hub_abort_reply", self._sent_control)

    def _targets(self, targets: list | None) -> list[int]:
        live = self.state.live_ids()
        return live if targets is None else [t for t in targets if t in live]

    def _q_hub_clear_request(self, ident: bytes, header: dict, content: dict) -> None:
        ids = [self._send_control(e, "clear_request", {}) for e in self._targets(content["targets"])]
        self._reply_when_done(ident, header, "hub_clear_reply", [i for i in ids if i])

    def _q_hub_signal_request(self, ident: bytes, header: dict, content: dict) -> None:
        ids = [self._send_control(e, "signal_request", {"signum": content["signum"]})
               for e in self._targets(content["targets"])]
        self._reply_when_done(ident, header, "hub_signal_reply", [i for i in ids if i])

    def _q_hub_shutdown_request(self, ident: bytes, header: dict, content: dict) -> None:
        for engine_id in self._targets(content["targets"]):
            self._send_control(engine_id, "shutdown_request", {"restart": False})
        self._reply(ident, header, "hub_shutdown_reply", {"status": "ok"})
        if content["hub"]:
            self._execute([C.NotifyClients("hub_shutdown_notification", {})])
            if self.on_shutdown is not None:
                threading.Thread(target=self.on_shutdown, daemon=True).start()
            else:
                self._stop.set()

    # A hub request that fans out to engines' control channels is answered when every
    # engine has confirmed (so `rc.clear()` then `apply` sees an empty namespace), or
    # after CONTROL_TIMEOUT seconds / when the engine is lost.
    CONTROL_TIMEOUT = 5.0

    def _reply_when_done(self, ident: bytes, header: dict, reply_type: str,
                         control_ids: list[str]) -> None:
        if not control_ids:
            self._reply(ident, header, reply_type, {"status": "ok", "unanswered": []})
            return
        group = {"ident": ident, "header": header, "type": reply_type,
                 "waiting": set(control_ids),
                 "deadline": time.monotonic() + self.CONTROL_TIMEOUT}
        for cid in control_ids:
            self._control_groups[cid] = group

    def _control_answered(self, control_id: str) -> None:
        group = self._control_groups.pop(control_id, None)
        self._control_engine.pop(control_id, None)
        if group is None:
            return
        group["waiting"].discard(control_id)
        if not group["waiting"]:
            self._reply(group["ident"], group["header"], group["type"],
                        {"status": "ok", "unanswered": []})

    def _expire_control(self, now: float) -> None:
        for cid, group in list(self._control_groups.items()):
            if now >= group["deadline"] and cid in self._control_groups:
                unanswered = sorted(self._control_engine.get(c, -1) for c in group["waiting"])
                for c in group["waiting"]:
                    self._control_groups.pop(c, None)
                    self._control_engine.pop(c, None)
                self._reply(group["ident"], group["header"], group["type"],
                            {"status": "ok", "unanswered": unanswered})
