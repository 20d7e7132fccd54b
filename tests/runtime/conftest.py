"""Shared pieces for the runtime tests: the worker image (built once per session, content-hashed so
later sessions skip the build), a fake-engine probe, and a leftover check by label."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioner.runtime import labels as L
from provisioner.runtime.deployment import ProbeResult
from provisioner.runtime.engine import FakeContainer, FakeRuntime
from provisioner.runtime.lifecycle import UpOptions
from provisioner.runtime.relay import parse_routes
from provisioner.settings import Settings, load_settings

from .._helpers import clear_settings

FAKE_IMAGE = "provisioner-worker:fake"


@pytest.fixture(scope="session")
def worker_image(docker_engine: Any) -> str:
    """The real worker image, built (or found by its content hash) once per test session."""
    from provisioner.runtime.images import build_worker_image

    return build_worker_image().tag


def scratch_settings(folder: Path, ready_timeout_s: float, **cli: Any) -> Settings:
    """The settings of a scratch project in ``folder`` (created, with a bare ``pyproject.toml``): the
    state dir and the cassettes in it, a worker's readiness waited for ``ready_timeout_s`` seconds,
    ``cli`` on top (dotted keys, as ``load_settings`` takes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    return load_settings(
        cli={
            "state_dir": str(folder / ".provision"),
            "lm.cache_dir": str(folder / "cassettes"),
            "container.ready_timeout_s": ready_timeout_s,
            **cli,
        },
        project_dir=folder,
    )


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Default settings with the state dir and cassettes under tmp_path (no user config leaks in)."""
    clear_settings(monkeypatch)
    monkeypatch.chdir(tmp_path)
    return scratch_settings(tmp_path, 30.0)


class FakeWorkers:
    """Makes FakeRuntime containers behave like workers behind the relay, for the readiness probe.

    A worker is ready when its container runs and its name is not in ``not_ready``; the probe
    finds it the way the real relay does: published port -> relay route -> slot alias.
    """

    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.not_ready: set[str] = set()
        self.probes = 0

    def kill_forwarder(self, port: int) -> None:
        """The engine's forwarder of host ``port`` dies (:meth:`FakeRuntime.kill_forwarder`)."""
        self.runtime.kill_forwarder(port)

    def probe(self, host: str, port: int, timeout: float) -> ProbeResult:
        self.probes += 1
        assert host == "127.0.0.1"
        with self.runtime._lock:
            containers = list(self.runtime.containers.values())
        for relay in containers:
            if relay.recipe.role != "relay" or relay.status != "running":
                continue
            for container_port, host_port in relay.ports.items():
                if host_port != port:
                    continue
                if self.runtime.dead_forwarders.get(port) == relay.id:
                    return ProbeResult(False, detail="connection refused", refused=True)
                routes = {lp: alias for lp, alias, _ in parse_routes(list(relay.recipe.command[3:]))}
                alias = routes[container_port]
                for c in containers:
                    if (
                        c.recipe.role == "worker"
                        and alias in c.recipe.networks[0].aliases
                        and c.status == "running"
                        and c.recipe.name not in self.not_ready
                    ):
                        return ProbeResult(True, True, "ok")
                return ProbeResult(False, detail="connection closed by relay")
        return ProbeResult(False, detail="connection refused", refused=True)


@pytest.fixture
def fake() -> Iterator[tuple[FakeRuntime, FakeWorkers]]:
    runtime = FakeRuntime(images=(FAKE_IMAGE,))
    yield runtime, FakeWorkers(runtime)


def leftovers(docker_engine: Any, run_id: str) -> list[str]:
    """Every container, network or volume still labelled with ``run_id``."""
    from provisioner.runtime.engine import DockerRuntime

    rt = DockerRuntime(docker_engine)
    return sorted(f"{r.kind} {r.name}" for r in rt.list_resources(L.selector(run_id)))


def started(container: FakeContainer) -> None:  # pragma: no cover - handy for on_start hooks
    container.log_lines.append("PROVISION_WORKER_READY port=8765")


def run_command_while(
    drive: Callable[[list[str]], None],
    settings: Settings,
    fake: tuple[FakeRuntime, FakeWorkers],
    folder: Path,
    options: UpOptions,
    health_interval_s: float,
    command: Callable[[Path], list[str]] = lambda fifo: ["cat", str(fifo)],
) -> tuple[int, list[str]]:
    """``provision run`` (``run_command``, on the fake engine) of a command that lasts until a FIFO
    (``folder/release``) is opened for writing — ``cat`` it, or ``command(fifo)`` — while
    ``drive(notes)`` does what the test does to the run in a thread (``notes``: what the run said so
    far; run_command owns the main thread, its signal handlers). The FIFO is opened once ``drive``
    returned or raised, so the command ends either way; an error of ``drive`` is raised here after the
    run. Returns the command's exit code and everything the run said."""
    import errno
    import os
    import threading

    from provisioner.runtime.run_command import run_command

    rt, workers = fake
    fifo = folder / "release"
    os.mkfifo(fifo)
    notes: list[str] = []
    errors: list[BaseException] = []
    returned = threading.Event()

    def driver() -> None:
        try:
            drive(notes)
        except BaseException as exc:
            errors.append(exc)
        # Open without blocking: a command that never started (or already ended) has no reader.
        while not returned.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
            returned.wait(0.02)

    thread = threading.Thread(target=driver, daemon=True, name="run-command-driver")
    thread.start()
    try:
        code = run_command(command(fifo), settings, options, runtime=rt, probe=workers.probe,
                           notify=notes.append, health_interval_s=health_interval_s)
    finally:
        returned.set()
        thread.join(60)
    if errors:
        raise errors[0]
    return code, notes
