"""A user-space TCP proxy for fault tests: pass, delay, black-hole or cut a connection.

    proxy = TcpProxy("127.0.0.1", upstream_port)    # listens on 127.0.0.1:proxy.port
    proxy.mode = "delay"; proxy.delay = 0.5          # every chunk waits 0.5 s, both ways
    proxy.mode = "blackhole"                          # bytes are read and thrown away
    proxy.cut()                                       # close every connection; refuse new
    proxy.mode = "pass"                               # back to normal (new connections work)
    proxy.close()

Threads only (one acceptor, two pumps per connection); every socket has a timeout so
``close()`` ends them all promptly.
"""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["TcpProxy"]


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.mode = "pass"
        self.delay = 0.0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.accepted = 0
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                down, _ = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            if self.mode == "cut":
                down.close()
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                down.close()
                continue
            self.accepted += 1
            for s in (down, up):
                s.settimeout(0.1)
            with self._lock:
                self._conns += [down, up]
            self._spawn(self._pump, down, up)
            self._spawn(self._pump, up, down)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                data = src.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                break
            if not data:
                break
            if self.mode == "blackhole":
                continue
            if self.mode == "delay" and self.delay:
                time.sleep(self.delay)
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        """Close every open connection and refuse new ones until ``mode`` changes."""
        self.mode = "cut"
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self.listener.close()
        for t in self._threads:
            t.join(2)
