"""The ``--targets`` grammar: parsed by hand, never eval'd."""

import builtins

import pytest

from ipyfarm.client.targets import parse_targets


@pytest.mark.parametrize("text, expected", [
    ("all", "all"),
    ("  all ", "all"),
    ("3", 3),
    ("-1", -1),
    ("+2", 2),
    ("0,2,5", [0, 2, 5]),
    ("0, 2 , 5", [0, 2, 5]),
    ("1,", [1]),
    ("::2", slice(None, None, 2)),
    ("1:3", slice(1, 3)),
    ("-2:", slice(-2, None)),
    (":", slice(None)),
    ("::-1", slice(None, None, -1)),
    ("[0,2]", [0, 2]),
    ("[ 3 ]", [3]),
    ("[1:]", slice(1, None)),
    ("[::2]", slice(None, None, 2)),
])
def test_valid_targets(text, expected):
    assert parse_targets(text) == expected


@pytest.mark.parametrize("text", [
    "", "  ", "[]", "x", "1.5", "1e3", "0x10", "1_000", "1,,2", ",1", "1:2:3:4",
    "::0", "[0,2", "0,2]", "[[0]]", "0,1:2", "all,1", "ALL", "None",
    "__import__('os')", "__import__('os').system('true')", "ids[0]", "range(3)",
    "[0] + [1]", "1 2",
])
def test_invalid_targets_name_the_text(text):
    with pytest.raises(ValueError) as info:
        parse_targets(text)
    assert repr(text) in str(info.value)
    assert "Use 'all'" in str(info.value)


def test_never_evaluates(monkeypatch):
    def no_eval(*args, **kwargs):
        raise AssertionError("parse_targets called eval/exec")

    monkeypatch.setattr(builtins, "eval", no_eval)
    monkeypatch.setattr(builtins, "exec", no_eval)
    monkeypatch.setattr(builtins, "__import__", no_eval)
    assert parse_targets("[0,2]") == [0, 2]
    with pytest.raises(ValueError):
        parse_targets("__import__('os')")


def test_non_string_is_a_type_error():
    with pytest.raises(TypeError):
        parse_targets(3)
