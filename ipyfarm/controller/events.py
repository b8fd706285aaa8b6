"""Facts the controller's state machine reacts to. Each carries ``now`` (seconds).

Payload frames (``frames``) are opaque here: the state machine stores and hands
them back, never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Event:
    now: float


@dataclass(slots=True)
class RegistrationRequested(Event):
    uuid: str
    ident: bytes  # the engine's identity on the registration socket
    info: dict  # registration_request content


@dataclass(slots=True)
class HeartbeatReceived(Event):
    uuid: str
    ident: bytes


@dataclass(slots=True)
class EngineUnregistered(Event):
    uuid: str


@dataclass(slots=True)
class EngineProcessExited(Event):
    pid: int
    hostname: str
    returncode: int


@dataclass(slots=True)
class ClientConnected(Event):
    ident: bytes


@dataclass(slots=True)
class ClientDisconnected(Event):
    ident: bytes


@dataclass(slots=True)
class TaskSubmitted(Event):
    msg_id: str
    client_ident: bytes
    msg_type: str  # execute_request | apply_request
    engine_id: int | None
    frames: Any = None
    label: str | None = None


@dataclass(slots=True)
class ReplyArrived(Event):
    engine_id: int
    msg_id: str
    status: str  # ok | error | aborted
    frames: Any = None
    nbytes: int = 0
    started: Any = None
    completed: Any = None
    client_ident: bytes | None = None


@dataclass(slots=True)
class AbortRequested(Event):
    msg_ids: list | None
    targets: list | None


@dataclass(slots=True)
class PurgeRequested(Event):
    msg_ids: list | str  # list of ids or "all"
    engine_ids: list = field(default_factory=list)


@dataclass(slots=True)
class TimerFired(Event):
    pass
