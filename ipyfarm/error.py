"""Exceptions a user of ipyfarm sees. Names follow ipyparallel's ``ipyparallel.error``."""

from __future__ import annotations

import builtins
import re
from typing import Any

__all__ = [
    "CompositeError",
    "DependencyTimeout",
    "EngineError",
    "ImpossibleDependency",
    "InvalidDependency",
    "KernelError",
    "NoClusterError",
    "NoEnginesRegistered",
    "RemoteError",
    "SerializationError",
    "TaskAborted",
    "TaskTimeout",
    "TimeoutError",
    "UnmetDependency",
    "collect_exceptions",
    "wrap_exception",
]

from .protocol.serialize import SerializationError


class IPyFarmError(Exception):
    """Base class of ipyfarm's own errors."""


class KernelError(IPyFarmError):
    """Something went wrong with an engine or the controller rather than in user code."""


class EngineError(KernelError):
    """An engine died or was unreachable while it held a task."""


class NoClusterError(IPyFarmError, OSError):
    """No running cluster could be found or reached."""


class NoEnginesRegistered(KernelError):
    """An operation needs engines and none are registered."""


class TaskAborted(KernelError):
    """The task was aborted before it ran."""


class TaskTimeout(KernelError):
    """The task ran longer than its time limit."""


class UnmetDependency(KernelError):
    """Raised on an engine to say: run this task elsewhere."""


class ImpossibleDependency(UnmetDependency):
    """A task's dependencies can never be met."""


class DependencyTimeout(ImpossibleDependency):
    """A task waited for its dependencies longer than its timeout."""


class InvalidDependency(ImpossibleDependency):
    """A dependency names something that does not exist."""


class TimeoutError(IPyFarmError, builtins.TimeoutError):  # noqa: A001
    """A wait for results ran out of time (also a builtin ``TimeoutError``)."""


class RemoteError(IPyFarmError):
    """An exception raised by user code on an engine.

    ``ename``, ``evalue`` and ``traceback`` (the remote traceback text) describe it;
    ``engine_info`` says where it ran. In IPython it renders like a local traceback.
    """

    def __init__(self, ename: str, evalue: str, traceback: str = "",
                 engine_info: dict | None = None):
        super().__init__(ename, evalue)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.engine_info = engine_info or {}

    @property
    def engine_id(self) -> Any:
        return self.engine_info.get("engine_id")

    def __repr__(self) -> str:
        where = f"[{self.engine_id}:{self.engine_info.get('method', 'apply')}]"
        return f"{where} {self.ename}: {self.evalue}"

    def __str__(self) -> str:
        return f"{self.ename}: {self.evalue} (on engine {self.engine_id})"

    def render_traceback(self) -> list[str]:
        """Lines of the remote traceback, or ``ename: evalue`` when there is none."""
        if self.traceback:
            return self.traceback.splitlines()
        return [f"{self.ename}: {self.evalue}"]

    def _render_traceback_(self) -> list[str]:
        header = f"[engine {self.engine_id}] " if self.engine_id is not None else ""
        lines = self.render_traceback()
        if lines:
            lines = [header + lines[0], *lines[1:]]
        return lines

    def raise_exception(self) -> None:
        raise self


