"""Small functions the client sends as ``apply_request`` targets.

They are pickled by reference (``ipyfarm.engine.ops.push``), so a push or pull costs one
tiny pickle, and they need no message types of their own. Each finds the engine's user
namespace through the running :class:`~ipyfarm.engine.kernel.FarmKernel` (bound when the
kernel starts), or any running IPython shell. Importing this module imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["clear", "execute", "get_properties", "pull", "push", "run_function", "run_task",
           "set_properties"]

_kernel: Any = None  # the FarmKernel of this process, set by FarmKernel.__init__


def _bind(kernel: Any) -> None:
    global _kernel
    _kernel = kernel


def _shell() -> Any:
    if _kernel is not None:
        return _kernel.shell
    from IPython.core.getipython import get_ipython

    shell = get_ipython()
    if shell is None:
        raise RuntimeError(
            "ipyfarm.engine.ops functions run on engines: this process has no IPython "
            "shell. Call them through a view (view.push, view.pull, ...)."
        )
    return shell


def _where() -> str:
    engine_id = getattr(_kernel, "engine_id", -1)
    return f"engine {engine_id}" if engine_id >= 0 else "this engine"


def push(ns: dict) -> None:
    """Add ``ns`` to the user namespace; functions defined interactively see it as globals."""
    from ipyfarm.protocol.serialize import bind_interactive

    user_ns = _shell().user_ns
    for name, value in ns.items():
        user_ns[name] = bind_interactive(value, user_ns)


def _lookup(user_ns: dict, name: str) -> Any:
    try:
        return user_ns[name]
    except KeyError:
        pass
    except TypeError:
        raise TypeError(f"pull needs variable names (str), got {type(name).__name__}") from None
    if name.isidentifier():
        raise NameError(f"name {name!r} is not defined on {_where()}")
    # ipyparallel compatibility: an expression such as "a.shape" or "d['k']"
    return eval(name, user_ns)  # noqa: S307 - runs on the user's own engine, by request


def pull(names: str | list | tuple) -> Any:
    """One name -> its value; a list of names -> a list of values."""
    user_ns = _shell().user_ns
    if isinstance(names, str):
        return _lookup(user_ns, names)
    return [_lookup(user_ns, name) for name in names]


def clear() -> None:
    """Empty the user namespace (IPython's own names stay)."""
    from ipyfarm.protocol.serialize import forget_added

    shell = _shell()
    forget_added(shell.user_ns)
    shell.reset(new_session=False)


def execute(code: str) -> None:
    """Run Python source in the user namespace (no IPython syntax; use execute_request)."""
    shell = _shell()
    code_obj = compile(code, "<ipyfarm execute>", "exec")
    exec(code_obj, shell.user_global_ns, shell.user_ns)  # noqa: S102


def get_properties() -> dict:
    """This engine's properties (hostname, pid, cpu_count, memory_total, gpu_count, ...)."""
    props = getattr(_kernel, "properties", None)
    if props:
        return dict(props)
    from ipyfarm.engine.properties import engine_properties

    return engine_properties()


def set_properties(props: dict) -> dict:
    """Update this engine's properties (the scheduler hears of it with this reply)."""
    import json

    if not isinstance(props, dict) or not all(isinstance(k, str) for k in props):
        raise TypeError("properties must be a dict with string keys")
    try:
        json.dumps(props)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"engine properties must be plain JSON data (numbers, strings, lists, dicts): {e}"
        ) from None
    if _kernel is None:
        raise RuntimeError("set_properties runs on an ipyfarm engine; call view.set_properties")
    _kernel.properties.update(props)
    return dict(_kernel.properties)


def run_task(code: str, push_ns: dict | None = None, pull_names: str | list | tuple | None = None,
             clear_before: bool = False, clear_after: bool = False) -> dict:
    """A TaskClient ``Task`` on this engine: ``{name: value}`` of ``pull_names``.

    Optionally empties the namespace first, pushes ``push_ns``, runs ``code`` (IPython
    syntax allowed: magics, ``!shell``) in the user namespace, pulls, and empties the
    namespace afterwards (also when the code raised). Errors propagate: the task fails.
    """
    shell = _shell()
    if clear_before:
        clear()
    try:
        if push_ns:
            push(push_ns)
        source = shell.transform_cell(code)
        code_obj = compile(source, "<ipyfarm task>", "exec")
        exec(code_obj, shell.user_global_ns, shell.user_ns)  # noqa: S102
        if pull_names is None:
            return {}
        names = [pull_names] if isinstance(pull_names, str) else list(pull_names)
        return dict(zip(names, pull(names), strict=True))
    finally:
        if clear_after:
            clear()


def run_function(f: Any, args: tuple | list = (), kwargs: dict | None = None,
                 clear_before: bool = False, clear_after: bool = False) -> Any:
    """A TaskClient ``MapTask`` on this engine: ``f(*args, **kwargs)``, with the same
    namespace clearing as :func:`run_task`."""
    if clear_before:
        clear()
    try:
        return f(*args, **(kwargs or {}))
    finally:
        if clear_after:
            clear()
