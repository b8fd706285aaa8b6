"""The ``ipyfarm`` command: start | stop | list | demo | controller | engine."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from . import paths
from .cluster.base import BACKENDS

__all__ = ["main"]

DB_KINDS = ("memory", "sqlite")
SCHEMES = ("leastload", "lru", "plainrandom", "twobin", "weighted")


def controller_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a standalone controller runs in: glibc's malloc for Python objects.

    With pymalloc, a few long-lived objects made during a burst of tasks pin its 1 MiB
    arenas, and a controller that ran 50,000 tasks held +65 MB after purging them all;
    with glibc's allocator (trimmed after a purge) it gave back all but 5 MB, at the same
    throughput (benchmarks/RESULTS.md). A PYTHONMALLOC the user set is kept.
    """
    out = dict(os.environ if env is None else env)
    out.setdefault("PYTHONMALLOC", "malloc")
    return out


def _cmd_controller(args: argparse.Namespace) -> int:
    from .controller.app import run_standalone

    return run_standalone(n=args.n, profile=args.profile, ip=args.ip, log_level=args.log_level,
                          db=args.db, db_file=args.db_file, scheme=args.scheme, hwm=args.hwm,
                          restart_engines=args.restart_engines, engines=args.engines,
                          engine_options=_engine_options(args.engine_opt),
                          curve=args.curve)


