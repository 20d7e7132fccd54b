"""A deployment (:class:`Deployment`): the live containers and networks of one
:class:`~provisioner.runtime.recipes.RunPlan`. It creates them (workers started concurrently),
waits until every worker answers ``ping`` with its LM configured, replaces workers, and removes
everything again.

"Deployment" rather than "environment": that word already means ``provisioner.environment()`` /
``api.Environment`` (the public handle) and environment variables. A run may have several
deployments (one per process instance: ``main``, ``gw0``, a dedicated worker's), all under one run id.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.errors import (
    RuntimeProblem,
    WorkerNotReadyError,
)
from provisioner.runtime import labels as L
from provisioner.runtime.egress import block_host_access
from provisioner.runtime.engine import ContainerRuntime, ContainerState, remove_by_selector
from provisioner.runtime.engine.base import utc_clock
from provisioner.runtime.polling import poll_until
from provisioner.runtime.recipes import (
    ContainerRecipe,
    RunPlan,
    replacement_recipe,
)
from provisioner.runtime.resources import CleanupReport, ResourceManager
from provisioner.runtime.state import RunState

Progress = Callable[[str], None]


# --- readiness ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """``refused``: nothing accepted the connection at the address (ECONNREFUSED) — the published
    port is not served, as opposed to a worker that is slow or answered with an error."""

    ok: bool
    lm_configured: bool = False
    detail: str = ""
    latency_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    refused: bool = False

    @property
    def ready(self) -> bool:
        return self.ok and self.lm_configured


Probe = Callable[[str, int, float], ProbeResult]


def bridge_probe(host: str, port: int, timeout: float, *, token: str | None = None) -> ProbeResult:
    """One ``ping`` over the bridge protocol (the default readiness and health probe); ``token``:
    the run's bridge token, sent in a ``hello`` first (a run published off loopback)."""
    from provisioner.bridge.client import BridgeClient
    from provisioner.errors import BridgeError

    start = time.perf_counter()
    client = BridgeClient(host, port, connect_timeout=timeout, request_timeout=timeout, token=token)
    try:
        reply = client.ping()
    except BridgeError as exc:
        return ProbeResult(
            False,
            detail=str(exc),
            latency_s=time.perf_counter() - start,
            refused=isinstance(exc.__cause__, ConnectionRefusedError),
        )
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


