"""A worker container's log window: the lines it wrote between two times, as the engine stamped them.

One reader for every caller — :meth:`provisioner.api.Environment.worker_log` (the Python API) and
the pytest plugin's failure report (:mod:`provisioner.testing.worker_logs`) — over
:meth:`~provisioner.runtime.engine.ContainerRuntime.logs` with ``since``/``until``: the engine
compares them with each line's own timestamp (Docker's ``docker logs --since/--until``), so a
window holds exactly the lines written in it, whatever the host's clock did to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from provisioner.bridge.client import name_sessions
from provisioner.errors import ConfigError, WorkerLostError

if TYPE_CHECKING:  # the engine package imports docker-py: not at the plugin's start
    from provisioner.runtime.engine import ContainerRuntime


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
    if runtime.container_state(container) is None:
        raise WorkerLostError(f"worker {shown} is gone (removed or replaced), and its log with it")
    lines = runtime.logs(container, tail=None, since=since, until=until).splitlines()
    kept = lines if tail is None else (lines[-tail:] if tail else [])
    if sessions:
        kept = [name_sessions(line, sessions) for line in kept]
    return WorkerLogWindow(shown, since, until, tuple(kept), len(lines) - len(kept))
