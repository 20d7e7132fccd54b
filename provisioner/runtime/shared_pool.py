"""One pool per run: every process of a run (pytest's xdist workers, ``environment()`` blocks of one
``provision run``) uses the same warm workers, and a pytest session attaches to a running
``provision up`` environment instead of starting its own.

Before, each xdist process started a pool of its own (``-n 2`` on the e2e layer: four workers and
two warm-ups, slower than ``-n 1``), and ``pytest`` after ``provision up`` started a second set of
containers. Now:

* **deploy once, under a lock.** The first process that needs the pool takes ``pool.lock`` in the
  run's folder (:class:`filelock.FileLock`: ``flock``, released by the kernel when its holder
  dies, so a killed process never wedges the others), deploys the workers and writes ``pool.json``
  (slots, container ids, ``127.0.0.1`` ports, generations — no secrets). Every other process waits
  for the lock, reads ``pool.json`` and attaches: one warm-up, sessions spread over the same
  workers. A process killed mid-deploy leaves no ``pool.json``: the next one deploys (its names
  carry its own instance, so the killed one's leftovers never clash; they carry the pool's label
  and go with the run);
* **one worker first, more on demand.** The deploying process starts the pool's first worker
  (``start_slots=1``) and plans the layer's others; each process that uses the pool records the
  most sessions it had open at once in ``pool-demand/<process>``, and the deploying process grows
  the pool to the run's sum (it looks on each session it opens — one ``stat`` of the folder,
  :class:`DemandWatch` — and its monitor reads the files; a new peak of its own starts a worker
  at once), up to ``layer.workers``. A serial suite never waits for workers it does not use;
  ``-n 2`` gets two;
* **the pool's containers carry** ``provisioner.instance=pool`` (:data:`POOL_INSTANCE`), not a
  process instance: no process's per-test leak check sees them, and one label removes them;
* **who removes it**: the run's controller (the pytest process without xdist, or xdist's controller,
  which outlives its workers) at the end of the session (:func:`remove_shared_pool`), and the
  run's watchdog when every owner died. The process that deployed replaces dead workers while it
  runs and rewrites ``pool.json``; the others wait for that (:class:`AttachedWorkers`);
* **attaching to ``provision up``** (:func:`find_up_run`): the project's current run (its
  ``<state_dir>/current`` and state file, or ``PROVISION_RUN_ID`` under ``provision run``) is used
  when its layer, LM mode and record mode are the session's and its workers run; otherwise the
  session starts its own run and :class:`UpRunMatch` says why. An attached run is never removed
  by the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from provisioner.errors import WorkerLostError, WorkerNotReplaceableError
from provisioner.runtime import labels as L

if TYPE_CHECKING:
    from provisioner.lmconfig import LMConfig
    from provisioner.run import ResolvedRun
    from provisioner.runtime.deployment import Deployment, WorkerInfo
    from provisioner.runtime.engine import ContainerRuntime
    from provisioner.runtime.pool import WorkerPool
    from provisioner.runtime.state import RunState
    from provisioner.settings import Settings

POOL_FILE = "pool.json"
# Off loopback (a remote engine) every connection to the pool's workers starts with a hello carrying
# the run's bridge token: the deploying process writes it here, 0600 like the env file, for the
# processes that attach (never into pool.json); removed with the pool.
BRIDGE_TOKEN_FILE = "bridge-token"  # noqa: S105 - a file name
POOL_LOCK = "pool.lock"
# Written before a process deploys the pool: the controller's end sweeps the pool's label then.
POOL_STARTED = "pool.started"
# The provisioner.instance label of a shared pool's containers (a process instance otherwise).
POOL_INSTANCE = "pool"
# How often an attached process looks at pool.json while it waits for a replacement (seconds).
RECORD_POLL_S = 0.1
# One file per process of the run that uses the pool: the most sessions it had open at once (its
# demand). The deploying process grows the pool to the sum (WorkerPool.grow_on_demand).
DEMAND_DIR = "pool-demand"


def write_demand(run_dir: Path, process: str, peak: int) -> None:
    """Record ``process``'s demand (the most sessions it had open at once) for the deploying process."""
    from provisioner._files import atomic_write

    folder = run_dir / DEMAND_DIR
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / process, f"{peak}\n")


