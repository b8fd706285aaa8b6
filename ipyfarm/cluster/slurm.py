"""Engines as one Slurm job (the ``slurm`` backend): ``sbatch``, ``squeue``, ``scancel``.

::

    start(n) ─► batch_script(n, ...) ──stdin──► sbatch --parsable ─► job id (the handle)
                  #SBATCH --ntasks=n ...        the job runs: srun python -m ipyfarm.engine
                                                (one engine per task; each registers with
                                                the controller named in the controller file)
    watcher  ─► squeue --jobs=IDS --states=all  (a thread, every ``poll_interval`` s
                  PENDING / RUNNING / COMPLETING ... ─► active     while a job is active)
                  COMPLETED ─► exit code 0; FAILED, CANCELLED, TIMEOUT ... ─► 1
    poll(), describe() ─► the states last seen (they never wait on slurmctld)
    signal() ─► scancel --signal=NAME ID        (the engines: the job's steps)
    stop()   ─► scancel ID, then poll until the job has left (bounded), scancel --full
                --signal=KILL past the timeout

Command lines and the batch script come from pure functions (tested against golden
strings); :class:`SlurmEngineLauncher` only runs them. The controller file must be
readable where the job runs (a shared file system across nodes), and the engines must
reach the controller's address (``ip=`` beyond loopback for other nodes).

An ended job is not reported through ``on_exit``: a job id is not an engine's process id;
the controller sees the engines go by their heartbeats.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal as _signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .. import paths
from ..error import IPyFarmError
from .base import EngineLauncher
from .launcher import engine_command

__all__ = [
    "SlurmEngineLauncher",
    "SlurmError",
    "batch_script",
    "controller_job_script",
    "controller_script",
    "exit_code",
    "kill_command",
    "parse_sbatch_output",
    "parse_squeue_output",
    "run_command",
    "sbatch_command",
    "scancel_command",
    "squeue_command",
    "submit",
]

log = logging.getLogger("ipyfarm.cluster")

#: job states in which the job may still hold processes (squeue's long names)
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING",
    "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SIGNALING", "STAGE_OUT",
    "STOPPED", "SPECIAL_EXIT",
})
#: what a job that left squeue's list is shown as
GONE = "GONE"


class SlurmError(IPyFarmError):
    """A Slurm command failed (its stderr is in the message)."""


# ---------------------------------------------------------------------- pure builders
def _sbatch_value(name: str, value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"the Slurm option {name}={text!r} is empty or holds whitespace; "
                         "a #SBATCH line cannot carry it. Pass a value without spaces.")
    return text


def _job_script(ntasks: int, command: Sequence[str], *, job_name: str,
                output: str | None = None, partition: str | None = None,
                walltime: str | None = None, cpus_per_task: int | None = None,
                mem_per_cpu: str | None = None, sbatch_options: Iterable[str] = (),
                prologue: Iterable[str] = ()) -> str:
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={_sbatch_value('job_name', job_name)}",
             f"#SBATCH --ntasks={ntasks}"]
    for flag, value in (("output", output), ("partition", partition), ("time", walltime),
                        ("cpus-per-task", cpus_per_task), ("mem-per-cpu", mem_per_cpu)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={_sbatch_value(flag, value)}")
    for option in sbatch_options:
        lines.append(f"#SBATCH {_sbatch_value('sbatch_options', option)}")
    for line in prologue:
        if "\n" in line:
            raise ValueError(f"a prologue line holds a newline: {line!r}; pass one line "
                             "per list item")
        lines.append(line)
    lines.append(" ".join(shlex.quote(str(a)) for a in command))
    return "\n".join(lines) + "\n"


def batch_script(n: int, engine_cmd: Sequence[str], *, job_name: str = "ipyfarm-engines",
                 srun: str = "srun", srun_options: Iterable[str] = (), **options: Any) -> str:
    """The batch script of one job running ``n`` engines, one per Slurm task.

    ``engine_cmd`` is one engine's command line (:func:`~.launcher.engine_command`).
    ``options``: ``output``, ``partition``, ``walltime`` (``--time``), ``cpus_per_task``,
    ``mem_per_cpu``, ``sbatch_options`` (extra ``#SBATCH`` options: ``"--account=proj"``),
    ``prologue`` (shell lines run before the engines: ``"module load python"``).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"a Slurm job needs n >= 1 engines, not {n!r}")
    return _job_script(n, [srun, *srun_options, *engine_cmd], job_name=job_name, **options)


