"""Replay protection: remember the last ``size`` message signatures, in two flat arrays.

jupyter_client keeps signatures as a ``set`` of bytes objects. Tens of thousands of
small long-lived objects, spread over the heap among the controller's task records,
keep the memory those records free from going back to the system (the allocator can
only return a block once nothing in it is alive). Here a signature is reduced to a
62-bit fingerprint and kept in an open-addressing table (``array('q')``) plus a ring
that says which one to forget next: two allocations, whatever the traffic.

A fingerprint collision would reject a fresh message as a replay; with 62-bit
fingerprints and 65,536 remembered, that is about one chance in 10^14 per message.
"""

from __future__ import annotations

from array import array

__all__ = ["ReplayGuard"]

_EMPTY, _GONE = 0, -1


_BITS62 = (1 << 62) - 1


def fingerprint(signature: bytes) -> int:
    """A positive 62-bit integer from a signature: Python's keyed SipHash of all its
    bytes (stable within a process, which is all a replay check needs)."""
    return (hash(bytes(signature)) & _BITS62) + 1


class ReplayGuard:
    """The last ``size`` signatures seen; ``sig in guard`` / ``guard.add(sig)``."""

    def __init__(self, size: int = 65536):
        self.size = max(0, int(size))
        cap = 8
        while cap < 2 * self.size:
            cap *= 2
        self._mask = cap - 1
        self._table = array("q", bytes(8 * cap))
        self._ring = array("q", bytes(8 * max(1, self.size)))
        self._next = 0
        self._count = 0
        self._gone = 0

    def __len__(self) -> int:
        return self._count

    def _find(self, fp: int) -> int:
        """The slot holding ``fp``, or -1."""
        table, mask = self._table, self._mask
        i = fp & mask
        while True:
            v = table[i]
            if v == fp:
                return i
            if v == _EMPTY:
                return -1
            i = (i + 1) & mask

    def __contains__(self, signature: bytes) -> bool:
        return self.size > 0 and self._find(fingerprint(signature)) >= 0

    def add(self, signature: bytes) -> None:
        if self.size == 0:
            return
        fp = fingerprint(signature)
        if self._find(fp) >= 0:
            return
        old = self._ring[self._next]
        if old != _EMPTY:  # forget the oldest
            slot = self._find(old)
            if slot >= 0:
                self._table[slot] = _GONE
                self._gone += 1
                self._count -= 1
        self._ring[self._next] = fp
        self._next = (self._next + 1) % self.size
        table, mask = self._table, self._mask
        i = fp & mask
        while table[i] not in (_EMPTY, _GONE):
            i = (i + 1) & mask
        if table[i] == _GONE:
            self._gone -= 1
        table[i] = fp
        self._count += 1
        if self._gone > (mask + 1) // 4:
            self._rebuild()

    def _rebuild(self) -> None:
        """Drop the tombstones that forgetting leaves (amortized: every ~size/2 adds)."""
        table = array("q", bytes(8 * (self._mask + 1)))
        mask = self._mask
        for fp in self._ring:
            if fp != _EMPTY:
                i = fp & mask
                while table[i] != _EMPTY:
                    i = (i + 1) & mask
                table[i] = fp
        self._table = table
        self._gone = 0
