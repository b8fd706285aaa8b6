"""A controller on a background thread of this process (the default).

The running one is recorded here so that ``Client()`` without arguments finds it.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any

from .. import paths
from .hub import Hub

_lock = threading.Lock()
_running: list[EmbeddedController] = []


def current_embedded() -> EmbeddedController | None:
    """The most recently started embedded controller of this process that still runs."""
    with _lock:
        for ctl in reversed(_running):
            if not ctl.hub.stopped.is_set():
                return ctl
    return None


def hub_at(inproc_url: str) -> Any:
    """The running hub of this process bound at ``inproc_url``, or None."""
    with _lock:
        for ctl in _running:
            if ctl.hub.inproc_url == inproc_url and not ctl.hub.stopped.is_set():
                return ctl.hub
    return None


class EmbeddedController:
    """A :class:`Hub` running on a daemon thread, with its connection file."""

    def __init__(self, profile: str = "default", ip: str = "127.0.0.1", **hub_kwargs: Any):
        self.profile = profile
        self.hub = Hub(ip=ip, **hub_kwargs)
        self.file = paths.cluster_file(profile)
        self._info: dict[str, Any] = {}

    def connection_info(self) -> dict:
        """What a client needs; in this process it may use the in-process transport."""
        info = dict(self._info)
        info["inproc"] = self.hub.inproc_url
        return info

    def start(self, extra: dict | None = None) -> None:
        from datetime import datetime, timezone

        self._info = self.hub.connection_info()
        self._info.update(profile=self.profile, embedded=True,
                          created=datetime.now(timezone.utc).isoformat())
        if extra:
            self._info.update(extra)
        paths.write_secure_json(self.file, self._info)
        self.hub.start()
        with _lock:
            _running.append(self)
        atexit.register(self.stop)

    def stop(self) -> None:
        self.hub.stop()
        with _lock:
            if self in _running:
                _running.remove(self)
        try:
            if self.file.exists() and paths.read_json(self.file).get("client") == \
                    self._info.get("client"):
                self.file.unlink()
        except (OSError, ValueError):
            pass
