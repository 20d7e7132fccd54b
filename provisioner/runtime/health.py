"""The published path's health: host → ``127.0.0.1:<port>`` → the engine's port forwarder → relay →
worker, checked with a real ``ping`` frame, and its repair.

Why a check of its own: a worker's container state and the containers' own HEALTHCHECKs (which run
*inside* the containers) say nothing about the host side of a published port. Docker forwards a
port published on 127.0.0.1 through a host process, ``docker-proxy``, one per port (loopback traffic
does not take the iptables path). That process exits when ``accept()`` fails — a burst of ~10 000
connections runs it out of file descriptors (two per forwarded connection, and it inherits dockerd's
limit; measured with 20 000: issue 14, item 7) — and nothing starts it again: the relay and the
workers keep running and report healthy while ``127.0.0.1:<port>`` refuses every connection, for good.
The engine makes a container's forwarders only when it starts the container, and a restart would
publish on *new* ephemeral ports (every client holds the old address), so the repair re-creates the
relay container with the same host ports pinned (:meth:`ContainerRuntime.recreate_container`).
The relay holds no state (it forwards by alias), so workers, sessions and programs are untouched;
connections that went through the dead forwarder were broken already and clients reconnect.

A dead path is told apart from a worker that died (the pool and ``status --repair`` replace or
restart those) or is just slow: the relay's container is not running, or the published port
*refuses* the connection (ECONNREFUSED: nothing serves it) twice in a row while the relay's
container runs. A dead worker does not look like that — the relay accepts and then closes the
connection when it cannot reach the worker — and a ping that times out or is answered with an error
is load, not a dead path.

Callers: :class:`~provisioner.runtime.pool.WorkerPool` (its monitor and a refused request of a pooled
session, so the pytest plugin and ``provisioner.environment()`` heal on their own) via
:func:`heal_environment`; ``provision run -- CMD`` (a periodic check while CMD runs) via
:func:`heal_deployment`, which also replaces dead workers; and ``provision status [--repair]`` via
:func:`check_paths` and :func:`rebind_relay`.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from provisioner.errors import DockerUnavailableError, RecreateError, RuntimeProblem
from provisioner.runtime.deployment import Deployment, Probe, death_reason, repair_times
from provisioner.runtime.engine import ContainerRuntime
from provisioner.runtime.recipes import RELAY_BASE_PORT

# What a refused published port means, after "127.0.0.1:<port> ".
FORWARDER_GONE = (
    "refuses connections while the relay runs: the engine's port forwarder for it is gone "
    "(docker-proxy exits when accept() fails, e.g. out of file descriptors under a connection flood)"
)
PROBE_TIMEOUT_S = 2.0
# A repair the run's stop interrupted (provision run's command ended meanwhile): no failure, and no
# next check to try again.
STOPPING = "{what}: the run is being stopped"
_locks: weakref.WeakKeyDictionary[Deployment, threading.Lock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class PublishedWorker:
    """One worker as the host reaches it: ``host:port`` is the relay's published ``relay_port``."""

    slot: int
    name: str
    container_id: str
    host: str
    port: int

    @property
    def relay_port(self) -> int:
        """The relay's container port for this slot (the relay's routes: ``9000+slot=w<slot>:8765``)."""
        return RELAY_BASE_PORT + self.slot

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _running(runtime: ContainerRuntime, container: str) -> tuple[bool, str]:
    """(running, how it ended as a phrase after "which") — the engine's word; unknown counts as running."""
    try:
        state = runtime.container_state(container)
    except Exception:  # the engine cannot tell: no false alarm
        return True, ""
    if state is not None and state.running:
        return True, ""
    return False, death_reason(state)


