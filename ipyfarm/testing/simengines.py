"""Many engines simulated at the protocol level, in one thread: a load generator.

Each simulated engine does, on the wire, what a real engine does (``engine/link.py``,
``engine/kernel.py``), signed with the cluster key (:class:`FarmSession`)::

    registration_request {uuid, connection_info, pid, hostname, properties}
        on the controller's registration port; then heartbeat_request {uuid, rss}
        every heartbeat_period (staggered over the period), and
        unregistration_request {uuid} when it stops cleanly
    its own ROUTER socket, bound on two ports: the shell and the control port the
        controller connects to. apply_request -> apply_reply (the result: the engine's
        id, pickled), execute_request -> execute_reply, clear/abort/signal requests ->
        their replies, shutdown_request -> the engine unregisters and goes away.
        Every request's signature and buffer digests are checked first.

What differs from a real engine, to keep thousands of them cheap: registrations and
heartbeats of all engines go through a few shared DEALER sockets (the controller answers
the identity each message came from, so that is allowed), all engines announce one
shared iopub port (a PUB that publishes nothing: apply requests publish no output), and
nothing runs: an apply_request is answered at once with the engine's id as its result
(``delay`` adds a fixed run time). Sockets are watched with epoll on their ZMQ_FD, so an
idle engine costs nothing per loop.

Run it as a process (``python -m ipyfarm.testing.simengines --url tcp://.. --key .. -n
1024``) or in a thread (:meth:`SimEngines.start`).
"""

from __future__ import annotations

import argparse
import collections
import heapq
import itertools
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import uuid as uuidlib
from datetime import datetime, timezone
from typing import Any

import zmq

from ipyfarm import directzmq
from ipyfarm.protocol.messages import SchemaError, validate
from ipyfarm.protocol.serialize import dumps
from ipyfarm.protocol.session import (
    DELIM,
    FarmSession,
    SignatureError,
    buffer_digest,
    frames_bytes,
    split_identities,
)

__all__ = ["SimEngines", "load_client", "raise_limits"]

CONTROL_REPLIES = {"clear_request": "clear_reply", "abort_request": "abort_reply",
                   "signal_request": "signal_reply"}


def raise_limits(context: zmq.Context, sockets: int) -> None:
    """Let ``context`` hold ``sockets`` sockets, and the process as many files.

    libzmq's default is 1023 sockets per context; it must be raised before the context's
    first socket. Each socket costs a file descriptor or two (its mailbox, its
    connections): the soft limit on open files goes up to the hard one.
    """
    context.max_sockets = max(context.max_sockets, sockets + 64)
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, max(soft, 3 * sockets + 256)) if hard != resource.RLIM_INFINITY \
            else max(soft, 3 * sockets + 256)
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


_clock: list = [0, ""]  # [whole ms, its ISO text]: one formatting per ms, not per reply


def _now_iso() -> str:
    """The current UTC time as ISO text, to the millisecond (the reply dates of many
    engines answering within the same ms share one string)."""
    ms = int(time.time() * 1000)
    if ms != _clock[0]:
        _clock[0] = ms
        _clock[1] = datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(
            timespec="milliseconds")
    return _clock[1]


class _Engine:
    __slots__ = ("index", "uuid", "sock", "shell_port", "control_port", "engine_id",
                 "result", "result_digests", "gone", "next_beat", "counter")

    def __init__(self, index: int, sock: zmq.Socket, shell_port: int, control_port: int):
        self.index = index
        self.uuid = str(uuidlib.uuid4())
        self.sock = sock
        self.shell_port = shell_port
        self.control_port = control_port
        self.engine_id: int | None = None
        self.result: list = []
        self.result_digests = ""
        self.gone = False
        self.next_beat = 0.0
        self.counter = 0


