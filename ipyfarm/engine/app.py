"""``python -m ipyfarm.engine``: an IPython kernel application that joins a controller.

::

    python -m ipyfarm.engine --controller-file FILE [--ip IP] [--parent-pid PID] [--log-level L]
    python -m ipyfarm.engine --url tcp://HOST:PORT --key HEX [...]
    ... | python -m ipyfarm.engine --controller-file -    # its JSON on stdin (ssh launcher)
    mpiexec -n 4 python -m ipyfarm.engine --controller-file FILE --mpi   # ids = MPI ranks
    python -m ipyfarm.engine -f CONNECTION_FILE          # a plain kernel, as Jupyter starts it

Startup: parse arguments → read the controller file (key, registration address) → bind the
five kernel ports on 127.0.0.1 (or ``--ip``) → write ``ipyfarm-engine-<uuid>.json`` (0600)
in the Jupyter runtime dir → build the kernel → register (blocking, up to 30 s) → serve.
The engine exits when the controller stops answering heartbeats, answers ``unknown``, or
when ``--parent-pid`` exits; SIGTERM and ``shutdown_request`` exit cleanly (unregistering),
and so does end-of-file on stdin after ``--controller-file -``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from typing import Any

import zmq
from ipykernel.kernelapp import IPKernelApp, kernel_aliases, kernel_flags
from traitlets import Bool, Dict, Float, Integer, TraitError, Type, Unicode, default, validate

from ipyfarm import curve
from ipyfarm.engine.capture import EngineSession
from ipyfarm.engine.kernel import EngineExit, FarmKernel
from ipyfarm.engine.lifeline import read_stdin_line, watch_process, watch_stdin
from ipyfarm.engine.link import ControllerLink, RegistrationError
from ipyfarm.engine.mpi import MPIStartError, join_world, rank_from_env
from ipyfarm.engine.properties import engine_properties
from ipyfarm.protocol.session import FarmSession

__all__ = ["EngineStartError", "FarmEngineApp", "main"]

#: seconds between "the controller is gone" and a forced exit, if the engine is stuck in
#: user code and cannot stop by itself
EXIT_GRACE = 3.0
#: seconds a SIGTERM leaves the engine to stop cleanly (unregister, remove its connection
#: file, end its threads) before it is forced out; under the local launcher's 5 s between
#: SIGTERM and SIGKILL, so that the forced exit still unregisters and cleans up
TERM_GRACE = 4.0

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class EngineStartError(RuntimeError):
    """The engine cannot start; the message says why and what to do."""


class MainThreadShell:
    """Stands in for ipykernel's shell channel thread when the main loop serves the shell.

    False in a boolean test, which ipykernel reads as "no shell channel thread", and it
    names the main thread as the shell's ``parent_thread``, which ipykernel asks when it
    runs a cell with top-level ``await`` (with None there, such a cell failed without
    a reply). :attr:`FarmKernel._supports_kernel_subshells` is False with it.
    """

    parent_thread = threading.main_thread()

    def __bool__(self) -> bool:
        return False


def _terminal_fd() -> int:
    """The engine's real stderr, even after the kernel has captured fd 2."""
    fd = getattr(sys.stderr, "_original_stdstream_copy", None)
    if fd is None:
        fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
    return fd


def _dump_threads() -> None:
    """Every thread's stack to the engine's real stderr (for a forced exit's report)."""
    try:
        import faulthandler

        faulthandler.dump_traceback(file=_terminal_fd(), all_threads=True)
    except Exception:  # noqa: BLE001 - the report must not stop the exit
        pass


def _error_to_terminal(text: str) -> None:
    """Write to the engine's real stderr, even after the kernel has captured fd 2."""
    try:
        os.write(_terminal_fd(), (text.rstrip("\n") + "\n").encode(errors="replace"))
    except OSError:
        pass


