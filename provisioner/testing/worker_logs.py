"""A failed test's bridge-worker log lines from its own time window, for pytest's failure report.

A test that used a worker container — an isolated session pinned to a pool worker (``isolated`` /
``bridge``), its dedicated worker (``bridge_worker``), or the pool itself (``bridge_pool``) — and
failed gets one report section per worker: the lines that worker wrote between the test's start and
the end of the failed phase, read from the engine through
:meth:`~provisioner.runtime.engine.ContainerRuntime.logs` (``since``/``until``: the engine compares
them with each line's own timestamp), and where the worker's whole log is. The whole log is saved at
that moment to ``<run_dir>/logs/<container>.log``, because the container may be gone (a dedicated
worker is removed after the test, a pool worker at the end of the run) when someone reads the report.

Each pytest process (the only one, or an xdist worker) has its own :class:`WorkerLogs`: its containers
are its own and its tests run one after the other, so the window of a test holds that test's lines
only. Nothing touches the engine unless a test that used a worker failed.

No pytest import here: the plugin's ``pytest_runtest_makereport`` hook adds the sections.
"""

from __future__ import annotations

import datetime as _dt
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: How many lines of the window a section shows at most (the newest; the full log has them all).
MAX_LINES = 200
LOGS_DIR = "logs"


@dataclass(frozen=True)
class WorkerLogExcerpt:
    """One worker's lines of one test's window. ``since``/``until``: Unix seconds; ``lines``: the
    newest :data:`MAX_LINES` of the window, ``omitted``: how many older ones of it are not shown;
    ``log_path``: the saved full log (None when the container was gone); ``problem``: why there are
    no lines (the container was gone, the engine did not answer)."""

    worker: str
    since: float
    until: float
    lines: tuple[str, ...]
    omitted: int
    log_path: Path | None
    problem: str | None = None

    @property
    def title(self) -> str:
        """The report section's title (pytest prints it as a ``---- title ----`` rule)."""
        return f"provisioner: log of worker {self.worker}"

    def text(self) -> str:
        window = f"between {_clock(self.since)} and {_clock(self.until)} UTC (this test's window)"
        if self.problem is not None:
            head = f"no lines {window}: {self.problem}"
        elif not self.lines:
            head = f"the worker wrote no lines {window}"
        else:
            more = f", the last {len(self.lines)} shown" if self.omitted else ""
            head = f"{len(self.lines) + self.omitted} lines {window}{more}:"
        body = [head, *self.lines]
        if self.log_path is not None:
            body.append(f"full log: {self.log_path} (`docker logs {self.worker}` while the container exists)")
        return "\n".join(body) + "\n"


def _clock(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.UTC).strftime("%H:%M:%S.%f")[:-3]


class WorkerLogs:
    """Which worker containers each test of this process used, and their log excerpts on failure.

    ``runtime()`` gives this process's :class:`~provisioner.runtime.engine.ContainerRuntime` (None
    before it has one: then no test used a worker); ``log_dir`` receives the saved full logs;
    ``session_labels()``: session id -> the test node id that opened it (a line naming one of
    them shows the node id next to the id).
    """

    def __init__(self, runtime: Callable[[], Any | None], log_dir: Path, *,
                 max_lines: int = MAX_LINES,
                 session_labels: Callable[[], Mapping[str, str]] | None = None) -> None:
        self._runtime = runtime
        self._session_labels = session_labels
        self.log_dir = log_dir
        self.max_lines = max_lines
        self._lock = threading.Lock()
        # test id -> {container name: container id or name}, in the order the test used them
        self._used: dict[str, dict[str, str]] = {}
        self._written: dict[str, list[str]] = {}  # test id -> full logs saved for it
        self._retained: dict[str, list[str]] = {}  # test id -> its workers kept for debugging

    # -- what a test used ----------------------------------------------------------------------------

    def used(self, test_id: str, name: str, container: str | None = None) -> None:
        """The test used the worker container ``name`` (``container``: its id, if known)."""
        with self._lock:
            self._used.setdefault(test_id, {}).setdefault(name, container or name)

    def used_session(self, test_id: str, session_id: str, pool: Any) -> None:
        """The test opened session ``session_id`` of ``pool`` (a :class:`~provisioner.runtime.pool.
        WorkerPool`): it used the worker the session is pinned to."""
        try:
            name = pool.session(session_id).worker
        except Exception:  # the worker is already lost: nothing to point at
            return
        self.used(test_id, str(name))

    def used_pool(self, test_id: str, pool: Any) -> None:
        """The test used ``pool`` itself (``bridge_pool``): any of its current workers."""
        for worker in pool.stats().get("workers", ()):
            self.used(test_id, str(worker["name"]))

    def retained(self, test_id: str, name: str) -> None:
        """The test's worker ``name`` was kept for debugging (``retain_on_failure``)."""
        with self._lock:
            self._retained.setdefault(test_id, []).append(name)

    def workers_of(self, test_id: str) -> list[str]:
        with self._lock:
            return list(self._used.get(test_id, {}))

    # -- the failure report --------------------------------------------------------------------------

    def excerpts(self, test_id: str, since: float, until: float) -> list[WorkerLogExcerpt]:
        """For each worker the test used: its lines written from ``since`` to ``until`` (Unix seconds),
        and its whole log saved to :attr:`log_dir` (overwritten by a later failure: it grows)."""
        with self._lock:
            used = dict(self._used.get(test_id, {}))
        if not used:
            return []
        runtime = self._runtime()
        out = []
        for name, container in used.items():
            if runtime is None:
                out.append(WorkerLogExcerpt(name, since, until, (), 0, None, "no container engine"))
                continue
            out.append(self._excerpt(runtime, test_id, name, container, since, until))
        return out

    def _excerpt(self, runtime: Any, test_id: str, name: str, container: str, since: float,
                 until: float) -> WorkerLogExcerpt:
        from provisioner.errors import WorkerLostError
        from provisioner.runtime.logs import read_window

        try:
            sessions = self._session_labels() if self._session_labels is not None else None
            window = list(read_window(runtime, container, since, until, name=name, sessions=sessions).lines)
            whole = runtime.logs(container, tail=None)
        except WorkerLostError:
            return WorkerLogExcerpt(name, since, until, (), 0, None,
                                    "the container is gone (removed or replaced), and its log with it")
        except Exception as exc:  # a report section must never fail the report
            return WorkerLogExcerpt(name, since, until, (), 0, None,
                                    f"the engine did not give the log: {exc}")
        full = self.log_dir / f"{name}.log"
        path: Path | None = full
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            full.write_text(whole if not whole or whole.endswith("\n") else whole + "\n", encoding="utf-8")
        except OSError:
            path = None
        else:
            with self._lock:
                saved = self._written.setdefault(test_id, [])
                if str(path) not in saved:
                    saved.append(str(path))
        shown = window[-self.max_lines:] if self.max_lines else []
        return WorkerLogExcerpt(name, since, until, tuple(shown), len(window) - len(shown), path)

    def finish(self, test_id: str) -> tuple[list[str], list[str]]:
        """Forget the test (after its teardown): ``(full logs saved for it, its retained workers)``."""
        with self._lock:
            self._used.pop(test_id, None)
            return self._written.pop(test_id, []), self._retained.pop(test_id, [])
