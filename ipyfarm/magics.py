"""IPython magics: ``%px``, ``%%px``, ``%autopx``, ``%pxresult``, ``%pxconfig``, ``%farm``.

Argument parsing and display only; the client does the work::

    %load_ext ipyfarm   -> load_ipython_extension: %farm, and a %px family with no view yet
    %px code            -> no view: %farm starts an embedded cluster and activates rc[:]
                        -> view.execute(code, silent=False) -> AsyncResult
                        -> wait (stream lines / progress as metadata fills) -> display_outputs
    view.activate("x")  -> %pxx, %%pxx, %autopxx, %pxresultx, %pxconfigx run on that view

``--targets`` text is parsed by :func:`ipyfarm.client.targets.parse_targets`, never eval'd.
"""

from __future__ import annotations

import ast
import os
import re
from types import SimpleNamespace
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import (Magics, line_cell_magic, line_magic, magics_class,
                                no_var_expand)
from IPython.core.magic_arguments import MagicArgumentParser

from . import error
from .client.display import display_outputs
from .client.targets import parse_targets
from .pxwait import Streamer, interrupt, print_now, signal_number, wait

__all__ = ["FarmMagics", "ParallelMagics", "activate", "load_ipython_extension"]

GROUPS = ("type", "engine", "order")

# (flags, argparse keywords); the same table builds the parsers and reads %px lines
_EXEC = [
    (("-b", "--block"), dict(dest="block", action="store_const", const=True,
                             help="wait for the engines and show their outputs (default)")),
    (("-a", "--noblock"), dict(dest="block", action="store_const", const=False,
                               help="return the AsyncResult at once; %%pxresult shows it")),
    (("--stream",), dict(dest="stream", action="store_const", const=True,
                         help="print engines' output lines as they arrive (default)")),
    (("--no-stream",), dict(dest="stream", action="store_const", const=False,
                            help="print outputs only when all engines are done")),
    (("-t", "--targets"), dict(dest="targets", metavar="TARGETS",
                               help="engines: all, 3, -1, 0,2,5, ::2, 1:3, [0,2], [1:]")),
    (("-v", "--verbose"), dict(dest="verbose", action="store_const", const=True,
                               help="say which engines run the code")),
    (("--no-verbose",), dict(dest="verbose", action="store_const", const=False,
                             help="say nothing extra")),
    (("--progress-after",), dict(dest="progress_after", type=float, metavar="SECONDS",
                                 help="show a progress bar (ar.wait_interactive()) "
                                      "after SECONDS (-1: never)")),
    (("--signal-on-interrupt",), dict(dest="signal", metavar="SIG",
                                      help="signal Ctrl-C sends to the engines: SIGINT "
                                           "(default), SIGTERM, 9, 0 (none), ...")),
]
_OUTPUT = [
    (("--group-outputs",), dict(dest="groupby", choices=GROUPS,
                                help="type: all stdout, then stderr, ...; engine: each "
                                     "engine's outputs together; order: like type, "
                                     "displays interleaved across engines")),
    (("-e",), dict(dest="groupby", action="store_const", const="engine",
                   help="same as --group-outputs=engine")),
    (("-r",), dict(dest="groupby", action="store_const", const="order",
                   help="same as --group-outputs=order")),
    (("-o", "--out"), dict(dest="out", metavar="NAME",
                           help="store the AsyncResult in the variable NAME")),
]
_LOCAL = [(("--local",), dict(dest="local", action="store_true",
                              help="also run the code here, in this kernel"))]


def _parser(prog: str, description: str, *tables: list) -> MagicArgumentParser:
    parser = MagicArgumentParser(prog=prog, description=description)
    for table in tables:
        for flags, kwargs in table:
            parser.add_argument(*flags, **kwargs)
    return parser


_PX = _parser("%px", "Run code on the engines.", _EXEC, _OUTPUT, _LOCAL)
_PXCONFIG = _parser("%pxconfig", "Set the defaults of %px.", _EXEC,
                    [t for t in _OUTPUT if t[1]["dest"] == "groupby"])