def read_controller_file(path: str) -> dict[str, Any]:
    """The controller file's JSON; raise EngineStartError saying what is wrong with it."""
    what_to_do = (
        "Start a cluster first (`ipyfarm start`), or pass the file of a running one "
        "(they are `ipyfarm-cluster-<profile>.json` in the Jupyter runtime dir, "
        "`jupyter --runtime-dir`)."
    )
    try:
        if path == "-":  # sent by a launcher (ssh): no shared filesystem, nothing in `ps`
            info = json.loads(read_stdin_line())
        else:
            with open(path) as f:
                info = json.load(f)
    except FileNotFoundError:
        raise EngineStartError(
            f"controller file {path} does not exist. Likely cause: the controller is not "
            f"running (it removes the file when it stops). {what_to_do}"
        ) from None
    except (OSError, ValueError) as e:
        if path == "-":
            raise EngineStartError(
                f"cannot read the controller's info from stdin (--controller-file -): {e}. "
                "Likely cause: what started the engine did not send it as one JSON line "
                "and keep stdin open (the ssh launcher does both: stdin's end stops the "
                "engine). What to do: start ssh engines with Cluster(engines='ssh') or "
                "`ipyfarm start --engines ssh`, or pass --controller-file FILE."
            ) from None
        raise EngineStartError(
            f"cannot read controller file {path}: {e}. Likely cause: the file is not an "
            f"ipyfarm controller file, or it is being written. {what_to_do}"
        ) from None
    missing = [k for k in ("key", "registration") if not isinstance(info.get(k), str)]
    if missing:
        raise EngineStartError(
            f"controller file {path} lacks {', '.join(missing)}. Likely cause: it was "
            f"written by an incompatible ipyfarm version. {what_to_do}"
        )
    return info


def _host_of(url: str) -> str:
    return url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


