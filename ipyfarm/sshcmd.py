"""Pure builders of ``ssh`` command lines, shared by the SSH engine launcher
(:mod:`ipyfarm.cluster.ssh`) and the client's tunnel (:mod:`ipyfarm.client.tunnel`).

Nothing here runs a process: targets are parsed and argument lists are built, so every
command line is checked against golden strings in the tests.

Options given by the user come first on the command line: ssh takes the *first* value it
sees for an option, so ``ssh_args=["-o", "ConnectTimeout=30"]`` overrides our default.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SSHTarget", "is_this_host", "parse_target", "ssh_command"]

_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
#: user names and host names that cannot be taken for an ssh option or a shell word
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$|^[0-9A-Fa-f:.]+$")


@dataclass(frozen=True)
class SSHTarget:
    """Where ssh goes: ``host``, and the ``user`` and ``port`` when given."""

    host: str
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        """ssh's destination argument: ``user@host`` or ``host``."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        at = f"{self.user}@" if self.user else ""
        if self.port is None:
            return f"{at}{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{at}{host}:{self.port}"


def _bad(spec: Any, why: str) -> ValueError:
    return ValueError(f"ssh host {spec!r}: {why}. Write it as 'host', 'user@host', "
                      "'host:port', 'user@[::1]:port' or {'host': 'node1', 'n': 2}.")


def parse_target(spec: str | Mapping[str, Any]) -> SSHTarget:
    """``"host"``, ``"user@host"``, ``"host:port"``, ``"user@[v6addr]:port"``, or a dict
    with ``host`` (and optionally ``user``, ``port``) -> :class:`SSHTarget`."""
    if isinstance(spec, Mapping):
        if "host" not in spec:
            raise _bad(spec, "a dict needs a 'host' key")
        base = parse_target(str(spec["host"]))
        user = spec.get("user", base.user)
        port = spec.get("port", base.port)
        return _checked(spec, base.host, user, port)
    if not isinstance(spec, str) or not spec:
        raise _bad(spec, "not a host name")
    user, at, rest = spec.rpartition("@")
    if not at:
        user, rest = "", spec
    port: str | None = None
    if rest.startswith("["):
        host, close, tail = rest[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise _bad(spec, "an IPv6 address in brackets must end with ']' or ']:port'")
        port = tail[1:] or None
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:
        host = rest  # a name, or a bare IPv6 address (no port then)
    return _checked(spec, host, user or None, port)


def _checked(spec: Any, host: str, user: Any, port: Any) -> SSHTarget:
    if not _HOST.match(host):
        raise _bad(spec, f"{host!r} is not a host name or address")
    if user is not None and not _USER.match(str(user)):
        raise _bad(spec, f"{user!r} is not a user name")
    if port is not None:
        try:
            port = int(port)
        except (TypeError, ValueError):
            raise _bad(spec, f"port {port!r} is not a number") from None
        if not 0 < port < 65536:
            raise _bad(spec, f"port {port} is out of range")
    return SSHTarget(host, None if user is None else str(user), port)


def ssh_command(target: SSHTarget, remote: Sequence[str] = (), *, ssh: str = "ssh",
                ssh_args: Sequence[str] = (), key: str | None = None,
                connect_timeout: float | None = 10, extra: Sequence[str] = ()) -> list[str]:
    """``ssh [ssh_args] -o BatchMode=yes -o ConnectTimeout=T [extra] [-p P] [-i KEY]
    DEST [remote...]``.

    ``BatchMode=yes``: never prompt for a password or a host key (there is no terminal to
    answer): fail at once with ssh's message instead.
    """
    cmd = [ssh, *ssh_args, "-o", "BatchMode=yes"]
    if connect_timeout is not None:
        cmd += ["-o", f"ConnectTimeout={max(1, round(connect_timeout))}"]
    cmd += list(extra)
    if target.port is not None:
        cmd += ["-p", str(target.port)]
    if key:
        cmd += ["-i", str(key)]
    return [*cmd, target.destination, *remote]


def is_this_host(host: str) -> bool:
    """Whether ``host`` names this machine (loopback, or this machine's host name)."""
    if host in _LOCAL_NAMES or host.startswith("127."):
        return True
    return host in {socket.gethostname(), socket.getfqdn()}
