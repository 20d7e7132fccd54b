"""A worker container's log window: the lines it wrote between two times.

One reader for every caller — :meth:`provisioner.api.Environment.worker_log` (the Python API) and
the pytest plugin's failure report (:mod:`provisioner.testing.worker_logs`) — over
:meth:`~provisioner.runtime.engine.ContainerRuntime.logs`.

A line's time is the time the worker wrote it, not the engine's stamp. The engine (Docker's
json-file log driver) stamps a line when it *reads* it from the container's output, a moment
after the write: measured on this project's machine, 0.8 ms at the median and up to 61 ms with
both cores busy (2026-12-01; docs/benchmarks.md, "Worker log windows"). A window taken by the
engine's stamps alone therefore missed a line written just before its end (a 6 ms window of a
failed test, under the full suite's load) and could take in a line written just before its
start. So:

- every worker log line starts with its own UTC write time (``2026-12-01 00:41:36,984123``, to
  the microsecond: the worker's logging format, ``provisioner.bridge.worker._WriteTimeFormatter``);
  a line without one (a program's ``print``, a traceback's continuation) takes the time of the line before it;
- the reader asks the engine for the lines stamped from ``since`` on (a line is stamped after it
  was written, never before) and keeps those written from ``since`` to ``until``;
- a window that ended less than :data:`CATCH_UP_S` ago is complete once the engine holds a line
  the worker wrote after ``until`` (the output is one stream, read in order: every earlier line
  is stored too); until then the reader polls, for :data:`CATCH_UP_S` after ``until`` at most (a
  worker that wrote nothing since costs that wait). A container that is not running has had its
  output read to the end.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from provisioner.bridge.client import name_sessions
from provisioner.errors import ConfigError, WorkerLostError

if TYPE_CHECKING:  # the engine package imports docker-py: not at the plugin's start
    from provisioner.runtime.engine import ContainerRuntime


#: How long after a window's end the reader waits, at most, for the engine to store the lines the
#: worker wrote before it (seconds). The engine's lag measured 61 ms at most with both cores busy
#: (see the module's docstring); 0.5 s leaves a margin for a loaded CI machine.
CATCH_UP_S = 0.5
_POLL_S = 0.02
#: The worker's own write time at the start of a line (UTC; microseconds, or milliseconds: Python's
#: default format, workers before 2026-12-01).
_OWN_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d),(\d{3}|\d{6}) ")


def written_at(line: str) -> float | None:
    """The Unix time (seconds) a worker log line says it was written, or None for a line that does
    not start with the worker's timestamp (``2026-12-01 00:41:36,984123 ...``, UTC; or to the
    millisecond)."""
    own = _own_time(line)
    return None if own is None else own[0]


def _own_time(line: str) -> tuple[float, float] | None:
    """(write time, its resolution), both in seconds."""
    m = _OWN_TIME.match(line)
    if m is None:
        return None
    *fields, fraction = m.groups()
    year, month, day, hour, minute, second = (int(g) for g in fields)
    try:
        whole = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (OverflowError, ValueError):
        return None
    tick = 10.0 ** -len(fraction)
    return whole + int(fraction) * tick, tick


def in_window(lines: list[str], since: float, until: float, stamped_by_until: int) -> tuple[list[str], bool]:
    """``(the lines written from since to until, whether a line written after until is among
    them)``. ``lines``: a container's output from the first line the engine stamped at or after
    ``since``, oldest first; ``stamped_by_until``: how many of them the engine stamped by ``until``.
    A line without its own time takes the time of the line before it; before any such line, it is
    in the window when the engine stamped it by ``until`` (written no later than its stamp). A
    line's own time is truncated to its resolution (a microsecond, or a millisecond), so ``since``
    is too."""
    kept: list[str] = []
    current: tuple[float, float] | None = None
    for index, line in enumerate(lines):
        current = _own_time(line) or current
        if current is None:
            if index < stamped_by_until:
                kept.append(line)
            continue
        at, tick = current
        if at > until:
            return kept, True
        if at >= math.floor(since / tick) * tick:
            kept.append(line)
    return kept, False


@dataclass(frozen=True)
class WorkerLogWindow:
    """The lines one worker container wrote in a window.

    ``worker``: the container's name; ``since``/``until``: the window, Unix time in seconds
    (fractions kept), both ends included; ``lines``: the newest ``tail`` lines of the window (all
    when no ``tail`` was asked for), oldest first, without line ends; ``omitted``: how many older
    lines of the window ``tail`` left out.
    """

    worker: str
    since: float
    until: float
    lines: tuple[str, ...]
    omitted: int = 0

    @property
    def text(self) -> str:
        """The lines joined with newlines ("" for an empty window)."""
        return "\n".join(self.lines)


def check_window(since: float, until: float, tail: int | None = None) -> None:
    """Raises :class:`ConfigError` naming the argument at fault: a time that is not a finite number
    of seconds, ``since`` after ``until``, or a negative ``tail``."""
    for name, value in (("since", since), ("until", until)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} is not a time: give Unix seconds, e.g. time.time()")
    if since > until:
        raise ConfigError(f"since={since} is after until={until}: the window would be empty; swap them")
    if tail is not None and tail < 0:
        raise ConfigError(f"tail={tail} must be 0 or more (None: every line of the window)")


def read_window(
    runtime: ContainerRuntime,
    container: str,
    since: float,
    until: float,
    *,
    tail: int | None = None,
    name: str | None = None,
    sessions: Mapping[str, str] | None = None,
) -> WorkerLogWindow:
    """The lines ``container`` (id or name) wrote from ``since`` to ``until`` (Unix seconds), the
    newest ``tail`` of them (None: all). ``name``: the worker's name in the result (default
    ``container``). ``sessions``: session id -> the caller's name for it; a line naming one of
    these sessions names it ``<name> (<session id>)`` (:func:`name_sessions`).

    Raises:
        ConfigError: a bad window (:func:`check_window`).
        WorkerLostError: the container is gone (removed, or replaced by a new one under another
            name), and its log with it.
    """
    check_window(since, until, tail)
    shown = name or container
    state = runtime.container_state(container)
    if state is None:
        raise WorkerLostError(f"worker {shown} is gone (removed or replaced), and its log with it")
    deadline = until + CATCH_UP_S
    while True:
        read_at = time.time()
        output = runtime.logs(container, tail=None, since=since).splitlines()
        # Only lines before the first with the worker's own time go by the engine's stamp: ask which
        # of them the engine stamped by until (a prefix of the output) only when there are any.
        stamped = 0
        if output and written_at(output[0]) is None:
            stamped = len(runtime.logs(container, tail=None, since=since, until=until).splitlines())
        lines, complete = in_window(output, since, until, stamped)
        if complete or read_at >= deadline or not state.running:
            break
        time.sleep(min(_POLL_S, max(deadline - read_at, 0.0)))
    kept = lines if tail is None else (lines[-tail:] if tail else [])
    if sessions:
        kept = [name_sessions(line, sessions) for line in kept]
    return WorkerLogWindow(shown, since, until, tuple(kept), len(lines) - len(kept))
