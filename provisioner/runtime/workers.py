"""One process's containers for a layer: the warm pool, dedicated workers, the run's watchdog, leak checks.

Built on :mod:`provisioner.runtime` — the launch steps of :mod:`provisioner.runtime.launch` (the
same ones ``provision up`` takes), ``WorkerPool`` and ``ResourceManager``. What this module adds is
the *per-process* view that pytest (with or without xdist) and :func:`provisioner.environment` need:

* **names are per deployment, labels per process and run.** Every process plans its containers
  under the run's id (one watchdog, one ``provision reap`` target, one ledger) with its own name
  prefix ``prov-<run>-<instance>`` (a dedicated worker: ``…-<instance>-d<n>``; the run's shared pool:
  ``…-pool-<instance>``) and ``provisioner.instance`` label (``pool`` for the shared pool), both given
  to :func:`~provisioner.runtime.recipes.plan_run` (nothing is renamed afterwards), so two processes
  never clash and each removes only its own containers;
* **one image for the whole run**: the image is content-hashed and built under a machine-wide lock
  (:func:`provisioner.runtime.images.ensure_worker_image`), so concurrent processes build it once;
* **one watchdog per run**: every process registers as an owner; the first one starts it;
* **leak checks** compare snapshots of this process's resources around a test, ignoring what belongs
  to the process (pool, relay, networks) or was retained on purpose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from provisioner.layers import shared_workers_up_to

if TYPE_CHECKING:
    from provisioner.layers import Layer
    from provisioner.lmconfig import LMConfig
    from provisioner.run import RunIdentity
    from provisioner.runtime.deployment import Deployment, WorkerInfo
    from provisioner.runtime.engine import ContainerRuntime
    from provisioner.runtime.pool import WorkerPool
    from provisioner.runtime.recipes import RunPlan, RunTarget
    from provisioner.runtime.resources import ResourceManager
    from provisioner.runtime.shared_pool import SharedPool
    from provisioner.runtime.state import RunState
    from provisioner.settings import Settings

RYUK_DISABLED_ENV = "TESTCONTAINERS_RYUK_DISABLED"
# How long a process waits for the run's watchdog to hold its lock (seconds; as watchdog.wait_watching).
WATCHDOG_START_TIMEOUT_S = 15.0
# How often a process's pool looks at its workers' container states (seconds).
POOL_MONITOR_INTERVAL_S = 2.0
_UNSAFE = re.compile(r"[^a-z0-9]+")
# recycle_after_sessions for fork-mode pools: never by count (2**31 sessions).
_NEVER = 2**31
# How often a process-isolation session retries a busy fork-mode worker (seconds).
BUSY_RETRY_S = 0.05
# Fork-mode workers a pool of a layer with isolation "process" starts at once (at most the layer's
# `workers`): two, so that a sequential suite always finds a worker whose next process is ready.
PROCESS_POOL_START = 2


@dataclass(frozen=True)
class WorkerStarts:
    """How many warm-pool workers each entry point starts for a container layer (the one rule
    :meth:`ProcessContainers._deploy_pool`, ``ProvisionRun.warm_pool`` and ``provision layers`` use).

    ``pytest_first``: started before the first test; ``pytest_up_to``: the most, the others started
    on demand (more sessions open at once than workers run). One pool per pytest run, shared by its
    xdist processes (not per process). ``up``: what ``provision up`` starts (its ``--workers``
    default). A ``bridge_worker`` fixture's dedicated workers come on top of either.
    """

    pytest_first: int
    pytest_up_to: int
    up: int

    def text(self) -> str:
        """``"pytest 1-2, up 2"``: the table's words."""
        pytest = (str(self.pytest_first) if self.pytest_first == self.pytest_up_to
                  else f"{self.pytest_first}-{self.pytest_up_to}")
        return f"pytest {pytest}, up {self.up}"

    def to_json(self) -> dict[str, int]:
        """Keys ``pytest_first``, ``pytest_up_to``, ``up`` (counts of workers)."""
        return dataclasses.asdict(self)


