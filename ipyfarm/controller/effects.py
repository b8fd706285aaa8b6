"""The controller's commands carried out: what the state machine decided, done on sockets.

``Hub`` mixes this in. Each ``_do_<Command>`` performs one command class of
:mod:`.commands` (dispatching a task to an engine's shell, delivering a result, failing a
task, connecting to a new engine's ports, answering registrations and heartbeats, control
requests). :meth:`CommandEffects._execute` finds them by the command's class name. Kept
apart from :mod:`.hub`, which receives and decodes; this module only sends.
"""

from __future__ import annotations

import functools
from typing import Any

import zmq

from .. import curve, directzmq
from ..protocol.session import DELIM, iso_now
from . import commands as C

__all__ = ["CommandEffects", "ENGINE_SOCKETS", "engine_context"]


#: sockets the engine context may hold: three per engine, so ~10,000 engines
ENGINE_SOCKETS = 32768


def engine_context(sockets: int) -> zmq.Context:
    """A zmq context for up to ``sockets`` sockets, in a process allowed enough files.

    Each engine's sockets cost about two file descriptors each (a mailbox, a TCP
    connection): the soft limit on open files is raised toward the hard one (a no-op
    where it is high enough already).
    """
    ctx = zmq.Context()
    ctx.max_sockets = min(sockets, ctx.get(zmq.SOCKET_LIMIT))
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass
    return ctx


