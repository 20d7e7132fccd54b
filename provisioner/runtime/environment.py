"""A layer's environment, up and down: the plain API behind ``provision up/down/status/run/reap/doctor``.

* :class:`RunEnvironment` — one live run: creates its networks and containers from a
  :class:`~provisioner.runtime.recipes.RunPlan` (workers started concurrently), waits until every
  worker answers ``ping`` with its LM configured, replaces workers, and removes everything again;
* :func:`up` / :func:`down` / :func:`status` / :func:`run_command` / :func:`reap` / :func:`doctor` —
  what the CLI calls, with the state file ``<state_dir>/runs/<id>/state.json`` and the env file
  ``<state_dir>/runs/<id>/env`` (also copied to ``<state_dir>/current.env`` for ``source``).

No secrets are written to the state file: it holds ids, names, addresses and modes only. The env
file (mode 0600) also holds the run's control token, ``PROVISION_CONTROL_TOKEN``: it lets a
controller in any language use the workers' worker-wide commands (docs/protocol.md, "Access").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict

from provisioner.bridge.protocol import CONTROL_TOKEN_ENV
from provisioner.errors import (
    ConfigError,
    DockerUnavailableError,
    ImageError,
    ProvisionerError,
    RuntimeProblem,
    WorkerNotReadyError,
)
from provisioner.layers import get_layer
from provisioner.lm.ledger import RUN_LM_SUBDIR
from provisioner.lmconfig import LMMode
from provisioner.runtime import labels as L
from provisioner.runtime import watchdog as wd
from provisioner.runtime.egress import block_host_access
from provisioner.runtime.engine import ContainerRuntime, ContainerState, ResourceRef, remove_by_selector
from provisioner.runtime.recipes import (
    ContainerRecipe,
    RunPlan,
    plan_run,
    prepare_shared_dir,
    replacement_recipe,
)
from provisioner.runtime.resources import CleanupReport, ResourceManager, should_remove
from provisioner.settings import Settings, load_settings

LOOPBACK = "127.0.0.1"
CURRENT_ENV = "current.env"
CURRENT_RUN = "current"
Progress = Callable[[str], None]


# --- readiness ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    lm_configured: bool = False
    detail: str = ""
    latency_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.ok and self.lm_configured


Probe = Callable[[str, int, float], ProbeResult]


def bridge_probe(host: str, port: int, timeout: float) -> ProbeResult:
    """One ``ping`` over the bridge protocol (the default readiness and health probe)."""
    from provisioner.bridge.client import BridgeClient
    from provisioner.errors import BridgeError

    start = time.perf_counter()
    client = BridgeClient(host, port, connect_timeout=timeout, request_timeout=timeout)
    try:
        reply = client.ping()
    except BridgeError as exc:
        return ProbeResult(False, detail=str(exc), latency_s=time.perf_counter() - start)
    finally:
        client.close()
    return ProbeResult(
        bool(reply.get("status") == "ok"),
        bool(reply.get("lm_configured")),
        "ok",
        time.perf_counter() - start,
        dict(reply),
    )


# --- one live run ------------------------------------------------------------------------------------


@dataclass
class WorkerInfo:
    slot: int
    name: str
    container_id: str
    host: str
    port: int
    generation: int = 0
    started_at: float = field(default_factory=time.time)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class RunEnvironment:
    """One run's containers and networks. Use :meth:`start`, then :meth:`stop` (or ``with``).

    ``resources`` (default: a new :class:`ResourceManager` on ``runtime``) tracks everything this
    object creates, so a failed or interrupted start removes exactly what it made.
    """

    def __init__(
        self,
        plan: RunPlan,
        runtime: ContainerRuntime,
        *,
        resources: ResourceManager | None = None,
        probe: Probe = bridge_probe,
        ready_timeout_s: float = 60.0,
        poll_interval_s: float = 0.025,
        progress: Progress | None = None,
    ) -> None:
        self.plan = plan
        self.runtime = runtime
        self.resources = resources or ResourceManager(runtime, selector=L.selector(plan.run_id))
        self.probe = probe
        self.ready_timeout_s = ready_timeout_s
        self.poll_interval_s = poll_interval_s
        self.progress = progress or (lambda _m: None)
        self.workers: list[WorkerInfo] = []
        self.recipes: dict[int, ContainerRecipe] = {r.slot: r for r in plan.workers if r.slot is not None}
        self.container_ids: dict[str, str] = {}  # recipe name -> container id
        self.state: RunState | None = None
        self.warnings: list[str] = []
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self.started = False

    # -- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> RunEnvironment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> RunEnvironment:
        """Create networks, then the stand-in, relay and workers concurrently; wait until ready.

        On any failure — including Ctrl-C — everything created so far is removed before raising.
        """
        try:
            self._start()
        except BaseException:
            self._closing.set()
            self.resources.cleanup_all()
            raise
        self.started = True
        return self

    @property
    def control_token(self) -> str | None:
        """The workers' control token (pass it as ``BridgeClient(..., token=...)``)."""
        return self.plan.control_token

    def _start(self) -> None:
        t0 = time.perf_counter()
        if self.plan.run_limits is not None and self.plan.lm_run_dir is not None:
            from provisioner.lm.limits import write_run_limits

            # Before any worker starts: the run's limits hold whatever a worker's client configures.
            write_run_limits(Path(self.plan.lm_run_dir), **self.plan.run_limits)
        run_net, edge_net = self.plan.networks
        others = [r for r in self.plan.containers() if r is not self.plan.relay]
        # The workers' Python start-up is the critical path: they start as soon as the run network
        # exists, while the edge network and the relay are made alongside.
        with self._threads(len(others) + 3) as pool:
            run_net_done = pool.submit(self._create_network, run_net)
            edge_done = pool.submit(self._create_network, edge_net)
            _wait_all([run_net_done], self._closing)
            self.progress(f"run network ready in {time.perf_counter() - t0:.2f}s; starting containers")
            started = [pool.submit(self._run, recipe) for recipe in others]
            _wait_all([edge_done], self._closing)
            started.append(pool.submit(self._run, self.plan.relay))
            _wait_all(started, self._closing)
        relay_id = self.container_ids[self.plan.relay.name]
        ports = {slot: self._relay_port(relay_id, slot) for slot in self.recipes}
        self.workers = [
            WorkerInfo(slot, recipe.name, self.container_ids[recipe.name], LOOPBACK, ports[slot])
            for slot, recipe in sorted(self.recipes.items())
        ]
        self.progress(f"containers started in {time.perf_counter() - t0:.2f}s; waiting for readiness")
        with self._threads(len(self.workers) + 1) as pool:
            waits: list[Future[None]] = [pool.submit(self.wait_ready, w) for w in self.workers]
            if self.plan.standin is not None:
                waits.append(pool.submit(self._wait_standin))
            _wait_all(waits, self._closing)
        self.progress(f"{len(self.workers)} worker(s) ready in {time.perf_counter() - t0:.2f}s")

    @contextlib.contextmanager
    def _threads(self, count: int) -> Iterator[ThreadPoolExecutor]:
        """A thread pool whose threads are told to stop (``_closing``) before it waits for them when
        the block fails — a Ctrl-C between two statements included — so nothing runs on to its deadline."""
        pool = ThreadPoolExecutor(max_workers=count)
        try:
            yield pool
        except BaseException:
            self._closing.set()
            raise
        finally:
            pool.shutdown(wait=True)

    def stop(self) -> CleanupReport:
        """Remove every container and network of the run (tracked ones, then a label sweep)."""
        self._closing.set()
        report = self.resources.cleanup_all()
        remove_by_selector(self.runtime, L.selector(self.plan.run_id))
        self.started = False
        return report

    # -- pieces ----------------------------------------------------------------------------------------

    def _create_network(self, recipe: Any) -> None:
        net_id = self.runtime.create_network(recipe)
        self.resources.track("network", net_id, name=recipe.name, owner="run")

    def _run(self, recipe: ContainerRecipe) -> str:
        if self._closing.is_set():
            raise RuntimeProblem("the run is being stopped")
        container_id = self.runtime.create_container(recipe)
        self.resources.track("container", container_id, name=recipe.name, owner=_owner_of(recipe))
        with self._lock:
            self.container_ids[recipe.name] = container_id
        if self._closing.is_set():  # interrupted while we were creating it
            raise RuntimeProblem("the run is being stopped")
        self.runtime.start_container(container_id)
        if recipe.guarded:  # cut off from the host before its command starts (runtime/egress.py)
            block_host_access(
                self.runtime,
                recipe,
                container_id,
                network=self.plan.run_network,
                timeout_s=self.ready_timeout_s,
                stop=self._closing,
            )
        return container_id

    def _relay_port(self, relay_id: str, slot: int) -> int:
        port = self.runtime.published_port(relay_id, self.plan.relay_port_for(slot))
        if port is None:
            raise RuntimeProblem(
                f"the relay {self.plan.relay.name} has no 127.0.0.1 port for worker slot {slot}; "
                f"its log:\n{self.runtime.logs(relay_id)}"
            )
        return port

    def wait_ready(self, worker: WorkerInfo) -> None:
        """Poll ``ping`` every ``poll_interval_s`` until the worker is ready or the deadline passes.

        A worker whose container exits fails at once (no waiting for the deadline), with its logs.
        """
        deadline = time.monotonic() + self.ready_timeout_s
        next_state_check = 0.0
        last = ProbeResult(False, detail="not probed yet")
        while True:
            if self._closing.is_set():
                raise RuntimeProblem("the run is being stopped")
            last = self.probe(worker.host, worker.port, max(0.2, min(2.0, self.ready_timeout_s / 4)))
            if last.ready:
                return
            now = time.monotonic()
            if now >= next_state_check:
                next_state_check = now + 0.25
                for cid, label in (
                    (worker.container_id, worker.name),
                    (self.container_ids[self.plan.relay.name], self.plan.relay.name),
                ):
                    state = self.runtime.container_state(cid)
                    if state is None or not state.running:
                        how = (
                            "is gone" if state is None else f"exited ({state.status}, code {state.exit_code})"
                        )
                        raise WorkerNotReadyError(
                            f"worker {worker.name} did not become ready: container {label} {how}",
                            self.runtime.logs(cid),
                        )
            if now >= deadline:
                why = "LM not configured" if last.ok else last.detail
                raise WorkerNotReadyError(
                    f"worker {worker.name} ({worker.address}) was not ready within "
                    f"{self.ready_timeout_s:.0f}s (last ping: {why})",
                    self.runtime.logs(worker.container_id),
                )
            time.sleep(self.poll_interval_s)

    def _wait_standin(self) -> None:
        assert self.plan.standin is not None
        cid = self.container_ids[self.plan.standin.name]
        deadline = time.monotonic() + self.ready_timeout_s
        while "PROVISION_STANDIN_READY" not in self.runtime.logs(cid, tail=20):
            state = self.runtime.container_state(cid)
            if state is None or not state.running or time.monotonic() >= deadline:
                raise WorkerNotReadyError(
                    f"the Gemini stand-in {self.plan.standin.name} did not start", self.runtime.logs(cid)
                )
            time.sleep(self.poll_interval_s * 2)

    # -- workers ---------------------------------------------------------------------------------------

    def worker(self, slot: int) -> WorkerInfo:
        with self._lock:
            for w in self.workers:
                if w.slot == slot:
                    return w
        raise KeyError(f"no worker in slot {slot}")

    def addresses(self) -> list[str]:
        return [w.address for w in self.workers]

    def worker_state(self, slot: int) -> ContainerState | None:
        return self.runtime.container_state(self.worker(slot).container_id)

    def replace_worker(self, slot: int) -> WorkerInfo:
        """Remove the worker in ``slot`` and start a fresh one behind the same address."""
        old = self.worker(slot)
        tracked = self.resources.find("container", old.container_id)
        if tracked is not None:
            self.resources.release(tracked)
        else:
            self.runtime.remove_container(old.container_id)
        generation = old.generation + 1
        recipe = replacement_recipe(self.recipes[slot], generation)
        try:
            container_id = self._run(recipe)
            new = WorkerInfo(slot, recipe.name, container_id, old.host, old.port, generation)
            self.wait_ready(new)
        except BaseException:
            # A half-made replacement would block the next attempt's name: remove it.
            with self._lock:
                made = self.container_ids.pop(recipe.name, None)
            if made is not None:
                found = self.resources.find("container", made)
                if found is not None:
                    self.resources.release(found)
                else:
                    self.runtime.remove_container(made)
            raise
        with self._lock:
            self.workers = [new if w.slot == slot else w for w in self.workers]
        return new


