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
    rss: int | None = None  # the engine's resident memory, bytes, when it says


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
    """A task from a client: direct (``engine_id`` set) or load-balanced (``None``).

    The scheduling fields apply to load-balanced tasks: ``after`` / ``follow``
    (:class:`~ipyfarm.controller.dependencies.DepSpec` or None), ``timeout`` (seconds
    to wait for dependencies or a fitting engine), ``targets`` (candidate engine ids),
    ``retries``, ``placement`` (a predicate on an engine's properties dict).
    ``time_limit`` (seconds it may run, direct or balanced; None: no limit) applies to both.
    """

    msg_id: str
    client_ident: bytes
    msg_type: str  # execute_request | apply_request
    engine_id: int | None
    frames: Any = None
    label: str | None = None
    after: Any = None
    follow: Any = None
    timeout: float | None = None
    targets: list | None = None
    retries: int = 0
    engine_retries: int | None = None  # reruns after an engine death; None: ``retries``
    placement: Any = None
    date: float | None = None  # the request header's date, seconds since the epoch
    resubmit_of: str | None = None
    time_limit: float | None = None


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
    ename: str | None = None
    evalue: str | None = None
    engine_uuid: str | None = None
    properties: dict | None = None  # the engine's properties, when they changed
    decoded: Any = None  # the reply as the shell decoded it (opaque here), for delivery


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
