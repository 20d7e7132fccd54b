"""The resource manager: everything a run creates is tracked, released in reverse, and leak-checked.

Kinds: ``container``, ``network``, ``volume`` (engine resources, removed through the runtime),
``process`` (host processes, terminated then killed via psutil), ``tempfile`` (files or folders),
``port`` (host ports held open by something we started; released by their cleanup callback).

* :meth:`ResourceManager.track` records a resource with an owner (``"run"``, ``"session:<id>"``,
  ``"test:<nodeid>"`` ...) and, optionally, how to clean it up;
* :meth:`ResourceManager.release` cleans one up now; :meth:`cleanup_owner` everything of one owner;
  :meth:`cleanup_all` everything, newest first (containers before the networks they sit on);
* :meth:`ResourceManager.snapshot` looks at the *world* (managed engine resources by label, our
  child processes, tracked files that still exist, tracked ports still listening), and
  :func:`leaks` / :meth:`check_leaks` compare two snapshots and name whatever was left behind.

A snapshot is taken twice per test, so it must not poll the whole machine (it did: a system-wide
``psutil.net_connections()`` ≈ 30 ms and three engine list calls ≈ 15 ms per snapshot, 75 % of a
pooled suite's time, measured with cProfile — issue 10). What it looks at instead:

* **engine resources**: an :class:`EngineWatch` (one per manager, started on the first snapshot,
  a background thread) lists once, then follows the engine's event stream. A snapshot taken with
  ``sync=True`` (the one after a test) first asks the engine for the events up to *now* (one
  bounded ``since``/``until`` read) and waits until the stream has applied them, so a container
  or network created right before the check is not missed; if the stream broke or lags past
  ``sync_timeout_s``, it lists instead. Runtimes without events (:class:`EventSource`) are listed.
  A runtime that counts this process's engine writes (:class:`WriteCount`: the Docker runtime
  counts every changing request of every docker-py client in the process) spares that read when
  the count has not moved since the last exact view: nothing with this process's labels can
  have been created since (resources of another process carry its own labels).
* **processes**: this process's descendants; when the process has no child at all (one
  ``waitid(WNOHANG | WNOWAIT)`` call, which reaps nothing) there is nothing to walk.
* **ports**: only when a port is tracked, and then the sockets of this process and its
  descendants, not the machine's.
* **temp files**: ``lstat`` of the tracked paths.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from provisioner.errors import LeakError, RuntimeProblem
from provisioner.runtime import labels as L
from provisioner.runtime.engine import ContainerRuntime, EngineEvent, EventSource, EventStream

if TYPE_CHECKING:  # imported when used: psutil is not needed to import this module
    import psutil

Kind = Literal["container", "network", "volume", "process", "tempfile", "port"]
KINDS: tuple[str, ...] = ("container", "network", "volume", "process", "tempfile", "port")
Snapshot = frozenset[tuple[str, str]]


# How many applied event keys a watch remembers (duplicates the stream may deliver again are
# recognised among them); a synchronised snapshot waits for at most a quarter of that many.
APPLIED_MEMORY = 4096


@dataclass
class Resource:
    """One tracked resource. ``ident`` is what cleanup acts on (container id, pid, path, port)."""

    kind: Kind
    name: str
    ident: str
    owner: str
    seq: int
    created: float = field(default_factory=time.time)
    cleanup: Callable[[], object] | None = field(default=None, repr=False)


@dataclass
class CleanupReport:
    removed: list[Resource] = field(default_factory=list)
    errors: list[tuple[Resource, BaseException]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@runtime_checkable
class WriteCount(Protocol):
    """A runtime that knows how many requests of this process may have changed its engine."""

    def engine_writes(self) -> int:
        """A count that grows (by any amount) whenever a request that may create, change or remove
        an engine resource is sent and again when it returned."""
        ...


class ResourceManager:
    """Tracks what one controller created. Thread-safe.

    ``runtime`` is needed for engine resources' default cleanup; ``selector`` (labels) scopes the
    engine part of :meth:`snapshot` (default: every resource provisioner manages).
    ``sync_timeout_s``: how long a synchronised snapshot waits for the event stream before it
    lists the engine's resources instead. Call :meth:`close` to stop the event watch.
    """

    def __init__(
        self,
        runtime: ContainerRuntime | None = None,
        *,
        selector: Mapping[str, str] | None = None,
        process_grace_s: float = 3.0,
        sync_timeout_s: float = 10.0,
    ) -> None:
        self.runtime = runtime
        self.selector = dict(selector) if selector is not None else L.selector()
        self.process_grace_s = process_grace_s
        self.sync_timeout_s = sync_timeout_s
        self._watch: EngineWatch | None = None
        self._items: dict[int, Resource] = {}
        self._seq = itertools.count(1)
        self._lock = threading.RLock()

    # -- tracking ------------------------------------------------------------------------------------

    def track(
        self,
        kind: Kind,
        ident: str | int | Path,
        *,
        name: str | None = None,
        owner: str = "run",
        cleanup: Callable[[], object] | None = None,
    ) -> Resource:
        """Record a resource. Without ``cleanup`` the kind's default applies (see module docs)."""
        if kind not in KINDS:
            raise ValueError(f"unknown resource kind {kind!r}; expected one of {', '.join(KINDS)}")
        text = str(ident)
        with self._lock:
            res = Resource(kind, name or text, text, owner, next(self._seq), cleanup=cleanup)
            self._items[res.seq] = res
            return res

    def forget(self, resource: Resource) -> None:
        """Stop tracking without cleaning up (someone else owns it now)."""
        with self._lock:
            self._items.pop(resource.seq, None)

    def tracked(self, owner: str | None = None) -> list[Resource]:
        """Tracked resources in creation order, optionally of one owner."""
        with self._lock:
            items = sorted(self._items.values(), key=lambda r: r.seq)
        return [r for r in items if owner is None or r.owner == owner]

    def find(self, kind: Kind, ident: str) -> Resource | None:
        with self._lock:
            return next((r for r in self._items.values() if r.kind == kind and r.ident == ident), None)

    # -- cleanup -------------------------------------------------------------------------------------

    def release(self, resource: Resource) -> None:
        """Clean up one resource now and stop tracking it. Raises what its cleanup raised."""
        self._cleanup(resource)
        self.forget(resource)

    def cleanup_owner(self, owner: str) -> CleanupReport:
        """Everything of ``owner``, newest first."""
        return self._cleanup_many(self.tracked(owner))

    def cleanup_all(self) -> CleanupReport:
        """Everything, newest first. Errors are collected, not raised, so one failure stops nothing."""
        return self._cleanup_many(self.tracked())

    def _cleanup_many(self, items: list[Resource]) -> CleanupReport:
        report = CleanupReport()
        for res in reversed(items):
            try:
                self._cleanup(res)
            except Exception as exc:
                report.errors.append((res, exc))
            else:
                report.removed.append(res)
            self.forget(res)
        return report

    def _cleanup(self, res: Resource) -> None:
        if res.cleanup is not None:
            res.cleanup()
            return
        if res.kind in ("container", "network", "volume"):
            if self.runtime is None:
                raise RuntimeProblem(
                    f"cannot remove {res.kind} {res.name}: this ResourceManager has no container runtime "
                    "(create it with one to track containers, networks or volumes)"
                )
            if res.kind == "container":
                self.runtime.remove_container(res.ident)
            elif res.kind == "network":
                self.runtime.remove_network(res.ident)
            else:
                self.runtime.remove_volume(res.ident)
        elif res.kind == "process":
            terminate_process(int(res.ident), grace_s=self.process_grace_s)
        elif res.kind == "tempfile":
            remove_path(Path(res.ident))
        # ports without a callback: nothing to do; whoever holds the socket closes it

    # -- leak checks ---------------------------------------------------------------------------------

    def snapshot(self, *, sync: bool = True) -> Snapshot:
        """What exists now: managed engine resources (by label), our child processes, tracked files
        that still exist and tracked ports still listening, as ``(kind, name)`` pairs.

        ``sync=False`` skips the engine round trip of the event watch: the engine part is what the
        stream has delivered so far. Right for a *baseline* taken before a test (something still
        on its way then can only add a false leak, never hide one); a check needs ``sync=True``.

        Raises:
            DockerUnavailableError: the engine stopped answering (and no event stream is live).
        """
        seen: set[tuple[str, str]] = set()
        if self.runtime is not None:
            seen.update(self._engine_resources(sync))
        children = child_processes_of_this_process()
        seen.update(("process", f"{pid} {name}") for pid, name in children)
        tracked = self.tracked()
        listening = (
            own_listening_ports([pid for pid, _ in children])
            if any(r.kind == "port" for r in tracked) else set()
        )
        for res in tracked:
            if res.kind == "tempfile" and os.path.lexists(res.ident):
                seen.add(("tempfile", res.ident))
            elif res.kind == "port" and res.ident.isdigit() and int(res.ident) in listening:
                seen.add(("port", res.ident))
        return frozenset(seen)

    def _engine_resources(self, sync: bool) -> set[tuple[str, str]]:
        runtime = self.runtime
        assert runtime is not None
        if not isinstance(runtime, EventSource):
            return {(ref.kind, ref.name) for ref in runtime.list_resources(self.selector)}
        with self._lock:
            if self._watch is None:
                self._watch = EngineWatch(runtime, self.selector, sync_timeout_s=self.sync_timeout_s)
            watch = self._watch
        return watch.current(sync=sync)

    def close(self) -> None:
        """Stop the event watch (if one runs); tracked resources stay tracked."""
        with self._lock:
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    def check_leaks(self, before: Snapshot, after: Snapshot | None = None) -> None:
        """Raise :class:`LeakError` naming every resource in ``after`` (default: now) not in ``before``."""
        found = leaks(before, self.snapshot() if after is None else after)
        if found:
            raise LeakError(found)