def _owner_of(recipe: ContainerRecipe) -> str:
    return f"slot:{recipe.slot}" if recipe.slot is not None else recipe.role


def _wait_all(futures: Any, cancel: threading.Event | None = None) -> None:
    """Wait for every future; raise the first error after all have finished (nothing left running).

    ``cancel`` is set at the first error — Ctrl-C included — so the others (readiness polls, egress
    guards) stop at once instead of running on to their own deadlines.
    """
    first: BaseException | None = None
    for fut in list(futures):
        try:
            fut.result()
        except BaseException as exc:
            if cancel is not None:
                cancel.set()
            first = first or exc
    if first is not None:
        raise first


# --- state and env files -----------------------------------------------------------------------------


class WorkerEntry(TypedDict):
    """One worker of a run in its state file: slot, container name and id, ``127.0.0.1:<port>``."""

    slot: int
    name: str
    container_id: str
    address: str


@dataclass
class RunState:
    """What ``provision up`` leaves behind for ``status``/``down`` and for other tools. No secrets."""

    run_id: str
    layer: str
    lm_mode: str
    session: str
    image: str
    created: float
    owner_pid: int
    owner_host: str
    persistent: bool
    uses_standin: bool
    egress: bool
    networks: list[str]
    relay: str
    standin: str | None
    workers: list[WorkerEntry]
    lm_run_dir: str | None = None
    status: str = "up"

    @property
    def addresses(self) -> list[str]:
        return [str(w["address"]) for w in self.workers]

    def env(self, state_file: Path | None = None) -> dict[str, str]:
        """The variables any language's test suite needs to reach this run."""
        ports = [a.rsplit(":", 1)[1] for a in self.addresses]
        env = {
            "PROVISION_RUN_ID": self.run_id,
            "PROVISION_LAYER": self.layer,
            "PROVISION_LM_MODE": self.lm_mode,
            "PROVISION_BRIDGE_ADDRS": ",".join(self.addresses),
            "PROVISION_BRIDGE_HOST": LOOPBACK,
            "PROVISION_BRIDGE_PORTS": ",".join(ports),
            "PROVISION_WORKERS": str(len(self.workers)),
            "PROVISION_LM_STANDIN": "1" if self.uses_standin else "0",
        }
        if self.lm_run_dir:
            env["PROVISION_LM_RUN_DIR"] = self.lm_run_dir
        if state_file is not None:
            env["PROVISION_STATE_FILE"] = str(state_file)
        return env