def worker_starts(layer: Layer) -> WorkerStarts | None:
    """What pytest and ``provision up`` start for ``layer``; None for a layer that runs in-process
    (no containers: its ``workers`` field is never used)."""
    if not layer.needs_docker:
        return None
    up_to = shared_workers_up_to(layer.pooling_enabled, layer.workers)
    first = min(PROCESS_POOL_START, up_to) if layer.isolation == "process" else 1
    return WorkerStarts(pytest_first=first, pytest_up_to=up_to, up=layer.workers)


def switch_off_ryuk() -> None:
    """Switch testcontainers' Ryuk reaper off for this process (and its children), through its
    documented configuration (the ``TESTCONTAINERS_RYUK_DISABLED`` variable), unless the user set it.

    Ryuk needs an image pull and the docker socket mounted into a privileged container; the run's
    watchdog does its job without either. testcontainers reads the setting once, at its first
    container start, so it is set here, when the pytest plugin or :func:`provisioner.environment`
    loads this module — before any dedicated worker starts. testcontainers is not imported for it
    (it loads docker-py: ~0.5 s of start-up).
    """
    os.environ.setdefault(RYUK_DISABLED_ENV, "true")


switch_off_ryuk()


class RunContext(Protocol):
    """What a process's containers read of its run (:class:`provisioner.api.Environment` is one).

    A protocol, so this module does not import :mod:`provisioner.api` (which sits above the runtime).
    """

    @property
    def settings(self) -> Settings: ...
    @property
    def layer(self) -> Layer: ...
    @property
    def lm_config(self) -> LMConfig: ...
    @property
    def run_id(self) -> str: ...
    @property
    def run_dir(self) -> Path: ...

    identity: RunIdentity
    # The worker image tag the run's controller prepared, and why it could not (xdist workers).
    prepared_image: str | None
    image_problem: str | None
    # The `provision up` run whose workers serve as the pool (runtime/shared_pool.py), or None.
    up_run: RunState | None