def _engine_options(items: list[str]) -> dict[str, Any]:
    """``--engine-opt KEY=VALUE`` pairs; a VALUE that parses as JSON is taken as such
    (``hosts=["a","b"]``, ``cpus=2``), anything else as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"ipyfarm: --engine-opt wants KEY=VALUE, not {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    return out


def _controller_argv(args: argparse.Namespace) -> list[str]:
    """The ``ipyfarm controller`` command line that ``start --daemonize`` runs."""
    cmd = [sys.executable, "-m", "ipyfarm", "controller", "-n", str(args.n),
           "--profile", args.profile, "--ip", args.ip, "--log-level", args.log_level,
           "--db", args.db, "--scheme", args.scheme, "--hwm", str(args.hwm)]
    if args.db_file is not None:
        cmd += ["--db-file", os.path.abspath(args.db_file)]
    if args.restart_engines:
        cmd.append("--restart-engines")
    cmd += ["--engines", args.engines]
    for item in args.engine_opt:
        cmd += ["--engine-opt", item]
    if args.curve is not None:
        cmd.append("--curve" if args.curve else "--no-curve")
    return cmd


def _engines_ready(file: Any, args: argparse.Namespace, deadline: float,
                   what: str) -> int | None:
    """Wait (until ``deadline``) for ``args.n`` engines of the controller in ``file``;
    the number registered, or None after saying why on stderr."""
    from .client.client import Client
    from .error import IPyFarmError

    try:
        with Client(url_file=file, timeout=args.timeout) as rc:
            rc.wait_for_engines(args.n, timeout=max(1.0, deadline - time.monotonic()))
            return len(rc.ids)
    except IPyFarmError as e:
        print(f"ipyfarm: {what} but engines are not ready: {e}", file=sys.stderr)
        return None


def _cmd_start(args: argparse.Namespace) -> int:
    if args.controller == "slurm":
        return _start_controller_job(args)
    if not args.daemonize:
        return _cmd_controller(args)
    cmd = _controller_argv(args)
    log_file = paths.runtime_dir() / f"ipyfarm-{args.profile}.log"
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, env=controller_env())
    file = paths.cluster_file(args.profile)
    deadline = time.monotonic() + args.timeout

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"ipyfarm: the controller exited at start (code {proc.returncode}); "
                  f"see {log_file}", file=sys.stderr)
            return 1
        if file.exists() and paths.read_json(file).get("pid") == proc.pid:
            break
        time.sleep(0.05)
    else:
        print(f"ipyfarm: the controller did not start within {args.timeout} s; see {log_file}",
              file=sys.stderr)
        return 1
    n = _engines_ready(file, args, deadline, f"cluster started (pid {proc.pid})")
    if n is None:
        return 1
    print(f"ipyfarm: cluster {args.profile!r} running: controller pid {proc.pid}, {n} engines. "
          f"Connect with ipyfarm.Client(profile={args.profile!r}); stop with "
          f"`ipyfarm stop --profile {args.profile}`.")
    return 0


def _start_controller_job(args: argparse.Namespace) -> int:
    """``start --controller slurm``: the controller runs as a Slurm job (docs/slurm.md)."""
    from datetime import datetime, timedelta

    from .cluster.slurm import SlurmError, controller_job_script, submit

    output = paths.runtime_dir() / f"ipyfarm-{args.profile}-controller-%j.out"
    submitted = datetime.now().astimezone() - timedelta(seconds=5)  # clocks of other nodes
    try:
        job = submit(controller_job_script(_controller_argv(args), output=str(output)),
                     "the controller's job")
    except (SlurmError, ValueError) as e:
        print(f"ipyfarm: {e}", file=sys.stderr)
        return 1
    log, file = str(output).replace("%j", str(job)), paths.cluster_file(args.profile)
    deadline = time.monotonic() + args.timeout
    while not (file.exists() and datetime.fromisoformat(
            paths.read_json(file).get("created") or "1970-01-01T00:00:00+00:00") > submitted):
        if time.monotonic() > deadline:
            print(f"ipyfarm: the controller's Slurm job {job} wrote no {file} within "
                  f"{args.timeout} s: still pending (`squeue -j {job}`) or failed (see {log}). "
                  f"Cancel it with `scancel {job}`.", file=sys.stderr)
            return 1
        time.sleep(0.2)
    n = _engines_ready(file, args, deadline, f"the controller runs (Slurm job {job})")
    if n is None:
        return 1
    print(f"ipyfarm: cluster {args.profile!r} running: controller in Slurm job {job}, {n} "
          f"engines. Connect with ipyfarm.Client(profile={args.profile!r}); stop with "
          f"`scancel {job}`.")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    file = paths.cluster_file(args.profile)
    if not file.exists():
        print(f"ipyfarm: no cluster of profile {args.profile!r} is running", file=sys.stderr)
        return 1
    info = paths.read_json(file)
    pid = int(info.get("pid", -1))
    if info.get("embedded"):
        print(f"ipyfarm: the cluster {args.profile!r} is embedded in process {pid}; stop it "
              "from there (cluster.stop_cluster_sync() or rc.shutdown(hub=True))",
              file=sys.stderr)
        return 1
    if not paths.pid_alive(pid):
        file.unlink(missing_ok=True)
        print(f"ipyfarm: removed the stale file of cluster {args.profile!r} (pid {pid} is gone)")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while paths.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if paths.pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        print(f"ipyfarm: controller {pid} did not stop in {args.timeout} s; killed it")
    else:
        print(f"ipyfarm: stopped cluster {args.profile!r} (pid {pid})")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    found = paths.find_cluster_files()
    if not found:
        print("no ipyfarm clusters running")
        return 0
    print(f"{'PROFILE':<16} {'PID':>7} {'ENGINES':>7}  {'KIND':<9} {'STARTED':<19}  LAUNCHER")
    for path, info in found:
        engines: Any = "?"
        launcher = info.get("engines", "local")
        if not info.get("embedded"):
            try:
                from .client.client import Client

                with Client(url_file=path, timeout=2) as rc:
                    engines = len(rc.ids)
                    launcher = _launcher_summary(rc.farm_status().get("launcher")) or launcher
            except Exception:
                engines = "?"
        kind = "embedded" if info.get("embedded") else "process"
        print(f"{info.get('profile', '?'):<16} {info.get('pid', '?'):>7} {engines:>7}  "
              f"{kind:<9} {info.get('created', '')[:19]:<19}  {launcher}")
    return 0


def _launcher_summary(desc: dict | None) -> str:
    """``slurm job 12 RUNNING``-style text from a launcher's ``describe()``."""
    if not desc:
        return ""
    if "error" in desc:
        return f"? ({desc['error']})"
    words = [str(desc.get("backend", "?"))]
    for key in ("job_id", "state", "hosts"):
        value = desc.get(key)
        if value:
            words.append(f"job {value}" if key == "job_id" else
                         ",".join(map(str, value)) if isinstance(value, list) else str(value))
    return " ".join(words)


def install_kernelspec(user: bool = False, prefix: str | None = None) -> str:
    """Install the ``ipyfarm-engine`` kernelspec; returns where it went.

    A wheel install ships it already (``jupyter-config/``); an editable install
    does not (setuptools skips data files there), hence this command. Both come from
    :func:`ipyfarm.kernelspec.kernelspec_json`; this one runs this interpreter.
    """
    import tempfile

    from jupyter_client.kernelspec import KernelSpecManager

    from .kernelspec import KERNEL_NAME, kernelspec_json

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            f.write(kernelspec_json(sys.executable))
        return KernelSpecManager().install_kernel_spec(
            tmp, KERNEL_NAME, user=user, prefix=None if user else (prefix or sys.prefix))