def run_dir_of(settings: Settings, run_id: str) -> Path:
    return (Path(settings.state_dir) / "runs" / run_id).resolve()


def state_file_of(settings: Settings, run_id: str) -> Path:
    return run_dir_of(settings, run_id) / "state.json"


def _atomic_write(path: Path, text: str, *, private: bool = False) -> None:
    """Replace ``path`` atomically; ``private``: readable by the owner only (0600) from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def render_env(env: Mapping[str, str]) -> str:
    """``export KEY=value`` lines: ``source``-able by sh/bash/zsh, and read by python-dotenv."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


def write_state(
    settings: Settings, state: RunState, *, current: bool = True, control_token: str | None = None
) -> Path:
    """Write state.json and the env file of the run (and make it the current one).

    ``control_token`` goes into the env files only (as ``PROVISION_CONTROL_TOKEN``; they are
    written 0600), never into state.json.
    """
    path = state_file_of(settings, state.run_id)
    _atomic_write(path, json.dumps(asdict(state), indent=2) + "\n")
    env = state.env(path)
    if control_token:
        env[CONTROL_TOKEN_ENV] = control_token
    env_text = render_env(env)
    _atomic_write(path.with_name("env"), env_text, private=True)
    if current:
        root = Path(settings.state_dir).resolve()
        _atomic_write(root / CURRENT_ENV, env_text, private=True)
        _atomic_write(root / CURRENT_RUN, state.run_id + "\n")
    return path