class CommandEffects:
    """The command half of :class:`~ipyfarm.controller.hub.Hub` (a mixin: ``self`` is the
    hub, with its sockets, ``session``, ``state``, ``poller`` and handler table)."""

    state: Any
    session: Any
    poller: Any
    reg_sock: Any
    curve_keys: Any
    engine_context: Any
    on_kill: Any
    _engine_socks: dict
    _dispatch_out: list
    _inline_ident: int
    _handlers: dict
    _local: dict
    _control_engine: dict
    _sent_control: Any
    _hb_count: int

    def _execute(self, commands: list) -> None:
        table = self._command_table
        for cmd in commands:
            table[type(cmd)](cmd)

    @functools.cached_property
    def _command_table(self) -> dict:
        return {cls: getattr(self, "_do_" + cls.__name__) for cls in vars(C).values()
                if isinstance(cls, type) and issubclass(cls, C.Command) and cls is not C.Command}

    def _do_DispatchTask(self, cmd: C.DispatchTask) -> None:
        # queued, sent by _flush_dispatches once the messages at hand are handled (the
        # hub flushes before it waits, yields or reads another socket): sends back to
        # back find libzmq's I/O thread still awake from the first, one wake-up for many.
        # A client's thread submitting a task inline sends it at once
        out = self._dispatch_out
        out.append((cmd.engine_id, [cmd.client_ident, DELIM, *cmd.frames]))
        if self._inline_ident or len(out) >= 64:
            self._flush_dispatches()

    def _flush_dispatches(self) -> None:
        out, self._dispatch_out = self._dispatch_out, []
        socks, recheck = self._engine_socks, self.poller.recheck
        for engine_id, frames in out:
            engine = socks.get(engine_id)
            if engine is None:  # lost meanwhile: the state has dealt with its tasks
                continue
            directzmq.send(engine[0], frames)
            recheck(engine[0])

    def _do_DeliverResult(self, cmd: C.DeliverResult) -> None:
        if cmd.decoded is not None:
            deliver = self._local.get(cmd.client_ident)
            if deliver is not None:
                if self._dispatch_out:
                    # the engines' next tasks go before this client handles the result
                    # (on this thread): an engine with room idles until they come
                    self._flush_dispatches()
                deliver(cmd.decoded)
                return
        self._to_client([cmd.client_ident, DELIM, *cmd.frames])

    def _do_FailTask(self, cmd: C.FailTask) -> None:
        reply_type = cmd.msg_type.replace("_request", "_reply")
        err = {
            "status": cmd.status, "ename": cmd.ename, "evalue": cmd.evalue, "traceback": [],
            "engine_info": {"engine_id": cmd.engine_id, "method": cmd.msg_type[:-8]},
        }
        md = {"engine_id": cmd.engine_id, "status": cmd.status, "msg_type": reply_type,
              "error": err if cmd.status == "error" else None}
        parent = {"msg_id": cmd.msg_id, "msg_type": cmd.msg_type}
        self._send_to_client(cmd.client_ident, reply_type, err, parent=parent, metadata=md)

    def _do_ConnectEngine(self, cmd: C.ConnectEngine) -> None:
        ci = cmd.info.get("connection_info", {})
        transport, ip = ci.get("transport", "tcp"), ci.get("ip", "127.0.0.1")

        def url(port: Any) -> str:
            return f"tcp://{ip}:{port}" if transport == "tcp" else f"ipc://{ip}-{port}"

        if self.engine_context is None:
            self.engine_context = engine_context(ENGINE_SOCKETS)
        shell = self.engine_context.socket(zmq.DEALER)
        control = self.engine_context.socket(zmq.DEALER)
        # one SUB per engine, closed when the engine goes: disconnecting an endpoint of
        # a shared SUB while other engines publish trips libzmq's fair-queue assertion
        # (`!_more`, fq.cpp) now and then, aborting the whole process
        iopub = self.engine_context.socket(zmq.SUB)
        iopub.setsockopt(zmq.SUBSCRIBE, b"")
        for s in (shell, control, iopub):
            s.linger = 0
            s.sndhwm = 0
            s.rcvhwm = 0
            curve.connect_as_client(s, self.curve_keys and self.curve_keys[0])
        shell.connect(url(ci["shell_port"]))
        control.connect(url(ci["control_port"]))
        iopub.connect(url(ci["iopub_port"]))
        self._engine_socks[cmd.engine_id] = (shell, control, iopub)
        eid = cmd.engine_id
        self._handlers[shell] = lambda frames: self._on_engine_shell(eid, frames)
        self._handlers[control] = lambda frames: self._on_engine_control(eid, frames)
        self._handlers[iopub] = self._on_iopub
        for s in (shell, control, iopub):
            self.poller.register(s, zmq.POLLIN)

    def _do_DisconnectEngine(self, cmd: C.DisconnectEngine) -> None:
        for cid, eid in list(self._control_engine.items()):
            if eid == cmd.engine_id:
                self._control_answered(cid)
        socks = self._engine_socks.pop(cmd.engine_id, None)
        if socks is None:
            return
        for s in socks:
            self.poller.unregister(s)
            self._handlers.pop(s, None)
            s.close(0)

    def _do_ReplyRegistration(self, cmd: C.ReplyRegistration) -> None:
        self.session.send(self.reg_sock, "registration_reply", cmd.content, ident=cmd.ident)
        self.poller.recheck(self.reg_sock)  # the send may have taken its readable signal

    def _do_ReplyHeartbeat(self, cmd: C.ReplyHeartbeat) -> None:
        # every engine beats every period: a reply built from packed parts (a counter
        # for msg_id) costs a fifth of Session.send's; the same message, signed the same
        hb = self._hb_parts
        self._hb_count += 1
        header = self.session.pack_part({
            "msg_id": f"{hb[0]}{self._hb_count}", "msg_type": "heartbeat_reply",
            "username": self.session.username, "session": self.session.session,
            "date": iso_now(), "version": hb[1]})
        if not cmd.known:
            content = hb[3]
        else:
            content = hb[2].get(cmd.period)
            if content is None:  # one per period in use (a few quarter steps)
                content = hb[2][cmd.period] = self.session.pack_part(
                    {"status": "ok", "heartbeat_period": cmd.period} if cmd.period
                    else {"status": "ok"})
        parts = [header, b"{}", b"{}", content]
        directzmq.send(self.reg_sock, [cmd.ident, DELIM, self.session.sign(parts), *parts])
        self.poller.recheck(self.reg_sock)

    @functools.cached_property
    def _hb_parts(self) -> tuple:
        from jupyter_client.session import protocol_version

        self._hb_count = 0
        return (f"{self.session.session}-hb-", protocol_version,
                {}, self.session.pack_part({"status": "unknown"}))

    def _do_NotifyClients(self, cmd: C.NotifyClients) -> None:
        for ident in list(self.state.clients):
            self._send_to_client(ident, cmd.msg_type, cmd.content)

    def _send_control(self, engine_id: int, msg_type: str, content: dict) -> str | None:
        socks = self._engine_socks.get(engine_id)
        if socks is None:
            return None
        msg = self.session.send(socks[1], msg_type, content)
        self.poller.recheck(socks[1])
        msg_id = msg["header"]["msg_id"] if msg else None
        if msg_id:
            self._control_engine[msg_id] = engine_id
        return msg_id

    def _do_SendControl(self, cmd: C.SendControl) -> None:
        msg_id = self._send_control(cmd.engine_id, cmd.msg_type, cmd.content)
        if msg_id:
            self._sent_control.append(msg_id)

    def _do_KillEngine(self, cmd: C.KillEngine) -> None:
        if self.on_kill is not None:
            self.on_kill(cmd.engine_id, cmd.pid)
