"""What the state machine asks the I/O shell to do. Imperatives, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Command:
    pass


@dataclass(slots=True)
class ConnectEngine(Command):
    engine_id: int
    info: dict


@dataclass(slots=True)
class DisconnectEngine(Command):
    engine_id: int


@dataclass(slots=True)
class ReplyRegistration(Command):
    ident: bytes
    content: dict


@dataclass(slots=True)
class ReplyHeartbeat(Command):
    ident: bytes
    known: bool
    period: float = 0.0  # the heartbeat period the engine is to keep (0: not said)


@dataclass(slots=True)
class DispatchTask(Command):
    engine_id: int
    msg_id: str
    client_ident: bytes
    frames: Any


@dataclass(slots=True)
class DeliverResult(Command):
    client_ident: bytes
    msg_id: str
    frames: Any
    decoded: Any = None  # ReplyArrived.decoded: a client of the shell's process takes it


@dataclass(slots=True)
class FailTask(Command):
    """Answer a task's client with an error reply built by the shell."""

    client_ident: bytes
    msg_id: str
    msg_type: str  # the request type; the reply is <verb>_reply
    engine_id: int | None
    ename: str
    evalue: str
    status: str = "error"  # or "aborted"


@dataclass(slots=True)
class SendControl(Command):
    engine_id: int
    msg_type: str
    content: dict


@dataclass(slots=True)
class NotifyClients(Command):
    msg_type: str
    content: dict


@dataclass(slots=True)
class KillEngine(Command):
    """Ask the launcher that started ``pid`` to stop it (used when it stops answering)."""

    engine_id: int
    pid: int