class StateUnreadableError(RuntimeProblem):
    """A run's state file exists but cannot be used: truncated (a process killed mid-write), hand
    edited, or written by an incompatible version. ``path``: the file; ``reason``: what is wrong."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"the run's state file {path} is unreadable ({reason})")
        self.path = path
        self.reason = reason


_RUN_STATE = TypeAdapter(RunState)
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def read_state(settings: Settings, run_id: str) -> RunState | None:
    """The run's state (None: it has no state file; only ``provision up`` writes one).

    Raises:
        StateUnreadableError: the file is there but is not a valid state file (torn, bad JSON, a
            field missing or of the wrong type) — the run's resources are still found by their labels.
    """
    path = state_file_of(settings, run_id)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateUnreadableError(path, exc.strerror or str(exc)) from None
    try:
        return _RUN_STATE.validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'document'}: {err['msg']}" for err in exc.errors()[:3]
        )
        raise StateUnreadableError(path, problems) from None


def current_run_id(settings: Settings) -> str | None:
    """The run id in ``<state_dir>/current`` (None: none, or the file is torn or not a run id)."""
    try:
        text = (Path(settings.state_dir) / CURRENT_RUN).read_bytes().decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None
    return text if _RUN_ID.fullmatch(text) else None


def _clear_current(settings: Settings, run_id: str) -> None:
    root = Path(settings.state_dir)
    if current_run_id(settings) == run_id:
        for name in (CURRENT_ENV, CURRENT_RUN):
            with contextlib.suppress(FileNotFoundError):
                (root / name).unlink()


# --- up / down / status ------------------------------------------------------------------------------


def new_run_id() -> str:
    return secrets.token_hex(4)


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else load_settings()


def _docker(runtime: ContainerRuntime | None) -> ContainerRuntime:
    if runtime is not None:
        return runtime
    from provisioner.runtime.engine import DockerRuntime

    rt = DockerRuntime()
    rt.ping()
    return rt


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

    def live_owners(self, run_dir: Path | None = None) -> list[str]:
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
            for pid, start in wd._entries(run_dir / wd.OWNERS_DIR):
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
            return (Path(state_dir) / "runs" / self.run_id).is_dir()
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


def up(
    settings: Settings | None = None,
    *,
    layer: str | None = None,
    workers: int | None = None,
    lm_mode: LMMode | None = None,
    require_key: bool = False,
    persistent: bool = True,
    run_id: str | None = None,
    session: str | None = None,
    image: str | None = None,
    runtime: ContainerRuntime | None = None,
    probe: Probe = bridge_probe,
    watchdog: bool = True,
    owner_pid: int | None = None,
    progress: Progress | None = None,
    new: bool = False,
) -> RunEnvironment:
    """Start a layer's environment and write its state and env files; return the live run.

    ``persistent`` (``provision up``): the environment outlives this process until :func:`down`.
    A persistent run refuses to start over a live persistent run of the same project and layer
    (it would orphan it: ``down`` only knows the current run) unless ``new`` starts another one
    alongside. Every resource is labelled with the project (:func:`project_of`).
    Otherwise (``provision run``, the pytest plugin) the run's watchdog removes it as soon as its
    owner process (``owner_pid``, default this one) is gone, even after SIGKILL. The watchdog also
    covers a persistent run until it is fully up, so Ctrl-C or a kill during ``up`` leaves nothing.

    Raises:
        ConfigError: the layer has no containers, or ``require_key`` without a key.
        RuntimeProblem: a live run of this project and layer exists (see ``new``), or ``run_id``
            is taken.
        ImageError: the worker image cannot be built or found, or holds another provisioner.
    """
    settings = _settings(settings)
    say = progress or (lambda _m: None)
    project = project_of(settings)
    layer_obj = get_layer(settings, layer or settings.layer)
    if not layer_obj.needs_docker:
        raise ConfigError(
            f"layer {layer_obj.name!r} runs in-process (adapter {layer_obj.adapter!r}) and has no "
            "containers; choose a bridge layer such as 'integration' or 'e2e'"
        )
    lm = settings.lm_for(layer_obj.name, lm_mode)
    if require_key and lm.mode == "real" and lm.api_key is None:
        raise ConfigError(
            "--require-key: lm.api_key is not set; export GEMINI_TEST_API_KEY to use the real Gemini API"
        )
    rt = _docker(runtime)
    runs = list_runs(rt, project, settings.state_dir)
    if persistent and not new:
        live = [
            r for r in runs
            if r.persistent and r.project == project and r.layer == layer_obj.name and r.running(rt)
        ]
        if live:
            ids = ", ".join(r.run_id for r in live)
            raise RuntimeProblem(
                f"layer {layer_obj.name!r} of this project is already up (run {ids}); "
                f"remove it first with `provision down --run {live[-1].run_id}`, "
                "or start another one alongside with `provision up --new`"
            )
    warnings = [
        f"stale run {r.run_id} (layer {r.layer}, owner pid {r.owner_pid} gone) still has "
        f"{len(r.resources)} resource(s); `provision reap` removes them"
        for r in runs
        if r.stale
    ]
    for w in warnings:
        say("warning: " + w)
    if image is None:
        from provisioner.runtime.engine import DockerRuntime
        from provisioner.runtime.images import ensure_worker_image

        if not isinstance(rt, DockerRuntime):
            raise ImageError("pass image= when using a runtime other than DockerRuntime")
        image = ensure_worker_image(
            rt, image=settings.container.image, base=settings.container.base, project=project, progress=say
        )
    if run_id is not None and rt.list_resources(L.selector(run_id)):
        raise RuntimeProblem(
            f"run id {run_id!r} is already in use on this engine; choose another, or remove it first "
            f"with `provision down --run {run_id}`"
        )
    run_id = run_id or new_run_id()
    run_dir = run_dir_of(settings, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    lm_run_dir: Path | None = None
    if lm.mode != "mock":
        lm_run_dir = prepare_shared_dir(Path(lm.run_dir) if lm.run_dir else run_dir / RUN_LM_SUBDIR)
        if lm.mode == "cached" and lm.record_mode != "none":  # replay-only: mounted read-only, untouched
            prepare_shared_dir(Path(lm.cache_dir))
    owner = owner_pid or os.getpid()
    if watchdog:
        wd.ensure_watchdog(
            run_id, run_dir, owner_pid=owner, interval_s=settings.container.watchdog_interval_s, wait=False
        )
    created = time.time()
    plan = plan_run(
        settings,
        layer_obj,
        lm,
        run_id=run_id,
        image=image,
        workers=workers,
        session=session,
        run_dir=lm_run_dir,
        owner_pid=owner,
        created=created,
        persistent=persistent,
        project=project,
    )
    env = RunEnvironment(
        plan,
        rt,
        probe=probe,
        ready_timeout_s=settings.container.ready_timeout_s,
        progress=say,
    )
    try:
        env.start()
        if watchdog:
            wd.wait_watching(run_dir)
    except BaseException:
        env.stop()
        # The watchdog stays on duty: when this process ends it sweeps the run's labels once more,
        # catching a container whose create call was still in flight when we were interrupted.
        raise
    state = RunState(
        run_id=run_id,
        layer=layer_obj.name,
        lm_mode=lm.mode,
        session=plan.session,
        image=image,
        created=created,
        owner_pid=owner,
        owner_host=socket.gethostname(),
        persistent=persistent,
        uses_standin=plan.uses_standin,
        egress=plan.egress,
        networks=[n.name for n in plan.networks],
        relay=plan.relay.name,
        standin=plan.standin.name if plan.standin else None,
        workers=[
            {"slot": w.slot, "name": w.name, "container_id": w.container_id, "address": w.address}
            for w in env.workers
        ],
        lm_run_dir=str(lm_run_dir) if lm_run_dir else None,
    )
    # Only a persistent environment becomes the "current" one that shells source: a test session's
    # or `provision run`'s private run must not replace what `provision up` left for the user.
    write_state(settings, state, current=persistent, control_token=plan.control_token)
    env.state = state
    if persistent and watchdog:
        wd.mark(run_dir, wd.PERSIST_MARKER)  # up is done: the watchdog stands down, the run stays
        wd.unregister_owner(run_dir, owner)
    env.warnings = warnings
    return env


@dataclass
class DownResult:
    """``removed``: ``"<kind> <name>"`` of what went; ``state_problem``: why the run's state file
    could not be read (empty: it could, or there is none) — its resources went by label anyway."""

    run_id: str | None
    removed: list[str]
    state_problem: str = ""


class AmbiguousRunError(ConfigError):
    """Several runs could be meant; ``candidates`` lists them (``run id (layer …, started …)``)."""

    def __init__(self, message: str, candidates: list[str]) -> None:
        super().__init__(message)
        self.candidates = candidates


def _describe(summary: RunSummary) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary.created)) if summary.created else "?"
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


def down(
    settings: Settings | None = None,
    *,
    run_id: str | None = None,
    runtime: ContainerRuntime | None = None,
) -> DownResult:
    """Remove a run (default: :func:`default_run`) — idempotent: a second call removes nothing.

    Raises:
        AmbiguousRunError: no ``run_id`` and the project has several runs up.
    """
    settings = _settings(settings)
    rt = _docker(runtime)
    run_id = run_id or default_run(settings, rt)
    if run_id is None:
        return DownResult(None, [])
    run_dir = run_dir_of(settings, run_id)
    removed: list[str] = []
    if run_dir.is_dir():
        wd.mark(run_dir, wd.STOPPED_MARKER)  # the watchdog, if any, stands down
        from provisioner.runtime.resources import terminate_process

        for pid, start in wd._entries(run_dir / wd.PROCESSES_DIR):
            if terminate_process(pid, grace_s=2.0, create_time=start or None):
                removed.append(f"process {pid}")
    removed += [f"{ref.kind} {ref.name}" for ref in _remove_run(rt, run_id)]
    problem = ""
    try:
        state = read_state(settings, run_id)
    except StateUnreadableError as exc:  # the labels found everything; the file is left as it is
        state, problem = None, str(exc)
    if state is not None and state.status != "down":
        state.status = "down"
        write_state(settings, state, current=False)
    _clear_current(settings, run_id)
    return DownResult(run_id, removed, problem)


def _remove_run(runtime: ContainerRuntime, run_id: str) -> list[ResourceRef]:
    return remove_by_selector(runtime, L.selector(run_id))


def death_reason(state: ContainerState | None) -> str:
    """How a worker's container ended, from the engine's container state, as a phrase after
    "which": ``is gone (...)``, ``was OOM-killed: out of memory (exit code 137)``, ``exited with code
    137 (SIGKILL)``, ``is paused``. The facts are Docker's (``State.Status``, ``State.ExitCode``,
    ``State.OOMKilled``); the signal name is the exit code minus 128, as the shell reports it."""
    if state is None:
        return "is gone (its container no longer exists)"
    if state.oom_killed:
        return f"was OOM-killed: out of memory (exit code {state.exit_code})"
    if state.status not in ("exited", "dead"):
        return f"is {state.status}"
    code = state.exit_code
    how = f"exited with code {code}"
    if code is not None and 128 < code < 128 + 65:
        with contextlib.suppress(ValueError):
            how += f" ({signal.Signals(code - 128).name})"
    return how


@dataclass
class WorkerHealth:
    """One worker of a run. ``container``: the engine's status (running | exited | missing ...);
    ``reason``: how a worker that is not running ended (:func:`death_reason`), else empty;
    ``repaired``: what ``status(repair=True)`` did for it (empty: nothing needed or possible)."""

    slot: int
    name: str
    address: str
    container: str  # running | exited | missing ...
    ping_ok: bool
    lm_configured: bool
    latency_ms: float | None
    detail: str = ""
    reason: str = ""
    repaired: str = ""

    @property
    def healthy(self) -> bool:
        return self.container == "running" and self.ping_ok and self.lm_configured


@dataclass
class StatusReport:
    run_id: str | None
    state: RunState | None
    workers: list[WorkerHealth]
    others: dict[str, str]  # relay / stand-in: name -> container status
    state_problem: str = ""  # the state file is unreadable (StateUnreadableError's message)

    @property
    def healthy(self) -> bool:
        return (
            bool(self.workers)
            and all(w.healthy for w in self.workers)
            and all(s == "running" for s in self.others.values())
        )


def status(
    settings: Settings | None = None,
    *,
    run_id: str | None = None,
    runtime: ContainerRuntime | None = None,
    probe: Probe = bridge_probe,
    repair: bool = False,
) -> StatusReport:
    """The health of every worker of a run (default: :func:`default_run`): container state and a ping.

    ``repair``: first restart every worker whose container exited (killed, OOM-killed, crashed) —
    the same container, so the same network alias and published address — re-apply its egress
    guard and wait until it answers ``ping`` (``container.ready_timeout_s``). What was done is in
    each worker's ``repaired``; a worker whose container is gone cannot be restarted (``down`` then
    ``up``). A repaired worker has lost its sessions and programs.

    Raises:
        AmbiguousRunError: no ``run_id`` and the project has several runs up.
    """
    settings = _settings(settings)
    rt = _docker(runtime)
    run_id = run_id or default_run(settings, rt)
    try:
        state = read_state(settings, run_id) if run_id else None
    except StateUnreadableError as exc:
        return StatusReport(run_id, None, [], {}, state_problem=str(exc))
    if state is None:
        return StatusReport(run_id, None, [], {})
    repaired: dict[str, str] = {}
    if repair:
        repaired = _repair_workers(settings, rt, state, probe)

    def check(w: dict[str, Any]) -> WorkerHealth:
        cstate = rt.container_state(str(w["container_id"]))
        host, port = str(w["address"]).rsplit(":", 1)
        done = repaired.get(str(w["name"]), "")
        if cstate is None or not cstate.running:
            return WorkerHealth(
                int(w["slot"]),
                str(w["name"]),
                str(w["address"]),
                "missing" if cstate is None else cstate.status,
                False,
                False,
                None,
                reason=death_reason(cstate),
                repaired=done,
            )
        result = probe(host, int(port), 2.0)
        return WorkerHealth(
            int(w["slot"]),
            str(w["name"]),
            str(w["address"]),
            cstate.status,
            result.ok,
            result.lm_configured,
            round(result.latency_s * 1000, 2),
            "" if result.ok else result.detail,
            repaired=done,
        )

    with ThreadPoolExecutor(max_workers=max(1, len(state.workers))) as pool:
        workers = list(pool.map(check, state.workers))
    others = {}
    for name in (state.relay, state.standin):
        if name:
            cs = rt.container_state(name)
            others[name] = "missing" if cs is None else cs.status
    return StatusReport(run_id, state, workers, others)


def _repair_workers(
    settings: Settings, rt: ContainerRuntime, state: RunState, probe: Probe
) -> dict[str, str]:
    """Restart the run's exited workers in place (see :func:`status`); worker name -> what was done."""
    found = rt.list_resources(L.selector(state.run_id))
    labels = {ref.name: ref.labels for ref in found if ref.kind == "container"}
    run_network = state.networks[0] if state.networks else ""

    def repair_one(w: dict[str, Any]) -> tuple[str, str]:
        name, cid = str(w["name"]), str(w["container_id"])
        cstate = rt.container_state(cid)
        if cstate is not None and cstate.running:
            return name, ""
        why = death_reason(cstate)
        if cstate is None:
            return name, (f"not repaired: the worker {why}; `provision down` and `provision up` "
                          "start the run afresh")
        try:
            rt.start_container(cid)
            if not state.egress:  # guarded: its command waits until the guard has cut it off again
                target = ContainerRecipe(
                    name=name, role="worker", image=state.image, command=(), environment={},
                    labels=labels.get(name, L.selector(state.run_id)), networks=(), guarded=True,
                )
                block_host_access(rt, target, cid, network=run_network,
                                  timeout_s=settings.container.ready_timeout_s)
            host, port = str(w["address"]).rsplit(":", 1)
            deadline = time.monotonic() + settings.container.ready_timeout_s
            while not probe(host, int(port), 2.0).ready:
                now_state = rt.container_state(cid)
                if now_state is None or not now_state.running:
                    raise RuntimeProblem(f"it {death_reason(now_state)} again; its log:\n{rt.logs(cid)}")
                if time.monotonic() >= deadline:
                    raise RuntimeProblem(
                        f"it did not answer ping within {settings.container.ready_timeout_s:.0f}s"
                    )
                time.sleep(0.05)
        except RuntimeProblem as exc:
            return name, f"restart failed: {exc} (the worker {why})"
        return name, f"restarted: the worker {why}"

    with ThreadPoolExecutor(max_workers=max(1, len(state.workers))) as pool:
        return dict(pool.map(repair_one, state.workers))