_PXRESULT = _parser("%pxresult", "Show the last %px result.", _OUTPUT)
_PX_FLAGS = {flag: "action" not in kwargs  # flag -> takes a value
             for flags, kwargs in _EXEC + _OUTPUT + _LOCAL for flag in flags}
_TOKEN = re.compile(r"\s*(\S+)")


def split_px_line(line: str) -> tuple[list[str], str]:
    """Leading ``%px`` options of a line and the code after them (``-1`` is code)."""
    argv: list[str] = []
    pos = 0
    while (m := _TOKEN.match(line, pos)) is not None:
        token = m.group(1)
        name = token.split("=", 1)[0]
        if name not in _PX_FLAGS:
            break
        argv.append(token)
        pos = m.end()
        if _PX_FLAGS[name] and "=" not in token:
            value = _TOKEN.match(line, pos)
            if value is None:
                raise UsageError(f"%px: {name} needs a value")
            argv.append(value.group(1))
            pos = value.end()
    return argv, line[pos:].strip()


def _targets_arg(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return parse_targets(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


@magics_class
class ParallelMagics(Magics):
    """``%px`` and friends for one view (named with the view's ``suffix``)."""

    def __init__(self, shell: Any, view: Any = None, suffix: str = ""):
        super().__init__(shell)
        self.view = view
        self.suffix = suffix
        self.last_result: Any = None
        self._last_client: Any = None
        # block None: the view's own block flag, as in ipyparallel (views the magics make
        # for themselves are blocking); %pxconfig --block/--noblock overrides it
        self.config_ = SimpleNamespace(targets=None, block=None, stream=True, verbose=False,
                                       progress_after=2.0, signal="SIGINT", groupby="type")
        self._autopx = None
        for kind in ("line", "cell"):
            self.magics[kind] = {name + suffix: fn for name, fn in self.magics[kind].items()}

    # ------------------------------------------------------------------ the view
    def _active_view(self) -> Any:
        if self.view is None and not self.suffix:
            from .client.client import latest_client

            rc = latest_client()  # a Client made in this session activates the magics
            if rc is not None:
                self.view = rc[:]
                self.view.block = True  # ipyparallel's initially active view blocks
                print_now(f"ipyfarm: %px runs on the {len(rc.ids)} engines of the Client "
                           "created in this session (rc[:].activate() picks another)")
                return self.view
        if self.view is None:
            farm = _farm_magics(self.shell)
            if farm is None or self.suffix:
                raise UsageError(f"%px{self.suffix}: no active view. Activate one "
                                 f"(rc[:].activate({self.suffix!r})), or `%load_ext ipyfarm` "
                                 "and %px starts a cluster")
            farm.start_cluster(n=None)
        return self.view

    def _pick(self, args: Any, name: str) -> Any:
        value = getattr(args, name, None)
        return getattr(self.config_, name) if value is None else value

    # ------------------------------------------------------------------ %px
    @no_var_expand
    @line_cell_magic
    def px(self, line: str, cell: str | None = None) -> Any:
        """Run code on the engines: ``%px code`` or a ``%%px [options]`` cell.

        %px import os; os.getpid()
        %%px --targets ::2 --group-outputs=engine
        """
        if cell is None:
            argv, code = split_px_line(line)
            args = _PX.parse_args(argv)
        else:
            args, code = _PX.parse_argstring(line), cell
        if not code.strip():
            raise UsageError("%px: no code to run")
        if args.signal is not None:
            signal_number(args.signal)
        if args.out is not None and not args.out.isidentifier():
            raise UsageError(f"-o/--out needs a variable name, not {args.out!r}")
        return self._execute(code, args)

    px.__doc__ = (px.__doc__ or "") + "\n" + _PX.format_help()

    def _execute(self, code: str, args: Any) -> Any:
        targets = _targets_arg(args.targets) if args.targets else self.config_.targets
        view = self._active_view()
        try:
            ar = view.execute(code, silent=False, targets=targets, block=False)
        except (IndexError, TypeError, error.NoEnginesRegistered, error.NoClusterError,
                RuntimeError) as e:
            hint = "" if _alive(view.client) else \
                "; activate another view, or `%farm start` a new cluster"
            raise UsageError(f"%px{self.suffix}: {e}{hint}") from None
        self.last_result, self._last_client = ar, view.client
        if args.out:
            self.shell.user_ns[args.out] = ar
        if self._pick(args, "verbose"):
            ids = ar.engine_id if isinstance(ar.engine_id, list) else [ar.engine_id]
            print_now(f"Parallel execution on engine(s): {ids}")
        if args.local:
            self._run_here(code)
        block = self._pick(args, "block")
        if not (view.block if block is None else block):
            return ar
        self._wait_and_show(ar, view.client, args)
        return None

    def _run_here(self, code: str) -> None:
        paused = self._autopx
        if paused is not None:
            self.shell.input_transformers_cleanup.remove(paused)
        try:
            self.shell.run_cell(code, store_history=False)
        finally:
            if paused is not None:
                self.shell.input_transformers_cleanup.append(paused)

    def _wait_and_show(self, ar: Any, client: Any, args: Any) -> None:
        metadatas = [client.metadata[m] for m in ar.msg_ids]
        streamer = Streamer(metadatas) if self._pick(args, "stream") else None
        try:
            wait(ar, streamer, self._pick(args, "progress_after"))
        except KeyboardInterrupt:
            if not interrupt(ar, client, self._pick(args, "signal")):
                if streamer is not None:
                    streamer.poll()
                raise
        if streamer is not None:
            streamer.poll()
        left = streamer.remaining() if streamer is not None else metadatas
        display_outputs(left, self._pick(args, "groupby"))
        ar.get(0)  # raises the engines' error(s): IPython renders them as tracebacks

    # ------------------------------------------------------------------ %pxresult
    @line_magic
    def pxresult(self, line: str = "") -> None:
        """Show the outputs of the last %px (waiting for it if it still runs)."""
        args = _PXRESULT.parse_argstring(line)
        if self.last_result is None:
            raise UsageError(f"%pxresult{self.suffix}: no %px{self.suffix} has run yet")
        if args.out:
            if not args.out.isidentifier():
                raise UsageError(f"-o/--out needs a variable name, not {args.out!r}")
            self.shell.user_ns[args.out] = self.last_result
        opts = SimpleNamespace(groupby=args.groupby, stream=False)
        self._wait_and_show(self.last_result, self._last_client, opts)

    pxresult.__doc__ = (pxresult.__doc__ or "") + "\n" + _PXRESULT.format_help()

    # ------------------------------------------------------------------ %pxconfig
    @line_magic
    def pxconfig(self, line: str = "") -> None:
        """Set the defaults of %px (``--targets``, ``--block``/``--noblock``, ...);
        with no options, print them."""
        args = _PXCONFIG.parse_argstring(line)
        if args.signal is not None:
            signal_number(args.signal)
        changes = {k: v for k, v in vars(args).items() if v is not None}
        if "targets" in changes:
            changes["targets"] = _targets_arg(changes["targets"])
        for key, value in changes.items():
            setattr(self.config_, key, value)
        if not changes:
            shown = dict(vars(self.config_))
            if shown["block"] is None:  # the view's flag (a view the magics make: True)
                shown["block"] = True if self.view is None else bool(self.view.block)
            text = ", ".join(f"{k}={v!r}" for k, v in shown.items())
            print_now(f"%pxconfig{self.suffix}: {text}")

    pxconfig.__doc__ = (pxconfig.__doc__ or "") + "\n" + _PXCONFIG.format_help()

    # ------------------------------------------------------------------ %autopx
    @line_magic
    def autopx(self, line: str = "") -> None:
        """Toggle sending every following cell to the engines (``%autopx`` again stops)."""
        if self._autopx is None:
            self._autopx = self._to_px
            self.shell.input_transformers_cleanup.append(self._autopx)
            print_now(f"%autopx{self.suffix} enabled")
        else:
            self.stop_autopx()
            print_now(f"%autopx{self.suffix} disabled")

    def stop_autopx(self) -> None:
        if self._autopx is not None:
            transformers = self.shell.input_transformers_cleanup
            if self._autopx in transformers:
                transformers.remove(self._autopx)
            self._autopx = None

    def _to_px(self, lines: list[str]) -> list[str]:
        """Input transformer: a cell becomes a %%px call (except this family's magics)."""
        cell = "".join(lines)
        words = cell.split(None, 1)
        own = {f"%{name}{self.suffix}" for name in ("autopx", "px", "pxconfig", "pxresult")}
        if not words or words[0] in own or words[0] in {"%" + w for w in own}:
            return lines
        if _incomplete(cell):
            return lines  # a terminal is still reading a block: let it ask for more
        return [f"get_ipython().run_cell_magic({'px' + self.suffix!r}, '', {cell!r})\n"]


def _incomplete(cell: str) -> bool:
    try:
        ast.parse(cell)
        return False
    except SyntaxError:
        pass
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().check_complete(cell)[0] == "incomplete"


def _alive(rc: Any) -> bool:
    return not rc.closed and not rc.hub_shut_down


def _registered(shell: Any) -> list[ParallelMagics]:
    """The ParallelMagics instances whose magics the shell has now."""
    found: list[ParallelMagics] = []
    for fn in shell.magics_manager.magics["line"].values():
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, ParallelMagics) and owner not in found:
            found.append(owner)
    return found


def _px_magics(shell: Any, suffix: str = "") -> ParallelMagics | None:
    fn = shell.magics_manager.magics["line"].get("pxconfig" + suffix)
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, ParallelMagics) else None


