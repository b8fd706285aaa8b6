"""The interpreter switch interval ipyfarm's threads ask for, and give back (pure)."""

import sys

import pytest

from ipyfarm import switching


@pytest.fixture
def interval():
    before = sys.getswitchinterval()
    assert switching._users == 0, "a cluster of this process is running: it holds the interval"
    sys.setswitchinterval(0.005)
    users = switching._users
    yield
    assert switching._users == users  # each enter had its leave
    sys.setswitchinterval(before)


def test_lowered_while_threads_serve_and_restored_after_the_last(interval, monkeypatch):
    monkeypatch.delenv("IPYFARM_SWITCH_INTERVAL", raising=False)
    switching.enter()
    assert sys.getswitchinterval() == pytest.approx(switching.DEFAULT)
    switching.enter()  # a second thread (controller and client in one process)
    switching.leave()
    assert sys.getswitchinterval() == pytest.approx(switching.DEFAULT)
    switching.leave()
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_a_value_changed_meanwhile_is_left_alone(interval, monkeypatch):
    monkeypatch.delenv("IPYFARM_SWITCH_INTERVAL", raising=False)
    switching.enter()
    sys.setswitchinterval(0.002)  # the user's own choice, made while a cluster ran
    switching.leave()
    assert sys.getswitchinterval() == pytest.approx(0.002)


def test_environment_chooses_or_turns_it_off(interval, monkeypatch):
    monkeypatch.setenv("IPYFARM_SWITCH_INTERVAL", "0.001")
    switching.enter()
    assert sys.getswitchinterval() == pytest.approx(0.001)
    switching.leave()
    monkeypatch.setenv("IPYFARM_SWITCH_INTERVAL", "0")
    switching.enter()
    assert sys.getswitchinterval() == pytest.approx(0.005)
    switching.leave()
    monkeypatch.setenv("IPYFARM_SWITCH_INTERVAL", "0.05")  # never raised above Python's
    switching.enter()
    assert sys.getswitchinterval() == pytest.approx(0.005)
    switching.leave()
    assert sys.getswitchinterval() == pytest.approx(0.005)