def run_overview(
    settings: Settings | None = None, *, runtime: ContainerRuntime | None = None
) -> list[dict[str, Any]]:
    """Every run on the engine, all projects, oldest first (``provision status --all-projects``).

    Each row: ``run_id``, ``project`` (None: made by an older version), ``this_project`` (bool),
    ``layer``, ``persistent``, ``owner_host``, ``owner_pid``, ``created`` (unix time), ``resources``
    (count).
    """
    settings = _settings(settings)
    rt = _docker(runtime)
    ours = project_of(settings)
    return [
        {
            "run_id": r.run_id,
            "project": r.project,
            "this_project": r.project == ours,
            "layer": r.layer,
            "persistent": r.persistent,
            "owner_host": r.owner_host,
            "owner_pid": r.owner_pid,
            "created": r.created,
            "resources": len(r.resources),
        }
        for r in list_runs(rt)
    ]


# --- provision run -----------------------------------------------------------------------------------


def run_command(
    command: Sequence[str],
    settings: Settings | None = None,
    *,
    layer: str | None = None,
    workers: int | None = None,
    lm_mode: LMMode | None = None,
    require_key: bool = False,
    runtime: ContainerRuntime | None = None,
    progress: Progress | None = None,
    image: str | None = None,
    probe: Probe = bridge_probe,
    watchdog: bool = True,
) -> int:
    """Bring a layer up, run ``command`` with the run's env, bring it down; return the command's code.

    SIGINT/SIGTERM are passed on to the command and the run is still removed; SIGKILL of this
    process leaves the cleanup to the run's watchdog (within a few seconds). When the command
    fails, ``cleanup_policy``/``retain_on_failure`` may keep the run for inspection
    (:func:`~provisioner.runtime.resources.should_remove`).
    """
    if not command:
        raise ConfigError(
            "provision run needs a command after `--`, e.g. provision run --layer e2e -- pytest"
        )
    settings = _settings(settings)
    received: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)
        else:
            raise KeyboardInterrupt

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    env: RunEnvironment | None = None
    failed: bool | None = None  # None: the command did not finish (interrupted, crashed)
    try:
        env = up(
            settings,
            layer=layer,
            workers=workers,
            lm_mode=lm_mode,
            require_key=require_key,
            persistent=False,
            runtime=runtime,
            progress=progress,
            image=image,
            probe=probe,
            watchdog=watchdog,
        )
        assert env.state is not None
        run_dir = run_dir_of(settings, env.state.run_id)
        child_env = {**os.environ, **env.state.env(state_file_of(settings, env.state.run_id))}
        if env.control_token:
            child_env[CONTROL_TOKEN_ENV] = env.control_token
        try:
            child = subprocess.Popen(list(command), env=child_env)
        except OSError as exc:
            raise ConfigError(f"cannot run {command[0]!r}: {exc}") from None
        wd.register_process(run_dir, child.pid)
        code = child.wait()
        code = 128 + received[0] if received and code < 0 else code
        failed = code != 0
        return code
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if env is not None and env.state is not None:
            run_id = env.state.run_id
            # Interrupted before the command finished: always clean up.
            if failed is not None and not should_remove(
                settings.cleanup_policy, settings.retain_on_failure, failed
            ):
                wd.mark(run_dir_of(settings, run_id), wd.RETAIN_MARKER)  # the watchdog leaves it too
                (progress or (lambda _m: None))(
                    f"kept run {run_id} (cleanup_policy={settings.cleanup_policy}, "
                    f"retain_on_failure={settings.retain_on_failure}); remove it with "
                    f"`provision down --run {run_id}`"
                )
            else:
                down(settings, run_id=run_id, runtime=runtime)


