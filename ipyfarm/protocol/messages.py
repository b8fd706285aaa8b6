"""Every message type ipyfarm sends, with the content keys it must carry.

Who talks to whom (all Jupyter-format, signed with the cluster key)::

    client DEALER ──► controller ROUTER "client"       requests, hub queries
    engine DEALER ──► controller ROUTER "registration" registration, heartbeats
    controller DEALER ──► engine ROUTER shell          forwarded task requests
    controller DEALER ──► engine ROUTER control        abort / clear / signal / shutdown
    controller SUB ◄── engine XPUB iopub               outputs, relayed to the owning client

Task requests (``execute_request``, ``apply_request``) carry routing in their
*metadata*: ``engine_id`` (int) for a direct task; ``null`` for a load-balanced one,
which may add ``after`` / ``follow`` (a list of msg_ids, or ``{"ids", "all",
"success", "failure"}``), ``timeout`` (s), ``targets`` (engine ids), ``retries``,
``label`` and ``placement`` (a base64 cloudpickle of a predicate on an engine's
properties: the one user object the controller unpickles). The controller reads the
header and metadata, never the buffers, and forwards the frames unchanged.

:func:`validate` checks a decoded content dict against its schema; the
controller and engines drop (and log) a message that does not fit.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SCHEMAS", "SchemaError", "validate"]


class SchemaError(ValueError):
    """Decoded content does not match its message type's schema."""


_num = (int, float)
_ids = (list,)

# msg_type -> {key: accepted types}; keys listed are required, others are allowed
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    # client -> engine (through the controller)
    "execute_request": {"code": (str,)},
    "apply_request": {},
    # engine -> client (through the controller)
    "execute_reply": {"status": (str,)},
    "apply_reply": {"status": (str,)},
    # engine <-> controller
    "registration_request": {
        "uuid": (str,),
        "connection_info": (dict,),
        "pid": (int,),
        "hostname": (str,),
    },
    "registration_reply": {"status": (str,)},
    "unregistration_request": {"uuid": (str,)},
    "heartbeat_request": {"uuid": (str,)},
    "heartbeat_reply": {"status": (str,)},
    # controller -> engine, on control
    "abort_request": {"msg_ids": _ids},
    "abort_reply": {"status": (str,)},
    "clear_request": {},
    "clear_reply": {"status": (str,)},
    "signal_request": {"signum": (int,)},
    "signal_reply": {"status": (str,)},
    "shutdown_request": {"restart": (bool,)},
    # client <-> controller
    "connection_request": {},
    "connection_reply": {"engines": (dict,)},
    "queue_request": {"targets": (list, type(None))},
    "queue_reply": {"status": (str,)},
    "result_request": {"msg_ids": _ids},
    "result_reply": {"status": (str,)},
    "history_request": {},
    "history_reply": {"history": (list,)},
    "purge_request": {"msg_ids": (list, str), "engine_ids": (list,)},
    "purge_reply": {"status": (str,)},
    "resubmit_request": {"msg_ids": _ids},
    "resubmit_reply": {"status": (str,)},
    "db_request": {"query": (dict,)},
    "status_request": {},
    # a notebook frontend -> an engine's comm (ipywidgets made on engines), and back
    "comm_open": {"comm_id": (str,)},
    "comm_msg": {"comm_id": (str,)},
    "comm_close": {"comm_id": (str,)},
    "status_reply": {"status": (str,)},
    "db_reply": {"status": (str,)},
    "hub_abort_request": {"msg_ids": (list, type(None)), "targets": (list, type(None))},
    "hub_abort_reply": {"status": (str,)},
    "hub_clear_request": {"targets": (list, type(None))},
    "hub_clear_reply": {"status": (str,)},
    "hub_signal_request": {"targets": (list, type(None)), "signum": (int,)},
    "hub_signal_reply": {"status": (str,)},
    "hub_shutdown_request": {"targets": (list, type(None)), "hub": (bool,)},
    "hub_shutdown_reply": {"status": (str,)},
    # controller -> every client
    "registration_notification": {"engine_id": (int,), "info": (dict,)},
    "unregistration_notification": {"engine_id": (int,), "reason": (str,)},
    "hub_shutdown_notification": {},
}


def validate(msg_type: str, content: Any) -> None:
    """Raise :class:`SchemaError` unless ``content`` fits ``msg_type``'s schema."""
    schema = SCHEMAS.get(msg_type)
    if schema is None:
        raise SchemaError(f"unknown message type {msg_type!r}")
    if not isinstance(content, dict):
        raise SchemaError(f"{msg_type}: content must be a dict, got {type(content).__name__}")
    for key, types in schema.items():
        if key not in content:
            raise SchemaError(f"{msg_type}: missing key {key!r}")
        if not isinstance(content[key], types):
            raise SchemaError(
                f"{msg_type}: {key!r} must be {' or '.join(t.__name__ for t in types)}, "
                f"got {type(content[key]).__name__}"
            )
