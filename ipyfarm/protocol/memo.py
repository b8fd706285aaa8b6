"""Bounded memo tables: remembered work whose result is a function of its key.

The tables on the per-message paths (digests of small buffers, the bytes of an ``f()``
request, the function they rebuild, a cell's transformation) hold at most ``limit``
entries and are emptied when full: the keys in use come back at once, and a table never
keeps what a long-gone workload left behind.
"""

from __future__ import annotations

from typing import Any

__all__ = ["remember"]


def remember(table: dict, key: Any, value: Any, limit: int) -> Any:
    """``table[key] = value`` (the table emptied first if it holds ``limit`` entries);
    returns ``value``."""
    if len(table) >= limit:
        table.clear()
    table[key] = value
    return value
