"""Dependencies of load-balanced tasks: on other tasks, and on what an engine has.

- :class:`Dependency`: a set of msg_ids with ``all`` / ``success`` / ``failure`` flags,
  used for the ``after`` (time) and ``follow`` (location) flags of a
  :class:`~ipyfarm.client.lbview.LoadBalancedView`. The controller evaluates them.
- :func:`depend` and :func:`require`: checks that run *on the engine* just before the
  task; when one fails the engine raises :class:`~ipyfarm.error.UnmetDependency` and
  the scheduler runs the task on another engine (never the same one twice; a task no
  engine can run fails with ``ImpossibleDependency``).
"""

from __future__ import annotations

import functools
import importlib
import types
from typing import Any, Callable, Iterable

from ..error import UnmetDependency

__all__ = ["Dependency", "depend", "dependent", "require", "to_wire"]


def _ids_of(item: Any) -> list[str]:
    msg_ids = getattr(item, "msg_ids", None)  # an AsyncResult
    if msg_ids is not None:
        return list(msg_ids)
    if isinstance(item, str):
        return [item]
    if isinstance(item, Iterable):
        out: list[str] = []
        for x in item:
            out.extend(_ids_of(x))
        return out
    raise TypeError(
        f"a dependency is a msg_id, an AsyncResult, or a list of them, not {type(item).__name__}")


class Dependency(set):
    """msg_ids a task depends on, and how.

    ``all``: every one (True) or any one (False) must be met; ``success`` /
    ``failure``: whether a task that succeeded / failed meets the dependency.
    """

    def __init__(self, dependencies: Any = (), all: bool = True, success: bool = True,
                 failure: bool = False):
        super().__init__(_ids_of(dependencies))
        if not (success or failure):
            raise ValueError("a Dependency that neither success nor failure meets can never "
                             "be met; set success=True and/or failure=True")
        self.all = bool(all)
        self.success = bool(success)
        self.failure = bool(failure)

    def as_dict(self) -> dict:
        return {"ids": sorted(self), "all": self.all, "success": self.success,
                "failure": self.failure}

    def __repr__(self) -> str:
        return (f"Dependency({sorted(self)}, all={self.all}, success={self.success}, "
                f"failure={self.failure})")


def to_wire(value: Any) -> Any:
    """A flag value (msg_id, AsyncResult, list, Dependency, dict) in the form the
    controller reads; None when there is no dependency."""
    if value is None:
        return None
    if isinstance(value, Dependency):
        return value.as_dict() if value else None
    if isinstance(value, dict):
        return Dependency(value.get("ids", value.get("dependencies", ())),
                          all=value.get("all", True), success=value.get("success", True),
                          failure=value.get("failure", False)).as_dict()
    ids = sorted(set(_ids_of(value)))
    return ids or None


def _engine_namespace() -> dict | None:
    from ..engine import ops

    kernel = ops._kernel
    return None if kernel is None else kernel.shell.user_ns


class dependent:  # noqa: N801 - ipyparallel's name
    """``f`` guarded by ``df(*dargs, **dkwargs)``: UnmetDependency when it is false."""

    def __init__(self, f: Callable, df: Callable, *dargs: Any, **dkwargs: Any):
        self.f = f
        self.df = df
        self.dargs = dargs
        self.dkwargs = dkwargs
        functools.update_wrapper(self, f)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ns = _engine_namespace()
        f, df = self.f, self.df
        if ns is not None:
            from ..protocol.serialize import bind_interactive

            f, df = bind_interactive(f, ns), bind_interactive(df, ns)
        if not df(*self.dargs, **self.dkwargs):
            name = getattr(self.df, "__name__", "dependency")
            raise UnmetDependency(f"{name}{self.dargs!r} is false on this engine")
        return f(*args, **kwargs)


def depend(f: Callable, *args: Any, **kwargs: Any) -> Callable[[Callable], dependent]:
    """Decorator: run the task only on engines where ``f(*args, **kwargs)`` is true."""

    def wrap(task: Callable) -> dependent:
        return dependent(task, f, *args, **kwargs)

    return wrap


def _require(*names: str, **mapping: Any) -> bool:
    """On the engine: import ``names`` and put ``mapping`` in the namespace."""
    ns = _engine_namespace()
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            return False
        if ns is not None:
            ns[name.split(".")[0]] = importlib.import_module(name.split(".")[0])
            if "." not in name:
                ns[name] = module
    if ns is not None:
        ns.update(mapping)
    return True


def require(*objects: Any, **mapping: Any) -> Callable[[Callable], dependent]:
    """Decorator: the task needs these modules (names or modules) and objects.

    Modules are imported on the engine before the task runs (an engine that can't
    import one raises UnmetDependency, so the task goes elsewhere); functions are
    sent along under their ``__name__``, and ``name=object`` pairs under ``name``.
    """
    names: list[str] = []
    push: dict[str, Any] = dict(mapping)
    for obj in objects:
        if isinstance(obj, str):
            names.append(obj)
        elif isinstance(obj, types.ModuleType):
            names.append(obj.__name__)
        elif callable(obj) and hasattr(obj, "__name__"):
            push[obj.__name__] = obj
        else:
            raise TypeError(f"require takes module names, modules or functions (others by "
                            f"keyword: require(name=obj)), not {type(obj).__name__}")
    return depend(_require, *names, **push)
