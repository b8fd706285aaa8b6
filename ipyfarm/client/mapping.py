"""Splitting sequences across engines and joining the pieces back (block distribution).

numpy arrays are split by slicing, so each piece is a view: no copy is made
before the pieces are sent.
"""

from __future__ import annotations

from typing import Any


def _is_array(obj: Any) -> bool:
    return type(obj).__module__ == "numpy" and hasattr(obj, "shape")


def bounds(n: int, p: int) -> list[tuple[int, int]]:
    """``p`` contiguous ``(lo, hi)`` ranges covering ``range(n)``, sizes differing by ≤ 1."""
    q, r = divmod(n, p)
    out, lo = [], 0
    for i in range(p):
        hi = lo + q + (1 if i < r else 0)
        out.append((lo, hi))
        lo = hi
    return out


def partition(seq: Any, p: int) -> list[Any]:
    """``seq`` cut in ``p`` pieces (lists stay lists, arrays become views, ranges ranges)."""
    if p < 1:
        raise ValueError("cannot partition over zero engines")
    if not hasattr(seq, "__getitem__") or not hasattr(seq, "__len__"):
        seq = list(seq)
    return [seq[lo:hi] for lo, hi in bounds(len(seq), p)]


def join(pieces: list) -> Any:
    """Inverse of :func:`partition` for gathered pieces."""
    if pieces and all(_is_array(x) for x in pieces):
        import numpy

        return numpy.concatenate(pieces)
    out: list = []
    for piece in pieces:
        if isinstance(piece, list | tuple | range) or _is_array(piece):
            out.extend(piece)
        else:
            out.append(piece)
    return out


def map_chunk(f: Any, *chunks: Any) -> list:
    """Run on an engine: ``list(map(f, *chunks))``."""
    return list(map(f, *chunks))


class ItemError:
    """An item's exception inside a chunk, as data (``map(..., return_exceptions=True)``)."""

    __slots__ = ("ename", "evalue", "traceback", "engine_info")

    def __init__(self, exc: BaseException):
        import traceback

        from ..engine import ops

        self.ename = type(exc).__name__
        self.evalue = str(exc)
        self.traceback = "".join(traceback.format_exception(exc))
        kernel = ops._kernel
        self.engine_info = {"engine_id": getattr(kernel, "engine_id", None), "method": "map"}

    def __reduce__(self) -> Any:
        return _rebuild_item_error, (self.ename, self.evalue, self.traceback, self.engine_info)

def _rebuild_item_error(ename: str, evalue: str, tb: str, engine_info: dict) -> Any:
    from ..error import wrap_exception

    return wrap_exception({"ename": ename, "evalue": evalue, "traceback": tb.splitlines(),
                           "engine_info": engine_info})


def map_chunk_catching(f: Any, *chunks: Any) -> list:
    """Run on an engine: like :func:`map_chunk`, an item's exception becomes its result."""
    out = []
    for args in zip(*chunks, strict=False):
        try:
            out.append(f(*args))
        except Exception as e:
            out.append(ItemError(e))
    return out
