"""Reuse the pickle of an interactively defined function while nothing it captures changed.

cloudpickle sends a function defined in ``__main__`` (a notebook cell, a script) by value:
its code, defaults, closure and the globals it names, pickled again for every task, about
40% of the cost of building a tiny one. :func:`pickled` keeps the bytes of such a function
and gives them again while the function could only pickle to the same bytes:

- everything cloudpickle would capture is a module (pickled by reference) or an immutable
  value (numbers, strings, bytes, None, and tuples/frozensets of them), and
- each of those is still the very same object: the same code, defaults, closure cells and
  global bindings, compared by identity (the cache holds them, so an identity cannot be
  reused by another object).

A function that names anything else (a list, a dict, an array, another function of
``__main__``), has attributes, or annotations other than strings and builtin types, is
never cached: it is pickled afresh for every task, as before, since its captured state
may change without its identity changing.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import cloudpickle

from .memo import remember

__all__ = ["captures_only_immutables", "pickled"]

_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})
_EMPTY_CELL = object()
_names: dict[types.CodeType, tuple[str, ...]] = {}
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _immutable(value: Any, depth: int = 0) -> bool:
    t = type(value)
    if t in _SCALARS:
        return True
    if (t is tuple or t is frozenset) and depth < 4:
        return all(_immutable(v, depth + 1) for v in value)
    return False


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The names ``code`` (and the code objects nested in it) may look up as globals."""
    found = _names.get(code)
    if found is None:
        names = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names.update(_global_names(const))
        # (code objects of long-gone functions go when the table is full)
        found = remember(_names, code, tuple(sorted(names)), 4096)
    return found


def _captured(f: types.FunctionType) -> list | None:
    """What cloudpickle would capture of ``f``, if all of it is immutable or a module;
    else None."""
    if f.__dict__:
        return None
    out: list = [f.__code__, f.__name__, f.__qualname__, f.__doc__]
    for name, value in f.__annotations__.items():  # strings, or builtin types like int
        if not (_immutable(value) or (type(value) is type and value.__module__ == "builtins")):
            return None
        out += (name, value)
    for value in (f.__defaults__ or ()):
        if not _immutable(value):
            return None
        out.append(value)
    for value in (f.__kwdefaults__ or {}).values():
        if not _immutable(value):
            return None
        out.append(value)
    for cell in f.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:
            value = _EMPTY_CELL
        if not (value is _EMPTY_CELL or _immutable(value) or type(value) is types.ModuleType):
            return None
        out.append(value)
    g = f.__globals__
    for name in _global_names(f.__code__):
        value = g.get(name, _EMPTY_CELL)
        if not (value is _EMPTY_CELL or _immutable(value) or type(value) is types.ModuleType):
            return None
        out.append(value)
    return out


def captures_only_immutables(f: types.FunctionType) -> bool:
    """Whether all ``f`` would capture (attributes, defaults, cells, globals it names)
    is modules and immutable values."""
    return _captured(f) is not None


def pickled(f: types.FunctionType) -> bytes | None:
    """cloudpickle's bytes for ``f`` (a ``__main__`` function), reused while valid;
    None when ``f`` captures something mutable (pickle it with the rest, as usual)."""
    captured = _captured(f)
    if captured is None:
        return None
    hit = _cache.get(f)
    if hit is not None:
        held, data = hit
        if len(held) == len(captured) and all(a is b for a, b in zip(held, captured, strict=True)):
            return data
    data = cloudpickle.dumps(f, protocol=5)
    _cache[f] = (captured, data)
    return data
