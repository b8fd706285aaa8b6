"""A real one-node Slurm for the tests: munged, slurmctld and slurmd started as our children.

Everything lives in one temporary directory (munge key and socket, slurm.conf, state,
spool, logs, pid files); the daemons run in the foreground (``-F`` / ``-D``) so that they
are our child processes and can be stopped by pid. Client commands (sbatch, squeue,
scancel, srun, sinfo) find the cluster through ``SLURM_CONF``, which :func:`single_node_slurm`
sets in ``os.environ`` while it runs. Needs root and Debian's ``slurmctld slurmd
slurm-client munge`` packages. docs/slurm.md shows the same steps as shell commands.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "srun", "sinfo")


def missing_commands() -> list[str]:
    """The commands this fixture needs that are not on PATH."""
    return [c for c in DAEMONS if shutil.which(c) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, hostname: str, ctld_port: int, slurmd_port: int,
               munge_socket: Path, cpus: int = 4) -> str:
    """slurm.conf of a one-node cluster whose files all live under ``root``.

    ``SlurmdParameters=config_overrides`` lets slurmd accept ``CPUs=cpus`` on a machine
    with fewer cores (the engines oversubscribe them). No cgroups (linuxproc process
    tracking, no task plugin) and no accounting database.
    """
    return f"""\
ClusterName=ipyfarmtest
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=5
MinJobAge=300
SlurmctldDebug=info
SlurmdDebug=info
NodeName={hostname} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SingleNodeSlurm:
    """munged + slurmctld + slurmd under ``root``; :meth:`start`, :meth:`stop`, :meth:`logs`."""

    def __init__(self, root: Path, cpus: int = 4):
        self.root = Path(root)
        self.cpus = cpus
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ start
    def start(self, timeout: float = 60.0) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(slurm_conf(self.root, self.hostname, free_port(), free_port(),
                                        self.munge_socket, self.cpus))
        m = self.munge_dir
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={m}/munged.pid",
                               f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged to create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.node_state() == "idle", timeout,
                   f"node {self.hostname} to be idle in sinfo")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115
        try:
            self.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT, env=self.env)
        finally:
            out.close()

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                why = f"exited: {dead}" if dead else f"not within {timeout:g} s"
                raise RuntimeError(f"test Slurm: waited for {what}, {why}.\n{self.logs()}")
            time.sleep(0.2)

    def node_state(self) -> str:
        """The node's state as sinfo shows it (``idle``, ``alloc``, ...), or ``""``."""
        try:
            out = subprocess.run(["sinfo", "--noheader", f"--nodes={self.hostname}",
                                  "--format=%t"], capture_output=True, text=True,
                                 timeout=10, env=self.env)
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout.strip()

    def run(self, *cmd: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              env=self.env)

    def jobs(self) -> dict[int, str]:
        """``{job_id: STATE}`` of every job slurmctld still lists."""
        out = self.run("squeue", "--noheader", "--states=all", "--format=%i|%T").stdout
        return {int(j): s for j, _, s in (ln.partition("|") for ln in out.split())
                if j.isdigit()}

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancel every job, stop the daemons by pid, and kill what they left behind."""
        try:
            if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                active = [str(j) for j, s in self.jobs().items()
                          if s in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING")]
                if active:
                    self.run("scancel", "--full", "--signal=KILL", *active)
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline and any(
                            s in ("PENDING", "RUNNING", "COMPLETING")
                            for s in self.jobs().values()):
                        time.sleep(0.3)
        except (subprocess.TimeoutExpired, OSError):
            pass
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                proc = self.procs.get(name)
                if proc is None or proc.poll() is not None:
                    continue
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            for pid in self.leftovers():
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()

    def leftovers(self) -> list[int]:
        """Processes started under this cluster (slurmstepd, job steps) still alive:
        they carry our SLURM_CONF in their environment."""
        found = []
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if p.environ().get("SLURM_CONF") == str(self.conf) and p.status() != "zombie":
                    found.append(p.pid)
        return found

    def logs(self, lines: int = 40) -> str:
        """The tail of every daemon's log, for failure messages."""
        parts = []
        for path in sorted(self.root.glob("log/*")) + [self.munge_dir / "munged.log"]:
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"---- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts) or "(no logs written)"


@contextlib.contextmanager
def single_node_slurm(root: Path, cpus: int = 4):
    """A running one-node Slurm; ``SLURM_CONF`` points at it in ``os.environ`` meanwhile."""
    slurm = SingleNodeSlurm(root, cpus)
    before = os.environ.get("SLURM_CONF")
    try:
        slurm.start()
        os.environ["SLURM_CONF"] = str(slurm.conf)
        yield slurm
    finally:
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
        slurm.stop()
