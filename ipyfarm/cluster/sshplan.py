"""Pure builders for the ssh engine launcher (:mod:`ipyfarm.cluster.ssh`): where engines
go, the remote shell line, the ssh command, what an engine reads from stdin, the address it
dials, and the message when ssh fails. No process is run here; the tests compare the
results with golden strings.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..sshcmd import SSHTarget, is_this_host, ssh_command
from .launcher import engine_command

__all__ = ["PID_MARK", "controller_payload", "engine_address", "engine_ssh_command",
           "launch_error", "plan_hosts", "remote_engine_command", "remote_kill_command"]

#: the first line a remote engine's shell prints: its pid (the engine's, after ``exec``)
PID_MARK = "ipyfarm-engine-pid"
_WILDCARDS = {"*", "0.0.0.0", "::", ""}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def plan_hosts(hosts: Sequence[tuple[SSHTarget, int]], n: int, start: int = 0
               ) -> list[SSHTarget]:
    """The hosts of ``n`` more engines when ``start`` were placed before.

    Each host takes its count of consecutive slots, in order; past the last slot the
    list starts again (``[(a, 2), (b, 1)]``, n=5: a a b a a).
    """
    slots = [target for target, count in hosts for _ in range(count)]
    if not slots:
        raise ValueError("no ssh host has room for an engine: give hosts with n >= 1")
    return [slots[(start + i) % len(slots)] for i in range(n)]


def remote_engine_command(python: str = "python3", log_level: str = "WARNING",
                          env: Mapping[str, str] | None = None,
                          engine_args: Sequence[str] = ()) -> str:
    """The shell line an engine's host runs: print the pid and host name, then become
    the engine.

    ``exec`` keeps the shell's pid, so ``$$`` is the engine's pid; ``uname -n`` is the
    name it registers with. The controller's info is read from stdin
    (``--controller-file -``).
    """
    assigns = ["PYTHONUNBUFFERED=1"]
    for name, value in (env or {}).items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"remote_env: {name!r} is not an environment variable name")
        assigns.append(f"{name}={value}")
    engine = engine_command("-", None, log_level, python) + list(engine_args)
    return f'echo {PID_MARK} $$ "$(uname -n)"; exec ' + shlex.join(["env", *assigns, *engine])


def engine_ssh_command(target: SSHTarget, remote: str, *, ssh: str = "ssh",
                       ssh_args: Sequence[str] = (), key: str | None = None,
                       connect_timeout: float | None = 10) -> list[str]:
    """One engine's local command: ``ssh ... -T [-p P] [-i KEY] DEST 'REMOTE'``."""
    return ssh_command(target, [remote], ssh=ssh, ssh_args=ssh_args, key=key,
                       connect_timeout=connect_timeout, extra=["-T"])


def remote_kill_command(pid: int, sig: int = 9) -> str:
    return f"kill -{int(sig)} {int(pid)}"


def _host_of(url: str) -> str:
    return url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


def controller_payload(info: Mapping[str, Any], address: str | None = None) -> bytes:
    """What an engine reads from stdin: the controller's info as one JSON line, with the
    registration host replaced by ``address`` when given (a wildcard is no address)."""
    out = {k: v for k, v in info.items() if k not in ("inproc", "embedded")}
    if address:
        scheme, _, rest = out["registration"].partition("://")
        shown = f"[{address}]" if ":" in address else address
        out["registration"] = f"{scheme}://{shown}:{rest.rsplit(':', 1)[1]}"
        out["location"] = address
    return (json.dumps(out, separators=(",", ":"), sort_keys=True) + "\n").encode()


def engine_address(registration: str, targets: Sequence[SSHTarget],
                   facing: Callable[[str], str], given: str | None = None) -> str | None:
    """The controller address engines on ``targets`` dial (None: the one in the file).

    A wildcard listen address is replaced (by ``given``, else this machine's address
    that routes to the first remote host, else loopback). A loopback controller is only
    reachable from this machine: refused for any other host, with what to do.
    """
    host = _host_of(registration)
    remote = [t for t in targets if not is_this_host(t.host)]
    if given:
        return given
    if host in _WILDCARDS:
        return facing(remote[0].host) if remote else "127.0.0.1"
    if remote and is_this_host(host):
        raise ValueError(
            f"the controller listens on {host} only, which engines on "
            f"{', '.join(sorted({t.host for t in remote}))} cannot reach. Start it on an "
            "address those hosts can reach: Cluster(ip='0.0.0.0', engines='ssh', ...) or "
            "`ipyfarm start --ip 0.0.0.0 --engines ssh ...` (CurveZMQ then encrypts the "
            "traffic); add engine_options controller_address=HOST if the hosts know this "
            "machine by another name.")
    return None


def launch_error(target: SSHTarget, returncode: int | None, stderr: str,
                 waited: float) -> str:
    """The message for an engine whose ssh never reached its remote shell."""
    how = (f"ssh exited with code {returncode}" if returncode is not None
           else f"ssh did not reach the remote shell within {waited:g} s")
    said = stderr.strip() or "(ssh printed nothing)"
    port = f"-p {target.port} " if target.port else ""
    return (f"could not start an engine on {target}: {how}: {said}\n"
            "Likely cause: the host is unreachable or refuses the connection, this "
            "machine's key is not authorized there (no password prompts: BatchMode), or "
            "the host key is not in known_hosts.\n"
            f"What to do: check that `ssh {port}{target.destination} true` works from this "
            "machine without a prompt; pass engine_options ssh_key=..., ssh_args=[...] "
            "or connect_timeout=... as needed.")
