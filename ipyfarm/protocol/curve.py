"""When CurveZMQ encryption is on, and where its keys are recorded (pure: no sockets).

Authentication stays where it was: every message carries an HMAC signature made with the
cluster key. Curve adds confidentiality on the wire. A cluster has one Curve keypair; its
public and secret keys travel in the controller file next to the HMAC key (the file is
mode 0600 and already is the cluster secret). The socket side (setting the options on
zmq sockets) is :mod:`ipyfarm.curve`; this module stays free of zmq like the rest of
``protocol/``.
"""

from __future__ import annotations

import ipaddress

__all__ = ["PLAINTEXT_WARNING", "is_loopback", "keys_from", "record", "wanted"]

#: logged when a controller listens beyond loopback with Curve switched off
PLAINTEXT_WARNING = (
    "the controller listens on {ip} without CurveZMQ encryption (curve=False / "
    "--no-curve): code, arguments and results cross the network in plain text (messages "
    "are still signed, so they cannot be forged, only read). Leave Curve on unless the "
    "network is trusted."
)

_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def is_loopback(ip: str) -> bool:
    """Whether ``ip`` (an address or ``localhost``) only reaches this host."""
    ip = ip.strip().strip("[]")
    if ip.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:  # a host name, "*": assume it reaches beyond this host
        return False


def wanted(ip: str, curve: bool | None = None) -> bool:
    """Whether a controller listening on ``ip`` encrypts: ``curve`` if given, else on
    exactly when ``ip`` is not a loopback address (``0.0.0.0`` and ``*`` included)."""
    if curve is not None:
        return bool(curve)
    return not is_loopback(ip)


def keys_from(info: dict) -> tuple[str, str] | None:
    """The cluster keypair ``(public, secret)`` a controller file records, or None when
    the cluster runs without Curve."""
    public, secret = info.get("curve_publickey"), info.get("curve_secretkey")
    if isinstance(public, str) and isinstance(secret, str) and public and secret:
        return public, secret
    return None


def record(public: str, secret: str) -> dict[str, str]:
    """The controller-file fields for the cluster keypair (the names Jupyter's kernel
    connection files use for the same keys)."""
    return {"curve_publickey": public, "curve_secretkey": secret}
