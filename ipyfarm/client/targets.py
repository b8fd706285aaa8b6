"""Parsing ``--targets`` text (``%px``, ``%pxconfig``) into what views accept.

A small grammar read by hand, never ``eval``'d::

    targets := "all" | item | "[" item "]"
    item    := int | int ("," int)* [","] | slice
    slice   := [int] ":" [int] [":" [int]]
    int     := ["+" | "-"] digits

``parse_targets("all") == "all"``, ``"3" -> 3``, ``"-1" -> -1``, ``"0,2,5" -> [0, 2, 5]``,
``"::2" -> slice(None, None, 2)``, ``"[0,2]" -> [0, 2]``, ``"[1:]" -> slice(1, None)``.
A bracketed single number is a list (``"[3]" -> [3]``), as in Python. Anything else
raises ``ValueError`` naming the text. Pure: no I/O, no state.
"""

from __future__ import annotations

import re

__all__ = ["Targets", "parse_targets"]

Targets = int | list[int] | slice | str

_INT = re.compile(r"[+-]?[0-9]+")


def _fail(text: str, why: str) -> ValueError:
    return ValueError(
        f"bad targets {text!r}: {why}. Use 'all', an engine id (3, -1), a comma list "
        "(0,2,5), a slice (::2, 1:3, -2:) or one of those in brackets ([0,2], [1:])")


def _int(part: str, text: str) -> int:
    part = part.strip()
    if not _INT.fullmatch(part):
        if part == text.strip():
            raise _fail(text, "it is not 'all', an engine id, a list or a slice")
        raise _fail(text, f"{part!r} is not an integer")
    return int(part)


def _slice(body: str, text: str) -> slice:
    parts = body.split(":")
    if len(parts) > 3:
        raise _fail(text, "a slice has at most two ':'")
    bounds = [None if not p.strip() else _int(p, text) for p in parts]
    bounds += [None] * (3 - len(bounds))
    if bounds[2] == 0:
        raise _fail(text, "a slice step cannot be zero")
    return slice(*bounds)


def _list(body: str, text: str) -> list[int]:
    parts = body.split(",")
    if len(parts) > 1 and not parts[-1].strip():
        parts = parts[:-1]  # one trailing comma, as Python allows
    if any(not p.strip() for p in parts):
        raise _fail(text, "an empty item in the list")
    return [_int(p, text) for p in parts]


def parse_targets(text: str) -> Targets:
    """``--targets`` text as ``"all"``, an int, a list of ints or a slice."""
    if not isinstance(text, str):
        raise TypeError(f"targets text must be a string, not {type(text).__name__}")
    body = text.strip()
    if not body:
        raise _fail(text, "it is empty")
    if body == "all":
        return "all"
    bracketed = body.startswith("[") and body.endswith("]")
    if bracketed:
        body = body[1:-1].strip()
        if not body:
            raise _fail(text, "the brackets are empty")
    elif "[" in body or "]" in body:
        raise _fail(text, "unbalanced brackets")
    if ":" in body:
        if "," in body:
            raise _fail(text, "a slice and a list cannot be mixed")
        return _slice(body, text)
    if "," in body or bracketed:
        return _list(body, text)
    return _int(body, text)