class Deployment:
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
        start_slots: int | None = None,
        ready_slots: int | None = None,
    ) -> None:
        """``start_slots``: how many worker slots :meth:`start` starts (the lowest); the others wait
        for :meth:`add_worker` (a pool that grows: its relay already routes every slot). Default all.
        ``ready_slots``: :meth:`start` returns once that many of the started workers are ready
        (whichever are first); the others keep starting and are *booting*: :meth:`pending_slots`
        lists them and :meth:`add_worker` waits for one. Default: every started worker."""
        self.plan = plan
        self.start_slots = start_slots
        self.ready_slots = ready_slots
        self.runtime = runtime
        self.resources = resources or ResourceManager(runtime, selector=self.selector)
        if probe is bridge_probe and plan.bridge_token:  # off loopback: every connection says hello
            probe = functools.partial(bridge_probe, token=plan.bridge_token)
        self.probe = probe
        self.ready_timeout_s = ready_timeout_s
        self.poll_interval_s = poll_interval_s
        self.progress = progress or (lambda _m: None)
        self.workers: list[WorkerInfo] = []
        # Worker containers this deployment started (every slot and generation: the first ones, one
        # still booting or started later by add_worker, replacements): what "workers started" counts.
        self.workers_created = 0
        self.recipes: dict[int, ContainerRecipe] = {r.slot: r for r in plan.workers if r.slot is not None}
        self.container_ids: dict[str, str] = {}  # recipe name -> container id
        self.state: RunState | None = None
        self.warnings: list[str] = []
        # The runtime was opened for this deployment (lifecycle.up without a runtime): stop() closes it.
        self.owns_runtime = False
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self.started = False
        self._ports: dict[int, int] = {}  # slot -> the relay's 127.0.0.1 port for it
        # Slots :meth:`start` leaves for :meth:`add_worker`.
        self._deferred = set(sorted(self.recipes)[start_slots:]) if start_slots is not None else set()
        # Started workers :meth:`start` did not wait for (``ready_slots``): slot -> (worker, its
        # readiness wait, running in the background); :meth:`add_worker` takes them.
        self._booting: dict[int, tuple[WorkerInfo, Future[None]]] = {}
        self._boot_executor: ThreadPoolExecutor | None = None
        # Set by :meth:`stop_booting`: the booting workers' readiness waits give up.
        self._boot_cancel = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> Deployment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Deployment:
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

    @property
    def bridge_token(self) -> str | None:
        """The run's bridge token when it is published off loopback (every connection's ``hello``
        carries it: ``BridgeClient(..., token=...)``); None on loopback."""
        return self.plan.bridge_token

    def _start(self) -> None:
        t0 = time.perf_counter()
        if self.plan.run_limits is not None and self.plan.lm_run_dir is not None:
            from provisioner.lm.limits import write_run_limits

            # Before any worker starts: the run's limits hold whatever a worker's client configures.
            write_run_limits(Path(self.plan.lm_run_dir), **self.plan.run_limits)
        run_net, edge_net = self.plan.networks
        later = self._deferred
        others = [r for r in self.plan.containers() if r is not self.plan.relay and r.slot not in later]
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
        self._ports = {slot: self._relay_port(relay_id, slot) for slot in self.recipes}
        started_workers = [
            WorkerInfo(slot, recipe.name, self.container_ids[recipe.name], self.runtime.publish_host,
                       self._ports[slot])
            for slot, recipe in sorted(self.recipes.items()) if slot not in later
        ]
        self.progress(f"containers started in {time.perf_counter() - t0:.2f}s; waiting for readiness")
        if self.ready_slots is None or self.ready_slots >= len(started_workers):
            # Every worker: wait as before the first-ready start (a `provision up` interrupted while
            # waiting hung once at load 2 in _wait_first_ready's loop; the cause, a future's lock left
            # held by concurrent.futures.wait, is gone, see there).
            with self._threads(len(started_workers) + 1) as pool:
                waits: list[Future[None]] = [pool.submit(self.wait_ready, w) for w in started_workers]
                if self.plan.standin is not None:
                    waits.append(pool.submit(self._wait_standin))
                _wait_all(waits, self._closing)
            self.workers = started_workers
        else:
            self.workers = self._wait_first_ready(started_workers, max(1, self.ready_slots))
        self.progress(f"{len(self.workers)} worker(s) ready in {time.perf_counter() - t0:.2f}s"
                      + (f"; {len(self._booting)} more starting" if self._booting else ""))

    def _wait_first_ready(self, workers: list[WorkerInfo], needed: int) -> list[WorkerInfo]:
        """Wait until ``needed`` of ``workers`` (and the stand-in) are ready; return the ready ones.
        The others' readiness waits go on in the background (:attr:`_booting`).

        The first test needs one worker, not all: a pool of isolation ``process`` starts two, and
        the first session goes to whichever is ready first while the other finishes its start-up
        (docs/benchmarks.md, "Process isolation": the pool start's critical path). A failure before
        ``needed`` are ready fails the start, as waiting for all did; a later one fails that
        worker's :meth:`add_worker`.
        """
        executor = ThreadPoolExecutor(max_workers=len(workers) + 1, thread_name_prefix="provision-ready")
        # Finished waits arrive on a queue (each future's done callback, run by its thread), not
        # through concurrent.futures.wait(): that takes every future's lock in turn on the calling
        # thread, and a Ctrl-C between two of them left a lock held for good — the thread finishing
        # that future then blocked on it forever, and so did shutdown(wait=True) below (the hang of
        # an interrupted `process` pool start). SimpleQueue.get holds nothing while it waits.
        finished: queue.SimpleQueue[Future[None]] = queue.SimpleQueue()
        ready: list[WorkerInfo] = []
        try:
            waits: dict[Future[None], WorkerInfo] = {}
            for w in workers:
                waits[executor.submit(self.wait_ready, w, cancel=self._boot_cancel)] = w
            standin = executor.submit(self._wait_standin) if self.plan.standin is not None else None
            pending: set[Future[None]] = set(waits) | ({standin} if standin is not None else set())
            for fut in pending:
                fut.add_done_callback(finished.put)
            while pending and (len(ready) < needed or (standin is not None and not standin.done())):
                fut = finished.get()
                pending.discard(fut)
                fut.result()  # raises the first failure: the start fails
                if fut in waits:
                    ready.append(waits[fut])
        except BaseException:
            self._closing.set()
            executor.shutdown(wait=True)
            raise
        for fut, worker in waits.items():
            if worker not in ready:
                self._booting[worker.slot] = (worker, fut)
        executor.shutdown(wait=False)  # its threads end with the booting workers' waits
        return sorted(ready, key=lambda w: w.slot)

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

    @property
    def selector(self) -> dict[str, str]:
        """The labels of this deployment's process instance in its run (``run`` + ``instance``)."""
        return L.selector(self.plan.run_id, self.plan.instance)

    def owns(self, kind: str, name: str) -> bool:
        """``name`` is one of this deployment's resources: a network, the relay or stand-in, a
        worker of any generation, or the egress guard of one of them. Another deployment of the same
        instance (a dedicated worker beside the pool) has other names, so it is never taken for ours."""
        plan = self.plan
        if kind == "network":
            return name in {n.name for n in plan.networks}
        if kind != "container":
            return False
        fixed = {plan.relay.name}
        if plan.standin is not None:
            fixed |= {plan.standin.name, f"{plan.standin.name}-guard"}
        return name in fixed or any(
            name == r.name or name.startswith(f"{r.name}-") for r in self.recipes.values()
        )

    def interrupt(self) -> None:
        """Make what another thread is doing with this deployment — a start, a replacement waiting
        for readiness — give up at once (``RuntimeProblem``: the run is being stopped); nothing new
        starts afterwards. :meth:`stop` does this first."""
        self._closing.set()

    @property
    def interrupted(self) -> bool:
        """Whether :meth:`interrupt` (or :meth:`stop`) was called: the run is being stopped."""
        return self._closing.is_set()

    def stop_booting(self) -> None:
        """The workers still starting in the background (``ready_slots``) stop being waited for:
        their :meth:`add_worker` raises at once (a pool being closed does not wait for them; their
        containers are removed with the deployment)."""
        self._boot_cancel.set()

    def stop(self) -> CleanupReport:
        """Remove this deployment's containers and networks: the tracked ones, then a label sweep of
        its own (:meth:`owns`, under :attr:`selector`) for any whose create call was still in flight.

        Only its own: other processes of the run (xdist workers), and other deployments of this
        process, keep theirs. Removing the whole run is :func:`~provisioner.runtime.lifecycle.down`'s
        job and the watchdog's."""
        self._closing.set()
        try:
            report = self.resources.cleanup_all()
            remove_by_selector(self.runtime, self.selector, lambda ref: self.owns(ref.kind, ref.name))
        finally:
            if self.owns_runtime:  # opened for it: closed with it (docker-py's connection pool)
                self.owns_runtime = False
                self.runtime.close()
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
        if recipe.slot is not None:
            with self._lock:
                self.workers_created += 1
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
                f"the relay {self.plan.relay.name} has no published port for worker slot {slot}; "
                f"its log:\n{self.runtime.logs(relay_id)}"
            )
        return port

    def wait_ready(self, worker: WorkerInfo, *, cancel: threading.Event | None = None) -> None:
        """Poll ``ping`` every ``poll_interval_s`` until the worker is ready or the deadline passes.

        A worker whose container exits fails at once (no waiting for the deadline), with its logs.
        ``cancel``: set, the wait gives up (``RuntimeProblem``), as when the run is being stopped.
        """
        next_state_check = 0.0
        last = ProbeResult(False, detail="not probed yet")

        def ready() -> bool:
            nonlocal last, next_state_check
            if self._closing.is_set():
                raise RuntimeProblem("the run is being stopped")
            if cancel is not None and cancel.is_set():
                raise RuntimeProblem(f"worker {worker.name} is no longer waited for (its pool is closing)")
            last = self.probe(worker.host, worker.port, max(0.2, min(2.0, self.ready_timeout_s / 4)))
            if last.ready:
                return True
            now = time.monotonic()
            if now >= next_state_check:
                next_state_check = now + 0.25
                for cid, label in (
                    (worker.container_id, worker.name),
                    (self.container_ids[self.plan.relay.name], self.plan.relay.name),
                ):
                    state = self.runtime.container_state(cid)
                    if state is None or not state.running:
                        how = death_reason(state)
                        raise WorkerNotReadyError(
                            f"worker {worker.name} did not become ready: container {label} {how}",
                            self.runtime.logs(cid),
                        )
            return False

        if not poll_until(ready, self.ready_timeout_s, self.poll_interval_s, stop=self._closing):
            if self._closing.is_set():
                raise RuntimeProblem("the run is being stopped")
            why = "LM not configured" if last.ok else last.detail
            raise WorkerNotReadyError(
                f"worker {worker.name} ({worker.address}) was not ready within "
                f"{self.ready_timeout_s:.0f}s (last ping: {why})",
                self.runtime.logs(worker.container_id),
            )

    def _wait_standin(self) -> None:
        assert self.plan.standin is not None
        name = self.plan.standin.name
        cid = self.container_ids[name]

        def started() -> bool:
            if "PROVISION_STANDIN_READY" in self.runtime.logs(cid, tail=20):
                return True
            state = self.runtime.container_state(cid)
            if state is None or not state.running:
                raise WorkerNotReadyError(f"the Gemini stand-in {name} did not start", self.runtime.logs(cid))
            return False

        if not poll_until(started, self.ready_timeout_s, self.poll_interval_s * 2, stop=self._closing):
            raise WorkerNotReadyError(f"the Gemini stand-in {name} did not start", self.runtime.logs(cid))

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

    def slot_port(self, slot: int) -> int:
        """The relay's published host port for worker ``slot`` (also a slot not started yet)."""
        return self._ports[slot]

    def pending_slots(self) -> list[int]:
        """Worker slots of the plan not in :attr:`workers` yet: not started (``start_slots``) or
        still starting (``ready_slots``); :meth:`add_worker` starts one, or waits for it."""
        with self._lock:
            started = {w.slot for w in self.workers}
            return sorted((self._deferred | set(self._booting)) - started)

    def add_worker(self, slot: int) -> WorkerInfo:
        """Start the planned worker of ``slot`` (one :meth:`start` left for later) and wait until it
        is ready — or, for a worker :meth:`start` started but did not wait for (``ready_slots``),
        only wait; it is reachable at the relay port its slot had from the start.

        Raises:
            ValueError: the slot is not a pending one.
            WorkerNotReadyError: the worker did not become ready (its container is removed again).
            RuntimeProblem: the deployment is being stopped, or :meth:`stop_booting` was called.
        """
        if slot not in self.pending_slots():
            raise ValueError(f"worker slot {slot} is not waiting to start (pending: {self.pending_slots()})")
        recipe = self.recipes[slot]
        with self._lock:
            booting = self._booting.get(slot)
        try:
            if booting is not None:  # started with the deployment: wait for its readiness
                new, started = booting
                started.result()
            else:
                container_id = self._run(recipe)
                new = WorkerInfo(slot, recipe.name, container_id, self.runtime.publish_host,
                                 self._ports[slot])
                self.wait_ready(new)
        except BaseException:
            with self._lock:
                self._booting.pop(slot, None)
                made = self.container_ids.pop(recipe.name, None)
            found = self.resources.find("container", made) if made is not None else None
            if found is not None:
                self.resources.release(found)
            elif made is not None:
                self.runtime.remove_container(made)
            raise
        with self._lock:
            self._booting.pop(slot, None)
            self.workers = sorted([*self.workers, new], key=lambda w: w.slot)
        return new

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