# --- reap ------------------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1d`` or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip().lower()
    try:
        if value and value[-1] in units:
            return float(value[:-1]) * units[value[-1]]
        return float(value)
    except ValueError:
        raise ConfigError(f"--older-than: {text!r} is not a duration (e.g. 30m, 2h, 1d)") from None


@dataclass
class ReapResult:
    """One run ``reap`` looked at: ``removed`` what went (or would go, with ``dry_run``); ``kept``
    why it stayed although selected (its owners are alive), empty when it was removed."""

    run_id: str
    reason: str
    removed: list[str]
    project: str | None = None
    kept: str = ""
    state_problem: str = ""  # its state file is unreadable (it is removed by label all the same)


def reap(
    settings: Settings | None = None,
    *,
    run_id: str | None = None,
    older_than_s: float | None = None,
    all_runs: bool = False,
    all_projects: bool = False,
    force: bool = False,
    runtime: ContainerRuntime | None = None,
    dry_run: bool = False,
) -> list[ReapResult]:
    """Remove leftovers of earlier runs of this project (``all_projects``: of every project).

    Default: runs whose owner process on this host is gone and that were not started as persistent
    (``provision up``) — what a watchdog would have removed had it run. ``run_id``: that run.
    ``older_than_s``: every run created longer ago than that (persistent ones too). ``all_runs``:
    every run in scope. A run labelled by an older provisioner (no project label) is in this
    project's scope when this project's state dir has it (``<state_dir>/runs/<run_id>``), and in
    ``all_projects``' always. A selected run whose owner processes are alive (a test session, ``provision
    run``) is kept — reported with ``kept`` — unless ``force``.
    """
    settings = _settings(settings)
    rt = _docker(runtime)
    project = None if all_projects or run_id is not None else project_of(settings)
    now = time.time()
    out = []
    for summary in list_runs(rt, project, settings.state_dir):
        if run_id is not None:
            reason = "requested" if summary.run_id == run_id else ""
        elif all_runs:
            reason = "--all"
        elif older_than_s is not None:
            age = now - summary.created
            reason = f"{age / 60:.0f} min old" if summary.created and age > older_than_s else ""
        else:
            reason = "owner gone" if summary.stale else ""
        if not reason:
            continue
        listed = [f"{r.kind} {r.name}" for r in summary.resources]
        problem = ""
        try:
            read_state(settings, summary.run_id)
        except StateUnreadableError as exc:
            problem = str(exc)
        owners = summary.live_owners(run_dir_of(settings, summary.run_id))
        if owners and not force:
            kept = f"owner {', '.join(owners)} alive; --force removes it anyway"
            out.append(ReapResult(summary.run_id, reason, [], summary.project, kept, problem))
            continue
        if dry_run:
            out.append(ReapResult(summary.run_id, reason, listed, summary.project, "", problem))
            continue
        result = down(settings, run_id=summary.run_id, runtime=rt)
        out.append(ReapResult(summary.run_id, reason, result.removed, summary.project, "",
                              result.state_problem or problem))
    return out