def process_instance() -> str:
    """This process's name inside a run: the xdist worker id (``gw0``...) or ``main``, plus the pid.

    The pid keeps two ``environment()`` blocks of separate scripts in one run apart.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER") or "main"
    return f"{_UNSAFE.sub('', worker.lower()) or 'main'}-{os.getpid()}"


@dataclass
class DedicatedWorker:
    """A worker container for one test only (the ``bridge_worker`` fixture).

    ``container`` is the testcontainers ``DockerContainer``; ``client`` a ``BridgeClient`` connected
    through the worker's own relay on 127.0.0.1; ``session(id)`` a session on it.
    """

    name: str
    container_id: str
    host: str
    port: int
    container: Any
    client: Any
    environment: Any = field(repr=False)
    retained: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def session(self, session_id: str) -> Any:
        return self.client.session(session_id)

    def resource_names(self) -> list[tuple[str, str]]:
        """Every container and network of the worker's plan: the worker, its relay, the run's Gemini
        stand-in when the layer records from one (a retained worker keeps it, so it is not a leak)."""
        plan = self.environment.plan
        names = [("container", self.name)] + [("container", c.name) for c in plan.containers()]
        return list(dict.fromkeys(names)) + [("network", n.name) for n in plan.networks]


class ProcessContainers:
    """The containers one process (a pytest process or an ``environment()`` block) owns."""

    def __init__(self, environment: RunContext, *, runtime: ContainerRuntime | None = None) -> None:
        """``runtime``: the caller's (it closes it, and no watchdog process guards it: the watchdog
        reaches only the engine :func:`~provisioner.runtime.engine.open_runtime` finds); default:
        that engine, opened on first use."""
        self.env = environment
        self.instance = process_instance()
        self._lock = threading.RLock()
        self._runtime: Any = runtime
        self._runtime_given = runtime is not None
        self._image: str | None = None
        self._image_error: Exception | None = None
        self._pool_error: Exception | None = None
        self._resources: ResourceManager | None = None
        self._watchdog_started = False
        self._run_target: RunTarget | None = None
        self._pool: WorkerPool | None = None
        self._shared: SharedPool | None = None
        self._pool_env: Deployment | None = None
        self._dedicated = itertools.count(1)
        self._dedicated_started = 0  # dedicated workers; the pool's are its deployment's
        self.retained: list[str] = []
        self._retained_names: set[tuple[str, str]] = set()

    @property
    def workers_started(self) -> int:
        """Worker containers this process started: its dedicated workers, and every worker of the
        run's pool when this process deployed it (:attr:`Deployment.workers_created`: the first, one
        that joined late or was still starting when the run ended — ``ready_slots`` — replacements
        and recycled ones). A process that attached to the pool started none of it."""
        pool_env = self._pool_env
        deployed = self._shared is not None and self._shared.deployed and pool_env is not None
        return self._dedicated_started + (pool_env.workers_created if deployed and pool_env else 0)

    # -- the pieces, created on first use ------------------------------------------------------------

    @property
    def runtime(self) -> Any:
        with self._lock:
            if self._runtime is None:
                from provisioner.runtime.engine import open_runtime

                # DockerUnavailableError with the reason when there is no engine
                self._runtime = open_runtime(self.env.settings)
            return self._runtime

    @property
    def resources(self) -> ResourceManager:
        """This process's resource manager (scoped to its own containers by label)."""
        with self._lock:
            if self._resources is None:
                from provisioner.runtime import labels as L
                from provisioner.runtime.resources import ResourceManager

                selector = L.selector(self.env.run_id, self.instance)
                self._resources = ResourceManager(self.runtime, selector=selector)
            return self._resources

    @property
    def resources_started(self) -> bool:
        return self._resources is not None

    @property
    def pool_started(self) -> WorkerPool | None:
        """The process's pool when it has one already (None: no session was opened yet)."""
        return self._pool

    @property
    def image(self) -> str:
        """The worker image: the one the run's controller prepared (xdist workers never build), else
        checked or built now. A failure is remembered: later tests get the same error at once."""
        return self.prepare_image()

    def prepare_image(self, progress: Callable[[str], None] | None = None) -> str:
        """Check (or build) the worker image once; ``progress`` receives the build's status messages.

        Raises:
            ImageError: the image is missing or failed to build (also on every later call).
            DockerUnavailableError: no engine.
        """
        with self._lock:
            if self._image_error is not None:
                raise self._image_error
            if self._image is None and self.env.prepared_image is not None:
                self._image = self.env.prepared_image
            if self._image is None and self.env.image_problem is not None:
                from provisioner.errors import ImageError

                self._image_error = ImageError(f"the run's controller could not prepare the worker image: "
                                               f"{self.env.image_problem}")
                raise self._image_error
            if self._image is None:
                from provisioner.errors import ProvisionerError
                from provisioner.runtime import launch

                try:
                    self._image = launch.ensure_image(self.runtime, self.env.settings, progress=progress)
                except ProvisionerError as exc:
                    self._image_error = exc
                    raise
            return self._image

    def _target(self) -> RunTarget:
        """This process's place in the run (launch step ``prepare_run_dir``, done once)."""
        with self._lock:
            if self._run_target is None:
                from provisioner.runtime import launch
                from provisioner.runtime.recipes import Owner
                from provisioner.runtime.state import RunDir

                self._run_target = launch.prepare_run_dir(
                    self.env.settings, self.env.lm_config, RunDir(self.env.run_dir), Owner.this_process(),
                    instance=self.instance,
                )
            return self._run_target

    def _ensure_watchdog(self, *, wait: bool = True) -> None:
        """Register with the run's watchdog (started unless one watches). ``wait=False`` returns once
        it is spawned — a detached process in its own session, so it comes up and reaps the run even
        if this process is killed right after — and :meth:`_wait_watchdog` checks later that it holds."""
        with self._lock:
            if self._watchdog_started or self._runtime_given:
                return
            from provisioner.runtime import launch

            # An xdist worker is its controller's dependant: the watchdog terminates it and removes
            # the run as soon as the controller is gone, instead of waiting for execnet's timeouts.
            launch.start_watchdog(self.env.settings, self._target(), principal=self.env.identity.principal,
                                  wait=wait)
            self._watchdog_started = True

    def _wait_watchdog(self) -> None:
        """Until the run's watchdog holds its lock, or has left on purpose: a marker says the run is
        kept (``persist``, a ``retain``ed failed worker of another process) or stopped — the
        watchdog exits then, by design. RuntimeProblem with its log if neither happens in time."""
        if self._runtime_given:
            return
        from provisioner.errors import RuntimeProblem
        from provisioner.runtime import watchdog as wd
        from provisioner.runtime.polling import poll_until

        target = self._target()
        assert target.run_dir is not None
        run_dir = target.run_dir.path
        markers = (wd.PERSIST_MARKER, wd.RETAIN_MARKER, wd.STOPPED_MARKER, wd.REAPED_MARKER)

        def watched() -> bool:
            return wd.watchdog_alive(run_dir) or any((run_dir / m).exists() for m in markers)

        if not poll_until(watched, WATCHDOG_START_TIMEOUT_S, 0.02):
            log = run_dir / wd.LOG_FILE
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeProblem(f"the run's watchdog did not start within {WATCHDOG_START_TIMEOUT_S:.0f}s; "
                                 f"its log:\n{tail}")

    def _plan(self, workers: int, name: str | None = None, *, instance: str | None = None) -> RunPlan:
        """A plan of this process (launch step ``plan_run``), named ``prov-<run>-<name or instance>``
        and labelled with ``instance`` (default: this process's) from the start."""
        from provisioner.runtime.recipes import PlanOptions, bridge_token_for, plan_run

        target = self._target()
        target = dataclasses.replace(target, name=name, instance=instance or target.instance)
        bridge_token = bridge_token_for(self.runtime.publish_host)
        return plan_run(self.env.settings, self.env.layer, self.env.lm_config, target, self.image,
                        PlanOptions(workers=workers, bridge_token=bridge_token))

    def _require_container_layer(self, what: str) -> None:
        from provisioner.errors import ConfigError

        if not self.env.layer.needs_docker:
            raise ConfigError(
                f"{what} needs a container layer, but layer {self.env.layer.name!r} runs "
                f"{self.env.layer.runs_in_words}; run with --layer integration (or e2e), or mark the test "
                "for it"
            )

    # -- the pool ------------------------------------------------------------------------------------

    @property
    def pool(self) -> WorkerPool:
        """This process's warm workers: ``layer.workers`` for pooled layers, else one worker.

        Started on first use (the pytest plugin warms it before the first test). A failed start is
        remembered: later tests get the same error at once instead of waiting for it again.
        """
        with self._lock:
            if self._pool_error is not None:
                raise self._pool_error
            if self._pool is None:
                try:
                    return self._start_pool()
                except Exception as exc:
                    from provisioner.errors import RuntimeProblem

                    if isinstance(exc, RuntimeProblem):
                        self._pool_error = exc
                    raise
            return self._pool

    def _start_pool(self) -> WorkerPool:
        """The run's one pool (:mod:`provisioner.runtime.shared_pool`): the ``provision up`` run this
        session attaches to, else the pool another process of the run deployed, else a new one."""
        with self._lock:
            if self._pool is None:
                self._require_container_layer("the worker pool")
                from provisioner.runtime import shared_pool

                self.resources  # noqa: B018 - the per-test leak checks watch this process's containers
                container = self.env.settings.container
                state = self.env.up_run
                if state is not None:
                    from provisioner.runtime.state import bridge_token_of

                    attached = shared_pool.attach_up_run(
                        state, self.runtime, ready_timeout_s=container.ready_timeout_s,
                        bridge_token=bridge_token_of(self.env.settings, state.run_id))
                    if isinstance(attached, str):
                        # The session chose to attach (its header said so) and a worker died since:
                        # as for a death mid-session, its sessions fail saying to repair. Starting
                        # its own workers here made the header, phase line and summary untrue.
                        from provisioner.errors import WorkerNotReplaceableError

                        raise WorkerNotReplaceableError(
                            f"the run this session attached to no longer serves it: {attached}; "
                            "it starts no workers of its own halfway")
                    self._pool = self._make_pool(attached, False)
                    self._shared = shared_pool.SharedPool(self._pool, False, attached)
                    return self._pool
                # The watchdog's start-up (a Python process: 1.4 to 2.7 s measured at load 10) runs
                # alongside the pool's; it is spawned before anything is created, so it covers it.
                self._ensure_watchdog(wait=False)
                self._shared = shared_pool.obtain_pool(
                    self.env.run_dir, self.env.run_id, runtime=self.runtime, deploy=self._deploy_pool,
                    make_pool=self._make_pool, ready_timeout_s=container.ready_timeout_s,
                    process=self.instance,
                )
                self._pool = self._shared.pool
                if self._shared.deployed and self.env.layer.isolation == "process":
                    # The worker that was not ready yet joins as soon as it is (pool.json rewritten then).
                    self._pool.grow(PROCESS_POOL_START)
                self._wait_watchdog()
            return self._pool

    def _deploy_pool(self) -> Deployment:
        """Start the run's shared pool, labelled as the run's pool (not this process's: its leak
        checks never see them): one worker now, the layer's others (``layer.workers`` for pooled
        layers) planned and started on demand — when more sessions are open at once, in this process
        or the run's others, than workers run (:meth:`WorkerPool.grow_on_demand`)."""
        from provisioner.runtime import launch
        from provisioner.runtime.shared_pool import POOL_INSTANCE

        layer = self.env.layer
        starts = worker_starts(layer)
        assert starts is not None  # _require_container_layer
        count = starts.pytest_up_to
        plan = self._plan(count, f"{POOL_INSTANCE}-{self.instance}", instance=POOL_INSTANCE)
        # Its own selector (run + "pool"). Starting every worker at once made a serial suite wait
        # for workers it never used, sharing the two cores with the one it did (docs/benchmarks.md).
        # Isolation "process" starts two at once, in parallel: a serial suite alternates between
        # them (WorkerPool's least_recently_used), so one worker's next process warms up while the
        # other serves.
        # The first session needs one worker: a `process` pool's start returns when the first of its
        # two is ready, and the other joins the pool when it is (_start_pool: WorkerPool.grow).
        run_env = launch.deploy(plan, self.runtime, self.env.settings, start_slots=starts.pytest_first,
                                ready_slots=1)
        self._pool_env = run_env  # its workers are counted at close (Deployment.workers_created)
        return run_env

    def _make_pool(self, environment: Any, deployed: bool) -> WorkerPool:
        from provisioner.runtime.pool import WorkerPool

        container = self.env.settings.container
        pool = WorkerPool(
            environment,
            # A fork-mode worker's sessions live in their own processes: nothing piles up in it.
            recycle_after_sessions=(container.recycle_after_sessions if self.env.layer.isolation != "process"
                                    else _NEVER),
            recycle_after_s=container.recycle_after_s,
            owns_environment=False,  # the run's controller removes the shared pool (shared_pool.py)
            least_recently_used=self.env.layer.isolation == "process",
        )
        if deployed:
            # Heals between tests too: a worker killed while no session used it is replaced
            # before anyone asks (one container-state look per worker and interval, no ping).
            pool.start_monitor(POOL_MONITOR_INTERVAL_S)
        return pool

    def open_session(self, session_id: str) -> tuple[Any, Any]:
        """(session client, cleanup) for a new session pinned to a live pool worker
        (:meth:`WorkerPool.lease`: the cleanup of a session whose worker died is a no-op with a note)."""
        pool = self.pool
        if self.env.layer.isolation == "process":
            return self._open_process_session(pool, session_id)
        return pool.lease(session_id, request_timeout=self.env.settings.request_timeout)

    def _open_process_session(self, pool: WorkerPool, session_id: str) -> tuple[Any, Any]:
        """Isolation ``process``: the session's connection is its own process, forked by the pinned
        fork-mode worker. Closing the connection ends the process, so the cleanup only closes it.

        The pool asks the engine nothing when it pins the session (``check=False``): the new
        connection is the check. When it fails and the engine says the worker died, the worker is
        replaced and the session opened again on a live one (a dead worker is never the test's
        problem); a connection that fails while the worker runs is the test's error.
        A worker at its process limit answers "busy" (``TooManyConnections``): processes of earlier
        tests are still ending, so the connection is retried until ``process_timeout``.

        Raises:
            BridgeConnectionError: the worker runs but the connection failed.
            WorkerLostError: every worker died and replacing them failed.
        """
        import time

        from provisioner.bridge.protocol import ErrorType
        from provisioner.errors import BridgeConnectionError, BridgeError, WorkerLostError

        deadline = time.monotonic() + self.env.settings.process_timeout
        dead_seen = 0
        while True:
            pool.open_session(session_id, check=False)
            try:
                client = pool.client(session_id, request_timeout=self.env.settings.request_timeout, fork=True)
                while True:
                    try:
                        client.bridge.connect()  # forks the test's process now (setup), learns its pid
                        break
                    except BridgeError as exc:
                        if exc.error_type != ErrorType.TOO_MANY_CONNECTIONS or time.monotonic() > deadline:
                            raise
                        time.sleep(BUSY_RETRY_S)
            except BridgeConnectionError as exc:
                lost = pool.connection_failed(session_id)  # the engine's word, on failures only
                pool.close_session(session_id)
                if lost is None:
                    raise
                dead_seen += 1
                if dead_seen > 2 * max(1, len(pool.environment.workers)):
                    raise WorkerLostError(f"no live worker for session {session_id!r}: {lost}") from exc
                continue  # its worker died before the test used it: a live one (or its replacement)
            except BaseException:
                pool.close_session(session_id)
                raise
            break

        def cleanup() -> None:
            try:
                client.bridge.close()  # the process ends with its connection: nothing to clean inside
            finally:
                pool.close_session(session_id)

        return client, cleanup

    # -- dedicated workers ---------------------------------------------------------------------------

    def start_dedicated_worker(self, label: str) -> DedicatedWorker:
        """A fresh worker container (testcontainers ``DockerContainer`` from the layer's recipe) behind
        its own relay, ready (``ping`` answers with the LM configured)."""
        self._require_container_layer("bridge_worker")
        if self._runtime_given:
            return self._start_dedicated_on_runtime()
        from provisioner.bridge.client import BridgeClient
        from provisioner.runtime import launch
        from provisioner.runtime.deployment import WorkerInfo
        from provisioner.runtime.egress import block_host_access

        self._ensure_watchdog()
        # A deployment of its own (names prov-<run>-<instance>-d<n>-…, the process's instance label).
        plan = self._plan(1, f"{self.instance}-d{next(self._dedicated)}")
        recipe = plan.workers[0]
        # Networks and the relay are deployed as usual; the worker itself by testcontainers.
        base = launch.deploy(dataclasses.replace(plan, workers=()), self.runtime, self.env.settings)
        container = None
        try:
            container = recipe.to_testcontainer()
            container.start()
            container_id = container.get_container_id()
            base.resources.track("container", container_id, name=recipe.name, owner=f"test:{label}",
                                 cleanup=container.stop)
            if recipe.guarded:  # the worker waits for its egress guard before it serves
                block_host_access(self.runtime, recipe, container_id, network=plan.run_network,
                                  timeout_s=self.env.settings.container.ready_timeout_s)
            relay_id = base.container_ids[plan.relay.name]
            port = self.runtime.published_port(relay_id, plan.relay_port_for(0))
            host = self.runtime.publish_host
            info: WorkerInfo = WorkerInfo(0, recipe.name, container_id, host, int(port))
            base.wait_ready(info)
            self._dedicated_started += 1
        except BaseException:
            base.resources.cleanup_all()
            raise
        client = BridgeClient(host, int(port), request_timeout=self.env.settings.request_timeout,
                              token=plan.control_token)
        return DedicatedWorker(recipe.name, container_id, host, int(port), container, client, base)

    def _start_dedicated_on_runtime(self) -> DedicatedWorker:
        """A dedicated worker made by the handed-in runtime (testcontainers talks to Docker only, and
        a handed-in runtime is the door to the engine): the plan's one worker, relay and networks as a
        deployment. ``container`` is None (there is no testcontainers object)."""
        from provisioner.bridge.client import BridgeClient
        from provisioner.runtime import launch

        plan = self._plan(1, f"{self.instance}-d{next(self._dedicated)}")
        deployment = launch.deploy(plan, self.runtime, self.env.settings)  # removes what it made on failure
        info = deployment.workers[0]
        self._dedicated_started += 1
        client = BridgeClient(info.host, info.port, request_timeout=self.env.settings.request_timeout,
                              token=plan.control_token)
        return DedicatedWorker(info.name, info.container_id, info.host, info.port, None, client, deployment)

    def stop_dedicated_worker(self, worker: DedicatedWorker, *, retain: bool) -> None:
        """Remove the worker, its relay and networks — or keep them (retain_on_failure) for debugging."""
        with contextlib.suppress(Exception):
            worker.client.close()
        if retain:
            from provisioner.runtime import watchdog as wd

            worker.retained = True
            names = worker.resource_names()
            self._retained_names.update(names)
            self.retained.append(f"container {worker.name} ({worker.address})")
            # The run's watchdog leaves a retained run alone; `provision reap` removes it later.
            wd.mark(self.env.run_dir, wd.RETAIN_MARKER)
            for res in worker.environment.resources.tracked():
                worker.environment.resources.forget(res)
            return
        report = worker.environment.resources.cleanup_all()
        if not report.ok:
            from provisioner.errors import CleanupError

            raise CleanupError([(f"{r.kind} {r.name}", exc) for r, exc in report.errors],
                               what=f"removal(s) of dedicated worker {worker.name}")

    # -- leak checks ---------------------------------------------------------------------------------

    def owned_names(self) -> set[tuple[str, str]]:
        """What belongs to the process, not a test: pool containers and networks, retained ones."""
        names = set(self._retained_names)
        if self._resources is not None:
            names.update(
                (r.kind, r.name if r.kind in ("container", "network", "volume") else r.ident)
                for r in self._resources.tracked()
                if not r.owner.startswith("test:")
            )
        return names

    def pool_owns(self, kind: str, name: str) -> bool:
        """A container of the pool's worker slots: any generation of a worker, or its egress guard,
        also one a background replacement is still making (not tracked yet). Never a test's leak."""
        env = self._pool_env
        if kind != "container" or env is None:
            return False
        return any(name == r.name or name.startswith(f"{r.name}-") for r in env.recipes.values())

    def _sweep(self) -> list[str]:
        """Remove whatever still carries this process's labels (created but never tracked, e.g. by a
        start interrupted mid-call), keeping retained workers. Containers before networks."""
        from provisioner.runtime.engine import remove_resource

        assert self._resources is not None
        found = [
            ref for ref in self.runtime.list_resources(self._resources.selector)
            if (ref.kind, ref.name) not in self._retained_names
        ]
        problems = []
        for ref in sorted(found, key=lambda r: r.kind != "container"):
            try:
                remove_resource(self.runtime, ref)
            except Exception as exc:
                problems.append(f"{ref.kind} {ref.name}: {exc}")
        return problems

    def close(self) -> list[str]:
        """Remove everything this process created (except retained workers); return what failed."""
        problems: list[str] = []
        with self._lock:
            if self._pool is not None:
                with contextlib.suppress(Exception):
                    self._pool.close()
            if self._runtime is not None and self.env.identity.controller and self.env.up_run is None:
                from provisioner.runtime.shared_pool import finish_shared_pool

                # The run's controller ends last: the run's shared pool goes (runtime/shared_pool.py).
                problems += finish_shared_pool(self.env.run_dir, self.env.run_id, self._runtime)
            if self._resources is not None:
                report = self._resources.cleanup_all()
                problems += [f"{r.kind} {r.name}: {exc}" for r, exc in report.errors]
                problems += self._sweep()
                self._resources.close()  # stops the event watch of the leak checks
            if self._runtime is not None and not self._runtime_given:
                with contextlib.suppress(Exception):
                    self._runtime.close()
        return problems


