"""Several small messages in one frame: a controller's replies to one client, packed.

A client that says so in its ``connection_request`` (``{"batch": true}``) may receive
``[BATCH, packed]`` instead of one message: the frames of several messages, each
signed and checked as usual, in one frame. The controller packs the small messages it
has for such a client when it is about to wait for sockets again, so that a burst of
results costs the controller one send and the client one receive, not one of each per
result (each multipart message costs a few libzmq calls per frame on both sides). A
single message, or one with a big frame, still goes alone as before.

``packed`` is little-endian uint32 counts, then bytes: the number of messages M; the
number of frames of each message (M counts); the length of every frame, in order; then
the frames' bytes, one after another. Nothing else: each message keeps its own
signature, checked by the receiver as if it had come alone.
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["BATCH", "MAX_BYTES", "MAX_CLIENTS", "MAX_DELAY", "MAX_MESSAGES", "pack", "unpack"]

BATCH = b"<IPYFARM|BATCH>"
#: a batch is sent once it holds this many bytes or messages, so that a burst does not
#: wait on its own end. Small: ~8 replies of a no-op task already save most of the
#: per-message cost, and with 48 kB batches the standalone controller's memory through
#: 100,000 tasks varied more (peaks of +140 to +160 MB against +142 to +144 with 8 kB;
#: likely the transient buffers, allocated among its task records)
MAX_BYTES = 8 * 1024
MAX_MESSAGES = 256
#: nor does the first message of a batch wait longer than this (seconds) for others
#: while the controller is busy
MAX_DELAY = 0.002
#: a controller batches for the latest this many clients to connect (an older one gets
#: its replies one by one again): what it remembers stays bounded
MAX_CLIENTS = 4096


def pack(messages: list[list[bytes]]) -> bytes:
    """One frame holding ``messages`` (lists of bytes frames)."""
    counts = [len(m) for m in messages]
    frames = [f for m in messages for f in m]
    head = struct.pack(f"<{1 + len(counts) + len(frames)}I", len(messages), *counts,
                       *map(len, frames))
    return head + b"".join(frames)


def unpack(data: Any) -> list[list[bytes]]:
    """The messages in a packed frame; ValueError if it is not one (whoever sent it)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    size = len(data)
    if size < 4:
        raise ValueError("batch: shorter than its message count")
    (n,) = struct.unpack_from("<I", data)
    if n < 1 or 4 * (1 + n) > size:
        raise ValueError(f"batch: {n} messages do not fit its {size} bytes")
    counts = struct.unpack_from(f"<{n}I", data, 4)
    total = sum(counts)
    start = 4 * (1 + n + total)
    if min(counts) < 1 or start > size:
        raise ValueError("batch: frame counts do not fit its size")
    lengths = struct.unpack_from(f"<{total}I", data, 4 * (1 + n))
    if start + sum(lengths) != size:
        raise ValueError("batch: frame lengths do not add up to its size")
    out: list[list[bytes]] = []
    pos, i = start, 0
    for count in counts:
        frames = []
        for length in lengths[i:i + count]:
            frames.append(data[pos:pos + length])
            pos += length
        i += count
        out.append(frames)
    return out