# --- doctor ----------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def _isolated(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    """Run one check; an unexpected error becomes a failed check naming it (doctor never crashes)."""
    try:
        return check()
    except Exception as exc:
        return [Check(name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}")]


def doctor(settings: Settings | None = None, *, runtime: ContainerRuntime | None = None) -> list[Check]:
    """Every check, each isolated: installation, engine, worker image, base image, API key, disk
    space, stale runs. Returns one or more :class:`Check` per area (status ``ok``/``warn``/``fail``);
    a problem — including an unexpected error inside a check — is a failed check with advice, never
    an exception. Without a reachable engine the engine-bound checks are skipped as failed.
    """
    try:
        settings = _settings(settings)
    except ProvisionerError as exc:
        return [Check("settings", "fail", str(exc))]
    checks: list[Check] = []
    checks += _isolated("provisioner installation", _check_installation)
    rt: ContainerRuntime | None = None
    try:
        rt = _docker(runtime)
        rt.ping()
    except DockerUnavailableError as exc:
        rt = None
        checks.append(Check("docker engine", "fail", str(exc)))
    except Exception as exc:
        rt = None
        checks.append(Check("docker engine", "fail", f"{type(exc).__name__}: {exc}"))
    docker_root = "/"
    if rt is not None:
        from provisioner.runtime.engine import DockerRuntime

        engine = rt
        if isinstance(engine, DockerRuntime):
            checks += _isolated("docker engine", lambda: _check_engine(engine))
            checks += _isolated("worker image", lambda: _check_worker_image(settings, engine))
            checks += _isolated("base image", lambda: _check_base_image(settings, engine))
            with contextlib.suppress(Exception):
                docker_root = str(engine.client.info().get("DockerRootDir") or "/var/lib/docker")
        else:
            checks.append(Check("docker engine", "ok", type(rt).__name__))
    checks += _isolated("Gemini API key", lambda: _check_api_key(settings))
    checks += _isolated("disk", lambda: _check_disk(settings, docker_root))
    if rt is not None:
        engine_ = rt
        checks += _isolated("stale runs", lambda: _check_stale(settings, engine_))
    return checks


def _check_installation() -> list[Check]:
    from provisioner.runtime import images

    package = images.installed_package()
    images.recipe_dir()
    return [
        Check(
            "provisioner installation",
            "ok",
            f"{package.name} {package.version} at {package.root} (package hash {package.hash()[:16]})",
        )
    ]


def _check_engine(rt: Any) -> list[Check]:
    version = rt.client.version()
    detail = f"Docker {version.get('Version')} (API {version.get('ApiVersion')})"
    return [Check("docker engine", "ok", detail)]


def _check_worker_image(settings: Settings, rt: Any) -> list[Check]:
    from provisioner.runtime import images

    custom = settings.container.image
    if custom:
        if not rt.image_exists(custom):
            return [
                Check(
                    "worker image",
                    "fail",
                    f"{custom} (settings container.image) is not present; provisioner does not build "
                    f"custom images: build or pull it yourself (`docker build -t {custom} …` or "
                    f"`docker pull {custom}`), or unset container.image to use provisioner's own image",
                )
            ]
        try:
            images.check_image_provisioner(rt, custom)
        except ImageError as exc:
            return [Check("worker image", "fail", str(exc))]
        return [Check("worker image", "ok", f"{custom} (settings container.image) is present")]
    tag = images.worker_tag(rt, settings.container.base)
    if tag and rt.image_exists(tag):
        return [Check("worker image", "ok", f"{tag} is present (this installation's provisioner)")]
    return [
        Check(
            "worker image",
            "warn",
            f"{tag or 'the worker image'} is not built yet; `provision images build` "
            "(or the first `provision up` / container test) builds it",
        )
    ]


def _check_base_image(settings: Settings, rt: Any) -> list[Check]:
    from provisioner.runtime import images

    if settings.container.image:
        return [Check("base image", "ok", "not needed: container.image is a custom image")]
    try:
        base_ref, _ = images.resolve_base(rt, settings.container.base, allow_build=False)
        return [Check("base image", "ok", f"{base_ref} is present")]
    except ImageError:
        problem = images.debootstrap_problem()
        if problem and settings.container.base == "debootstrap":
            return [Check("base image", "fail", problem)]
        if problem:
            return [
                Check(
                    "base image",
                    "warn",
                    f"{images.PYTHON_BASE} is not present (a pull needs a registry) and the offline "
                    f"base cannot be built: {problem}",
                )
            ]
        return [Check("base image", "ok", "buildable offline with debootstrap (root, debootstrap found)")]


def _check_api_key(settings: Settings) -> list[Check]:
    real_layers = [n for n, mode in settings.lm_modes.items() if mode == "real"]
    if settings.lm.api_key is not None:
        return [Check("Gemini API key", "ok", "GEMINI_TEST_API_KEY is set (real mode uses the real API)")]
    return [
        Check(
            "Gemini API key",
            "warn",
            f"GEMINI_TEST_API_KEY is not set: real-mode layers ({', '.join(real_layers) or '-'}) "
            "use the local Gemini stand-in",
        )
    ]


def _check_disk(settings: Settings, docker_root: str) -> list[Check]:
    checks = []
    for label, path in (
        ("disk (docker)", docker_root),
        ("disk (state dir)", str(Path(settings.state_dir).resolve())),
    ):
        probe_path = Path(path)
        while not probe_path.exists() and probe_path != probe_path.parent:
            probe_path = probe_path.parent
        try:
            free = shutil.disk_usage(probe_path).free / 1e9
        except OSError as exc:
            checks.append(Check(label, "warn", f"cannot read free space of {path}: {exc}"))
            continue
        checks.append(Check(label, "ok" if free >= 2 else "fail", f"{free:.1f} GB free at {path}"))
    return checks


def _check_stale(settings: Settings, rt: ContainerRuntime) -> list[Check]:
    stale = [r.run_id for r in list_runs(rt, project_of(settings), settings.state_dir) if r.stale]
    if stale:
        return [Check("stale runs", "warn", f"{', '.join(stale)}: `provision reap` removes them")]
    return []
