"""Where a load-balanced task may run: pure checks over the live engines.

:func:`candidates` narrows the live engines by the task's ``targets``, its ``follow``
locations, its ``placement`` predicate and the engines that refused it
(UnmetDependency); when nothing is left it says why, in words for the user.
"""

from __future__ import annotations

from typing import Any

from .jobs import Job

__all__ = ["candidates", "satisfies", "unreachable_text"]


def candidates(job: Job, live: list, follow_engines: set | None = None
               ) -> tuple[list, str | None]:
    """Engines (of ``live``) ``job`` may run on; else ``([], why)`` (``why`` None: no engines)."""
    fits = live
    if not fits:
        return [], None
    if job.targets is not None:
        fits = [e for e in fits if e.engine_id in job.targets]
        if not fits:
            return [], (f"none of its target engines {sorted(job.targets)} is alive "
                        f"(live engines: {[e.engine_id for e in live]})")
    if job.follow is not None:
        where = follow_engines or set()
        fits = [e for e in fits if e.engine_id in where]
        if not fits:
            return [], (f"it must follow tasks that ran on engine(s) "
                        f"{sorted(x for x in where if x is not None)}, which are "
                        "gone or not among its targets")
    if job.placement is not None:
        fits = [e for e in fits if satisfies(job.placement, e.properties)]
        if not fits:
            return [], ("no live engine's properties satisfy its placement predicate "
                        "(set a timeout to wait for one, or check view.get_properties())")
    if job.blacklist:
        fits = [e for e in fits if e.engine_id not in job.blacklist]
        if not fits:
            return [], (f"it raised UnmetDependency on every engine that could run it "
                        f"({sorted(job.blacklist)})")
    return fits, None


def satisfies(predicate: Any, properties: dict) -> bool:
    """A placement predicate's verdict; one that raises counts as False."""
    try:
        return bool(predicate(dict(properties)))
    except Exception:
        return False


def unreachable_text(job: Job, kind: str, spec: Any) -> str:
    accepted = " or ".join(w for w, on in (("succeeded", spec.success),
                                           ("failed", spec.failure)) if on) or "ended"
    need = "all" if spec.all else "any"
    where = (" and on one engine" if kind == "follow" and spec.all else "")
    return (f"task {job.msg_id} can never run: its {kind} dependency needs {need} of "
            f"{len(spec.ids)} task(s) to have {accepted}{where}, and that can no longer "
            "happen")