def _ip_facing(host: str) -> str:
    """The local address that routes to ``host`` (no packet is sent)."""
    if host in _LOOPBACK or host.startswith("127."):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class _DropPlainTcpWarning(logging.Filter):
    """ipykernel warns about unencrypted TCP on every start; on loopback it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without encryption" not in record.getMessage()


class _OneLineDrops(logging.Filter):
    """A dropped (badly signed, malformed) message is worth one line, not a traceback."""

    _MESSAGES = ("Invalid message", "Invalid Message", "Invalid Control Message")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self._MESSAGES and record.exc_info and record.exc_info[1]:
            exc = record.exc_info[1]
            record.msg = "dropped an invalid message: %s: %s"
            record.args = (type(exc).__name__, exc)
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


engine_aliases = {
    **kernel_aliases,
    "controller-file": "FarmEngineApp.controller_file",
    "url": "FarmEngineApp.url",
    "key": "FarmEngineApp.key",
    "signature-scheme": "FarmEngineApp.signature_scheme",
    "parent-pid": "FarmEngineApp.parent_pid",
    "registration-timeout": "FarmEngineApp.registration_timeout",
    "engine-uuid": "FarmEngineApp.engine_uuid",
}


class FarmEngineApp(IPKernelApp):
    """IPKernelApp running a FarmKernel, registered with an ipyfarm controller."""

    name = "ipyfarm-engine"
    description = "Start an ipyfarm engine (an IPython kernel that runs ipyfarm tasks)."
    aliases = Dict(engine_aliases)
    flags = Dict(
        {
            **kernel_flags,
            "debugger": ({"FarmEngineApp": {"debugger": True}}, "enable Jupyter's debugger"),
            "mpi": ({"FarmEngineApp": {"mpi": True}}, "join mpiexec's MPI world (mpi4py); "
                    "ask for engine id = MPI rank"),
        }
    )
    kernel_class = Type(FarmKernel, klass="ipykernel.kernelbase.Kernel").tag(config=True)

    controller_file = Unicode("", help="the controller's JSON file (key, registration); "
                              "'-': one line on stdin, and exit when stdin closes").tag(
        config=True
    )
    url = Unicode("", help="the controller's registration address, tcp://host:port").tag(
        config=True
    )
    key = Unicode("", help="the cluster key (hex), with --url").tag(config=True)
    signature_scheme = Unicode("hmac-sha256", help="with --url").tag(config=True)
    parent_pid = Integer(0, help="exit when this process exits").tag(config=True)
    subshells = Bool(False, help="serve Jupyter kernel subshells (ipykernel >= 7); off by "
                     "default: one thread hop less per task").tag(config=True)
    registration_timeout = Float(30.0, help="seconds to wait for the controller").tag(
        config=True
    )
    debugger = Bool(
        False, help="load debugpy so Jupyter's visual debugger works (costs ~0.1 s and "
        "~10 MB per engine)"
    ).tag(config=True)
    mpi = Bool(False, help="initialise MPI (mpi4py) and register with mpi_rank/mpi_size; "
               "automatic when mpiexec started the engine").tag(config=True)
    engine_uuid = Unicode(help="this engine's uuid (names its connection file); a new "
                          "one by default (launchers pass one, to clean up after a "
                          "killed engine)").tag(config=True)

    @validate("engine_uuid")
    def _valid_engine_uuid(self, proposal: Any) -> str:
        value = proposal["value"]
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise TraitError(f"--engine-uuid must be a UUID, not {value!r}") from None

    @default("outstream_class")
    def _default_outstream_class(self) -> str:
        return "ipyfarm.engine.capture.EngineOutStream"

    @default("engine_uuid")
    def _default_engine_uuid(self) -> str:
        return str(uuid.uuid4())

    @default("session")
    def _default_session(self) -> EngineSession:
        return EngineSession(parent=self)

    link: ControllerLink | None = None
    _exit_code = 0

    # ---- initialisation ---------------------------------------------------------------

    def initialize(self, argv: Any = None) -> None:
        self._engine_defaults()
        self.log.addFilter(_OneLineDrops())
        super().initialize(argv)
        # traitlets leaves the logger at DEBUG and filters in the handler, so every
        # log.debug on ipykernel's per-message path built a record; filter at the logger
        self.log.setLevel(self.log_level)
        if self.subapp is None and self.url:
            self._make_link()

    def _engine_defaults(self) -> None:
        # one SQLite history file shared by N engines only brings lock contention
        if "enabled" not in self.config.HistoryManager:
            self.config.HistoryManager.enabled = False

    def init_connection_file(self) -> None:
        self._read_controller()
        if self.url and not self.connection_file:
            self.connection_file = f"ipyfarm-engine-{self.engine_uuid}.json"
        super().init_connection_file()

    def _read_controller(self) -> None:
        if self.controller_file:
            info = read_controller_file(self.controller_file)
            self.url = self.url or info["registration"]
            self.key = info["key"]
            self.signature_scheme = info.get("signature_scheme", self.signature_scheme)
            host = _host_of(self.url)
            if host in ("*", "0.0.0.0", "::") and info.get("location"):
                self.url = self.url.replace(host, info["location"], 1)
            keys = curve.keys_from(info)
            if keys is not None:  # the kernel's sockets serve Curve with the cluster keypair
                self.curve_publickey, self.curve_secretkey = (k.encode() for k in keys)
        if not self.url:
            return
        if not self.key:
            raise EngineStartError(
                f"no cluster key for the controller at {self.url}. Pass --key HEX with "
                "--url, or use --controller-file FILE."
            )
        self.session.signature_scheme = self.signature_scheme
        self.session.key = self.key.encode()
        ip_given = "ip" in self.config.IPKernelApp or "ip" in self.config.FarmEngineApp
        if not ip_given and self.transport == "tcp":
            self.ip = _ip_facing(_host_of(self.url))

    def init_sockets(self) -> None:
        quiet = self.transport == "ipc" or self.ip in _LOOPBACK or self.ip.startswith("127.")
        drop = _DropPlainTcpWarning()
        if quiet:
            self.log.addFilter(drop)
        try:
            super().init_sockets()
        finally:
            self.log.removeFilter(drop)

    def _bind_socket(self, s: Any, port: int) -> Any:
        # ipykernel >= 7.4 sets Curve options from these traits itself; older ones don't
        keys = getattr(self, "curve_secretkey", None), getattr(self, "curve_publickey", None)
        if keys[0] is not None and keys[1] is not None:
            curve.serve(s, keys[1], keys[0])
        return super()._bind_socket(s, port)

    def log_connection_info(self) -> None:
        # the stock version prints a Ctrl-C note to stdout; an engine has no terminal user
        self.log.info("engine connection file: %s", self.abs_connection_file)
        self._ports = dict(
            shell=self.shell_port,
            iopub=self.iopub_port,
            stdin=self.stdin_port,
            hb=self.hb_port,
            control=self.control_port,
        )

    def init_control(self, context: Any) -> None:
        super().init_control(context)
        # ipykernel 7 routes shell messages through a "shell channel" thread (for
        # subshells) and inproc pipes: two thread hops per task. Engines run one task at
        # a time and need no subshells, so the shell socket is served by the main loop.
        thread = getattr(self, "shell_channel_thread", None)
        if thread is not None and not self.subshells:
            self.shell_channel_thread = MainThreadShell()

    def init_signal(self) -> None:
        super().init_signal()

        def terminate(signum: int, frame: Any) -> None:
            # user code that catches BaseException would swallow the EngineExit, and a
            # stuck exit would hang: either way the engine leaves after TERM_GRACE
            self._force_exit_after(TERM_GRACE, "SIGTERM")
            raise EngineExit(0)

        signal.signal(signal.SIGTERM, terminate)

    def init_kernel(self) -> None:
        if self.debugger or "ipykernel.debugger" in sys.modules:
            return super().init_kernel()
        # ipykernel imports debugpy (0.1 s) while building the kernel; hide it so that
        # ipykernel.debugger records "unavailable", then let user code import it freely
        hidden = "debugpy" not in sys.modules
        if hidden:
            sys.modules["debugpy"] = None  # type: ignore[assignment]
        try:
            import ipykernel.debugger  # noqa: F401
        finally:
            if hidden:
                del sys.modules["debugpy"]
        return super().init_kernel()

    def _mpi_properties(self) -> dict[str, Any]:
        """``{mpi_rank, mpi_size}`` when this engine runs under mpiexec, else ``{}``."""
        if not self.mpi and rank_from_env(os.environ) is None:
            return {}
        try:
            return join_world()
        except MPIStartError as e:
            if self.mpi:
                raise EngineStartError(str(e)) from None
            self.log.warning("mpiexec started this engine but MPI is not used: %s", e)
            return {}

    def _make_link(self) -> None:
        properties = engine_properties()
        properties.update(self._mpi_properties())
        self.kernel.properties = properties
        self.kernel._sent_properties = dict(properties)  # registration carries them
        registration = {
            "uuid": self.engine_uuid,
            "connection_info": {
                "transport": self.transport,
                "ip": self.ip,
                "shell_port": self.shell_port,
                "iopub_port": self.iopub_port,
                "stdin_port": self.stdin_port,
                "control_port": self.control_port,
                "hb_port": self.hb_port,
            },
            "connection_file": self.abs_connection_file,
            "pid": os.getpid(),
            "hostname": properties["hostname"],
            "properties": properties,
        }
        if "mpi_rank" in properties:  # engine ids follow ranks where the ids are free
            registration["requested_id"] = properties["mpi_rank"]
        link_session = FarmSession(
            key=self.session.key, signature_scheme=self.session.signature_scheme,
            username="ipyfarm-engine",
        )
        self.link = ControllerLink(
            self.url, link_session, self.engine_uuid, registration, self._stop_engine, self.log,
            curve_serverkey=getattr(self, "curve_publickey", None),
        )

    # ---- running ----------------------------------------------------------------------

    def start(self) -> None:
        if self.subapp is not None:
            return super().start()
        try:
            # inside the try: a SIGTERM during registration must still stop the link
            # thread, or the interpreter would wait for it at exit
            # watched before registering: a parent killed while its controller's reply is
            # still in flight would otherwise leave the engine waiting out the timeout
            if self.parent_pid:
                watch_process(self.parent_pid, self._stop_engine)
            if self.controller_file == "-":  # started over ssh: stdin EOF = session gone
                watch_stdin(self._stdin_closed)
            if self.link is not None:
                self._register()
            super().start()
        finally:
            if self.link is not None:
                self.link.stop(unregister=self._exit_code == 0)
            self._join_control_thread()
            self._cleaned_up = True
        if self._exit_code:
            self.exit(self._exit_code)
        return None

    def _join_control_thread(self) -> None:
        """Let the control thread finish its message before the atexit handlers run.

        A ``shutdown_request`` ends by flushing stdout through the iopub thread, and the
        iopub thread's own atexit handler stops it: in that order the flush waits out its
        10 s timeout.
        """
        control = self.control_thread
        if control is not None and control.is_alive():
            control.stop()
            control.join(5.0)

    def _register(self) -> None:
        assert self.link is not None
        try:
            info = self.link.register(self.registration_timeout)
        except RegistrationError as e:
            where = f"controller file {self.controller_file}" if self.controller_file else (
                f"--url {self.url}"
            )
            _error_to_terminal(
                f"ipyfarm engine {self.engine_uuid}: registration failed: {e}.\n"
                "Likely cause: the controller is not running or listens elsewhere (a stale "
                f"{where}), a firewall blocks the port, or the engine has another cluster "
                "key (the controller drops badly signed messages), or the controller "
                "encrypts (CurveZMQ, on by default beyond loopback) and the engine lacks its "
                "key: --url/--key carry none, pass --controller-file instead.\n"
                "What to do: check that the cluster is running (`ipyfarm list`), then start "
                "engines from it, or pass its current controller file."
            )
            self.exit(1)
        self.kernel.engine_id = info["engine_id"]
        self.log.info("registered as engine %s", info["engine_id"])

    def _stop_engine(self, reason: str) -> None:
        """Stop because the controller or the parent is gone (called from any thread)."""
        engine = self.kernel.engine_id if self.kernel is not None else -1
        _error_to_terminal(
            f"ipyfarm engine {engine} ({self.engine_uuid}) is exiting: {reason}.\n"
            "Its tasks and variables are lost; start new engines once the cluster is back."
        )
        self._exit_code = 1
        loop = getattr(self, "io_loop", None)
        if loop is not None:
            loop.add_callback(loop.stop)
            # a running task is interrupted (SIGINT is ignored when idle); the timer ends
            # code that ignores the interrupt
            os.kill(os.getpid(), signal.SIGINT)
            timer = threading.Timer(EXIT_GRACE, self._hard_exit)
            timer.daemon = True
            timer.start()
        else:
            self._hard_exit()

    def _stdin_closed(self) -> None:
        """The launcher closed our stdin (its ``stop()``, or its ssh session ended): stop
        as on SIGTERM (unregistering), by force if user code holds on past the grace."""
        self._force_exit_after(EXIT_GRACE, "the launcher closed its stdin")
        os.kill(os.getpid(), signal.SIGTERM)

    _cleaned_up = False
    _exit_timer: threading.Timer | None = None

    def _force_exit_after(self, seconds: float, why: str) -> None:
        """Arm (once) a timer that ends the process if it is still running ``seconds``
        from now: a task that ignores the stop, or a thread that holds up the exit."""
        if self._exit_timer is not None:
            return
        timer = threading.Timer(seconds, self._stuck_exit, args=(seconds, why))
        timer.daemon = True
        self._exit_timer = timer
        timer.start()

    def _stuck_exit(self, seconds: float, why: str) -> None:
        engine = self.kernel.engine_id if self.kernel is not None else -1
        if self._cleaned_up:
            # unregistered and threads told to stop: what is left is the interpreter's
            # own teardown (atexit handlers, one of which removes the connection file)
            text = (f"stopped after {why}, but Python's exit did not finish within "
                    f"{seconds:g} s; ending the process.")
        else:
            text = (f"did not stop within {seconds:g} s of {why}; forcing it out. Likely "
                    "cause: the running task ignores the stop (it catches BaseException "
                    "or SystemExit, or waits in code that cannot be interrupted).")
        _error_to_terminal(f"ipyfarm engine {engine} ({self.engine_uuid}) {text} "
                           "Where each thread was:")
        _dump_threads()
        if not self._cleaned_up and self.link is not None:
            self.link.stop(unregister=True, timeout=1.0)
        # asked to stop, and stopped: 0, as for a clean stop, so that a cluster that
        # restarts crashed engines does not bring this one back
        self._hard_exit(0)

    def _hard_exit(self, code: int = 1) -> None:
        """Stuck (busy in user code): remove the connection file and exit now."""
        self.cleanup_connection_file()
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m ipyfarm.engine``."""
    app = FarmEngineApp.instance()
    try:
        app.initialize(argv)
    except EngineStartError as e:
        _error_to_terminal(f"ipyfarm engine: {e}")
        sys.exit(1)
    except zmq.ZMQError as e:
        _error_to_terminal(
            f"ipyfarm engine: cannot bind the kernel ports on {app.transport}://{app.ip}: {e}.\n"
            "Likely cause: --ip is not an address of this host, or the ports given are "
            "taken.\nWhat to do: pass --ip with one of this host's addresses (or omit it), "
            "and leave the ports unset so free ones are picked."
        )
        sys.exit(1)
    app.start()
