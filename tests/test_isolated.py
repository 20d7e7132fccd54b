from __future__ import annotations

import pytest

from provisioner.errors import CleanupError, ClosedError
from provisioner.factories import SessionFactory
from provisioner.isolated import IsolatedTest


def _test() -> IsolatedTest:
    return IsolatedTest(spec=SessionFactory.build(), adapter=object(), layer="unit")


def test_exposes_the_session_identity() -> None:
    test = _test()
    assert test.namespace == test.spec.namespace
    assert test.session_id.startswith("session_")
    assert test.program_id("qa") == f"{test.program_prefix}qa"


def test_cleanups_run_in_reverse_order_with_arguments() -> None:
    calls: list[object] = []
    test = _test()
    test.add_cleanup(calls.append, 1)
    test.add_cleanup(lambda *, value: calls.append(value), value=2)
    test.add_cleanup(calls.append, 3)
    test.close()
    assert calls == [3, 2, 1]
    test.close()  # idempotent
    assert calls == [3, 2, 1]


def test_a_failing_cleanup_does_not_stop_the_others() -> None:
    calls: list[str] = []

    def broken() -> None:
        raise OSError("disk gone")

    test = _test()
    test.add_cleanup(calls.append, "first-added")
    test.add_cleanup(broken)
    test.add_cleanup(calls.append, "last-added")
    with pytest.raises(CleanupError, match=r"1 cleanup\(s\) failed: .*broken: OSError: disk gone") as info:
        test.close()
    assert calls == ["last-added", "first-added"]
    assert isinstance(info.value.failures[0][1], OSError)


def test_context_manager_runs_cleanups_when_the_body_raises() -> None:
    calls: list[str] = []
    with pytest.raises(ZeroDivisionError), _test() as test:
        test.add_cleanup(calls.append, "cleaned")
        _ = 1 / 0
    assert calls == ["cleaned"]


def test_add_cleanup_validates() -> None:
    test = _test()
    with pytest.raises(TypeError, match="callable"):
        test.add_cleanup("not callable")  # type: ignore[arg-type]
    test.close()
    with pytest.raises(ClosedError, match="already closed"):
        test.add_cleanup(print)
