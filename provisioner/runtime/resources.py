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
from typing import Literal

from provisioner.errors import LeakError
from provisioner.runtime import labels as L
from provisioner.runtime.engine import ContainerRuntime

Kind = Literal["container", "network", "volume", "process", "tempfile", "port"]
KINDS: tuple[str, ...] = ("container", "network", "volume", "process", "tempfile", "port")
Snapshot = frozenset[tuple[str, str]]


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

    def extend(self, other: CleanupReport) -> None:
        self.removed += other.removed
        self.errors += other.errors


class ResourceManager:
    """Tracks what one controller created. Thread-safe.

    ``runtime`` is needed for engine resources' default cleanup; ``selector`` (labels) scopes the
    engine part of :meth:`snapshot` (default: every resource provisioner manages).
    """

    def __init__(
        self,
        runtime: ContainerRuntime | None = None,
        *,
        selector: Mapping[str, str] | None = None,
        process_grace_s: float = 3.0,
    ) -> None:
        self.runtime = runtime
        self.selector = dict(selector) if selector is not None else L.selector()
        self.process_grace_s = process_grace_s
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
                raise RuntimeError(
                    f"cannot remove {res.kind} {res.name}: this ResourceManager has no runtime"
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

    def snapshot(self) -> Snapshot:
        """What exists now: managed engine resources (by label), our child processes, tracked files
        that still exist and tracked ports still listening, as ``(kind, name)`` pairs."""
        seen: set[tuple[str, str]] = set()
        if self.runtime is not None:
            for ref in self.runtime.list_resources(self.selector):
                seen.add((ref.kind, ref.name))
        seen.update(("process", name) for name in child_processes())
        listening = listening_ports()
        for res in self.tracked():
            if res.kind == "tempfile" and os.path.lexists(res.ident):
                seen.add(("tempfile", res.ident))
            elif res.kind == "port" and res.ident.isdigit() and int(res.ident) in listening:
                seen.add(("port", res.ident))
        return frozenset(seen)

    def check_leaks(self, before: Snapshot, after: Snapshot | None = None) -> None:
        """Raise :class:`LeakError` naming every resource in ``after`` (default: now) not in ``before``."""
        found = leaks(before, self.snapshot() if after is None else after)
        if found:
            raise LeakError(found)


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


def child_processes(pid: int | None = None) -> list[str]:
    """``"<pid> <name>"`` for every live descendant of ``pid`` (default: this process)."""
    import psutil

    try:
        me = psutil.Process(pid or os.getpid())
        children = me.children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            out.append(f"{child.pid} {child.name()}")
        except psutil.Error:
            continue
    return out


def terminate_process(pid: int, *, grace_s: float = 3.0, create_time: float | None = None) -> bool:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL — the process and its children. False if gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return False  # the pid was reused by an unrelated process
        family = [*proc.children(recursive=True), proc]
    except psutil.Error:
        return False
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, alive = psutil.wait_procs(family, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return True


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=False)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this host (any address)."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return set()
    return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN and c.laddr}
