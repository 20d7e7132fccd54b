"""poll_until: the one polling loop of the host side."""

from __future__ import annotations

import threading

import pytest

from provisioner.runtime.polling import poll_until


def test_poll_until_returns_true_once_the_check_passes() -> None:
    calls = iter([False, False, True])
    assert poll_until(lambda: next(calls), 60.0, 0.0) is True


def test_poll_until_checks_at_least_once_and_returns_false_at_the_deadline() -> None:
    count = 0

    def never() -> bool:
        nonlocal count
        count += 1
        return False

    assert poll_until(never, 0.0, 0.0) is False
    assert count == 1


def test_a_check_that_raises_ends_the_wait_with_its_error() -> None:
    def exited() -> bool:
        raise RuntimeError("container exited")

    with pytest.raises(RuntimeError, match="container exited"):
        poll_until(exited, 60.0, 0.0)


def test_setting_stop_wakes_the_wait_so_the_check_sees_it_at_once() -> None:
    stop = threading.Event()
    seen: list[bool] = []

    def check() -> bool:
        seen.append(stop.is_set())
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()  # as another thread would: the 600 s interval must not be waited out
        return False

    with pytest.raises(KeyboardInterrupt):
        poll_until(check, 600.0, 600.0, stop=stop)
    assert seen == [False, True]