class CompositeError(RemoteError):
    """Errors from several engines at once (identical ones are listed once)."""

    tb_limit = 4

    def __init__(self, message: str, elist: list):
        Exception.__init__(self, message, elist)
        self.msg = message
        self.elist = elist
        first = elist[0] if elist else None
        self.ename = getattr(first, "ename", "CompositeError")
        self.evalue = getattr(first, "evalue", message)
        self.traceback = getattr(first, "traceback", "")
        self.engine_info = getattr(first, "engine_info", {})

    def _groups(self) -> list[tuple[list, Any]]:
        """``(engine ids, first error)`` per distinct error, in order of first appearance.

        Errors are the same when their name, value and traceback match once what differs
        between engines running the same code (cell numbers, colours) is taken out.
        """
        groups: dict[tuple, tuple[list, Any]] = {}
        for e in self.elist:
            key = (getattr(e, "ename", ""), getattr(e, "evalue", ""),
                   traceback_key(getattr(e, "traceback", "")))
            groups.setdefault(key, ([], e))[0].append(getattr(e, "engine_id", None))
        return list(groups.values())

    def __str__(self) -> str:
        lines = [self.msg]
        for engines, e in self._groups():
            lines.append(f"[engines {engines}] {getattr(e, 'ename', '')}: "
                         f"{getattr(e, 'evalue', e)}")
        return "\n".join(lines)

    __repr__ = __str__

    def render_traceback(self, excid: int | None = None) -> list[str]:
        lines: list[str] = []
        groups = self._groups()
        for i, (engines, e) in enumerate(groups):
            if excid is not None and i != excid:
                continue
            label = f"engine {engines[0]}" if len(engines) == 1 else f"engines {engines}"
            lines.append(f"[{label}]")
            rt = getattr(e, "render_traceback", None)
            lines.extend(rt() if rt else [repr(e)])
            if excid is None and i + 1 >= self.tb_limit and len(groups) > self.tb_limit:
                lines.append(f"... {len(groups) - self.tb_limit} more distinct exceptions")
                break
        return lines

    def _render_traceback_(self) -> list[str]:
        return [self.msg, *self.render_traceback()]

    def raise_exception(self, excid: int = 0) -> None:
        raise self.elist[excid]


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PER_ENGINE = [  # parts of a traceback that differ between engines running the same code
    (re.compile(r"\bIn ?\[\s*\d+\s*\]"), "In[#]"),               # Cell In[7], Input In [7]
    (re.compile(r"<ipython-input-\d+-[0-9a-f]+>"), "<ipython-input>"),  # older IPython
    (re.compile(r"\bipykernel_\d+"), "ipykernel_#"),                   # /tmp/ipykernel_<pid>/
]


def traceback_key(text: str) -> str:
    """``text`` (a remote traceback) without colour codes and per-engine details: cell
    numbers (``Cell In[7]``) and kernel pids in file names. Equal keys: the same error."""
    text = _ANSI.sub("", text)
    for pattern, replacement in _PER_ENGINE:
        text = pattern.sub(replacement, text)
    return text


# Errors raised by the controller or the engine machinery rather than by user code
# arrive as RemoteErrors (ename, evalue, engine_info) that are also instances of their
# own class, so both `except ipp.error.DependencyTimeout` and `e.ename` work.


class RemoteKernelError(RemoteError):
    """Base of the remote forms of ipyfarm's KernelErrors."""

    def __str__(self) -> str:
        if self.engine_id is None:
            return f"{self.ename}: {self.evalue}"
        return super().__str__()


class RemoteEngineError(EngineError, RemoteKernelError):
    pass


class RemoteTaskAborted(TaskAborted, RemoteKernelError):
    pass


class RemoteTaskTimeout(TaskTimeout, RemoteKernelError):
    pass


class RemoteUnmetDependency(UnmetDependency, RemoteKernelError):
    pass


class RemoteImpossibleDependency(ImpossibleDependency, RemoteKernelError):
    pass


class RemoteDependencyTimeout(DependencyTimeout, RemoteKernelError):
    pass


class RemoteInvalidDependency(InvalidDependency, RemoteKernelError):
    pass


_REMOTE_KINDS: dict[str, type[RemoteError]] = {
    cls.__mro__[1].__name__: cls
    for cls in (RemoteEngineError, RemoteTaskAborted, RemoteTaskTimeout, RemoteUnmetDependency,
                RemoteImpossibleDependency, RemoteDependencyTimeout, RemoteInvalidDependency)
}


def wrap_exception(content: dict) -> RemoteError:
    """The error content of a reply as a :class:`RemoteError`.

    Controller and engine-machinery errors (EngineError, DependencyTimeout, ...) come
    back as a RemoteError that is also an instance of that class.
    """
    tb = content.get("traceback", [])
    tb_text = "\n".join(tb) if isinstance(tb, list) else str(tb)
    ename = content.get("ename", "Exception")
    cls = _REMOTE_KINDS.get(ename, RemoteError)
    return cls(ename, content.get("evalue", ""), tb_text, content.get("engine_info"))


def collect_exceptions(results: list, method: str) -> list:
    """Raise CompositeError if any of ``results`` is an exception, else return them."""
    elist = [r for r in results if isinstance(r, BaseException)]
    if not elist:
        return results
    raise CompositeError(f"one or more exceptions raised in: {method}", elist)
