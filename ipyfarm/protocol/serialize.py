"""Objects <-> frames: cloudpickle with pickle protocol 5 out-of-band buffers.

``dumps(obj)`` returns ``[pickle_bytes, buf0, buf1, ...]``: numpy arrays,
memoryviews and large ``bytes`` leave the pickle as separate frames without a
copy; ``loads(frames)`` rebuilds the object on views of those frames, so a
received numpy array is a read-only view of the message buffer (copy it to
write, as the seeds describe).

Apply requests pickle ``(f, args, kwargs)`` as one object. When pickling fails,
the culprit is found and named: ``argument 2 (a generator)``.
"""

from __future__ import annotations

import io
import pickle
import types
from typing import Any

import cloudpickle

from .fncache import captures_only_immutables, pickled
from .memo import remember

__all__ = [
    "OOB_THRESHOLD",
    "Reference",
    "SerializationError",
    "dumps",
    "interactive",
    "loads",
    "pack_apply",
    "unpack_apply",
]

#: buffers smaller than this stay inside the pickle (a frame has its own cost)
OOB_THRESHOLD = 1024


class SerializationError(TypeError):
    """An object could not be pickled; the message names it and where it sat."""


def _rebuild_bytes(view: Any) -> bytes:
    return bytes(view)


def _rebuild_memoryview(view: Any) -> memoryview:
    return memoryview(view)


class _OOBBytes:
    """Wraps a large ``bytes`` so that it pickles out of band (pickle never asks a
    reducer about exact ``bytes``). Used for the object itself, apply arguments
    and the values of a top-level dict (``push``)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _rebuild_bytes, (pickle.PickleBuffer(self.data),)


def _wrap(obj: Any) -> Any:
    if type(obj) is bytes and len(obj) >= OOB_THRESHOLD:
        return _OOBBytes(obj)
    return obj


def _wrap_top(obj: Any) -> Any:
    if type(obj) is dict:
        return {k: _wrap(v) for k, v in obj.items()}
    return _wrap(obj)


class _Pickler(cloudpickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # large memoryviews travel out of band instead of inside the pickle
        t = type(obj)
        if t is memoryview and obj.nbytes >= OOB_THRESHOLD and obj.contiguous:
            return _rebuild_memoryview, (pickle.PickleBuffer(obj),)
        if t is types.FunctionType and obj.__module__ == "__main__":
            # an interactive function: its by-value pickle, reused while valid (fncache)
            data = pickled(obj)
            if data is not None:
                return pickle.loads, (data,)
        return super().reducer_override(obj)


def dumps(obj: Any) -> list:
    """Pickle ``obj``; return ``[pickle, *out_of_band_buffers]``.

    The C pickler runs first (fast); cloudpickle takes over when it fails or the
    pickle refers to ``__main__`` (interactively defined functions and classes
    must travel by value, which only cloudpickle does).
    """
    if obj is None:  # the result of most side-effect tasks
        return [_NONE_PICKLE]
    buffers: list = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < OOB_THRESHOLD:
            return True  # in band
        buffers.append(view)
        return False

    wrapped = _wrap_top(obj)
    if not _BY_VALUE_REGISTRY() and not _starts_in_main(obj):
        try:
            data = pickle.dumps(wrapped, protocol=5, buffer_callback=keep)
        except Exception:
            data = None
        if data is not None and b"__main__" not in data:
            return [data, *buffers]
        buffers.clear()
    f = io.BytesIO()
    _Pickler(f, protocol=5, buffer_callback=keep).dump(wrapped)
    return [f.getvalue(), *buffers]


_NONE_PICKLE = pickle.dumps(None, protocol=5)


def _starts_in_main(obj: Any) -> bool:
    """Whether ``obj`` (or the function of an apply tuple) was defined in ``__main__``:
    then the C pickler's attempt can only end in a reference to ``__main__``, which is
    thrown away, so cloudpickle goes first."""
    if type(obj) is tuple and obj:
        obj = obj[0]
    return getattr(obj, "__module__", None) == "__main__"


def _BY_VALUE_REGISTRY() -> Any:
    # modules registered with cloudpickle.register_pickle_by_value need cloudpickle
    return getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ())


def loads(frames: list) -> Any:
    """Inverse of :func:`dumps`; buffers may be bytes, memoryviews or zmq Frames."""
    views = [f if isinstance(f, bytes | memoryview) else f.buffer for f in frames]
    # received arrays are read-only views of the message buffer (no copy)
    oob = [v.toreadonly() if isinstance(v, memoryview) else v for v in views[1:]]
    return pickle.loads(views[0], buffers=oob)


def _describe(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}".removeprefix("builtins.")


def _find_culprit(f: Any, args: tuple, kwargs: dict) -> str:
    places = [("the function", f)]
    places += [(f"argument {i}", a) for i, a in enumerate(args)]
    places += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for where, obj in places:
        try:
            dumps(obj)
        except Exception as e:
            return f"{where} (type {_describe(obj)}): {e}"
    return "an unknown part of the call"


_NO_ARG_CALLS: dict[bytes, bytes] = {}


def pack_apply(f: Any, args: tuple, kwargs: dict) -> list:
    """Frames for an apply request; raise SerializationError naming what can't be pickled."""
    if not args and not kwargs and type(f) is types.FunctionType and f.__module__ == "__main__":
        # f() of an interactive function: the whole request is the same bytes for as
        # long as f's own pickle may be reused (fncache), so it is pickled once
        data = pickled(f)
        if data is not None:
            call = _NO_ARG_CALLS.get(data)
            if call is None:
                frames = dumps((f, (), {}))
                if len(frames) > 1:  # (never so far: f's pickle travels in band)
                    return frames
                call = remember(_NO_ARG_CALLS, data, frames[0], 256)
            return [call]
    try:
        wrapped_args = tuple(_wrap_top(a) for a in args)
        wrapped_kwargs = {k: _wrap_top(v) for k, v in kwargs.items()}
        return dumps((f, wrapped_args, wrapped_kwargs))
    except Exception as e:
        culprit = _find_culprit(f, args, kwargs)
        raise SerializationError(
            f"cannot send {culprit}. Nothing was sent. Objects sent to engines must be "
            "picklable by cloudpickle; pass data the engine can rebuild (e.g. a file name "
            "instead of an open file) or create the object on the engine."
        ) from e


