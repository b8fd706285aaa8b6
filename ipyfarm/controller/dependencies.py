"""Task dependencies as the scheduler sees them (pure: sets of msg_ids and outcomes).

A :class:`DepSpec` is met, still waiting, or unreachable, given each named task's
outcome: ``"ok"`` (succeeded), ``"failed"`` (error or aborted), ``"pending"``.

- ``all=True``: met when every task ended in an accepted way; unreachable as soon
  as one ended in a way that is not accepted.
- ``all=False``: met as soon as one ended in an accepted way; unreachable when all
  ended and none was accepted.
- ``success`` / ``failure``: which outcomes are accepted (by default success only).

For ``follow`` (location) the accepted tasks also say where the task may run: on the
engine they ran on (``all=True``: one engine for all of them, else unreachable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

__all__ = ["DepSpec", "MET", "UNREACHABLE", "WAITING"]

MET, WAITING, UNREACHABLE = "met", "waiting", "unreachable"


@dataclass(frozen=True, slots=True)
class DepSpec:
    ids: frozenset
    all: bool = True
    success: bool = True
    failure: bool = False

    @classmethod
    def from_wire(cls, value: Any) -> DepSpec | None:
        """From task metadata: ``None``, a list of msg_ids, or ``{"ids", "all", ...}``.

        Raises ValueError (with what was wrong) for anything else.
        """
        if value is None or value == [] or value == {}:
            return None
        if isinstance(value, list):
            ids, flags = value, {}
        elif isinstance(value, dict):
            ids = value.get("ids", value.get("dependencies", []))
            flags = {k: value[k] for k in ("all", "success", "failure") if k in value}
        else:
            raise ValueError(f"a dependency must be a list of msg_ids or a dict, "
                             f"not {type(value).__name__}")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError("dependency ids must be a list of msg_id strings")
        for k, v in flags.items():
            if not isinstance(v, bool):
                raise ValueError(f"dependency flag {k!r} must be true or false, not {v!r}")
        if not ids:
            return None
        return cls(frozenset(ids), **flags)

    def accepts(self, outcome: str) -> bool:
        return (outcome == "ok" and self.success) or (outcome == "failed" and self.failure)

    def evaluate(self, outcome_of: Callable[[str], str]) -> str:
        """MET, WAITING or UNREACHABLE."""
        good = bad = 0
        for msg_id in self.ids:
            outcome = outcome_of(msg_id)
            if outcome == "pending":
                continue
            if self.accepts(outcome):
                good += 1
            else:
                bad += 1
        pending = len(self.ids) - good - bad
        if self.all:
            if bad:
                return UNREACHABLE
            return WAITING if pending else MET
        if good:
            return MET
        return WAITING if pending else UNREACHABLE

    def locations(self, outcome_of: Callable[[str], str],
                  engine_of: Callable[[str], Any]) -> set:
        """Engines the accepted tasks ran on (for ``follow``)."""
        return {engine_of(m) for m in self.ids if self.accepts(outcome_of(m))}

    def follow_engines(self, outcome_of: Callable[[str], str],
                       engine_of: Callable[[str], Any]) -> tuple[str, set]:
        """``(verdict, engines)`` for a location dependency.

        With ``all=True`` the accepted tasks must share one engine: two different ones
        make it UNREACHABLE even before the rest finish.
        """
        verdict = self.evaluate(outcome_of)
        engines = self.locations(outcome_of, engine_of)
        if self.all and len(engines) > 1:
            return UNREACHABLE, engines
        return verdict, engines


def union_ids(specs: Iterable[DepSpec | None]) -> set:
    out: set = set()
    for spec in specs:
        if spec is not None:
            out |= spec.ids
    return out