def _cmd_kernelspec(args: argparse.Namespace) -> int:
    where = install_kernelspec(user=args.user, prefix=args.prefix)
    print(f"ipyfarm: installed the ipyfarm-engine kernelspec in {where}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.n)


def _cmd_engine(args: argparse.Namespace, rest: list[str]) -> int:
    from .engine.__main__ import main as engine_main

    return engine_main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ipyfarm", description="Interactive parallel computing "
                                "for Jupyter: controllers and engines.")
    sub = p.add_subparsers(dest="command", required=True)

    def cluster_opts(sp: argparse.ArgumentParser, n_default: int) -> None:
        sp.add_argument("-n", type=int, default=n_default, help="number of engines")
        sp.add_argument("--profile", default="default", help="cluster name")
        sp.add_argument("--ip", default="127.0.0.1", help="address to listen on")
        sp.add_argument("--curve", action=argparse.BooleanOptionalAction, default=None,
                        help="CurveZMQ encryption of all traffic (default: on when --ip is "
                        "beyond loopback); --no-curve sends plain text")
        sp.add_argument("--log-level", default="WARNING")
        sp.add_argument("--timeout", type=float, default=60.0)
        sp.add_argument("--db", choices=DB_KINDS, default="memory",
                        help="where task records live: in memory (default) or in SQLite at "
                        "<jupyter runtime dir>/ipyfarm-<profile>.sqlite")
        sp.add_argument("--db-file", default=None, metavar="PATH",
                        help="the SQLite file of task records (implies --db sqlite)")
        sp.add_argument("--scheme", choices=SCHEMES, default="leastload",
                        help="how load-balanced tasks pick an engine (default leastload)")
        sp.add_argument("--hwm", type=int, default=1, metavar="N",
                        help="load-balanced tasks an engine may hold at once (default 1)")
        sp.add_argument("--restart-engines", action="store_true",
                        help="replace engines that die unexpectedly (at most 3 in 60 s)")
        sp.add_argument("--engines", choices=sorted(BACKENDS), default="local",
                        help="how engines are started: local processes (default), mpiexec, "
                        "ssh or slurm")
        sp.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the engine launcher (repeatable), e.g. "
                        "hosts='[\"node1\"]' for ssh; see docs/ for each backend")

    sp = sub.add_parser("start", help="start a controller and n engines")
    cluster_opts(sp, os.cpu_count() or 1)
    sp.add_argument("--daemonize", action="store_true", help="run in the background")
    sp.add_argument("--controller", choices=("process", "slurm"), default="process",
                    help="where the controller runs: a process here (default), or a Slurm "
                    "job (submitted with sbatch; implies --daemonize)")
    sp.set_defaults(func=_cmd_start)
    sp = sub.add_parser("controller", help="run a standalone controller (foreground)")
    cluster_opts(sp, 0)
    sp.set_defaults(func=_cmd_controller)
    sp = sub.add_parser("stop", help="stop a standalone cluster")
    sp.add_argument("--profile", default="default")
    sp.add_argument("--timeout", type=float, default=10.0)
    sp.set_defaults(func=_cmd_stop)
    sp = sub.add_parser("list", help="list running clusters")
    sp.set_defaults(func=_cmd_list)
    sp = sub.add_parser("demo", help="a short demonstration on an embedded cluster")
    sp.add_argument("-n", type=int, default=min(4, os.cpu_count() or 1))
    sp.set_defaults(func=_cmd_demo)
    sp = sub.add_parser("kernelspec", help="install the ipyfarm-engine Jupyter kernelspec")
    sp.add_argument("--user", action="store_true", help="in the user's Jupyter dir")
    sp.add_argument("--prefix", default=None, metavar="DIR",
                    help="under DIR/share/jupyter/kernels (default: this Python's prefix)")
    sp.set_defaults(func=_cmd_kernelspec)
    sub.add_parser("engine", help="run one engine (options: python -m ipyfarm.engine --help)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["engine"]:
        return _cmd_engine(argparse.Namespace(), argv[1:])
    args = build_parser().parse_args(argv)
    serves = args.command == "controller" or (args.command == "start" and not args.daemonize
                                              and getattr(args, "controller", "process")
                                              != "slurm")
    if from_command_line and serves and "PYTHONMALLOC" not in os.environ:
        # this process becomes the controller: start over with its allocator
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "ipyfarm", *argv], controller_env())
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
