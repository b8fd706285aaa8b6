"""Showing what engines printed and displayed, per engine, like a local cell."""

from __future__ import annotations

import sys
from typing import Any


class ExecuteReply:
    """The result of ``view.execute``: its execution count and any ``Out[...]`` value."""

    def __init__(self, msg_id: str, content: dict, metadata: dict):
        self.msg_id = msg_id
        self._content = content
        self.metadata = metadata

    @property
    def execution_count(self) -> Any:
        return self._content.get("execution_count")

    @property
    def engine_id(self) -> Any:
        return self.metadata.get("engine_id")

    @property
    def execute_result(self) -> dict | None:
        return self.metadata.get("execute_result")

    def _plain(self) -> str:
        er = self.execute_result
        return (er or {}).get("data", {}).get("text/plain", "")

    def __repr__(self) -> str:
        text = self._plain()
        return f"<ExecuteReply[{self.execution_count}]: {text}>" if text else \
            f"<ExecuteReply[{self.execution_count}]>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        text = self._plain()
        if text:
            p.text(f"Out[{self.engine_id}:{self.execution_count}]: {text}")
        else:
            p.text(repr(self))

    def __getitem__(self, key: str) -> Any:
        return self.metadata[key]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self.metadata[key]
        except KeyError:
            raise AttributeError(key) from None


def _in_ipython() -> bool:
    return "IPython" in sys.modules and getattr(
        sys.modules["IPython"], "get_ipython", lambda: None)() is not None


def display_outputs(metadatas: list[dict], groupby: str = "type") -> None:
    """Show stdout, stderr, display data and results of each message.

    ``groupby``: ``type``: all stdout, then all stderr, then each engine's displays, then
    the results; ``engine``: each engine's outputs together; ``order``: like ``type``,
    with the displays interleaved (every engine's first display, then every engine's
    second, ...). A display is preceded by ``[output:<engine>]``, which engine made it.
    """
    if groupby not in ("type", "engine", "order"):
        raise ValueError(f"groupby must be 'type', 'engine' or 'order', not {groupby!r}")
    if groupby == "engine":
        for md in metadatas:
            show_stream(md, "stdout")
            show_stream(md, "stderr")
            show_outputs(md, md.get("outputs") or [])
            show_result(md)
        return
    for name in ("stdout", "stderr"):
        for md in metadatas:
            show_stream(md, name)
    if groupby == "type":
        for md in metadatas:
            show_outputs(md, md.get("outputs") or [])
    else:
        lists = [md.get("outputs") or [] for md in metadatas]
        for i in range(max(map(len, lists), default=0)):
            for md, outs in zip(metadatas, lists, strict=True):
                show_outputs(md, outs[i:i + 1])
    for md in metadatas:
        show_result(md)


def show_stream(md: dict, name: str) -> None:
    """``[stdout:<engine>] text`` (or stderr) if the message printed anything."""
    text = md.get(name) or ""
    if text:
        target = sys.stdout if name == "stdout" else sys.stderr
        print(f"[{name}:{md.get('engine_id')}] " + text.rstrip("\n"), file=target, flush=True)


def show_outputs(md: dict, outputs: list[dict]) -> None:
    """``[output:<engine>]``, then each of ``outputs`` (display data) shown as if made here."""
    if not outputs:
        return
    print(f"[output:{md.get('engine_id')}]", flush=True)
    show = _display if _in_ipython() else _print_data
    for out in outputs:
        show(out.get("data", {}), out.get("metadata", {}))


def show_result(md: dict) -> None:
    """``Out[<engine>:<count>]: value`` if the message has a result."""
    er = md.get("execute_result")
    if er:
        data = er.get("data", {})
        label = f"Out[{md.get('engine_id')}:{er.get('execution_count')}]: "
        if "text/plain" in data and len(data) == 1:
            print(label + data["text/plain"], flush=True)
        else:
            print(label, flush=True)
            show = _display if _in_ipython() else _print_data
            show(data, er.get("metadata", {}))


def _display(data: dict, metadata: dict) -> None:
    from IPython.display import publish_display_data

    publish_display_data(data=data, metadata=metadata)


def _print_data(data: dict, metadata: dict) -> None:
    print(data.get("text/plain", f"<display data: {', '.join(data)}>"))