def death_reason(state: ContainerState | None) -> str:
    """How a worker's container ended, from the engine's container state, as a phrase after
    "which": ``is gone (...)``, ``was OOM-killed: out of memory (exit code 137) at <time>``,
    ``exited with code 137 (SIGKILL) at 2026-11-30 21:40:03 UTC``, ``is paused``, ``is created but
    not running`` (a relay whose re-creation could not start it). The facts are Docker's
    (``State.Status``, ``State.ExitCode``, ``State.OOMKilled``, ``State.FinishedAt``: the time, UTC,
    when the engine says); the signal name is the exit code minus 128, as the shell reports it."""
    if state is None:
        return "is gone (its container no longer exists)"
    when = "" if state.finished_at is None else f" at {utc_clock(state.finished_at)}"
    if state.oom_killed:
        return f"was OOM-killed: out of memory (exit code {state.exit_code}){when}"
    if state.status == "created":  # made, not started (e.g. a relay whose port was taken)
        return "is created but not running"
    if state.status not in ("exited", "dead"):
        return f"is {state.status}"
    code = state.exit_code
    how = f"exited with code {code}"
    if code is not None and 128 < code < 128 + 65:
        with contextlib.suppress(ValueError):
            how += f" ({signal.Signals(code - 128).name})"
    return how + when


def repair_times(state: ContainerState | None, started: float, done: float, what: str = "the repair") -> str:
    """When a repaired container serves again and how long that took, for a heal message: ``back at
    2026-11-30 21:40:05 UTC: down 4.2 s, the repair took 1.8 s``. ``state``: the dead container's
    (its ``finished_at`` starts "down"; without it, e.g. a container that no longer exists, "down"
    is left out: nobody knows when it ended); ``started``/``done``: Unix seconds when the repair
    began and ended (``time.time()``); ``what``: the repair's name."""
    ended = None if state is None else state.finished_at
    down = "" if ended is None else f"down {max(0.0, done - ended):.1f} s, "
    return f"back at {utc_clock(done)}: {down}{what} took {max(0.0, done - started):.1f} s"