def check_paths(
    runtime: ContainerRuntime,
    relay: str,
    workers: Sequence[PublishedWorker],
    probe: Probe,
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> dict[int, str]:
    """Which workers' published paths are dead through no fault of the worker: slot -> why.

    ``relay``: the relay container's name or id. Empty when every path answers, or fails only in
    ways that are the worker's (the relay accepts and closes: the worker is gone, see the pool /
    ``status --repair``) or look like load (a timeout, an error reply). One ``ping`` per worker,
    concurrently; a refusal counts when a second ping is refused too.
    """
    relay_runs, relay_end = _running(runtime, relay)
    if not relay_runs:
        return {w.slot: f"the relay {relay} {relay_end}" for w in workers}

    def one(worker: PublishedWorker) -> str | None:
        if not _refused(probe, worker, timeout_s) or not _refused(probe, worker, timeout_s):
            return None
        return f"{worker.address} {FORWARDER_GONE}"

    with ThreadPoolExecutor(max_workers=max(1, len(workers))) as pool:
        found = dict(zip((w.slot for w in workers), pool.map(one, workers), strict=True))
    return {slot: why for slot, why in found.items() if why is not None}


def _refused(probe: Probe, worker: PublishedWorker, timeout_s: float) -> bool:
    result = probe(worker.host, worker.port, timeout_s)
    return not result.ok and result.refused


def rebind_relay(
    runtime: ContainerRuntime,
    relay: str,
    workers: Sequence[PublishedWorker],
    probe: Probe,
    *,
    timeout_s: float,
    reserved: Sequence[PublishedWorker] = (),
) -> str:
    """Re-create the relay with every worker's host port pinned, and wait until each worker whose
    container runs answers ``ping`` at its old address (``timeout_s``). Returns the relay's new id.
    ``reserved``: slots with no worker yet (a pool that grows on demand) whose ports are pinned too,
    so the worker that joins later is reached where the pool expects it; they are not waited for.

    Raises:
        RuntimeProblem: the relay does not exist.
        RecreateError: the engine could not make the relay again (e.g. a port was taken meanwhile),
            it published another port, or a worker did not answer within ``timeout_s`` (with the
            relay's log); its ``container_id`` is the relay container there is now, for the caller's
            records (the next check starts from it).
    """
    new_id = runtime.recreate_container(relay, {w.relay_port: w.port for w in (*workers, *reserved)})
    try:
        _wait_through(runtime, relay, new_id, workers, reserved, probe, timeout_s)
    except DockerUnavailableError:
        raise  # the engine gone is no failed re-creation: the caller says so and checks again later
    except RuntimeProblem as exc:
        raise RecreateError(str(exc), new_id) from None
    return new_id


def _wait_through(runtime: ContainerRuntime, relay: str, new_id: str, workers: Sequence[PublishedWorker],
                  reserved: Sequence[PublishedWorker], probe: Probe, timeout_s: float) -> None:
    for w in (*workers, *reserved):
        got = runtime.published_port(new_id, w.relay_port)
        if got != w.port:
            raise RuntimeProblem(
                f"the re-created relay {relay} publishes worker {w.name} on port {got}, not {w.port}"
            )
    deadline = time.monotonic() + timeout_s
    waiting = [w for w in workers if _running(runtime, w.container_id)[0]]
    while waiting:
        # A worker that stops meanwhile is not waited for: it is its replacer's (pool, provision run).
        waiting = [w for w in waiting
                   if not probe(w.host, w.port, PROBE_TIMEOUT_S).ok and _running(runtime, w.container_id)[0]]
        if not waiting:
            break
        runs, end = _running(runtime, new_id)
        if not runs or time.monotonic() >= deadline:
            names = ", ".join(f"{w.name} ({w.address})" for w in waiting)
            why = f"the relay {end}" if not runs else f"no answer within {timeout_s:.0f}s"
            raise RuntimeProblem(
                f"after re-creating the relay {relay}, {names} did not answer ping: {why}; "
                f"its log:\n{runtime.logs(new_id)}"
            )
        time.sleep(0.05)  # poll interval of the deadline loop above


def heal_environment(env: Deployment) -> list[str]:
    """Check a live run's published paths; when one is dead, re-create its relay on the same ports.

    Returns what was found and done, one message per cause (a dead relay is one message naming
    every worker behind it; a dead forwarder one per port; empty: every path answers, or a heal by
    another thread is in progress). The run's resource tracking follows the relay's new id.

    Raises:
        RuntimeProblem: the relay could not be re-created (see :func:`rebind_relay`); the run's
            records follow the relay container there is now, so the next call can try again and the
            run's cleanup removes it.
    """
    relay = env.plan.relay.name
    lock = _lock_for(env)
    if not lock.acquire(blocking=False):
        return []  # another thread is healing this run's path right now
    try:
        workers = [PublishedWorker(w.slot, w.name, w.container_id, w.host, w.port) for w in env.workers]
        dead = check_paths(env.runtime, relay, workers, env.probe)
        if not dead:
            return []
        old_id = env.container_ids.get(relay, relay)
        # Slots a growing pool has not started yet keep their ports too (Deployment.add_worker).
        reserved = [PublishedWorker(slot, env.recipes[slot].name, "", env.runtime.publish_host,
                                    env.slot_port(slot)) for slot in env.pending_slots()]
        try:
            relay_state = env.runtime.container_state(old_id)
        except DockerUnavailableError:
            raise
        except Exception:  # only for the message: "down" is left out
            relay_state = None
        if relay_state is not None and relay_state.running:
            relay_state = None  # a dead forwarder: the relay ran on, nobody knows when the port died
        started = time.time()
        try:
            new_id = rebind_relay(env.runtime, relay, workers, env.probe, timeout_s=env.ready_timeout_s,
                                  reserved=reserved)
        except RecreateError as exc:
            _follow(env, relay, old_id, exc.container_id)
            raise
        _follow(env, relay, old_id, new_id)
        done = time.time()
    finally:
        lock.release()
    names = {w.slot: w.name for w in workers}
    by_cause: dict[str, list[int]] = {}
    for slot, why in sorted(dead.items()):
        by_cause.setdefault(why, []).append(slot)
    out = []
    for why, slots in by_cause.items():
        which = ", ".join(f"{names[slot]} (slot {slot})" for slot in slots)
        paths = "path of worker" if len(slots) == 1 else "paths of workers"
        were = "was" if len(slots) == 1 else "were"
        out.append(f"the published {paths} {which} {were} dead: {why}; re-created the relay {relay} "
                   f"on the same ports; {repair_times(relay_state, started, done)}")
    return out


def _follow(env: Deployment, relay: str, old_id: str, new_id: str) -> None:
    """The run's records (its tracked resources, ``container_ids``) name the relay container there is now."""
    if new_id == old_id:
        return
    tracked = env.resources.find("container", old_id)
    if tracked is not None:
        env.resources.forget(tracked)
    env.resources.track("container", new_id, name=relay, owner="relay")
    env.container_ids[relay] = new_id


def heal_deployment(env: Deployment) -> list[str]:
    """One health check of a live run that has no pool (``provision run``'s): re-create the relay
    when a published path is dead (:func:`heal_environment`), then replace every worker whose
    container is not running with a fresh one behind the same address
    (:meth:`~provisioner.runtime.deployment.Deployment.replace_worker`: same slot, alias and
    published port; the dead worker's sessions and programs are gone).

    Returns one message per repair or failed repair, each saying what was wrong (the engine's
    words: exit code, signal, OOM, and when, UTC), what was done, when the worker served again and
    how long it was down and the repair took (:func:`~provisioner.runtime.deployment.repair_times`);
    empty when everything was healthy. A repair
    that fails (the relay could not be re-created, a replacement did not become ready: it is removed
    again) is a message too, ending "the next check tries again", and the other repairs still
    happen. The deployment's ``workers`` name the replacements afterwards.

    Raises:
        DockerUnavailableError: the engine does not answer.
    """
    try:
        notes = heal_environment(env)
    except DockerUnavailableError:
        raise
    except RuntimeProblem as exc:
        relay = env.plan.relay.name
        notes = [STOPPING.format(what=f"the relay {relay} not re-created") if env.interrupted
                 else f"re-creating the relay {relay} failed: {exc}; the next check tries again"]
    for worker in list(env.workers):
        state = env.runtime.container_state(worker.container_id)
        if state is not None and state.running:
            continue
        how = death_reason(state)
        started = time.time()
        try:
            new = env.replace_worker(worker.slot)
        except DockerUnavailableError:
            raise
        except RuntimeProblem as exc:  # WorkerNotReadyError included
            if env.interrupted:  # not a failure, and there is no next check
                notes.append(f"worker {worker.name} (slot {worker.slot}) {how}; "
                             + STOPPING.format(what="not replaced"))
                continue
            notes.append(f"worker {worker.name} (slot {worker.slot}) {how}; replacing it failed after "
                         f"{time.time() - started:.1f} s: {exc}; the next check tries again")
            continue
        notes.append(
            f"worker {worker.name} (slot {worker.slot}) {how}; replaced it with {new.name} behind "
            f"the same address {new.address} (its sessions and programs are gone); "
            f"{repair_times(state, started, time.time())}"
        )
    return notes


def wait_for_paths(workers: Sequence[PublishedWorker], probe: Probe, *, timeout_s: float) -> bool:
    """Wait until no worker's published address refuses connections any more (another process —
    the one that deployed these workers — is healing the path); False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while any(_refused(probe, w, PROBE_TIMEOUT_S) for w in workers):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)  # poll interval of the deadline loop
    return True


def _lock_for(env: Deployment) -> threading.Lock:
    """One lock per live run: the pool's monitor and a refused request may both notice a dead path."""
    with _locks_guard:
        lock = _locks.get(env)
        if lock is None:
            lock = _locks[env] = threading.Lock()
        return lock
