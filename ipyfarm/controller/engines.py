"""What the controller knows of each engine, and words for how an engine ended."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EngineState", "describe_exit"]


@dataclass(slots=True)
class EngineState:
    engine_id: int
    uuid: str
    ident: bytes
    pid: int
    hostname: str
    info: dict
    registered: float
    last_beat: float
    alive: bool = True
    outstanding: dict = field(default_factory=dict)  # msg_id -> "mux" | "task", in order
    completed: int = 0
    failed: int = 0
    last_used: int = 0
    lost_reason: str = ""
    rss: int | None = None  # resident memory, from its heartbeats
    # its heartbeat period and timeout as multiples of the configured ones: the factor
    # last announced to it, and the one its silence is judged by (the larger of the
    # last two announced until it has beaten at the newer: see ControllerState)
    beat_factor: float = 1.0
    limit_factor: float = 1.0

    @property
    def load(self) -> int:
        return len(self.outstanding)

    @property
    def properties(self) -> dict:
        return self.info.setdefault("properties", {})

    def public(self) -> dict:
        return {
            "engine_id": self.engine_id,
            "uuid": self.uuid,
            "pid": self.pid,
            "hostname": self.hostname,
            "connection_file": self.info.get("connection_file"),
            "connection_info": self.info.get("connection_info", {}),
            "properties": self.properties,
        }


def describe_exit(returncode: int) -> str:
    """Human words for a process exit status (negative = killed by a signal)."""
    if returncode < 0:
        import signal as _signal

        try:
            name = _signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (killed: out of memory, or by a user/launcher?)" if returncode == -9 else ""
        return f"exit code {returncode}, {name}{hint}"
    return f"exit code {returncode}"