def snapshot(containers: ProcessContainers | None, *, sync: bool = True) -> frozenset[tuple[str, str]]:
    """What exists now that a test could leak: this process's managed engine resources (when the
    process has any) and its child processes, tracked files and ports. ``sync=False`` for the
    baseline before a test (see :meth:`ResourceManager.snapshot`)."""
    if containers is not None and containers.resources_started:
        return containers.resources.snapshot(sync=sync)
    from provisioner.runtime.resources import ResourceManager

    return ResourceManager(None).snapshot(sync=sync)


def check_leaks(
    before: Iterable[tuple[str, str]],
    containers: ProcessContainers | None,
    test_id: str,
) -> list[tuple[str, str]]:
    """Resources that exist now, did not before the test, and belong to no one but the test."""
    from provisioner.runtime.resources import leaks

    after = snapshot(containers)
    owned = containers.owned_names() if containers is not None else set()
    found = [
        item for item in leaks(before, after)
        if item not in owned and not (containers is not None and containers.pool_owns(*item))
    ]
    if containers is not None and containers.resources_started:
        # Resources the test tracked itself (tempfiles, ports) and did not release.
        found += [
            (r.kind, r.ident) for r in containers.resources.tracked(f"test:{test_id}")
            if (r.kind, r.ident) in after and (r.kind, r.ident) not in found
        ]
    return found