def controller_job_script(command: Sequence[str], *, job_name: str = "ipyfarm-controller",
                          **options: Any) -> str:
    """The batch script of a one-task job that ``exec``s ``command`` (a controller's
    command line, so that the job's signals reach the controller itself)."""
    return _job_script(1, ["exec", *command], job_name=job_name, **options)


def controller_script(profile: str, n: int, *, python: str = sys.executable,
                      engine_options: Mapping[str, Any] | None = None,
                      controller_args: Iterable[str] = (),
                      job_name: str = "ipyfarm-controller", **options: Any) -> str:
    """The batch script of a job that runs a standalone controller (``ipyfarm
    controller``), which submits its ``n`` engines as a job of their own.

    The controller writes its connection file into the Jupyter runtime directory (it
    must be one that clients can read: a shared file system); ``scancel`` of this job
    stops the controller, and the controller then cancels its engines' job.
    ``options`` are :func:`batch_script`'s.
    """
    cmd = [python, "-m", "ipyfarm", "controller", "--profile", profile,
           "-n", str(int(n)), "--engines", "slurm"]
    for key, value in (engine_options or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        cmd += ["--engine-opt", f"{key}={text}"]
    return controller_job_script([*cmd, *controller_args], job_name=job_name, **options)


def sbatch_command(sbatch: str = "sbatch") -> list[str]:
    """Submit the script given on stdin; print only ``jobid[;cluster]``."""
    return [sbatch, "--parsable"]


def parse_sbatch_output(stdout: str) -> int:
    """The job id in ``sbatch --parsable``'s output (``"42"`` or ``"42;cluster"``)."""
    first = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    try:
        return int(first.split(";", 1)[0])
    except ValueError:
        raise SlurmError(f"sbatch printed no job id (output {stdout!r}); is `sbatch` "
                         "Slurm's, and does it accept --parsable?") from None


def squeue_command(job_ids: Iterable[int], squeue: str = "squeue") -> list[str]:
    """List the jobs, finished ones too: one ``id|STATE|reason`` line each."""
    ids = ",".join(str(int(j)) for j in job_ids)
    return [squeue, "--noheader", "--states=all", f"--jobs={ids}", "--format=%i|%T|%r"]


def parse_squeue_output(stdout: str) -> dict[int, tuple[str, str]]:
    """``{job_id: (STATE, reason)}`` from :func:`squeue_command`'s output."""
    states: dict[int, tuple[str, str]] = {}
    for line in stdout.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job.isdigit() and state.strip():
            states[int(job)] = (state.split()[0], reason.strip())
    return states


def exit_code(state: str) -> int | None:
    """``poll()``'s value for a job state: None while active, 0 if COMPLETED, else 1."""
    if state in ACTIVE_STATES:
        return None
    return 0 if state == "COMPLETED" else 1


def scancel_command(job_ids: Iterable[int], sig: int | None = None, full: bool = False,
                    scancel: str = "scancel") -> list[str]:
    """Cancel the jobs; with ``sig``, only signal their steps (all of it with ``full``)."""
    cmd = [scancel]
    if sig is not None:
        cmd.append(f"--signal={_signal.Signals(sig).name.removeprefix('SIG')}")
    if full:
        cmd.append("--full")
    return cmd + [str(int(j)) for j in job_ids]


def kill_command(job_id: int, pid: int, hostname: str, sig: int = _signal.SIGKILL,
                 srun: str = "srun") -> list[str]:
    """Signal one engine process on ``hostname`` by a step inside the job's allocation."""
    return [srun, f"--jobid={int(job_id)}", "--overlap", "--nodes=1", "--ntasks=1",
            f"--nodelist={hostname}", "kill", f"-{_signal.Signals(sig).name[3:]}",
            str(int(pid))]


# ---------------------------------------------------------------------- running them
def run_command(cmd: list[str], what: str, timeout: float = 30.0,
                stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run one Slurm command; a missing command or one that hangs is a SlurmError."""
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError:
        raise SlurmError(
            f"cannot {what}: the command {cmd[0]!r} was not found. Likely cause: Slurm's "
            "client commands are not installed or not on PATH on this host. Run this on "
            "a Slurm login node, or pass the command's path as an engine option (e.g. "
            "sbatch=/opt/slurm/bin/sbatch).") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(
            f"cannot {what}: `{shlex.join(cmd)}` did not answer within {timeout:g} s. "
            "Likely cause: slurmctld is down or overloaded. Check `sinfo`, or raise "
            "command_timeout.") from None


def submit(script: str, what: str, sbatch: str = "sbatch", timeout: float = 30.0) -> int:
    """Submit ``script`` (on sbatch's stdin); returns the job id. ``what`` names the job
    in errors, which carry sbatch's own message."""
    done = run_command(sbatch_command(sbatch), f"submit {what}", timeout, stdin=script)
    if done.returncode != 0:
        raise SlurmError(
            f"sbatch refused {what} (exit code {done.returncode}): "
            f"{done.stderr.strip() or done.stdout.strip() or '(no message)'}. Likely cause: "
            "an option the cluster does not accept (partition, time, memory) or no "
            "slurmctld to talk to; see `sinfo` and fix the engine options.")
    return parse_sbatch_output(done.stdout)


# ---------------------------------------------------------------------- the launcher
class SlurmEngineLauncher(EngineLauncher):
    """Engines as Slurm jobs: each ``start(n)`` submits one job of ``n`` tasks.

    Options (``Cluster(engines="slurm", engine_options={...})`` or ``ipyfarm start
    --engines slurm --engine-opt KEY=VALUE``): ``partition``, ``walltime`` (``--time``),
    ``cpus_per_task``, ``mem_per_cpu``, ``job_name``, ``sbatch_options`` (a list of
    extra ``#SBATCH`` options), ``prologue`` (shell lines before the engines),
    ``srun_options``, ``python`` (the interpreter on the nodes), ``output`` (the job's
    log file; ``%j`` is the job id), the commands ``sbatch``/``squeue``/``scancel``/
    ``srun``, ``poll_interval`` (how stale a job state may be, seconds) and
    ``command_timeout`` (seconds any one Slurm command may take).
    """

    backend = "slurm"

    def __init__(self, controller_file: str | Path, *,
                 on_exit: Callable[[int, int], None] | None = None,
                 log_level: str = "WARNING", log_dir: str | Path | None = None,
                 partition: str | None = None, walltime: str | None = None,
                 cpus_per_task: int | None = None, mem_per_cpu: str | None = None,
                 job_name: str = "ipyfarm-engines", sbatch_options: Sequence[str] = (),
                 prologue: Sequence[str] = (), srun_options: Sequence[str] = (),
                 python: str = sys.executable, output: str | None = None,
                 sbatch: str = "sbatch", squeue: str = "squeue", scancel: str = "scancel",
                 srun: str = "srun", poll_interval: float = 5.0,
                 command_timeout: float = 30.0):
        super().__init__(controller_file, on_exit=on_exit, log_level=log_level,
                         log_dir=log_dir)
        self.job_options = {"job_name": job_name, "partition": partition,
                            "walltime": walltime, "cpus_per_task": cpus_per_task,
                            "mem_per_cpu": mem_per_cpu,
                            "sbatch_options": list(sbatch_options),
                            "prologue": list(prologue),
                            "srun_options": list(srun_options)}
        self.python = python
        self.output = output
        self.commands = {"sbatch": sbatch, "squeue": squeue, "scancel": scancel,
                         "srun": srun}
        self.poll_interval = float(poll_interval)
        self.command_timeout = float(command_timeout)
        self.hostname = socket.gethostname()
        #: job id -> last state seen (squeue's long name, or GONE)
        self.states: dict[int, str] = {}
        #: job id -> squeue's reason (why a job is pending: Resources, Priority, ...)
        self.reasons: dict[int, str] = {}
        self.last_error = ""
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        # a check that the options make a script, before anything is submitted
        self.script(1)

    # ------------------------------------------------------------------ commands
    def script(self, n: int) -> str:
        """The batch script that :meth:`start` submits for ``n`` engines."""
        cmd = engine_command(self.controller_file, None, self.log_level, self.python)
        return batch_script(n, cmd, output=self._output(), srun=self.commands["srun"],
                            **self.job_options)

    def _output(self) -> str:
        if self.output is not None:
            return self.output
        return str(Path(self.log_dir or paths.runtime_dir()) / "ipyfarm-engines-%j.out")

    def job_log(self, job_id: int) -> str:
        """Where the output of job ``job_id`` goes (the ``output`` pattern, filled in)."""
        return (self._output().replace("%j", str(job_id))
                .replace("%x", str(self.job_options["job_name"])))

    def hint(self) -> str:
        """What to look at when engines do not come: jobs pending, or ended early."""
        hints = []
        for job, state in self.job_states().items():
            if state == "PENDING":
                reason = self.reasons.get(job) or "no reason given yet"
                hints.append(f"Slurm job {job} is PENDING ({reason}): `squeue -j {job}` and "
                             f"`scontrol show job {job}` say what it waits for")
            elif exit_code(state):
                hints.append(f"Slurm job {job} ended {state}; its output is in "
                             f"{self.job_log(job)}")
        return "; ".join(hints)

    def _run(self, cmd: list[str], what: str) -> subprocess.CompletedProcess:
        return run_command(cmd, what, self.command_timeout)

    def start(self, n: int) -> list[int]:
        """Submit one job of ``n`` engines; returns ``[job_id]``."""
        script = self.script(n)
        if self.output is None:
            Path(self.log_dir or paths.runtime_dir()).mkdir(parents=True, exist_ok=True)
        job_id = submit(script, f"the job of {n} engines", self.commands["sbatch"],
                        self.command_timeout)
        with self._lock:
            self.states[job_id] = "PENDING"
        log.info("submitted Slurm job %d of %d engines", job_id, n)
        self._ensure_watcher()
        return [job_id]

    # ------------------------------------------------------------------ state
    def refresh(self) -> dict[int, str]:
        """Ask squeue for the states of the jobs still active; returns ``{job_id: state}``.

        The watcher thread calls this every ``poll_interval`` seconds while a job is
        active, so :meth:`poll` and :meth:`describe` answer from memory and never make
        the controller wait on slurmctld.
        """
        with self._lock:
            active = [j for j, s in self.states.items() if s in ACTIVE_STATES]
        if not active:
            return self.job_states()
        try:
            done = self._run(squeue_command(active, self.commands["squeue"]),
                             "ask squeue for the job states")
        except SlurmError as e:
            self.last_error = str(e)
            return self.job_states()
        if done.returncode != 0 and "Invalid job id" not in done.stderr:
            self.last_error = f"squeue failed: {done.stderr.strip()}"
            return self.job_states()
        self.last_error = ""
        seen = parse_squeue_output(done.stdout)
        with self._lock:
            for job in active:
                state, self.reasons[job] = seen.get(job, (GONE, ""))  # GONE: purged
                self.states[job] = state
                code = exit_code(state)
                if code is not None and job not in self.exited:
                    self.exited[job] = code
                    log.info("Slurm job %d ended: %s", job, state)
        return self.job_states()

    def job_states(self) -> dict[int, str]:
        """``{job_id: state}`` as last seen (at most ``poll_interval`` seconds old)."""
        with self._lock:
            return dict(self.states)

    def _ensure_watcher(self) -> None:
        with self._lock:
            if self._watcher is None or not self._watcher.is_alive():
                self._closed.clear()
                self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                 name="ipyfarm-slurm-watcher")
                self._watcher.start()

    def _watch(self) -> None:
        while not self._closed.is_set():
            states = self.refresh()
            if not any(s in ACTIVE_STATES for s in states.values()):
                return
            self._closed.wait(self.poll_interval)

    def poll(self) -> dict[int, int | None]:
        """``{job_id: None}`` for each job still active (ended ones are in ``exited``)."""
        return {job: None for job, state in self.job_states().items()
                if exit_code(state) is None}

    @property
    def job_ids(self) -> list[int]:
        """Every job this launcher submitted, oldest first."""
        with self._lock:
            return list(self.states)

    def describe(self) -> dict[str, Any]:
        states = self.job_states()
        jobs = [{"job_id": j, "state": s} for j, s in states.items()]
        desc: dict[str, Any] = {"backend": self.backend, "jobs": jobs,
                                "running": sum(exit_code(s) is None for s in states.values())}
        if jobs:  # the newest job, for one-line summaries (`ipyfarm list`, the dashboard)
            desc.update(job_id=jobs[-1]["job_id"], state=jobs[-1]["state"],
                        log=self.job_log(jobs[-1]["job_id"]))
            hint = self.hint()
            if hint:
                desc["hint"] = hint
        if self.last_error:
            desc["error_detail"] = self.last_error
        return desc

    # ------------------------------------------------------------------ signals, stop
    def signal(self, sig: int, handles: list[int] | None = None) -> None:
        """Deliver ``sig`` to the engines of the jobs (all, or the given job ids); other
        handles are taken as process ids of engines (see :meth:`stop`)."""
        jobs, pids = self._split(handles)
        if jobs:
            done = self._run(scancel_command(jobs, sig, scancel=self.commands["scancel"]),
                             f"signal job(s) {jobs}")
            if done.returncode != 0:
                log.warning("scancel --signal failed for jobs %s: %s", jobs,
                            done.stderr.strip())
        for pid in pids:
            self._signal_engine(pid, sig)

    def _split(self, handles: list[int] | None) -> tuple[list[int], list[int]]:
        with self._lock:
            if handles is None:
                return [j for j, s in self.states.items() if s in ACTIVE_STATES], []
            jobs = [h for h in handles if h in self.states]
            return ([j for j in jobs if self.states[j] in ACTIVE_STATES],
                    [h for h in handles if h not in self.states])

    def stop(self, handles: list[int] | None = None, timeout: float = 5.0) -> None:
        """``scancel`` the jobs (all, or the given job ids) and wait until they have left
        (``scancel --full --signal=KILL`` past ``timeout``, then as long again).

        Other handles are process ids of single engines (the cluster's
        ``stop_engines_sync(ids)``): each gets SIGTERM by a step in its job.
        """
        jobs, pids = self._split(handles)
        for pid in pids:
            self._signal_engine(pid, _signal.SIGTERM)
        if not jobs:
            return
        try:  # a teardown goes on whatever Slurm answers: warn, do not raise
            self._cancel(jobs, timeout)
        except SlurmError as e:
            log.warning("%s; the Slurm job(s) %s may still run: cancel them with "
                        "`scancel %s`", e, jobs, " ".join(map(str, jobs)))
        if handles is None:
            self._closed.set()

    def _cancel(self, jobs: list[int], timeout: float) -> None:
        scancel = self.commands["scancel"]
        done = self._run(scancel_command(jobs, scancel=scancel), f"cancel job(s) {jobs}")
        if done.returncode != 0:
            log.warning("scancel failed for jobs %s: %s", jobs, done.stderr.strip())
        if self._wait_jobs(jobs, timeout):
            return
        self._run(scancel_command(jobs, _signal.SIGKILL, full=True, scancel=scancel),
                  f"kill job(s) {jobs}")
        if not self._wait_jobs(jobs, max(timeout, 5.0)):
            log.warning("Slurm job(s) %s still listed as %s after scancel; slurmctld will "
                        "finish them", jobs, [self.states[j] for j in jobs])

    def _wait_jobs(self, jobs: list[int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            states = self.refresh()
            if all(exit_code(states[j]) is not None for j in jobs):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pids:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(min(0.25, self.poll_interval))
        return True

    def kill_engine(self, pid: int, hostname: str) -> bool:
        """SIGKILL one stuck engine: by a step in its job (``srun --overlap``), or
        directly when that fails and the engine runs on this host."""
        return self._signal_engine(pid, _signal.SIGKILL, hostname)

    def _signal_engine(self, pid: int, sig: int, hostname: str | None = None) -> bool:
        host = hostname or self.hostname
        with self._lock:
            running = [j for j, s in self.states.items() if s == "RUNNING"]
        for job in reversed(running):
            cmd = kill_command(job, pid, host, sig, self.commands["srun"])
            try:
                done = self._run(cmd, f"signal engine process {pid} on {host}")
            except SlurmError as e:
                log.warning("%s", e)
                break
            if done.returncode == 0:
                return True
        if host == self.hostname:
            try:
                os.kill(pid, sig)
                return True
            except (ProcessLookupError, PermissionError):
                return False
        return False