def _farm_magics(shell: Any) -> FarmMagics | None:
    fn = shell.magics_manager.magics["line"].get("farm")
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, FarmMagics) else None


def activate(view: Any, suffix: str = "") -> None:
    """Make ``%px<suffix>``, ``%%px<suffix>``, ``%autopx<suffix>``, ``%pxresult<suffix>``
    and ``%pxconfig<suffix>`` run on ``view``'s engines (ipyparallel's ``view.activate``)."""
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        raise RuntimeError("view.activate() needs IPython: run it in a notebook or IPython")
    if not isinstance(suffix, str) or (suffix and not suffix.isidentifier()):
        raise ValueError(f"suffix must be letters, digits or _, not {suffix!r}")
    magics = _px_magics(shell, suffix)
    if magics is None:
        magics = ParallelMagics(shell, view, suffix)
        shell.register_magics(magics)
    magics.view = view


@magics_class
class FarmMagics(Magics):
    """``%farm start|stop|status|add|dashboard``: the cluster behind ``%px``."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self._commands = {"start": self._start, "stop": self._stop, "status": self._status,
                          "add": self._add, "dashboard": self._dashboard}

    @line_magic
    def farm(self, line: str = "") -> Any:
        """Manage the cluster %px runs on.

        %farm start [-n N] [--scheme S] [--profile P]   start a cluster, activate it
        %farm stop                                        stop the active view's cluster
        %farm status                                      engines and their queues
        %farm add N                                       start N more engines
        %farm dashboard                                   the live dashboard widget
        """
        words = line.split()
        if not words or words[0] not in self._commands:
            raise UsageError(f"%farm: use one of {', '.join(self._commands)} "
                             f"(got {line.strip()!r}); see %farm?")
        return self._commands[words[0]](words[1:])

    # ------------------------------------------------------------------ helpers
    def _view(self) -> Any:
        magics = _px_magics(self.shell, "")
        return magics.view if magics is not None else None

    def _client(self, what: str) -> Any:
        view = self._view()
        if view is None:
            raise UsageError(f"%farm {what}: no cluster is active; `%farm start` or %px "
                             "starts one")
        return view.client

    def _cluster(self, what: str) -> Any:
        rc = self._client(what)
        if rc.cluster is None:
            raise UsageError(
                f"%farm {what}: the active view's client is connected to a cluster this "
                f"session did not start (profile {rc.profile!r}); manage it with "
                "`ipyfarm start|stop`")
        return rc.cluster

    def start_cluster(self, n: int | None = None, scheme: str = "leastload",
                      profile: str | None = None) -> Any:
        """Start an embedded cluster (``n`` None: one engine per core), activate ``rc[:]``."""
        from .cluster.cluster import Cluster

        cluster = Cluster(n=n, scheme=scheme, profile=profile or f"farm-{os.getpid()}")
        rc = cluster.start_and_connect_sync()
        view = rc[:]
        view.block = True  # like the view a Client activates: %px waits and shows
        activate(view, "")
        how = " (one per core)" if n is None else ""
        print_now(f"ipyfarm: started a cluster of {len(rc.ids)} engines{how}, ids {rc.ids}, "
                   f"scheme {scheme}; %px runs on all of them, `%farm stop` stops it")
        return rc

    # ------------------------------------------------------------------ commands
    def _start(self, argv: list[str]) -> None:
        args = _FARM_START.parse_args(argv)
        view = self._view()
        if view is not None and _alive(view.client):
            raise UsageError(f"%farm start: a cluster of {len(view.client.ids)} engines is "
                             "already active; `%farm stop` it first, or `%farm add N`")
        if args.n is not None and args.n < 1:
            raise UsageError(f"%farm start: -n must be at least 1, not {args.n}")
        try:
            self.start_cluster(args.n, args.scheme, args.profile)
        except ValueError as e:
            raise UsageError(f"%farm start: {e}") from None

    def _stop(self, argv: list[str]) -> None:
        if argv:
            raise UsageError(f"%farm stop takes no arguments, not {' '.join(argv)!r}")
        cluster = self._cluster("stop")
        n = len(cluster.launcher.pids) if cluster.launcher else 0
        for magics in _registered(self.shell):
            if magics.view is not None and magics.view.client.cluster is cluster:
                magics.stop_autopx()
                magics.view = None
        cluster.stop_cluster_sync()
        print_now(f"ipyfarm: stopped the cluster ({n} engines)")

    def _status(self, argv: list[str]) -> None:
        view = self._view()
        if view is None:
            print_now("ipyfarm: no cluster is active; `%farm start` or %px starts one")
            return
        rc = view.client
        where = "embedded in this kernel" if rc.cluster is not None else "external"
        queues = rc.queue_status()
        print_now(f"ipyfarm: {len(rc.ids)} engines, controller {where} "
                   f"(profile {rc.profile!r}); %px targets {view.targets}")
        print_now(f"{'engine':>6}  {'queue':>5}  {'completed':>9}  {'tasks':>5}")
        for engine_id in rc.ids:
            q = queues.get(engine_id, {})
            print_now(f"{engine_id:>6}  {q.get('queue', 0):>5}  {q.get('completed', 0):>9}"
                       f"  {q.get('tasks', 0):>5}")
        print_now(f"unassigned tasks: {queues.get('unassigned', 0)}")

    def _add(self, argv: list[str]) -> None:
        if len(argv) != 1 or not argv[0].isdigit() or int(argv[0]) < 1:
            raise UsageError(f"%farm add N: N must be a positive number, not {' '.join(argv)!r}")
        n = int(argv[0])
        cluster = self._cluster("add")
        rc = self._client("add")
        before = set(rc.ids)
        cluster.start_engines_sync(n)
        rc.wait_for_engines(len(before) + n, timeout=cluster.engine_timeout)
        new = sorted(set(rc.ids) - before)
        print_now(f"ipyfarm: added {len(new)} engine{'s' if len(new) != 1 else ''}, ids {new};"
                   f" {len(rc.ids)} in all")

    def _dashboard(self, argv: list[str]) -> Any:
        import ipyfarm

        dashboard = getattr(ipyfarm, "Dashboard", None)
        if dashboard is None:
            raise UsageError("%farm dashboard: the dashboard is not available in this version")
        return dashboard(self._client("dashboard"))


_FARM_START = MagicArgumentParser(prog="%farm start", description="Start a cluster.")
_FARM_START.add_argument("-n", type=int, default=None, help="engines (default: one per core)")
_FARM_START.add_argument("--scheme", default="leastload", help="load-balancing scheme")
_FARM_START.add_argument("--profile", default=None, help="the cluster's profile name")


def load_ipython_extension(ip: Any) -> None:
    """``%load_ext ipyfarm``: ``%farm``, and ``%px`` that starts a cluster on first use.

    Idempotent: magics already registered (by an earlier call, or by a Client created in
    this session) are kept, with their active view."""
    if _farm_magics(ip) is None:
        ip.register_magics(FarmMagics(ip))
    if _px_magics(ip, "") is None:
        ip.register_magics(ParallelMagics(ip))
