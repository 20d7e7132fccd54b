"""A worker log window places each line by the time the worker wrote it, not by the engine's later
stamp, and waits for the engine to store the lines written before a recent window's end (on the
fake engine, whose stamps can be set to lag behind the writes)."""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import pytest

from provisioner.bridge.worker import _WriteTimeFormatter
from provisioner.errors import WorkerLostError
from provisioner.runtime import logs
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.recipes import ContainerRecipe


def _line(at: float, text: str) -> str:
    """A line as the worker writes it: its own UTC write time to the microsecond first."""
    formatter = _WriteTimeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, text, None, None)
    record.created = at
    return formatter.format(record)


def _worker(rt: FakeRuntime) -> Any:
    cid = rt.create_container(ContainerRecipe(name="w0", image="img", role="worker", command=(),
                                              environment={}, labels={}, networks=()))
    rt.start_container(cid)
    return rt.containers[cid]


def test_the_worker_format_gives_the_write_time_and_other_lines_none() -> None:
    at = datetime.datetime(2026, 12, 1, 0, 41, 36, 984000, tzinfo=datetime.UTC).timestamp()
    assert logs.written_at("2026-12-01 00:41:36,984 INFO provisioner.bridge: x") == pytest.approx(at)
    assert logs.written_at(_line(at, "ready")) == pytest.approx(at)
    assert logs.written_at("Traceback (most recent call last):") is None
    assert logs.written_at("2026-12-01 00:41:36,984123 INFO x") == pytest.approx(at + 0.000123)
    assert logs.written_at("2026-13-01 00:41:36,984 INFO month 13") is None


def test_requests_a_millisecond_apart_fall_on_their_sides_of_a_window_edge() -> None:
    rt = FakeRuntime(images=("img",))
    w0 = _worker(rt)
    for at, text in ((1000.0002, "before"), (1000.0005, "inside"), (1000.0008, "after")):
        w0.write_log(_line(at, text), at=1000.01)  # all stamped later, at once
    assert [line[-6:] for line in logs.read_window(rt, "w0", 1000.0004, 1000.0006).lines] == ["inside"]
    # A line written to the millisecond (Python's default format) counts from since's millisecond.
    coarse = FakeRuntime(images=("img",))
    _worker(coarse).write_log("1970-01-01 00:16:40,000 INFO x: coarse", at=1000.02)
    coarse_window = logs.read_window(coarse, "w0", 1000.0004, 1000.0006)
    assert coarse_window.lines == ("1970-01-01 00:16:40,000 INFO x: coarse",)


def test_a_line_counts_by_its_write_time_when_the_engine_stamped_it_later() -> None:
    rt = FakeRuntime(images=("img",))
    w0 = _worker(rt)
    # Written before the window, stamped inside it; written inside, stamped after its end (the lag).
    w0.write_log(_line(999.990, "before"), at=1000.02)
    w0.write_log(_line(1000.500, "inside"), at=1001.05)
    w0.write_log("  a continuation of inside", at=1001.06)
    w0.write_log(_line(1001.200, "after"), at=1001.21)
    window = logs.read_window(rt, "w0", 1000.0, 1001.0)
    assert window.lines == (_line(1000.5, "inside"), "  a continuation of inside")
    assert logs.read_window(rt, "w0", 1000.0, 1002.0, tail=1).lines == (_line(1001.2, "after"),)


def test_lines_without_a_write_time_before_any_that_has_one_count_by_the_engines_stamp() -> None:
    rt = FakeRuntime(images=("img",))
    w0 = _worker(rt)
    for at, text in ((10.0, "print a"), (20.0, "print b"), (30.0, "print c")):
        w0.write_log(text, at=at)
    assert logs.read_window(rt, "w0", 15.0, 25.0).lines == ("print b",)


class _Lagging:
    """The fake engine, storing the worker's last line only from the ``shows_at``-th read on: the
    engine reading the container's output a moment after the worker wrote it."""

    def __init__(self, rt: FakeRuntime, line: str, shows_at: int) -> None:
        self.rt, self.line, self.shows_at, self.reads = rt, line, shows_at, 0

    def container_state(self, container: str) -> Any:
        return self.rt.container_state(container)

    def logs(self, container: str, tail: int | None = None, *, since: float | None = None,
             until: float | None = None) -> str:
        self.reads += 1
        if self.reads == self.shows_at:
            self.rt.containers[self.rt._find(container).id].write_log(self.line)  # type: ignore[union-attr]
        return self.rt.logs(container, tail, since=since, until=until)


def test_a_recent_window_waits_until_the_engine_holds_a_line_written_after_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The reader stops at the line after the window (the 5th read), well before this deadline: the
    # real CATCH_UP_S (0.5 s) after `until` left a loaded machine too little time for 5 reads 20 ms
    # apart, and it gave up at its deadline instead.
    monkeypatch.setattr(logs, "CATCH_UP_S", 60.0)
    rt = FakeRuntime(images=("img",))
    w0 = _worker(rt)
    since = time.time() - 1.0
    until = time.time()
    w0.write_log(_line(until - 0.5, "inside, stored at once"))
    w0.write_log(_line(until - 0.001, "inside, stored late"), at=until + 0.01)
    lagging = _Lagging(rt, _line(until + 0.002, "after the window"), shows_at=5)
    window = logs.read_window(lagging, "w0", since, until)  # type: ignore[arg-type]
    assert window.lines == (_line(until - 0.5, "inside, stored at once"),
                            _line(until - 0.001, "inside, stored late"))
    assert lagging.reads >= 5  # it read again until the line after the window came


def test_an_idle_worker_costs_at_most_the_catch_up_wait_and_an_old_window_none() -> None:
    rt = FakeRuntime(images=("img",))
    w0 = _worker(rt)
    w0.write_log(_line(time.time(), "last line"))
    counting = _Lagging(rt, "never shown", shows_at=-1)
    logs.read_window(counting, "w0", 0.0, 100.0)  # type: ignore[arg-type]
    assert counting.reads == 1  # one read: the window ended long ago
    until = time.time()
    counting.reads = 0
    window = logs.read_window(counting, "w0", until - 1.0, until)  # type: ignore[arg-type]
    assert time.time() >= until + logs.CATCH_UP_S and counting.reads > 1
    assert [line.endswith("last line") for line in window.lines] == [True]


def test_a_stopped_worker_is_read_once_and_a_gone_one_raises() -> None:
    rt = FakeRuntime(images=("img",))
    w0 = _worker(rt)
    rt.crash(w0.id)  # exited
    counting = _Lagging(rt, "never shown", shows_at=-1)
    until = time.time()
    logs.read_window(counting, "w0", until - 1.0, until)  # type: ignore[arg-type]
    assert counting.reads == 1  # its output was read to the end: no wait
    rt.remove_container(w0.id)
    with pytest.raises(WorkerLostError, match="worker w0 is gone"):
        logs.read_window(rt, "w0", 0.0, 1.0)
