"""Size limits on what a peer may send (issue: bounded memory under hostile input).

The controller refuses, in libzmq before any Python sees it, a *frame* larger than its
limit (the peer's connection is dropped), and drops a *message* whose frames add up to
more. The registration port, open to anyone who can reach it, takes only small messages.
A client checks its own messages against the controller's advertised limit first, so a
user gets a clear error instead of a request that never arrives.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "REGISTRATION_MAX_BYTES", "check_outgoing", "nbytes"]

#: per frame and per message, client port (a 4 GiB array still travels)
DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**30
#: per frame and per message on the registration port (requests there are a few kB)
REGISTRATION_MAX_BYTES = 2**20


def nbytes(frame: Any) -> int:
    """Length in bytes of a frame (bytes, zmq.Frame, memoryview or buffer object)."""
    try:
        return memoryview(frame).nbytes
    except TypeError:
        return len(frame)


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def check_outgoing(buffers: Iterable[Any], limit: int | None, what: str = "message") -> None:
    """Raise ValueError when ``buffers`` exceed the controller's ``limit`` (None: no limit)."""
    if not limit:
        return
    total = 0
    for b in buffers:
        size = nbytes(b)
        total += size
        if size > limit or total > limit:
            raise ValueError(
                f"this {what} carries {_human(total)} or more of data, over the controller's "
                f"limit of {_human(limit)} per message (max_message_bytes). Likely cause: a "
                "very large argument, push or result. What to do: send the data in parts "
                "(scatter, or several pushes), share it through a file, or start the cluster "
                "with a larger max_message_bytes.")