class SimEngines:
    """``n`` simulated engines registering with the controller at ``url``."""

    def __init__(self, url: str, key: bytes, n: int, ip: str = "127.0.0.1",
                 signature_scheme: str = "hmac-sha256", delay: float = 0.0,
                 reg_sockets: int = 4, heartbeats: bool = True):
        self.url = url
        self.n = n
        self.ip = ip
        self.delay = delay
        self.heartbeats = heartbeats
        self.session = FarmSession(key=key, signature_scheme=signature_scheme,
                                   username="ipyfarm-engine")
        self.context = zmq.Context()
        raise_limits(self.context, n + reg_sockets + 8)
        self.heartbeat_period = 1.0
        self.engines: list[_Engine] = []
        self.by_uuid: dict[str, _Engine] = {}
        self.registered = 0
        self.answered = 0  # task requests answered
        self.beats_sent = 0
        self.lost: list[str] = []  # why engines were dropped by the controller
        self.dropped = 0  # messages that failed their signature or schema
        self.error: BaseException | None = None
        self._ids = itertools.count()
        self._prefix = uuidlib.uuid4().hex[:12]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        # engines waiting for their registration_reply, per registration socket: the
        # controller answers each peer's requests in order (the reply names no parent)
        self._requests: list[collections.deque] = [collections.deque()
                                                    for _ in range(max(1, reg_sockets))]
        self._todo: list = []  # callables from other threads, run on the loop
        self._delayed: list = []  # heap of (due, seq, sock, frames)
        self._hostname = socket.gethostname()
        self._reg: list[zmq.Socket] = []
        for _ in range(max(1, reg_sockets)):
            s = self.context.socket(zmq.DEALER)
            s.linger = 0
            s.sndhwm = s.rcvhwm = 0
            s.connect(url)
            self._reg.append(s)
        self.iopub = self.context.socket(zmq.PUB)
        self.iopub.linger = 0
        self.iopub_port = self.iopub.bind_to_random_port(f"tcp://{ip}")
        for i in range(n):
            s = self.context.socket(zmq.ROUTER)
            s.linger = 0
            s.sndhwm = s.rcvhwm = 0
            shell = s.bind_to_random_port(f"tcp://{ip}")
            control = s.bind_to_random_port(f"tcp://{ip}")
            eng = _Engine(i, s, shell, control)
            self.engines.append(eng)
            self.by_uuid[eng.uuid] = eng
        self._epoll = select.epoll()
        self._by_fd: dict[int, Any] = {}
        for s in self._reg:
            self._watch(s, s)
        for eng in self.engines:
            self._watch(eng.sock, eng)
        self._epoll.register(self._wake_r, select.EPOLLIN)

    def _watch(self, sock: zmq.Socket, what: Any) -> None:
        fd = sock.getsockopt(zmq.FD)
        self._by_fd[fd] = (sock, what)
        self._epoll.register(fd, select.EPOLLIN)

    # ------------------------------------------------------------------ control
    def start(self) -> SimEngines:
        """Run the engines on a daemon thread (they register at once)."""
        self._thread = threading.Thread(target=self.run, name="ipyfarm-simengines", daemon=True)
        self._thread.start()
        return self

    def stop(self, unregister: bool = True, timeout: float = 10.0) -> None:
        """Stop every engine (unregistering them first) and close all sockets."""
        if unregister:
            self.call(lambda: [self._unregister(e) for e in self.engines if not e.gone])
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the simulated engines' thread did not stop within "
                                   f"{timeout} s")

    def call(self, fn: Any) -> None:
        """Run ``fn()`` on the engines' thread (soon)."""
        self._todo.append(fn)
        os.write(self._wake_w, b"x")

    def unregister(self, indices: list[int]) -> None:
        """These engines send unregistration_request and go away (a clean exit)."""
        self.call(lambda: [self._unregister(self.engines[i]) for i in indices])

    def vanish(self, indices: list[int]) -> None:
        """These engines go silent and close their sockets (a crash: no goodbye)."""
        self.call(lambda: [self._close_engine(self.engines[i]) for i in indices])

    def engine_ids(self) -> list[int]:
        return sorted(e.engine_id for e in self.engines if e.engine_id is not None
                      and not e.gone)

    def wait_registered(self, n: int | None = None, timeout: float = 60.0) -> bool:
        want = self.n if n is None else n
        deadline = time.monotonic() + timeout
        while self.registered < want and time.monotonic() < deadline:
            if self.error is not None:
                raise RuntimeError(f"the simulated engines failed: {self.error!r}")
            time.sleep(0.01)
        return self.registered >= want

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        try:
            self._loop()
            while self._todo:  # what stop() asked for (unregistrations)
                self._todo.pop(0)()
        except BaseException as e:  # reported to whoever waits on us
            self.error = e
            raise
        finally:
            self._close()

    def _loop(self) -> None:
        t0 = time.monotonic()
        for eng in self.engines:
            self._send_reg(eng, "registration_request", self._registration(eng))
        period = self.heartbeat_period
        for eng in self.engines:  # spread over one period, as independent engines would be
            eng.next_beat = t0 + period * (1 + eng.index / max(1, self.n))
        beats = [(e.next_beat, e.index) for e in self.engines]
        heapq.heapify(beats)
        # sockets to drain now: a zmq FD only signals changes, so a socket is drained
        # until EAGAIN, and again whenever a send may have consumed its signal
        pending = [(s, w) for s, w in self._by_fd.values()]
        sent: set = set()
        while not self._stop.is_set():
            while self._todo:
                self._todo.pop(0)()
                pending.extend((s, s) for s in self._reg)
            for sock, what in pending:
                self._drain(sock, what)
            pending = []
            now = time.monotonic()
            while self.heartbeats and beats and beats[0][0] <= now:
                _, i = heapq.heappop(beats)
                eng = self.engines[i]
                if eng.gone:
                    continue
                if eng.engine_id is not None:
                    self._send_reg(eng, "heartbeat_request", {"uuid": eng.uuid, "rss": None})
                    self.beats_sent += 1
                eng.next_beat = now + self.heartbeat_period
                heapq.heappush(beats, (eng.next_beat, i))
                sent.add(self._reg[i % len(self._reg)])
            while self._delayed and self._delayed[0][0] <= now:
                _, _, eng, frames = heapq.heappop(self._delayed)
                if not eng.gone:
                    self._send(eng.sock, frames)
                    sent.add(eng)
            # a send can consume the FD's signal of a message that arrived meanwhile:
            # look at those sockets again next time round
            for what in sent:
                pending.append((what.sock, what) if isinstance(what, _Engine) else (what, what))
            sent.clear()
            nxt = beats[0][0] if beats and self.heartbeats else now + 1.0
            if self._delayed:
                nxt = min(nxt, self._delayed[0][0])
            timeout = max(0.0, nxt - time.monotonic())
            for fd, _ in self._epoll.poll(timeout):
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                entry = self._by_fd.get(fd)
                if entry is not None:
                    pending.append(entry)

    def _drain(self, sock: zmq.Socket, what: Any) -> None:
        for _ in range(100000):
            try:
                frames = directzmq.try_recv(sock)
            except zmq.ZMQError:
                return
            if frames is None:
                if not directzmq.readable(sock):
                    return
                continue
            if isinstance(what, _Engine):
                self._on_request(what, frames)
            else:
                self._on_controller(self._requests[self._reg.index(what)], frames)

    def _close(self) -> None:
        try:
            self._epoll.close()
        except OSError:
            pass
        for eng in self.engines:
            if not eng.sock.closed:
                eng.sock.close(0)
        for s in self._reg:
            s.close(2000)  # unregistrations still queued go out
        self.iopub.close(0)
        self.context.term()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _close_engine(self, eng: _Engine) -> None:
        if eng.gone:
            return
        eng.gone = True
        fd = eng.sock.getsockopt(zmq.FD)
        self._by_fd.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        eng.sock.close(0)

    def _unregister(self, eng: _Engine) -> None:
        if eng.gone:
            return
        if eng.engine_id is not None:
            self._send_reg(eng, "unregistration_request", {"uuid": eng.uuid})
        self._close_engine(eng)

    # ------------------------------------------------------------------ registration
    def _registration(self, eng: _Engine) -> dict:
        props = {"hostname": self._hostname, "pid": os.getpid(), "simulated": True,
                 "index": eng.index}
        return {
            "uuid": eng.uuid,
            "connection_info": {
                "transport": "tcp", "ip": self.ip, "shell_port": eng.shell_port,
                "iopub_port": self.iopub_port, "stdin_port": 0,
                "control_port": eng.control_port, "hb_port": 0,
            },
            "connection_file": "",
            "pid": os.getpid(),
            "hostname": self._hostname,
            "properties": props,
        }

    def _send_reg(self, eng: _Engine, msg_type: str, content: dict) -> None:
        i = eng.index % len(self._reg)
        if msg_type == "heartbeat_request":  # the most frequent: packed by hand
            header = (f'{{"msg_id":"{self._prefix}-{next(self._ids)}",'
                      f'"msg_type":"heartbeat_request","username":"ipyfarm-engine",'
                      f'"session":"{self.session.session}","date":"{_now_iso()}",'
                      '"version":"5.3"}').encode()
            parts = [header, b"{}", b"{}",
                     f'{{"uuid":"{eng.uuid}","rss":null}}'.encode()]
            self._send(self._reg[i], [DELIM, self.session.sign(parts), *parts])
            return
        self.session.send(self._reg[i], msg_type, content)
        if msg_type == "registration_request":
            self._requests[i].append(eng)

    def _on_controller(self, waiting: collections.deque, frames: list) -> None:
        try:
            _, rest = split_identities(frames)
            msg = self.session.deserialize(rest, content=True, copy=False)
            validate(msg["msg_type"], msg["content"])
        except (ValueError, SignatureError, SchemaError, KeyError):
            self.dropped += 1
            return
        content = msg["content"]
        if msg["msg_type"] == "registration_reply" and waiting:
            eng = waiting.popleft()
            if content["status"] != "ok":
                self.lost.append(f"engine {eng.index} refused: {content.get('reason')}")
                return
            eng.engine_id = int(content["engine_id"])
            self.heartbeat_period = float(content.get("heartbeat_period") or 1.0)
            eng.result = dumps(eng.engine_id)
            eng.result_digests = " ".join(buffer_digest(b) for b in eng.result)
            self.registered += 1
        elif msg["msg_type"] == "heartbeat_reply":
            if content["status"] == "unknown":
                self.lost.append("a heartbeat was answered 'unknown'")
            asked = content.get("heartbeat_period")
            if isinstance(asked, (int, float)) and asked > 0:
                self.heartbeat_period = float(asked)  # the next beats keep the new pace

    # ------------------------------------------------------------------ requests
    def _on_request(self, eng: _Engine, frames: list) -> None:
        try:
            idents, rest = split_identities(frames)
            header = self.session.verify(rest)
            msg_type = header["msg_type"]
        except (ValueError, SignatureError, KeyError, TypeError):
            self.dropped += 1
            return
        parent = frames_bytes(rest[1])
        if msg_type == "apply_request":
            reply = ("apply_reply", b'{"status":"ok"}', eng.result, eng.result_digests)
        elif msg_type == "execute_request":
            eng.counter += 1
            reply = ("execute_reply", json.dumps(
                {"status": "ok", "execution_count": eng.counter, "user_expressions": {}}
            ).encode(), [], "")
        elif msg_type in CONTROL_REPLIES:
            reply = (CONTROL_REPLIES[msg_type], b'{"status":"ok"}', [], "")
        elif msg_type == "shutdown_request":
            self._unregister(eng)
            return
        else:
            self.dropped += 1
            return
        out = self._reply(eng, idents, parent, msg_type, *reply)
        self.answered += msg_type in ("apply_request", "execute_request")
        if self.delay and msg_type in ("apply_request", "execute_request"):
            heapq.heappush(self._delayed, (time.monotonic() + self.delay, next(self._ids),
                                           eng, out))
        else:
            self._send(eng.sock, out)

    def _reply(self, eng: _Engine, idents: list, parent: bytes, request_type: str,
               msg_type: str, content: bytes, buffers: list, digests: str) -> list:
        """A signed reply built from pre-packed parts: the request's header is its parent.

        Header and metadata are JSON written by string formatting (every value is
        plain: ids, hex, ISO dates), a third of the encoder's cost.
        """
        now = _now_iso()
        extra = f',"buffer_digests":"{digests}"' if buffers else ""
        header = (f'{{"msg_id":"{self._prefix}-{next(self._ids)}","msg_type":"{msg_type}",'
                  f'"username":"ipyfarm-engine","session":"{self.session.session}",'
                  f'"date":"{now}","version":"5.3"{extra}}}').encode()
        md = (f'{{"engine_id":{eng.engine_id},"engine_uuid":"{eng.uuid}","started":"{now}",'
              f'"completed":"{now}","status":"ok","msg_type":"{request_type}",'
              '"dependencies_met":true}').encode()
        parts = [header, parent, md, content]
        return [*idents, DELIM, self.session.sign(parts), *parts, *buffers]

    @staticmethod
    def _send(sock: zmq.Socket, frames: list) -> None:
        # directzmq: one foreign call per frame, no pyzmq Frame objects (a third of the
        # cost of pyzmq's send)
        try:
            directzmq.send(sock, frames)
        except zmq.ZMQError:
            pass  # the engine was closed meanwhile, or the controller went away


