"""The runs on the engine, found by their labels: :func:`list_runs`, :class:`RunSummary`, the run
``down``/``status`` mean without ``--run`` (:func:`default_run`), and the project a run belongs to.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from provisioner.errors import (
    AmbiguousRunError,
)
from provisioner.runtime import labels as L
from provisioner.runtime import watchdog as wd
from provisioner.runtime.engine import ContainerRuntime, ResourceRef
from provisioner.runtime.engine.base import utc_clock
from provisioner.runtime.state import RunDir, current_run_id
from provisioner.settings import Settings, load_settings


def settings_or_load(settings: Settings | None) -> Settings:
    """``settings``, or the project's settings loaded from the working directory when None."""
    return settings if settings is not None else load_settings()


def runtime_or_docker(runtime: ContainerRuntime | None, settings: Settings | None = None) -> ContainerRuntime:
    """``runtime``, or the engine's runtime (:func:`~provisioner.runtime.engine.open_runtime`).

    Raises:
        DockerUnavailableError: no ``runtime`` and the engine does not answer.
    """
    if runtime is not None:
        return runtime
    from provisioner.runtime.engine import open_runtime

    return open_runtime(settings)


@contextlib.contextmanager
def opened_runtime(
    runtime: ContainerRuntime | None, settings: Settings | None = None
) -> Iterator[ContainerRuntime]:
    """``runtime`` for the block when given (the caller's: left open), else the engine's runtime
    (:func:`runtime_or_docker`), closed when the block ends — on an error or Ctrl-C too. docker-py
    keeps an HTTP connection pool (and an event connection) per client: every command that opens a
    runtime closes it here rather than leaving it to the garbage collector.

    Raises:
        DockerUnavailableError: no ``runtime`` and the engine does not answer.
    """
    if runtime is not None:
        yield runtime
        return
    opened = runtime_or_docker(None, settings)
    try:
        yield opened
    finally:
        opened.close()


def project_of(settings: Settings) -> str:
    """The :func:`~provisioner.runtime.labels.project_id` of the settings' project root."""
    return L.project_id(settings.project_dir)


@dataclass(frozen=True)
class RunSummary:
    """A run found on the engine by its labels.

    ``project`` is None for runs labelled by a provisioner older than the project label: such a run
    counts as a project's only when that project's state dir has it (``<state_dir>/runs/<run_id>``);
    ``--all-projects`` (``reap``, ``status``) finds every one.
    """

    run_id: str
    layer: str
    owner_host: str
    owner_pid: int
    persistent: bool
    created: float
    resources: list[ResourceRef]
    project: str | None = None

    def owner_alive(self) -> bool | None:
        """None when the owner is on another host (we cannot tell)."""
        if self.owner_host != socket.gethostname():
            return None
        import psutil

        try:
            return bool(psutil.Process(self.owner_pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def live_owners(self, run_dir: RunDir | None = None) -> list[str]:
        """The run's owner processes that are alive: the labelled owner and, when the run's state
        folder is known, every owner registered there (pytest and xdist workers, ``provision run``).
        Entries read ``pid <n>``, or ``<host> pid <n> (another host: assumed alive)``."""
        alive = []
        owner = self.owner_alive()
        if owner is None and self.owner_host not in ("", "?", "compose"):
            alive.append(f"{self.owner_host} pid {self.owner_pid} (another host: assumed alive)")
        elif owner and self.owner_pid > 0:
            alive.append(f"pid {self.owner_pid}")
        if run_dir is not None:
            for pid, start in wd._entries(run_dir.owners_dir):
                if wd._alive(pid, start) and f"pid {pid}" not in alive:
                    alive.append(f"pid {pid}")
        return alive

    def running(self, runtime: ContainerRuntime) -> bool:
        """At least one of its containers is running (a live environment, not just leftovers)."""
        for ref in self.resources:
            if ref.kind == "container":
                state = runtime.container_state(ref.id)
                if state is not None and state.running:
                    return True
        return False

    @property
    def stale(self) -> bool:
        """Owned by a process on this host that is gone (its watchdog should have removed it)."""
        return not self.persistent and self.owner_alive() is False

    def in_project(self, project: str | None, state_dir: Path | str | None = None) -> bool:
        """Belongs to ``project`` (None: any). A run without a project label (an older version's)
        belongs to it only when ``state_dir`` (that project's) has the run's folder: otherwise it
        may be another project's, and ``reap`` would remove another team's containers."""
        if project is None or self.project == project:
            return True
        if self.project is None and state_dir is not None:
            return RunDir.of(state_dir, self.run_id).path.is_dir()
        return False


def list_runs(
    runtime: ContainerRuntime, project: str | None = None, state_dir: Path | str | None = None
) -> list[RunSummary]:
    """Every run that has managed resources on the engine, oldest first.

    ``project``: only that project's runs, and unlabelled ones of older versions whose folder is in
    ``state_dir`` (that project's state dir; None: no unlabelled run).
    """
    groups: dict[str, list[ResourceRef]] = {}
    for ref in runtime.list_resources(L.selector()):
        if ref.run_id:
            groups.setdefault(ref.run_id, []).append(ref)
    runs = []
    for run_id, refs in groups.items():
        labels = refs[0].labels
        created = min((r.created for r in refs if r.created), default=0.0)
        try:
            pid = int(labels.get(L.OWNER_PID, "0"))
        except ValueError:
            pid = 0
        summary = RunSummary(
            run_id,
            labels.get(L.LAYER, "?"),
            labels.get(L.OWNER_HOST, "?"),
            pid,
            labels.get(L.PERSISTENT) == "true",
            created,
            refs,
            labels.get(L.PROJECT) or None,
        )
        if summary.in_project(project, state_dir):
            runs.append(summary)
    return sorted(runs, key=lambda r: r.created)


def _describe(summary: RunSummary) -> str:
    started = utc_clock(summary.created) if summary.created else "?"  # UTC, as the CLI shows times
    return f"{summary.run_id} (layer {summary.layer}, started {started})"


def default_run(settings: Settings, runtime: ContainerRuntime) -> str | None:
    """The run ``down``/``status`` mean without ``--run``: this project's one persistent run.

    The one persistent run of the project on the engine (normally the current run); when none is
    on the engine, the current run's id (``<state_dir>/current``, or None).

    Raises:
        AmbiguousRunError: the project has several live persistent runs (``up --new``).
    """
    project = project_of(settings)
    live = [r for r in list_runs(runtime, project) if r.persistent and r.project == project]
    if not live:
        return current_run_id(settings)  # gone from the engine: down still marks its state
    if len(live) == 1:
        return live[0].run_id
    candidates = [_describe(r) for r in live]
    raise AmbiguousRunError(
        f"this project has {len(live)} runs up; choose one with --run ID: " + "; ".join(candidates),
        [r.run_id for r in live],
    )


