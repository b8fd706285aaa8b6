"""Notebook widgets: the live dashboard and progress bars.

``model`` is pure (no ipywidgets); ``dashboard`` and ``progress`` render it. Importing
this package does not import ipywidgets: ``Dashboard`` is loaded when first asked for.
"""

from .model import EngineRow as EngineRow
from .model import FarmModel as FarmModel
from .model import FarmSnapshot as FarmSnapshot
from .model import ThroughputPoint as ThroughputPoint


def __getattr__(name: str):
    if name == "Dashboard":
        from .dashboard import Dashboard

        return Dashboard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Dashboard", "EngineRow", "FarmModel", "FarmSnapshot", "ThroughputPoint"]
