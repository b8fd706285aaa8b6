"""How a blocking ``%px`` waits: engines' lines printed as they arrive, a progress bar
after a while, and Ctrl-C sent on to the engines.

:mod:`ipyfarm.magics` parses the options and calls :func:`wait`; on ``KeyboardInterrupt``
it calls :func:`interrupt`. The client's I/O thread fills each task's metadata (stdout,
stderr, displays) while this polls it.
"""

from __future__ import annotations

import signal as _signal
import sys
import time
from typing import Any

from IPython.core.error import UsageError

from .client.display import show_outputs

__all__ = ["Streamer", "interrupt", "print_now", "signal_number", "wait"]

POLL = 0.05  # s between looks at streamed output; a finished result ends a wait at once
INTERRUPT_WAIT = 5.0  # s to wait for the engines' replies after Ctrl-C sent them a signal


def signal_number(text: str | int) -> int:
    """``"SIGINT"``, ``"INT"``, ``"2"`` or ``2`` as a signal number; 0 means none."""
    if isinstance(text, int) or str(text).strip().isdigit():
        return int(text)
    name = str(text).strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    sig = getattr(_signal.Signals, name, None) if name.isidentifier() else None
    if sig is None:
        raise UsageError(f"unknown signal {text!r}: use a name (SIGINT, SIGTERM, SIGKILL) "
                         "or a number (2, 15, 9; 0 sends none)")
    return int(sig)


def print_now(text: str, end: str = "\n", file: Any = None) -> None:
    print(text, end=end, file=file or sys.stdout, flush=True)


class Streamer:
    """Prints engines' whole output lines and displays as the client's I/O thread
    adds them to each message's metadata; what is left goes to display_outputs."""

    def __init__(self, metadatas: list):
        self._mds = metadatas
        self._sent = [{"stdout": 0, "stderr": 0} for _ in metadatas]
        self._shown = [0] * len(metadatas)

    def poll(self, before_print: Any = lambda: None) -> None:
        for i, md in enumerate(self._mds):
            for name in ("stdout", "stderr"):
                text = md.get(name) or ""
                start = self._sent[i][name]
                end = text.rfind("\n", start) + 1
                if end > start:
                    # counted as shown before printing: Ctrl-C mostly lands in the print's
                    # flush (a wait on the kernel's output thread), after the text was
                    # written; counting afterwards printed such lines twice
                    self._sent[i][name] = end
                    before_print()
                    label = f"[{name}:{md.get('engine_id')}] "
                    lines = text[start:end].rstrip("\n").split("\n")
                    print_now("\n".join(label + line for line in lines),
                              file=sys.stdout if name == "stdout" else sys.stderr)
            outputs = list(md.get("outputs") or [])
            new = outputs[self._shown[i]:]
            self._shown[i] = max(self._shown[i], len(outputs))  # as above
            if new:
                before_print()
                show_outputs(md, new)

    def remaining(self) -> list[dict]:
        left = []
        for i, md in enumerate(self._mds):
            rest = dict(md)
            for name in ("stdout", "stderr"):
                rest[name] = (md.get(name) or "")[self._sent[i][name]:]
            rest["outputs"] = list(md.get("outputs") or [])[self._shown[i]:]
            left.append(rest)
        return left


def wait(ar: Any, streamer: Streamer | None, progress_after: float | None) -> None:
    """Wait for ``ar``, printing streamed lines; after ``progress_after`` s (None or < 0:
    never) go on in ``ar.wait_interactive()``'s progress bar (a widget in a notebook)."""
    from .widgets.progress import wait_interactive

    interval = POLL if streamer is not None else 1.0
    never = progress_after is None or progress_after < 0
    deadline = None if never else time.monotonic() + progress_after
    while not ar.wait(interval if deadline is None else
                      max(min(interval, deadline - time.monotonic()), 0.0)):
        if streamer is not None:
            streamer.poll()
        if deadline is not None and time.monotonic() >= deadline:
            def poll(display: Any) -> None:
                if streamer is not None:
                    streamer.poll(display.clear)

            wait_interactive(ar, interval=min(interval, 0.1), poll=poll)
            return


def interrupt(ar: Any, client: Any, sig: Any) -> bool:
    """Ctrl-C during a blocking %px: send ``sig`` to the engines still running ``ar`` and
    wait (``INTERRUPT_WAIT`` s at most) for their replies; True once all are in."""
    signum = signal_number(sig)
    running = sorted({client.metadata[m]["engine_id"] for m in ar.msg_ids
                      if m not in client.results})
    if not running:
        return ar.wait(INTERRUPT_WAIT)
    if not signum:
        print_now(f"%px: interrupted here; engine(s) {running} go on running (the "
                   "signal-on-interrupt is 0); %pxresult shows their outputs when they "
                   "finish", file=sys.stderr)
        return False
    try:
        name = _signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    print_now(f"%px: interrupted; sent {name} to engine(s) {running}", file=sys.stderr)
    client.send_signal(signum, targets=running)
    if ar.wait(INTERRUPT_WAIT):
        return True
    late = sorted({client.metadata[m]["engine_id"] for m in ar.msg_ids
                   if m not in client.results})
    print_now(f"%px: engine(s) {late} still run {INTERRUPT_WAIT:.0f} s after {name}: "
               "they may ignore it (try --signal-on-interrupt SIGTERM); %pxresult shows "
               "their outputs when they finish", file=sys.stderr)
    return False