class DemandWatch:
    """Whether the run's recorded demand may have changed since the last look: one ``stat`` of
    ``pool-demand/`` (every write is an atomic rename into it, which moves its mtime). The deploying
    process looks on each session it opens, so a short ``-n 2`` run grows as soon as the other
    process records its first session, not at the monitor's next tick (every 2 s) — for the price
    of a ``stat`` per test. A change within one mtime tick after a look is seen by the monitor."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / DEMAND_DIR
        self._stamp: tuple[int, int] | None = None

    def changed(self) -> bool:
        try:
            info = os.stat(self.folder)
        except OSError:
            return False
        stamp = (info.st_mtime_ns, info.st_ctime_ns)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True


def read_demand(run_dir: Path, *, besides: str | None = None) -> int:
    """The run's processes' recorded demand, summed (``besides``: leave out that process's own).
    One directory listing and a small read per process that opened a session."""
    folder = run_dir / DEMAND_DIR
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    total = 0
    for entry in entries:
        if entry.name == besides or entry.name.startswith("."):
            continue
        with contextlib.suppress(OSError, ValueError):
            total += max(0, int(Path(entry.path).read_text().strip() or 0))
    return total


@dataclass
class PoolRecord:
    """``pool.json``: the run's shared workers. ``source``: ``deployed`` (a process of this run
    started them; ``owner`` is its ``<pid>-<start time>`` and it replaces dead workers) or ``up``
    (a ``provision up`` run; nobody replaces them)."""

    run_id: str
    source: Literal["deployed", "up"]
    owner: str
    workers: list[dict[str, Any]] = field(default_factory=list)

    def infos(self) -> list[WorkerInfo]:
        from provisioner.runtime.deployment import WorkerInfo

        return [WorkerInfo(w["slot"], w["name"], w["container_id"], w["host"], int(w["port"]),
                           int(w.get("generation", 0))) for w in self.workers]

    @staticmethod
    def entries(workers: list[WorkerInfo]) -> list[dict[str, Any]]:
        return [{"slot": w.slot, "name": w.name, "container_id": w.container_id, "host": w.host,
                 "port": w.port, "generation": w.generation} for w in workers]


def read_record(run_dir: Path) -> PoolRecord | None:
    """The run's ``pool.json`` (None: none, or torn/unreadable — then the pool is deployed anew)."""
    try:
        data = json.loads((run_dir / POOL_FILE).read_text())
        return PoolRecord(run_id=data["run_id"], source=data["source"], owner=data["owner"],
                          workers=list(data["workers"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(run_dir: Path, record: PoolRecord) -> None:
    """Replace ``pool.json`` atomically (readers never see half a file)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{POOL_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    os.replace(tmp, run_dir / POOL_FILE)


class AttachedWorkers:
    """What :class:`~provisioner.runtime.pool.WorkerPool` needs of an environment, over workers
    another process started (``pool.json``, or a ``provision up`` run's state): their addresses and
    the engine to look at their containers. It never removes them.

    A dead worker's replacement is the deploying process's job: :meth:`replace_worker` waits (up to
    ``ready_timeout_s``) until ``pool.json`` shows the slot's next generation. Workers of a
    ``provision up`` run are not replaced by anyone: it raises at once, saying what to do.
    """

    def __init__(self, run_dir: Path | None, record: PoolRecord, runtime: ContainerRuntime,
                 *, ready_timeout_s: float, bridge_token: str | None = None) -> None:
        self.run_dir = run_dir
        self.record = record
        self.runtime = runtime
        self.ready_timeout_s = ready_timeout_s
        self.bridge_token = bridge_token  # off loopback: what the pool's clients say hello with
        self.workers = record.infos()
        self._stamp = 0  # pool.json's mtime when last read (refresh)

    def worker(self, slot: int) -> WorkerInfo:
        for w in self.workers:
            if w.slot == slot:
                return w
        raise KeyError(f"no worker in slot {slot}")

    @property
    def unreplaceable_reason(self) -> str | None:
        """Why no process attached here replaces a dead worker, with what to do (None: the run's
        deploying process replaces it). Said, instead of "replacing it", by the pool that finds the
        death (:meth:`~provisioner.runtime.pool.WorkerPool.note`) and in its sessions' errors."""
        if self.record.source == "up" or self.run_dir is None:
            return (f"run {self.record.run_id} was started by `provision up` and only its owner replaces "
                    "its workers: run `provision status --repair` (or `provision down` and `provision up`), "
                    "then run the tests again")
        return None

    def replace_worker(self, slot: int) -> WorkerInfo:
        """The slot's next worker, once the run's deploying process has started it.

        Raises:
            WorkerNotReplaceableError: a ``provision up`` run's worker (only its owner replaces it).
            WorkerLostError: the deploying
                process is gone, or no replacement appeared within ``ready_timeout_s``.
        """
        old = self.worker(slot)
        reason = self.unreplaceable_reason
        if reason is not None or self.run_dir is None:
            raise WorkerNotReplaceableError(f"worker {old.name} is gone and not replaced: {reason}")
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            record = read_record(self.run_dir)
            if record is not None:
                for new in record.infos():
                    if new.slot == slot and new.generation > old.generation:
                        self.record = record
                        self.workers = [new if w.slot == slot else w for w in self.workers]
                        return new
            if not _owner_alive(self.record.owner) or time.monotonic() >= deadline:
                raise WorkerLostError(
                    f"worker {old.name} of run {self.record.run_id} is gone and the process that "
                    f"started the pool ({self.record.owner}) did not replace it"
                )
            time.sleep(RECORD_POLL_S)

    def refresh(self) -> list[WorkerInfo]:
        """Workers in ``pool.json`` that this view does not have yet (the deploying process adds the
        pool's later slots while tests run). One ``stat`` when the file did not change."""
        if self.run_dir is None:
            return []
        try:
            stamp = (self.run_dir / POOL_FILE).stat().st_mtime_ns
        except OSError:
            return []
        if stamp == self._stamp:
            return []
        self._stamp = stamp
        record = read_record(self.run_dir)
        if record is None:
            return []
        known = {w.slot for w in self.workers}
        new = [w for w in record.infos() if w.slot not in known]
        self.workers = sorted([*self.workers, *new], key=lambda w: w.slot)
        return new

    def stop(self) -> None:
        """Nothing: attached workers belong to whoever started them."""


def _owner_alive(entry: str) -> bool:
    from provisioner.runtime import watchdog as wd

    pid_text, _, start_text = entry.partition("-")
    try:
        return wd._alive(int(pid_text), float(start_text or 0))
    except ValueError:
        return False


@dataclass
class SharedPool:
    """This process's handle on the run's pool. ``deployed``: this process started the workers
    (``environment`` is the live :class:`Deployment`); else it attached."""

    pool: WorkerPool
    deployed: bool
    environment: Deployment | AttachedWorkers


def obtain_pool(
    run_dir: Path,
    run_id: str,
    *,
    runtime: ContainerRuntime,
    deploy: Callable[[], Deployment],
    make_pool: Callable[[Any, bool], WorkerPool],
    ready_timeout_s: float,
    process: str | None = None,
) -> SharedPool:
    """The run's pool: attach to the one another process of the run deployed, or deploy it.

    ``deploy`` starts the workers (labelled ``provisioner.instance=pool``); ``make_pool(environment,
    deployed)`` wraps them in a :class:`WorkerPool`. ``process``: this process's name in the run
    (default its pid), under which its demand is recorded. Deploying happens under ``pool.lock``, so
    concurrent processes deploy once; an attaching process waits for the lock meanwhile. A record
    whose workers are gone (``pool.json`` of a removed pool) is deployed over.

    Raises:
        whatever ``deploy`` raises (the lock is released; the next process tries again).
    """
    from filelock import FileLock

    from provisioner.runtime import watchdog as wd

    run_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run_dir / POOL_LOCK)):
        record = read_record(run_dir)
        if record is not None and record.run_id == run_id and _running(runtime, record):
            attached = AttachedWorkers(run_dir, record, runtime, ready_timeout_s=ready_timeout_s,
                                       bridge_token=_read_token(run_dir))
            shared = make_pool(attached, False)
            me = process or str(os.getpid())
            shared.on_peak = lambda peak: write_demand(run_dir, me, peak)  # the deployer grows for it
            return SharedPool(shared, False, attached)
        (run_dir / POOL_STARTED).touch()
        environment = deploy()
        if environment.bridge_token:
            from provisioner._files import atomic_write

            atomic_write(run_dir / BRIDGE_TOKEN_FILE, environment.bridge_token, mode=0o600)
        owner = wd.process_entry()
        write_record(run_dir, PoolRecord(run_id, "deployed", owner, PoolRecord.entries(environment.workers)))
        pool = make_pool(environment, True)

    def rewrite(workers: list[WorkerInfo]) -> None:
        write_record(run_dir, PoolRecord(run_id, "deployed", owner, PoolRecord.entries(workers)))

    pool.on_replaced = rewrite
    # Slots the deployment left for later start on demand: this process's sessions open at once,
    # plus the others' (their pool-demand files), read by the pool's monitor and on each new peak.
    pool.demand_elsewhere = lambda: read_demand(run_dir, besides=process or str(os.getpid()))
    pool.demand_changed = DemandWatch(run_dir).changed  # looked at on each session it opens
    pool.grows_on_demand = True
    return SharedPool(pool, True, environment)


def _read_token(run_dir: Path) -> str | None:
    try:
        return (run_dir / BRIDGE_TOKEN_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def _running(runtime: ContainerRuntime, record: PoolRecord) -> bool:
    """Every worker of the record has a container that runs (one engine call per worker)."""
    for w in record.workers:
        try:
            state = runtime.container_state(w["container_id"])
        except Exception:
            return False
        if state is None or not state.running:
            return False
    return bool(record.workers)


def remove_shared_pool(run_dir: Path, run_id: str, runtime: ContainerRuntime) -> list[str]:
    """The run is over: remove its shared pool (every container and network labelled with the run
    and :data:`POOL_INSTANCE`, whichever process made them) and ``pool.json``. Returns what failed."""
    from provisioner.runtime.engine import remove_by_selector

    for name in (POOL_FILE, POOL_STARTED, BRIDGE_TOKEN_FILE):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
    try:
        remove_by_selector(runtime, L.selector(run_id, POOL_INSTANCE))
    except Exception as exc:
        return [f"shared pool of run {run_id}: {exc}"]
    return []


def finish_shared_pool(run_dir: Path, run_id: str, runtime: ContainerRuntime | None = None) -> list[str]:
    """The run's controller, at its end: remove the shared pool if a process of the run deployed
    one (:data:`POOL_STARTED` exists; nothing touches the engine otherwise) on ``runtime`` (default:
    the engine :func:`~provisioner.runtime.engine.open_runtime` finds). Returns what failed."""
    if not (run_dir / POOL_STARTED).exists():
        return []
    if runtime is not None:
        return remove_shared_pool(run_dir, run_id, runtime)
    from provisioner.errors import ProvisionerError
    from provisioner.runtime.engine import open_runtime

    try:
        opened = open_runtime()
    except ProvisionerError as exc:
        return [f"shared pool of run {run_id}: {exc}"]
    try:
        return remove_shared_pool(run_dir, run_id, opened)
    finally:
        opened.close()


# --- attaching to `provision up` ------------------------------------------------------------------


@dataclass(frozen=True)
class UpRunMatch:
    """Whether a ``provision up`` run serves this session: ``state`` when it does; else ``reason``
    (empty when there is no such run at all, so nothing needs saying in a session's header) and
    ``none_because`` (why there was no run to consider — said only when asked, :attr:`why_not`)."""

    state: RunState | None
    reason: str = ""
    none_because: str = ""

    @property
    def attached(self) -> bool:
        return self.state is not None

    @property
    def why_not(self) -> str | None:
        """Why the session does not attach (None: it does): ``reason``, else ``none_because``."""
        if self.state is not None:
            return None
        return self.reason or self.none_because or "no `provision up` run to attach to"


def find_up_run(settings: Settings, layer: str, lm: LMConfig, run_id: str | None = None) -> UpRunMatch:
    """The running ``provision up`` environment this session should use, or why not.

    ``run_id``: the run to look at (``PROVISION_RUN_ID`` under ``provision run``); default the
    project's current one (``<state_dir>/current``, written by ``provision up``). It serves when its
    layer, LM mode and (cached mode) record mode equal the session's. Reads files only: whether its
    workers still run is checked when the pool is first needed (:func:`attach_up_run`).
    """
    from provisioner.runtime.state import StateUnreadableError, current_run_id, read_state

    chosen = run_id or current_run_id(settings)
    if chosen is None:
        return UpRunMatch(None, none_because=(
            f"no `provision up` run of this project is current (none recorded in"
            f" {Path(settings.state_dir) / 'current'}): `provision up --layer {layer}` starts one"))
    try:
        state = read_state(settings, chosen)
    except StateUnreadableError as exc:
        return UpRunMatch(None, f"run {chosen}: {exc}")
    if state is None:
        return UpRunMatch(None, none_because=(
            f"run {chosen} is not running: it has no state file (taken down, or reaped)"))
    wanted = {"layer": layer, "LM mode": lm.mode}
    found = {"layer": state.layer, "LM mode": state.lm_mode}
    if lm.mode == "cached":
        wanted["record mode"] = lm.record_mode
        found["record mode"] = state.record_mode or "unknown"
    differs = [f"{key} {found[key]} (this session: {wanted[key]})"
               for key in wanted if found[key] != wanted[key]]
    if differs:
        return UpRunMatch(None, f"`provision up` run {state.run_id} differs: {', '.join(differs)}")
    return UpRunMatch(state)


def choose_up_run(
    resolved: ResolvedRun, up_run: str | None = None, *, runtime: ContainerRuntime | None = None
) -> tuple[UpRunMatch, ResolvedRun]:
    """Whether a session of ``resolved`` (the pytest plugin's, or a :func:`provisioner.environment`
    block's) uses a running ``provision up`` environment, and the resolved run it then has: the up
    run's LM directory (its workers enforce that run's budget and write its ledger: in-process LM
    calls share them, and a test's LM cost finds its sessions' calls there).

    ``up_run``: the run to consider (an xdist worker gets its controller's choice; ``""``: none);
    default ``PROVISION_RUN_ID`` (``provision run``), else the project's current run. Container
    layers only.

    A run chosen here (not handed down by a controller) is attached only when every one of its
    workers runs (one engine look per worker, on ``runtime`` or the engine the settings name): a run
    with a dead worker is not attached, and the reason says how to repair it. The decision is made
    once, so the header, the attach phase's line and the summary say the same; a worker that dies
    after it fails its sessions (:class:`~provisioner.errors.WorkerLostError`, saying to repair).
    """
    import dataclasses

    from provisioner.run import RUN_ID_ENV

    if not resolved.layer.needs_docker:
        return UpRunMatch(None, none_because=(
            f"layer {resolved.layer.name} runs in-process: it has no workers to share")), resolved
    if up_run == "":
        return UpRunMatch(None, none_because="this process's xdist controller attached to no run"), resolved
    match = find_up_run(resolved.settings, resolved.layer.name, resolved.lm_config,
                        run_id=up_run or os.environ.get(RUN_ID_ENV))
    if match.state is not None and up_run is None:
        dead = _dead_up_worker(resolved.settings, match.state, runtime)
        if dead is not None:
            match = UpRunMatch(None, dead)
    if match.state is not None and match.state.lm_run_dir:
        lm = resolved.lm_config.model_copy(update={"run_dir": Path(match.state.lm_run_dir)})
        resolved = dataclasses.replace(resolved, lm_config=lm)
    return match, resolved


def _dead_up_worker(settings: Settings, state: RunState, runtime: ContainerRuntime | None) -> str | None:
    """Why ``state``'s run cannot be attached (a worker no longer runs, with what to do), or None.
    Without an engine nothing is said here: the pool's start reports the engine's problem."""
    from provisioner.errors import ProvisionerError

    own = runtime is None
    if runtime is None:
        from provisioner.runtime.engine import open_runtime

        try:
            runtime = open_runtime(settings)
        except ProvisionerError:  # no engine, or its address is wrong: said when the pool starts
            return None
    try:
        if _running(runtime, _up_record(state)):
            return None
    finally:
        if own:
            runtime.close()
    return up_run_dead_reason(state.run_id)


def up_run_dead_reason(run_id: str) -> str:
    """What a session says of a ``provision up`` run with a worker that no longer runs."""
    return (f"`provision up` run {run_id} has a worker that no longer runs (repair it: "
            "`provision status --repair`, or `provision down` and `provision up`)")


def _up_record(state: RunState) -> PoolRecord:
    workers = []
    for w in state.workers:
        host, _, port = str(w["address"]).rpartition(":")
        workers.append({"slot": w["slot"], "name": w["name"], "container_id": w["container_id"],
                        "host": host, "port": int(port), "generation": 0})
    return PoolRecord(state.run_id, "up", f"{state.owner_pid}-0", workers)


def attach_up_run(
    state: RunState, runtime: ContainerRuntime, *, ready_timeout_s: float, bridge_token: str | None = None
) -> AttachedWorkers | str:
    """The ``provision up`` run's workers to attach to, or why not (a worker no longer runs).
    ``bridge_token``: the run's ``PROVISION_BRIDGE_TOKEN`` (:func:`~provisioner.runtime.state.
    bridge_token_of`), which every connection presents when the run is published off loopback."""
    record = _up_record(state)
    if not _running(runtime, record):
        return up_run_dead_reason(state.run_id)
    return AttachedWorkers(None, record, runtime, ready_timeout_s=ready_timeout_s, bridge_token=bridge_token)
