"""An ssh tunnel to a controller behind a login node: ``Client(sshserver="me@login")``.

::

    Client ── tcp://127.0.0.1:LOCAL ──► ssh -N -L 127.0.0.1:LOCAL:HOST:PORT me@login
                                              ──► login node ──► HOST:PORT (controller)

``HOST:PORT`` is the controller's client address as written in its connection file, seen
from the ssh server: ``127.0.0.1`` there means a controller on the login node itself. The
tunnel is this process's own ``ssh`` child; it ends with ``rc.close()`` and at interpreter
exit. The command line is built by :func:`tunnel_command` (pure, golden-tested).
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence

from .. import error
from ..sshcmd import SSHTarget, parse_target, ssh_command

__all__ = ["Tunnel", "TunnelError", "forward_target", "tunnel_command"]

_WILDCARDS = {"*", "0.0.0.0", "::", ""}


class TunnelError(error.IPyFarmError, OSError):
    """The ssh tunnel to the controller could not be opened; ssh's words are included."""


def forward_target(url: str) -> tuple[str, int]:
    """``(host, port)`` that the ssh server forwards to, from a ``tcp://`` address."""
    scheme, sep, rest = url.partition("://")
    if scheme != "tcp" or not sep:
        raise TunnelError(f"cannot tunnel to {url!r}: only tcp:// addresses go through ssh")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    return ("127.0.0.1" if host in _WILDCARDS else host), int(port)


def tunnel_command(target: SSHTarget, local_port: int, remote_host: str, remote_port: int,
                   *, ssh: str = "ssh", ssh_args: Sequence[str] = (), key: str | None = None,
                   connect_timeout: float | None = 10) -> list[str]:
    """``ssh ... -N -T -o ExitOnForwardFailure=yes -L 127.0.0.1:L:HOST:P [-p] [-i] DEST``."""
    shown = f"[{remote_host}]" if ":" in remote_host else remote_host
    forward = ["-N", "-T", "-o", "ExitOnForwardFailure=yes",
               "-L", f"127.0.0.1:{local_port}:{shown}:{remote_port}"]
    return ssh_command(target, (), ssh=ssh, ssh_args=ssh_args, key=key,
                       connect_timeout=connect_timeout, extra=forward)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Tunnel:
    """A running ``ssh -N -L`` forward of one controller address; ``url`` is the local end."""

    def __init__(self, server: str, remote_url: str, *, key: str | None = None,
                 ssh: str = "ssh", ssh_args: Sequence[str] = (), timeout: float = 10.0):
        self.server = parse_target(server)
        self.remote_url = remote_url
        host, port = forward_target(remote_url)
        for _ in range(3):  # a local port taken between the probe and ssh's bind: retry
            self.local_port = _free_port()
            self.command = tunnel_command(self.server, self.local_port, host, port, ssh=ssh,
                                          ssh_args=ssh_args, key=key, connect_timeout=timeout)
            if self._open(timeout):
                return
        raise TunnelError(self._message("ssh could not listen on a free local port", ""))

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.local_port}"

    def _open(self, timeout: float) -> bool:
        with tempfile.TemporaryFile() as err:
            # own session: a Ctrl-C in the terminal or notebook does not cut the tunnel
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
            self._finalizer = weakref.finalize(self, _end, self.proc)
            deadline = time.monotonic() + timeout + 5
            while self.proc.poll() is None and time.monotonic() < deadline:
                if _listening(self.local_port):
                    return True
                time.sleep(0.05)
            running = self.proc.poll() is None
            self.close()
            err.seek(0)
            said = err.read().decode(errors="replace").strip()
        if "forwarding failed" in said or "Address already in use" in said:
            return False
        how = (f"no tunnel within {timeout + 5:g} s" if running
               else f"ssh exited with code {self.proc.returncode}")
        raise TunnelError(self._message(how, said))

    def _message(self, how: str, said: str) -> str:
        port = f"-p {self.server.port} " if self.server.port else ""
        return (f"cannot open an ssh tunnel through {self.server} to the controller at "
                f"{self.remote_url}: {how}: {said or '(ssh printed nothing)'}\n"
                "Likely cause: the ssh server is unreachable, this machine's key is not "
                "authorized there (no password prompts: BatchMode), or its host key is not "
                "in known_hosts.\n"
                f"What to do: check that `ssh {port}{self.server.destination} true` works "
                "without a prompt; pass sshkey=... for a key of your own.")

    def close(self) -> None:
        """End the ssh process (idempotent)."""
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None