#: the engine's side of :data:`_NO_ARG_CALLS`: the request's bytes -> the function
#: they rebuild, for ``f()`` of an interactive function without closure or attributes
_NO_ARG_FUNCTIONS: dict[bytes, types.FunctionType] = {}
#: how the pickle of ``(f, (), {})`` ends (empty tuple, empty dict, the 3-tuple, stop):
#: a request that ends otherwise has arguments and is neither copied nor looked up
_NO_ARG_TAIL = b")}\x94\x87\x94."


def unpack_apply(frames: list, namespace: dict) -> tuple[Any, tuple, dict]:
    """Rebuild ``(f, args, kwargs)``; resolve References and rebind interactive functions:
    ``f`` and any function passed as an argument (``map`` passes the user's function to
    its chunk runner), so their global names resolve in the engine's namespace.

    A request that is ``f()`` alone, for a function of ``__main__`` that captures only
    modules and immutable values (fncache's rule) and no cells, rebuilds ``f`` once: the
    same bytes again give the same code, defaults and captured globals, and the task
    still gets a function of its own (:func:`bind_interactive` makes one per call), so
    nothing of one call reaches the next. Any other function is rebuilt each time.
    """
    key = None
    if (len(frames) == 1 and len(frames[0]) <= 16384
            and bytes(frames[0][-len(_NO_ARG_TAIL):]) == _NO_ARG_TAIL):
        key = bytes(frames[0])
        cached = _NO_ARG_FUNCTIONS.get(key)
        if cached is not None:
            return bind_interactive(cached, namespace), (), {}
    f, args, kwargs = loads(frames)
    if (key is not None and not args and not kwargs and type(f) is types.FunctionType
            and f.__module__ == "__main__" and not f.__closure__
            and captures_only_immutables(f)):
        remember(_NO_ARG_FUNCTIONS, key, f, 64)
    f = bind_interactive(f, namespace)
    args = tuple(_arg(a, namespace) for a in args)
    kwargs = {k: _arg(v, namespace) for k, v in kwargs.items()}
    return f, args, kwargs


