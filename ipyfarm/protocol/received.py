"""Digests of big received buffers, reused when the same memory is sent on.

A buffer that arrives in a signed message is hashed once, to check it against its
signed digest. The memory it arrived in cannot change while it lives: libzmq allocated
it for that message, and it is only handed out read-only (numpy refuses to make an
array over it writable). Sending that memory on, whole (pulling back an array that was
pushed, pushing an array that was pulled), then needs no second hash of up to
gigabytes: its digest is already known.

The receiving end still hashes and checks every buffer, so an entry here can at worst
get a message refused, never a changed buffer accepted.

Only memory received through :mod:`ipyfarm.directzmq` (its owner carries
:data:`MARK`) of at least :data:`MIN_BYTES` is remembered, and only while it lives:
an entry goes when the memory is released. Finding a buffer's address takes numpy;
without numpy nothing is remembered.
"""

from __future__ import annotations

import weakref

__all__ = ["MARK", "MIN_BYTES", "known", "remember"]

#: attribute set (True) on the owner of memory received by directzmq
MARK = "_ipyfarm_received"
#: smaller buffers hash faster than they are looked up
MIN_BYTES = 1 << 20

_known: dict[tuple[int, int], str] = {}  # (address, size) -> signed digest


def _address(view: memoryview) -> int | None:
    try:
        import numpy
    except ImportError:
        return None
    try:
        return numpy.frombuffer(view, numpy.uint8).__array_interface__["data"][0]
    except (TypeError, ValueError):
        return None


def remember(view: memoryview, digest: str) -> None:
    """``view`` (flat bytes) matched ``digest``: remember it while its memory lives, if
    it is whole received memory of at least MIN_BYTES, handed out read-only."""
    if view.nbytes < MIN_BYTES or not view.readonly:
        return
    owner = view.obj
    if not getattr(owner, MARK, False):
        return
    address = _address(view)
    if address is None:
        return
    key = (address, view.nbytes)
    if key not in _known:  # (two live buffers never share an address: same owner)
        weakref.finalize(owner, _known.pop, key, None)
    _known[key] = digest


def known(view: memoryview) -> str | None:
    """The remembered digest of exactly this memory (read-only, same start and size)."""
    if not _known or view.nbytes < MIN_BYTES or not view.readonly:
        return None
    address = _address(view)
    return None if address is None else _known.get((address, view.nbytes))
