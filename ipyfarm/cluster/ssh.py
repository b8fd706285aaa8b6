"""Engines on named hosts, started with ``ssh`` (the ``ssh`` backend).

::

    Cluster(engines="ssh", n=4, engine_options={"hosts": ["node1", "me@node2:2222"]})

    this process                                   each host
    SSHEngineLauncher ── ssh -T host 'echo ipyfarm-engine-pid $$ "$(uname -n)";
       │  one ssh per engine          exec python3 -m ipyfarm.engine --controller-file -'
       ├─ stdin: the controller's info (one JSON line), then held open ──► engine reads it,
       │                                                   then exits when stdin closes
       └─ stdout: "ipyfarm-engine-pid PID HOST" (the engine's pid and host name)

- No shared filesystem: the controller's connection info (key included) travels on the ssh
  session's stdin, so it is neither read from a file on the host nor visible in ``ps``.
- The engine exits when its stdin reaches end-of-file: when ``stop()`` closes the pipe,
  when the local ``ssh`` dies, or when this process dies (however it dies). ``stop()``
  follows up with ``kill -9`` over ssh for an engine still there after ``timeout``.
- A remote engine binds its kernel ports on its own address facing the controller (the
  engine's default ``--ip``), so the controller must listen where the hosts can reach it:
  ``Cluster(ip="0.0.0.0")`` or a host address (then CurveZMQ encrypts the traffic).

Handles are the local ``ssh`` process ids; ``stop`` and ``kill_engine`` also take the
engines' own pids (as they registered). The command lines are built by pure functions
in :mod:`ipyfarm.cluster.sshplan`, tested against golden strings.
"""

from __future__ import annotations

import collections
import logging
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Callable

from .. import paths
from ..sshcmd import SSHTarget, is_this_host, parse_target, ssh_command
from .base import EngineLauncher
from .sshplan import (
    PID_MARK,
    controller_payload,
    engine_address,
    engine_ssh_command,
    launch_error,
    plan_hosts,
    remote_engine_command,
    remote_kill_command,
)

__all__ = ["SSHEngineLauncher", "SSHLaunchError", "controller_payload", "engine_address",
           "engine_ssh_command", "launch_error", "plan_hosts", "remote_engine_command"]

log = logging.getLogger("ipyfarm.cluster")

#: at most this many ssh handshakes at once (sshd's MaxStartups drops connections
#: beyond 10 unauthenticated ones by default)
MAX_HANDSHAKES = 8


class SSHLaunchError(RuntimeError):
    """An engine could not be started over ssh; the message has ssh's own words."""