def _arg(value: Any, namespace: dict) -> Any:
    if isinstance(value, Reference):
        return value.resolve(namespace)
    if isinstance(value, types.FunctionType):
        return bind_interactive(value, namespace)
    return value


_MISSING = object()
#: per namespace (by id; engines keep theirs for life): the values bind_interactive put
#: there, so that a later call may replace them but never a value set on the engine
_ADDED: dict[int, dict[str, Any]] = {}


def _added_to(namespace: dict) -> dict[str, Any]:
    """The values :func:`bind_interactive` added to ``namespace`` that it still holds
    (the others are forgotten, so nothing is kept alive that the namespace dropped)."""
    added = _ADDED.setdefault(id(namespace), {})
    gone = [name for name, value in added.items() if namespace.get(name, _MISSING) is not value]
    for name in gone:
        del added[name]
    return added


def forget_added(namespace: dict) -> None:
    """Drop the record of values :func:`bind_interactive` added to ``namespace`` (call it
    when the namespace is emptied, so that nothing it held stays alive here)."""
    _ADDED.pop(id(namespace), None)


def bind_interactive(f: Any, namespace: dict) -> Any:
    """Functions defined interactively see the engine's namespace.

    "Interactively" means in ``__main__`` (a notebook, a script), or anywhere
    cloudpickle had to send the function by value (a lambda, a nested function, a
    module the engine lacks): its global names resolve in the engine's namespace.
    Globals it captured on the client that the engine lacks are added to it, as if
    pushed; a name that holds such an added value still gets the value each later call
    brings (change ``threshold`` in the notebook, and the next task sees the change),
    while a value set on the engine itself (push, execute, a task) wins. Functions of
    importable modules keep their module's globals.
    """
    import sys

    if not isinstance(f, types.FunctionType):
        return f
    module = sys.modules.get(f.__module__)
    if f.__module__ != "__main__" and module is not None and f.__globals__ is vars(module):
        return f
    if f.__globals__ is namespace:
        return f
    added = _added_to(namespace)
    for name, value in f.__globals__.items():
        if name.startswith("__"):
            continue
        current = namespace.get(name, _MISSING)
        if current is _MISSING or (current is added.get(name, _MISSING) and current is not value):
            namespace[name] = added[name] = value
    g = types.FunctionType(f.__code__, namespace, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    g.__dict__.update(f.__dict__)
    g.__doc__ = f.__doc__
    g.__qualname__ = f.__qualname__
    return g


def interactive(f: Any) -> Any:
    """Decorator: make ``f`` resolve its globals in the engine's namespace."""
    f.__module__ = "__main__"
    return f


class Reference:
    """A name to look up in the engine's namespace when a task runs there.

    ``view.apply(f, ipp.Reference("a"))`` calls ``f(a)`` with the engine's ``a``.
    """

    def __init__(self, name: str):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"Reference needs a variable name, got {name!r}")
        self.name = name

    def resolve(self, namespace: dict) -> Any:
        try:
            return namespace[self.name]
        except KeyError:
            raise NameError(f"name {self.name!r} is not defined on this engine") from None

    def __repr__(self) -> str:
        return f"<Reference: {self.name!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("Reference", self.name))