def load_client(url: str, key: bytes, tasks: int, window: int = 2000,
                timeout: float = 120.0) -> dict:
    """Submit ``tasks`` load-balanced apply_requests to the controller's client port at
    ``url`` as fast as they are answered (at most ``window`` outstanding); return
    ``{"tasks", "seconds", "rate", "errors"}``.

    A load generator for the controller: each request is signed as a Client's would
    be, with its own msg_id and date, carrying a pickled ``os.getpid`` by reference and
    no arguments, one request a message; like a Client it takes batched replies
    (protocol/batch.py). Nothing else a Client does: results are counted, their status
    read, nothing unpickled. Its header is written by string formatting (plain values
    only), so that the generator takes as little as it can of the CPU the controller
    needs.
    """
    from ipyfarm.protocol.batch import BATCH, unpack
    from ipyfarm.protocol.serialize import pack_apply

    session = FarmSession(key=key, username="ipyfarm-loadgen")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 0
    sock.connect(url)
    # as a Client does: connect, saying that batched replies are understood
    session.send(sock, "connection_request", {"batch": True})
    if not sock.poll(timeout * 1000):
        raise TimeoutError(f"no connection_reply from {url} in {timeout} s")
    sock.recv_multipart()
    buffers = pack_apply(os.getpid, (), {})
    digests = " ".join(buffer_digest(b) for b in buffers)
    prefix = f"{uuidlib.uuid4().hex[:12]}-"
    head = '{"msg_id":"%s%d","msg_type":"apply_request","username":"ipyfarm-loadgen",' \
        f'"session":"{session.session}","date":"%s","version":"5.3",' \
        f'"buffer_digests":"{digests}"}}'
    rest = [b"{}", b'{"engine_id":null}', b"{}"]
    sign, send, try_recv = session.sign, directzmq.send, directzmq.try_recv
    sent = done = errors = 0
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    try:
        while done < tasks:
            while sent < tasks and sent - done < window:
                parts = [(head % (prefix, sent, _now_iso())).encode(), *rest]
                send(sock, [DELIM, sign(parts), *parts, *buffers])
                sent += 1
            if not sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
                raise TimeoutError(f"{tasks - done} of {tasks} tasks unanswered after "
                                   f"{timeout} s")
            while (frames := try_recv(sock)) is not None:
                for msg in unpack(frames[1]) if frames[0] == BATCH else [frames]:
                    _, reply = split_identities(msg)
                    done += 1
                    if b'"status":"ok"' not in frames_bytes(reply[4]).replace(b" ", b""):
                        errors += 1
    finally:
        sock.close(0)
        ctx.term()
    seconds = time.perf_counter() - t0
    return {"tasks": tasks, "seconds": seconds, "rate": tasks / seconds, "errors": errors}


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="the controller's registration address")
    p.add_argument("--key", required=True, help="the cluster key")
    p.add_argument("-n", type=int, default=1024, help="how many engines")
    p.add_argument("--ip", default="127.0.0.1")
    p.add_argument("--delay", type=float, default=0.0, help="seconds each task 'runs'")
    p.add_argument("--client", type=int, default=0, metavar="TASKS",
                   help="be a load-generating client instead: submit TASKS load-balanced "
                   "tasks to the client address --url, print the rate as JSON")
    args = p.parse_args(argv)
    if args.client:
        print(json.dumps(load_client(args.url, args.key.encode(), args.client)), flush=True)
        return 0
    sim = SimEngines(args.url, args.key.encode(), args.n, ip=args.ip, delay=args.delay)
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()
    sim.start()
    print(json.dumps({"engines": args.n, "pid": os.getpid()}), flush=True)
    while not done.wait(0.2):
        if os.getppid() != parent:  # whoever started us is gone: do not linger
            break
        if sim.error is not None or not sim._thread.is_alive():  # type: ignore[union-attr]
            print(f"simulated engines failed: {sim.error!r}", file=sys.stderr)
            return 1
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