def _address_facing(host: str) -> str:
    """This machine's address that routes to ``host`` (no packet is sent)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, 22, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


# ---------------------------------------------------------------------- the launcher
class _Engine:
    """One ``ssh`` process and what we learnt of the engine behind it."""

    def __init__(self, proc: subprocess.Popen, target: SSHTarget, log_file: Path | None):
        self.proc = proc
        self.target = target
        self.handle = proc.pid
        self.remote_pid: int | None = None
        self.hostname: str | None = None  # as the engine registers it (``uname -n``)
        self.ready = threading.Event()  # the pid line arrived, or ssh ended
        self.stderr: collections.deque[str] = collections.deque(maxlen=40)
        self.log_file = log_file
        self.threads: list[threading.Thread] = []

    def stderr_text(self) -> str:
        return "".join(self.stderr)


class SSHEngineLauncher(EngineLauncher):
    """One ``ssh`` per engine; see the module doc.

    Options (``engine_options`` / ``--engine-opt``): ``hosts`` (required: ``"host"``,
    ``"user@host"``, ``"host:port"`` or ``{"host": ..., "n": k}``), ``engines_per_host``
    (slots of a host without ``n``, default 1), ``ssh`` (the client program),
    ``ssh_args`` (extra arguments, before ours), ``ssh_key`` (``-i``),
    ``connect_timeout`` (s, default 10), ``python`` (the remote interpreter: default
    ``python3``, or this interpreter for a host that is this machine), ``remote_env``
    (variables set for the engine), ``engine_args`` (extra engine arguments, e.g.
    ``["--ip=10.0.0.7"]``), ``controller_address`` (the address hosts dial).
    """

    backend = "ssh"

    def __init__(self, controller_file: str | Path, *, hosts: Sequence[Any] | str | None = None,
                 engines_per_host: int = 1, ssh: str = "ssh", ssh_args: Sequence[str] = (),
                 ssh_key: str | None = None, connect_timeout: float = 10.0,
                 python: str | None = None, remote_env: Mapping[str, str] | None = None,
                 engine_args: Sequence[str] = (), controller_address: str | None = None,
                 on_exit: Callable[..., None] | None = None,
                 log_level: str = "WARNING", log_dir: str | Path | None = None):
        super().__init__(controller_file, on_exit=on_exit, log_level=log_level,
                         log_dir=log_dir)
        if not hosts:
            raise ValueError("the ssh engine launcher needs hosts: engine_options="
                             "{'hosts': ['node1', 'user@node2:2222']} (or --engine-opt "
                             "hosts='[\"node1\"]')")
        if isinstance(hosts, str | Mapping):
            hosts = [hosts]
        if not isinstance(engines_per_host, int) or engines_per_host < 1:
            raise ValueError(f"engines_per_host must be an int >= 1, not {engines_per_host!r}")
        self.hosts: list[tuple[SSHTarget, int]] = []
        for spec in hosts:
            count = spec.get("n", engines_per_host) if isinstance(spec, Mapping) else \
                engines_per_host
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"ssh host {spec!r}: n must be an int >= 0")
            self.hosts.append((parse_target(spec), count))
        self.ssh = ssh
        self.ssh_args = [str(a) for a in ([ssh_args] if isinstance(ssh_args, str) else ssh_args)]
        self.ssh_key = ssh_key
        self.connect_timeout = float(connect_timeout)
        self.python = python
        self.remote_env = dict(remote_env or {})
        self.engine_args = [str(a) for a in engine_args]
        self.controller_address = controller_address
        self._payload: bytes | None = None
        for target, _ in self.hosts:  # bad names / env fail here, not on a thread
            remote_engine_command(self._python_for(target), log_level, self.remote_env)
        self.engines: dict[int, _Engine] = {}
        #: why engines ended that nobody stopped (for describe()'s hint), newest last
        self.failures: collections.deque[str] = collections.deque(maxlen=8)
        self._placed = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def payload(self) -> bytes:
        """What each engine reads from stdin; the controller file is read at the first
        start (a standalone controller writes it after making its launcher)."""
        if self._payload is None:
            info = paths.read_json(self.controller_file)
            address = engine_address(info["registration"], [t for t, _ in self.hosts],
                                     _address_facing, self.controller_address)
            self._payload = controller_payload(info, address)
        return self._payload

    def _python_for(self, target: SSHTarget) -> str:
        if self.python:
            return self.python
        return sys.executable if is_this_host(target.host) else "python3"

    def _command(self, target: SSHTarget, remote: str) -> list[str]:
        return engine_ssh_command(target, remote, ssh=self.ssh, ssh_args=self.ssh_args,
                                  key=self.ssh_key, connect_timeout=self.connect_timeout)

    # ---- start ------------------------------------------------------------------------
    def start(self, n: int) -> list[int]:
        """Start ``n`` engines; returns once each one's ssh reached its host (the local
        ssh pids), or raises :class:`SSHLaunchError` having stopped them all."""
        payload = self.payload  # an unreachable controller address fails here
        with self._lock:
            targets = plan_hosts(self.hosts, n, self._placed)
            self._placed += n
        waited = self.connect_timeout + 15.0
        deadline = time.monotonic() + waited
        started: list[_Engine] = []
        for i, target in enumerate(targets):
            if i >= MAX_HANDSHAKES:  # one more once an earlier one got through (or failed)
                started[i - MAX_HANDSHAKES].ready.wait(max(0.0, deadline - time.monotonic()))
            started.append(self._spawn(target, payload))
        for eng in started:
            eng.ready.wait(max(0.0, deadline - time.monotonic()))
        failed = [e for e in started if e.remote_pid is None]
        if failed:
            self.stop([e.handle for e in started], timeout=2.0)
            for eng in failed:
                for t in eng.threads:
                    t.join(2.0)
            raise SSHLaunchError("\n".join(
                launch_error(e.target, e.proc.returncode, e.stderr_text(), waited)
                for e in failed))
        return [e.handle for e in started]

    def _spawn(self, target: SSHTarget, payload: bytes) -> _Engine:
        remote = remote_engine_command(self._python_for(target), self.log_level,
                                       self.remote_env, self.engine_args)
        log_file = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_file = self.log_dir / f"engine-ssh-{target.host}-{time.time_ns()}.log"
        # own session: a Ctrl-C (SIGINT to the terminal's process group) does not end ssh;
        # the engine still ends with this process, through its stdin
        proc = subprocess.Popen(self._command(target, remote), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        eng = _Engine(proc, target, log_file)
        with self._lock:
            self.engines[eng.handle] = eng
        try:
            assert proc.stdin is not None
            proc.stdin.write(payload)
            proc.stdin.flush()  # and held open: closing it stops the engine
        except OSError:
            pass  # ssh already failed; its stderr says why
        eng.threads = [threading.Thread(target=self._read, args=(eng, name, stream),
                                        name=f"ipyfarm-ssh-{name}", daemon=True)
                       for name, stream in (("stderr", proc.stderr), ("stdout", proc.stdout))]
        for t in eng.threads:  # stderr's first: the stdout reader joins it when ssh ends
            t.start()
        return eng

    def _read(self, eng: _Engine, name: str, stream: IO[bytes]) -> None:
        out = open(eng.log_file, "ab") if eng.log_file else None  # noqa: SIM115
        try:
            for raw in stream:
                if out is not None:
                    out.write(raw)
                    out.flush()
                line = raw.decode(errors="replace")
                if name == "stderr":
                    eng.stderr.append(line)
                elif eng.remote_pid is None and line.startswith(PID_MARK):
                    try:
                        words = line.split()
                        eng.remote_pid = int(words[1])
                        eng.hostname = words[2] if len(words) > 2 else None
                    except (IndexError, ValueError):
                        eng.stderr.append(f"unexpected first line from the host: {line}")
                    eng.ready.set()
        finally:
            if out is not None:
                out.close()
            stream.close()
        if name == "stdout":
            eng.ready.set()
            self._reap(eng)

    def _reap(self, eng: _Engine) -> None:
        """ssh closed its stdout: it is ending; record its exit (once)."""
        try:
            rc = eng.proc.wait(30)
        except subprocess.TimeoutExpired:
            return  # stop() will end it
        for t in eng.threads:
            if t is not threading.current_thread():
                t.join(5)  # all of ssh's stderr, for the message below
        with self._lock:
            if eng.handle not in self.engines:
                return  # stop() took it
            if rc != 0 and not self._stopping.is_set():
                said = eng.stderr_text().strip()
                # before `exited`: a cluster seeing the exit asks describe() for the hint
                self.failures.append(f"The engine on {eng.target} exited with code {rc}"
                                     + (f"; its last words: {said.splitlines()[-1]}"
                                        if said else ""))
                log.warning("the engine on %s (pid %s) exited with code %s; ssh said: %s",
                            eng.target, eng.remote_pid, rc, said or "-")
            del self.engines[eng.handle]
            self.exited[eng.handle] = rc
        self._report(eng, rc)

    def _report(self, eng: _Engine, rc: int) -> None:
        """Tell the cluster, by the engine's own pid and host where we know them."""
        if self.on_exit is not None and not self._stopping.is_set():
            if eng.remote_pid is not None and eng.hostname:
                self.on_exit(eng.remote_pid, rc, eng.hostname)
            else:
                self.on_exit(eng.remote_pid or eng.handle, rc)

    # ---- state ------------------------------------------------------------------------
    def poll(self) -> dict[int, int | None]:
        with self._lock:
            return {h: e.proc.poll() for h, e in self.engines.items()}

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return list(self.engines)

    @property
    def remote_pids(self) -> dict[int, tuple[str, int | None]]:
        """ssh pid -> (host, the engine's pid on it) of what runs now."""
        with self._lock:
            return {h: (e.target.host, e.remote_pid) for h, e in self.engines.items()}

    def describe(self) -> dict[str, Any]:
        with self._lock:
            engines = [{"host": str(e.target), "pid": e.remote_pid, "ssh_pid": h}
                       for h, e in self.engines.items()]
        first = self.hosts[0][0]
        hint = {"hint": "; ".join(self.failures)} if self.failures else {}
        return {"backend": self.backend, "running": len(engines), **hint,
                "hosts": [str(t) for t, _ in self.hosts], "engines": engines,
                "command": shlex.join(self._command(first, remote_engine_command(
                    self._python_for(first), self.log_level, self.remote_env,
                    self.engine_args)))}

    def _select(self, handles: list[int] | None) -> list[_Engine]:
        with self._lock:
            if handles is None:
                return list(self.engines.values())
            wanted = set(handles)
            return [e for h, e in self.engines.items() if h in wanted or e.remote_pid in wanted]

    # ---- signals and stopping ---------------------------------------------------------
    def _remote(self, engines: list[_Engine], command: Callable[[int], str],
                timeout: float) -> dict[int, bool]:
        """Run ``command(remote_pid)`` over ssh for each engine, in parallel."""
        procs = {}
        for eng in engines:
            if eng.remote_pid is None:
                continue
            cmd = ssh_command(eng.target, [command(eng.remote_pid)], ssh=self.ssh,
                              ssh_args=self.ssh_args, key=self.ssh_key,
                              connect_timeout=self.connect_timeout, extra=["-T"])
            procs[eng.handle] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                                 stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.PIPE)
        done = {}
        deadline = time.monotonic() + timeout
        for handle, proc in procs.items():
            try:
                _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                done[handle] = proc.returncode == 0
                if proc.returncode:
                    log.warning("%s over ssh failed (code %s): %s", command(0).split()[0],
                                proc.returncode, err.decode(errors="replace").strip())
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                done[handle] = False
        return done

    def signal(self, sig: int, handles: list[int] | None = None) -> None:
        """Deliver ``sig`` to engines on their hosts (``kill -SIG pid`` over ssh)."""
        self._remote(self._select(handles), lambda pid: remote_kill_command(pid, sig),
                     self.connect_timeout + 10)

    def kill_engine(self, pid: int, hostname: str) -> bool:
        """``kill -9`` the engine with this pid (as it registered) over ssh; returns at
        once (the controller's thread calls this), False for an engine not started here."""
        engines = [e for e in self._select([pid]) if e.remote_pid == pid]
        if not engines:
            return False
        if len(engines) > 1:  # the same pid on two hosts: the one named like hostname
            engines = [e for e in engines if hostname.split(".")[0] ==
                       e.target.host.split(".")[0]] or engines
        threading.Thread(target=self._remote, name="ipyfarm-ssh-kill", daemon=True,
                         args=(engines[:1], remote_kill_command,
                               self.connect_timeout + 10)).start()
        return True

    def stop(self, handles: list[int] | None = None, timeout: float = 5.0) -> None:
        """Close each engine's stdin (it unregisters and exits), then, past ``timeout``,
        ``kill -9`` it over ssh and end the local ssh. Returns when all are gone."""
        if handles is None:
            self._stopping.set()
        targets = self._select(handles)
        for eng in targets:
            try:
                assert eng.proc.stdin is not None
                eng.proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        stuck = []
        for eng in targets:
            try:
                eng.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stuck.append(eng)
        if stuck:
            log.warning("%d engine(s) did not exit within %g s of their stdin closing; "
                        "killing them over ssh", len(stuck), timeout)
            self._remote(stuck, remote_kill_command, self.connect_timeout + 10)
            for eng in stuck:
                if eng.proc.poll() is None:
                    eng.proc.kill()
                eng.proc.wait(10)
        for eng in targets:
            with self._lock:
                mine = self.engines.pop(eng.handle, None) is not None
                self.exited[eng.handle] = eng.proc.returncode
            if mine:
                self._report(eng, eng.proc.returncode)