class EngineWatch:
    """The managed engine resources matching ``selector``, kept current from the engine's event stream.

    Started with one list call and a live ``events(since=<start>)`` read in a daemon thread (the
    replay from ``since`` covers what changed while listing; applying a creation or removal twice
    changes nothing). :meth:`current` with ``sync=True`` is the handshake: it reads the engine's
    events from the last one the stream applied up to *now* (a bounded read, usually empty) and
    waits until the stream has applied every one of them; the state is then exact as of the call.
    When the stream has failed, or lags more than ``sync_timeout_s``, it lists instead.

    Docker's network and volume events carry no labels: for their creations the thread inspects
    the resource (one call, off the test's path) to match ``selector``.

    With a runtime that counts this process's engine writes (:class:`WriteCount`), a synchronised
    :meth:`current` whose count equals the one taken before the last exact view (the start-up list,
    a handshake or a fallback list) returns the state without the read: no creation by this
    process began or ended since, and the resources of ``selector`` are made only by the process
    whose labels they carry. ``reads_spared`` counts those (for tests and benchmarks).
    """

    def __init__(self, runtime: EventSource, selector: Mapping[str, str], *, sync_timeout_s: float = 10.0
                 ) -> None:
        self.runtime = runtime
        self.selector = dict(selector)
        self.sync_timeout_s = sync_timeout_s
        self.fallbacks = 0  # list calls made because the stream was broken or late (for tests, benchmarks)
        self.reads_spared = 0  # synchronised views that needed no read (no write since the last exact one)
        self._writes: Callable[[], int] | None = (
            runtime.engine_writes if isinstance(runtime, WriteCount) else None)
        self._exact_at = self._write_count()  # the write count before the last exact view
        self._state: dict[tuple[str, str], tuple[str, str]] = {}  # (kind, id) -> (kind, name)
        self._applied: dict[tuple[int, str, str, str], None] = {}  # recent event keys, in order
        self._cursor_ns = 0
        self._failed: BaseException | None = None
        self._relist = False
        self._closed = False
        self._changed = threading.Condition()
        self._stream: EventStream | None = None
        start_ns = time.time_ns()
        self._cursor_ns = start_ns
        self._stream = runtime.events(start_ns)
        self._state = self._listed()
        self._thread = threading.Thread(target=self._follow, name="provisioner-engine-events", daemon=True)
        self._thread.start()

    def _write_count(self) -> int | None:
        return self._writes() if self._writes is not None else None

    def _listed(self) -> dict[tuple[str, str], tuple[str, str]]:
        runtime: ContainerRuntime = self.runtime  # type: ignore[assignment]
        return {(r.kind, r.id): (r.kind, r.name) for r in runtime.list_resources(self.selector)}

    def _follow(self) -> None:
        assert self._stream is not None
        try:
            for event in self._stream:
                self._apply(event)
        except BaseException as exc:  # the engine went away or the stream broke: list from now on
            with self._changed:
                if not self._closed:
                    self._failed = exc
                self._changed.notify_all()
            return
        with self._changed:
            if not self._closed:
                self._failed = RuntimeProblem("the engine's event stream ended")
            self._changed.notify_all()

    def _apply(self, event: EngineEvent) -> None:
        ours: bool | None = None
        if event.action == "create":
            labels = event.labels
            if labels is None:  # networks and volumes: ask (None: already gone)
                try:
                    labels = self.runtime.resource_labels(event.kind, event.id) or {}
                except Exception:  # unknown: the next check lists instead of guessing
                    with self._changed:
                        self._relist = True
                    labels = {}
            ours = L.matches(labels, self.selector)
        with self._changed:
            if event.key not in self._applied:
                if ours:
                    self._state[(event.kind, event.id)] = (event.kind, event.name)
                elif event.action == "destroy":
                    self._state.pop((event.kind, event.id), None)
                self._applied[event.key] = None
                while len(self._applied) > APPLIED_MEMORY:
                    del self._applied[next(iter(self._applied))]
            self._cursor_ns = max(self._cursor_ns, event.time_ns)
            self._changed.notify_all()

    def current(self, *, sync: bool = True) -> set[tuple[str, str]]:
        """``(kind, name)`` of every matching resource; exact as of the call when ``sync``."""
        writes = self._write_count()  # before anything is read: a write from now on moves it
        with self._changed:
            cursor = self._cursor_ns
            usable = self._failed is None and not self._relist
            if usable and sync and writes is not None and writes == self._exact_at:
                self.reads_spared += 1
                return set(self._state.values())
        if usable and sync:
            until = time.time_ns()
            # The stream applies events in order, so the newest pending ones applied means all are;
            # the oldest may already be forgotten (APPLIED_MEMORY) when the watch lagged more than
            # that many events (a loaded machine: it then waited out sync_timeout_s and listed).
            pending = [e.key for e in self.runtime.events(cursor, until)][-(APPLIED_MEMORY // 4):]
            with self._changed:
                usable = self._changed.wait_for(
                    lambda: self._failed is not None or all(k in self._applied for k in pending),
                    timeout=self.sync_timeout_s,
                )
        with self._changed:
            if usable and self._failed is None and not self._relist:
                if sync:
                    self._exact_at = writes
                return set(self._state.values())
            failed = self._failed
            self._relist = False
        self.fallbacks += 1
        listed = self._listed()
        if failed is None:
            with self._changed:
                self._state = listed  # re-based; later events apply on top (idempotently)
                self._exact_at = writes
        return set(listed.values())

    def close(self) -> None:
        with self._changed:
            self._closed = True
        if self._stream is not None:
            self._stream.close()
        self._thread.join(timeout=5)


def leaks(before: Iterable[tuple[str, str]], after: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Resources present after and not before, sorted by kind then name."""
    old = set(before)
    return sorted(
        (item for item in set(after) if item not in old), key=lambda kv: (KINDS.index(kv[0]), kv[1])
    )


def should_remove(cleanup_policy: str, retain_on_failure: bool, failed: bool) -> bool:
    """Whether a run's resources are removed when it ends (``settings.cleanup_policy``).

    * ``aggressive`` — always removed (``retain_on_failure`` does not apply);
    * ``on_success`` — removed after success; after a failure kept when ``retain_on_failure``;
    * ``never`` — kept; ``provision down`` / ``provision reap`` remove them later.
    Kept resources stay labelled, so ``provision reap`` finds them.
    """
    if cleanup_policy == "aggressive":
        return True
    if cleanup_policy == "never":
        return False
    return not (failed and retain_on_failure)


# --- host processes, files, ports -----------------------------------------------------------------


def has_children() -> bool:
    """Whether this process has any child, live or exited, without reaping one (``waitid`` with
    ``WNOHANG | WNOWAIT``: one system call). True where ``waitid`` is missing (e.g. macOS)."""
    waitid = getattr(os, "waitid", None)
    if waitid is None:
        return True
    try:
        waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    except OSError:
        return True
    return True


def child_processes_of_this_process() -> list[tuple[int, str]]:
    """``(pid, name)`` of every live descendant of this process; nothing to walk without children."""
    if not has_children():
        return []
    return _live_descendants(None)


def _live_descendants(pid: int | None) -> list[tuple[int, str]]:
    """``(pid, name)`` of every live (not zombie) descendant of ``pid`` (default: this process)."""
    import psutil

    try:
        children = psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            out.append((child.pid, child.name()))
        except psutil.Error:
            continue
    return out


def terminate_process(pid: int, *, grace_s: float = 3.0, create_time: float | None = None) -> bool:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL — the process and its children. False if gone."""
    family = process_family(pid, create_time)
    terminate_processes(family, grace_s)
    return bool(family)


def process_family(pid: int, create_time: float | None = None) -> list[psutil.Process]:
    """The process ``pid`` after its descendants, or ``[]`` when it is gone or, ``create_time``
    given (seconds since the epoch, psutil's), the pid now names another process (one started more
    than 10 ms from it: the pid was reused)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return []
        return [*proc.children(recursive=True), proc]
    except psutil.Error:
        return []


def terminate_processes(procs: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM all of ``procs`` at once, wait up to ``grace_s`` seconds for them to end, then SIGKILL
    the ones left and wait up to ``grace_s`` again. One already gone is skipped."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=False)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def own_listening_ports(children: Iterable[int] = ()) -> set[int]:
    """TCP ports in LISTEN state on sockets of this process or of ``children`` (pids)."""
    import psutil

    ports: set[int] = set()
    for pid in (os.getpid(), *children):
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except (psutil.Error, OSError):
            continue
        ports.update(c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN and c.laddr)
    return ports
