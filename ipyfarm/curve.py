"""CurveZMQ on zmq sockets: the cluster keypair, server and client options.

::

    controller: client + registration ROUTERs ........ Curve servers (cluster keypair)
    engines: shell, control, stdin, iopub, heartbeat .. Curve servers (same keypair)
    clients, engine links, the controller's per-engine
    DEALER/SUB sockets ................................ Curve clients: a fresh keypair each,
                                                        plus the cluster's public key

Options must be set before ``bind`` / ``connect``. No ZAP handler runs, so any client
that knows the server's public key completes the handshake; who may act is still decided
by the HMAC signature on every message (the cluster key). The policy (when Curve is on,
where the keys are recorded) is the pure :mod:`ipyfarm.protocol.curve`.
"""

from __future__ import annotations

import zmq

from .protocol.curve import PLAINTEXT_WARNING, is_loopback, keys_from, record, wanted

__all__ = ["PLAINTEXT_WARNING", "connect_as_client", "is_loopback", "keys_from",
           "new_keypair", "record", "serve", "wanted"]


def _key(key: str | bytes) -> bytes:
    return key.encode("ascii") if isinstance(key, str) else key


def new_keypair() -> tuple[str, str]:
    """A fresh Curve keypair ``(public, secret)`` as Z85 text (40 characters each)."""
    if not zmq.has("curve"):
        raise RuntimeError(
            "CurveZMQ encryption is on (the controller listens beyond loopback, or "
            "curve=True), but this libzmq was built without Curve support. Install a pyzmq "
            "wheel (they bundle libzmq with Curve), or pass curve=False / --no-curve on a "
            "trusted network."
        )
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def serve(sock: zmq.Socket, public: str | bytes, secret: str | bytes) -> None:
    """Make ``sock`` a Curve server with the cluster keypair (before ``bind``)."""
    sock.curve_secretkey = _key(secret)
    sock.curve_publickey = _key(public)
    sock.curve_server = True


def connect_as_client(sock: zmq.Socket, server_public: str | bytes | None) -> None:
    """Make ``sock`` a Curve client of the server with public key ``server_public``,
    with a keypair of its own (before ``connect``); nothing when ``server_public`` is
    None (a cluster without Curve)."""
    if not server_public:
        return
    public, secret = zmq.curve_keypair()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = _key(server_public)
