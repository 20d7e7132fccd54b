"""The worker pool: warm workers, sessions pinned to one worker for life, replacement and recycling.

DSPex's "Session not found" bug came from a session's create and execute landing on different
workers. Here a session is bound to one worker *generation* when it opens: every call for it goes
to that worker, and if that worker dies or is replaced the session fails loudly with
:class:`~provisioner.errors.WorkerLostError` instead of silently continuing on a fresh worker that
has never seen its programs.

* :meth:`WorkerPool.open_session` picks the least-loaded worker and checks that it still runs: a
  session is never pinned to a dead worker. A dead one is replaced in the background and the
  session goes to another worker (or waits for the replacement when none is left). The check costs
  no engine call when the pool holds an idle connection to the worker (see below): the relay closes
  a connection the moment its worker's end closes, so an idle connection that is still open (one
  ``select`` with no wait) proves the worker was alive a moment ago. Without one (the first session
  on a worker, or the connection was closed) the engine is asked for the container's state;
* :meth:`WorkerPool.lease` is what a test takes: a session, a client on it and its cleanup, which
  the pool's closer thread finishes (``cleanup_session``, then the connection goes back to the pool
  for the next session on the same worker generation) while the next test starts. Connecting
  through the published port and the relay (two more hops, a DNS look-up in the relay), the
  per-session container inspect and the ``cleanup_session`` round trip were most of a pooled
  test's setup and teardown (cProfile over benchmarks/bench_suite.py's suite; issue 10);
* a client from :meth:`WorkerPool.client` whose connection fails asks the engine whether the worker
  died: if so the caller gets :class:`~provisioner.errors.WorkerLostError` saying how (exit code,
  signal, OOM-killed — from the container's state) and the worker is replaced at once;
* :meth:`WorkerPool.check` (also run by an optional monitor thread) replaces dead workers — their
  sessions become *lost*; closing a lost session is a no-op — and pings every worker through its
  published address: a dead path (the engine's port forwarder died, the relay stopped) is repaired
  by re-creating the relay on the same ports (:meth:`WorkerPool.heal_path`), sessions intact;
* a worker that served ``recycle_after_sessions`` sessions or is older than ``recycle_after_s``
  is drained (no new sessions) and replaced once its last session closes.

Replacements keep the slot's address (the relay forwards by alias), so clients need no new port.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from provisioner.bridge.client import BridgeClient, name_session
from provisioner.errors import BridgeConnectionError, WorkerLostError, WorkerNotReplaceableError
from provisioner.runtime.deployment import Deployment, WorkerInfo, bridge_probe, death_reason, repair_times
from provisioner.runtime.engine import ContainerState
from provisioner.runtime.health import PublishedWorker, heal_environment, wait_for_paths
from provisioner.runtime.resources import CleanupReport

log = logging.getLogger("provisioner.pool")
# How long an idle connection's ping may take before it is not reused (seconds; the engine is asked
# instead). A threaded worker answers ping on its connection thread even while it executes.
REUSE_PING_TIMEOUT_S = 5.0


def _answers_ping(client: Any) -> bool:
    """``client``'s worker answers a ``ping`` on its open connection (one round trip, within
    :data:`REUSE_PING_TIMEOUT_S`); False on any failure (the caller then checks the engine)."""
    try:
        client.call("ping", timeout=REUSE_PING_TIMEOUT_S)
    except Exception:
        return False
    return True


# Idle connections kept per worker generation (a process runs one test at a time; threads of a
# test that open sessions concurrently may need a few).
IDLE_CONNECTIONS_PER_WORKER = 4
# After a broken connection, how long the engine gets to report the worker's exit (seconds).
CONNECTION_FAILURE_SETTLE_S = 1.5


@dataclass(frozen=True)
class PooledSession:
    """A session and the worker (slot + generation) it is pinned to."""

    session_id: str
    slot: int
    generation: int
    worker: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class _Slot:
    info: WorkerInfo
    born: float
    served: int = 0
    active: set[str] = field(default_factory=set)
    draining: bool = False
    replacing: bool = False
    # Why the last replacement of this slot failed (cleared by a successful one).
    failure: str | None = None
    # This process may not replace the slot's worker (WorkerNotReplaceableError: a `provision up`
    # run's): it is not tried again, and said once, not once per test.
    unreplaceable: bool = False
    # When the last session was pinned here (the pool's clock; -inf: never): the
    # ``least_recently_used`` pick.
    last_opened: float = float("-inf")


class PoolEnvironment(Protocol):
    """What a pool needs of its workers' environment: a started :class:`Deployment`, or
    :class:`~provisioner.runtime.shared_pool.AttachedWorkers` (workers another process started)."""

    workers: list[WorkerInfo]
    runtime: Any
    ready_timeout_s: float

    def worker(self, slot: int) -> WorkerInfo: ...

    def replace_worker(self, slot: int) -> WorkerInfo: ...

    def stop(self) -> object: ...


class WorkerPool:
    """Session routing over a started :class:`Deployment` (or workers another process started,
    :class:`~provisioner.runtime.shared_pool.AttachedWorkers`). Thread-safe.

    ``owns_environment``: :meth:`close` also stops the environment (the default for
    :meth:`WorkerPool.start`).
    """

    def __init__(
        self,
        environment: PoolEnvironment,
        *,
        recycle_after_sessions: int = 200,
        recycle_after_s: float = 3600.0,
        owns_environment: bool = False,
        clock: Callable[[], float] = time.monotonic,
        least_recently_used: bool = False,
        connection_failure_settle_s: float = CONNECTION_FAILURE_SETTLE_S,
    ) -> None:
        """``connection_failure_settle_s``: after a broken connection, how long the engine gets to
        report the worker's exit before the failure counts as a blip (seconds; a blip waits it out
        in full, so tests of a blip on the in-memory engine, which reports an exit at once, pass a
        small one). ``least_recently_used``: among workers with equally many open sessions, pin a new session
        to the one that got its last session longest ago (else: the one that served fewest). The
        pool of a layer with isolation ``process`` picks so: a fork-mode worker forks and warms its
        next *spare* process after a connection arrives, so a sequential suite that alternates
        between two workers always connects to one whose spare had a whole test's time to get
        ready, while the other's spare warms on that worker's own CPU quota."""
        if not environment.workers:
            raise ValueError("the environment has no workers; start() it before building a pool")
        self.environment = environment
        self.recycle_after_sessions = recycle_after_sessions
        self.recycle_after_s = recycle_after_s
        self.owns_environment = owns_environment
        self.clock = clock
        self.least_recently_used = least_recently_used
        self.connection_failure_settle_s = connection_failure_settle_s
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {w.slot: _Slot(w, clock()) for w in environment.workers}
        self._sessions: dict[str, PooledSession] = {}
        self._lost: dict[str, str] = {}
        self.replaced = 0
        self.recycled = 0
        self.added = 0  # workers that joined after the start (grow)
        self._monitor: threading.Thread | None = None
        self._stop_monitor = threading.Event()
        self._replacers: list[threading.Thread] = []
        # Idle connections per (slot, generation), and the one reserved for a session being opened.
        self._idle: dict[tuple[int, int], list[PooledBridgeClient]] = {}
        self._reserved: dict[str, PooledBridgeClient] = {}
        self._closed = False
        self.connections_reused = 0
        # Sessions of ended leases still to be cleaned up on their workers, by the closer thread.
        self._cleanups: queue.SimpleQueue[tuple[str, Any] | None] | None = None
        self._closer_thread: threading.Thread | None = None
        self._pending_cleanups = 0
        self.engine_checks = 0  # container-state look-ups made by open_session (tests, benchmarks)
        # What the pool did on its own (replaced a dead worker, skipped a lost session's cleanup).
        self.notes: list[str] = []
        # Called with the environment's workers after each replacement or added worker
        # (runtime.shared_pool rewrites the run's pool.json with it: the run's other processes
        # find the new worker).
        self.on_replaced: Callable[[list[WorkerInfo]], None] | None = None
        # Growing on demand (issue 10): a pool deployed with slots left for later (Deployment's
        # start_slots) starts one more worker when more sessions are open at once than it has
        # workers — here (peak_sessions) or in the run's other processes (demand_elsewhere: their
        # peaks, runtime/shared_pool.py) — up to its planned size. on_peak tells the others ours.
        self.grows_on_demand = False
        self.peak_sessions = 0
        self.demand_elsewhere: Callable[[], int] | None = None
        # Cheap "may the others' demand have changed?" (one stat), asked on each session opened.
        self.demand_changed: Callable[[], bool] | None = None
        self.on_peak: Callable[[int], None] | None = None
        self._starting: set[int] = set()  # slots a grow thread is starting
        # The run folder whose watchdog close() tells the run is over (set by start(): the pool
        # started the run); None when someone else owns the run's end (the plugin, the API).
        self.finishes_run: Path | None = None

    @classmethod
    def start(cls, settings: Any = None, options: Any = None, **up_kwargs: Any) -> WorkerPool:
        """Bring a layer's workers up (not persistent: the watchdog removes them if we die) as a pool.

        ``options``: :class:`~provisioner.runtime.lifecycle.UpOptions`; ``up_kwargs``: the other
        keywords of :func:`~provisioner.runtime.lifecycle.up` (``runtime``, ``probe``, ``progress``)."""
        import dataclasses

        from provisioner.runtime.lifecycle import UpOptions, up
        from provisioner.runtime.runs import settings_or_load
        from provisioner.runtime.state import run_dir_of

        settings = settings_or_load(settings)
        options = dataclasses.replace(options or UpOptions(), persistent=False)
        env = up(settings, options, **up_kwargs)
        pool = cls(
            env,
            recycle_after_sessions=settings.container.recycle_after_sessions,
            recycle_after_s=settings.container.recycle_after_s,
            owns_environment=True,
        )
        # The run is this pool's alone: close() ends it for the watchdog too (finish_run).
        pool.finishes_run = run_dir_of(settings, env.plan.run_id).path
        return pool

    # -- sessions ------------------------------------------------------------------------------------

    def open_session(self, session_id: str | None = None, *, check: bool = True) -> PooledSession:
        """Pin a new session to the least-loaded live worker (recycling due, idle workers first).

        The chosen worker's container state is checked (one engine call): a dead worker is never
        handed out; it is replaced in the background and another worker chosen. ``check=False``:
        the caller's own new connection to the worker is the check (isolation ``process``: every
        session connects afresh, so the engine call was one more round trip per test); when that
        connection fails the caller asks :meth:`connection_failed` and opens the session again.

        Raises:
            ValueError: ``session_id`` is already open.
            WorkerLostError: every worker is dead and replacing them failed (the engine's error).
        """
        session_id = session_id or f"s-{uuid.uuid4().hex[:12]}"
        self._refresh()
        self._recycle_due()
        if self.grows_on_demand and self.demand_changed is not None and self.demand_changed():
            self.grow_on_demand()  # another process's new demand: grow now, not at the monitor's tick
        dead_seen = 0
        while True:
            with self._cond:
                if session_id in self._sessions:
                    raise ValueError(f"session {session_id!r} is already open")
                while True:
                    candidates = [s for s in self._slots.values() if not s.replacing]
                    if candidates:
                        break
                    self._cond.wait(timeout=1.0)
                fresh = [s for s in candidates if not s.draining] or candidates
                # A worker whose replacement failed is dead: the others first.
                slot = min(fresh, key=self._pick_key)
                slot.active.add(session_id)
                slot.served += 1
                previous_open, slot.last_opened = slot.last_opened, self.clock()
                pinned = PooledSession(
                    session_id,
                    slot.info.slot,
                    slot.info.generation,
                    slot.info.name,
                    slot.info.host,
                    slot.info.port,
                )
                self._sessions[session_id] = pinned
                self._lost.pop(session_id, None)
                idle = self._idle.get((slot.info.slot, slot.info.generation))
                reuse = idle.pop() if idle else None
            state: ContainerState | None = None
            if reuse is not None and reuse.idle_and_open() and _answers_ping(reuse):
                # It answered just now. Open alone was not enough: the relay closes a dead worker's
                # connections a moment after its death, and a session opened in that moment was
                # pinned to the dead worker (test_api's killed-between-tests test, about 1 run in 5
                # of the README's command).
                alive = True
            elif not check:
                alive = True  # the caller's connection will tell
                if reuse is not None:
                    reuse.close()
                    reuse = None
            else:
                if reuse is not None:
                    reuse.close()
                    reuse = None
                self.engine_checks += 1
                alive, state = self._state(slot.info)
            if alive:
                with self._cond:
                    if self._due(slot):
                        slot.draining = True
                    if reuse is not None:
                        self._reserved[session_id] = reuse
                    # Sessions whose lease ended wait for the closer thread: not demand any more.
                    in_use = len(self._sessions) - self._pending_cleanups
                    peak = in_use > self.peak_sessions
                    if peak:
                        self.peak_sessions = in_use
                if peak:
                    self._note_peak()
                return pinned
            # Dead: take the session back, replace the worker in the background, choose again.
            with self._cond:
                slot.active.discard(session_id)
                slot.served -= 1
                slot.last_opened = previous_open
                self._sessions.pop(session_id, None)
                self._lost.pop(session_id, None)
            self._retire(pinned.slot, pinned.generation, death_reason(state))
            dead_seen += 1
            if dead_seen > 2 * len(self._slots):
                with self._cond:
                    # Judge only once the replacements in flight have ended: one may still bring a
                    # worker up (then choose again), or say it may not replace (a provision up run's).
                    self._cond.wait_for(lambda: not any(s.replacing for s in self._slots.values()),
                                        timeout=getattr(self.environment, "ready_timeout_s", 60.0))
                    failures = sorted({s.failure for s in self._slots.values() if s.failure})
                    owned = all(s.unreplaceable for s in self._slots.values())
                    revived = any(s.failure is None and not s.replacing for s in self._slots.values())
                if revived and dead_seen <= 8 * len(self._slots):
                    continue
                what = ("this process may not replace them, so no replacement was attempted" if owned
                        else "replacing them failed")
                raise WorkerLostError(
                    f"no live worker for session {session_id!r}: every worker died and {what}: "
                    f"{'; '.join(failures) or 'unknown error'}"
                )

    def _pick_key(self, slot: _Slot) -> tuple[bool, int, float, int]:
        """Order of preference in :meth:`open_session` (lowest first): a worker whose replacement
        failed last, then fewest open sessions, then least recently used or fewest served."""
        rested = slot.last_opened if self.least_recently_used else float(slot.served)
        return (slot.failure is not None, len(slot.active), rested, slot.info.slot)

    def session(self, session_id: str) -> PooledSession:
        """The session's worker; :class:`WorkerLostError` when that worker is gone."""
        with self._cond:
            if session_id in self._lost:
                raise WorkerLostError(self._lost[session_id])
            try:
                pinned = self._sessions[session_id]
            except KeyError:
                raise KeyError(f"no open session {session_id!r} in this pool") from None
            current = self._slots[pinned.slot].info
            if current.generation != pinned.generation:  # replaced under us without check() noticing
                raise WorkerLostError(self._lost_message(session_id, pinned, "was replaced"))
            return pinned

    def is_lost(self, session_id: str) -> str | None:
        """Why the session's worker is gone (the :class:`WorkerLostError` message), or None."""
        try:
            self.session(session_id)
        except WorkerLostError as exc:
            return str(exc)
        except KeyError:
            return None
        return None

    def close_session(self, session_id: str) -> None:
        """Forget a session (lost or not); a drained worker with no sessions left is recycled."""
        recycle: int | None = None
        with self._cond:
            self._lost.pop(session_id, None)
            pinned = self._sessions.pop(session_id, None)
            if pinned is None:
                return
            slot = self._slots[pinned.slot]
            if slot.info.generation == pinned.generation:
                slot.active.discard(session_id)
                if slot.draining and not slot.active and not slot.replacing:
                    slot.replacing = True
                    recycle = pinned.slot
        if recycle is not None:
            self._replace(recycle, lost_reason=None)
            self.recycled += 1

    def client(self, session_id: str, **client_kwargs: Any) -> Any:
        """A ``SessionClient`` for the session on its pinned worker (close it when done).

        It has session access only: the worker is shared with other sessions (other tests), so
        ``reset_state``, ``shutdown`` and the other worker-wide commands answer ``Unauthorized``.
        The pool's own management needs no such client (health is a ``ping`` and the container's
        state, replacement goes through the engine).

        When a request fails because the connection broke and the worker's container is no longer
        running, the request raises :class:`WorkerLostError` (how the worker ended, from the
        engine) chained to the connection error, and the worker is replaced in the background.
        """
        pinned = self.session(session_id)
        with self._cond:
            reused = self._reserved.pop(session_id, None)
        if reused is not None and reused.options == client_kwargs:
            reused.pooled_session = session_id
            self.connections_reused += 1
            return reused.session(session_id)
        if reused is not None:
            reused.close()
        # Off loopback every connection starts with a hello carrying the run's bridge token.
        token = getattr(self.environment, "bridge_token", None)
        client = PooledBridgeClient(self, session_id, pinned.host, pinned.port,
                                    **({"token": token} if token else {}), **client_kwargs)
        return client.session(session_id)

    def lease(self, session_id: str, **client_kwargs: Any) -> tuple[Any, Callable[[], None]]:
        """(session client, cleanup) for a new session pinned to a live worker: what one test takes.

        The cleanup hands the session to the pool's closer thread and returns: that thread runs
        ``cleanup_session`` on the worker and gives the connection back to the pool (the next
        session on the same worker generation reuses it). The test does not wait for the worker's
        round trip — under load the larger part of a pooled test's teardown — and nothing can
        observe the difference: session ids are never reused, and the session stays counted on its
        worker until it is cleaned up. A failed cleanup is a note (logged as a warning on
        ``provisioner.pool`` and kept in :attr:`notes`), as is the no-op cleanup of a session whose
        worker died (its programs went with the worker, which the pool replaces).
        :meth:`wait_cleanups` waits for the thread; :meth:`close` drains it. After :meth:`close` the
        cleanup runs in the caller.

        Raises:
            ValueError: ``session_id`` is already open.
            WorkerLostError: no live worker (see :meth:`open_session`).
        """
        self.open_session(session_id)
        try:
            session = self.client(session_id, **client_kwargs)
        except BaseException:
            self.close_session(session_id)
            raise

        def cleanup() -> None:
            with self._cond:
                background = not self._closed
                if background:
                    self._pending_cleanups += 1
            if background:
                self._closer().put((session_id, session))
            else:
                self._end_session(session_id, session)

        return session, cleanup

    def _end_session(self, session_id: str, session: Any) -> None:
        """``cleanup_session`` on the worker (skipped with a note for a lost session), then the
        connection goes back to the pool and the session is forgotten."""
        try:
            lost = self.is_lost(session_id)
            if lost is None:
                try:
                    session.close()  # cleanup_session on the worker
                except WorkerLostError as exc:
                    lost = str(exc)
            if lost is not None:
                self.note(name_session(f"cleanup of session {session_id!r} skipped, nothing to clean: {lost}",
                                       session_id, getattr(session, "label", None)))
        except Exception as exc:  # the closer thread has no caller to raise to
            self.note(name_session(f"cleanup of session {session_id!r} failed: {type(exc).__name__}: {exc}",
                                   session_id, getattr(session, "label", None)))
        finally:
            self._give_back(session_id, session.bridge)
            self.close_session(session_id)

    def _closer(self) -> queue.SimpleQueue[tuple[str, Any] | None]:
        """The queue of the thread that ends leased sessions (started on first use)."""
        with self._cond:
            if self._cleanups is None:
                self._cleanups = queue.SimpleQueue()
                thread = threading.Thread(target=self._close_loop, args=(self._cleanups,),
                                          name="provision-pool-closer", daemon=True)
                self._closer_thread = thread
                thread.start()
            return self._cleanups

    def _close_loop(self, items: queue.SimpleQueue[tuple[str, Any] | None]) -> None:
        while (item := items.get()) is not None:
            try:
                self._end_session(*item)
            finally:
                with self._cond:
                    self._pending_cleanups -= 1
                    self._cond.notify_all()

    def wait_cleanups(self, timeout_s: float | None = None) -> bool:
        """Wait until every leased session that ended has been cleaned up on its worker; False if
        some are still pending after ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending_cleanups == 0, timeout=timeout_s)

    def _give_back(self, session_id: str, client: PooledBridgeClient) -> None:
        """Keep the session's connection for the next session on the same worker generation, when
        the session was not lost and the connection is open; else close it."""
        with self._cond:
            pinned = self._sessions.get(session_id)
            keep = (
                not self._closed
                and pinned is not None
                and self._slots[pinned.slot].info.generation == pinned.generation
                and client.idle_and_open()
            )
            if keep:
                assert pinned is not None
                idle = self._idle.setdefault((pinned.slot, pinned.generation), [])
                keep = len(idle) < IDLE_CONNECTIONS_PER_WORKER
                if keep:
                    idle.append(client)
        if not keep:
            client.close()

    def connection_failed(self, session_id: str) -> str | None:
        """A request of ``session_id`` failed on its connection: if its worker died, retire it
        (replacement in the background) and return why the session is lost; None for a blip."""
        with self._cond:
            if session_id in self._lost:
                return self._lost[session_id]
            pinned = self._sessions.get(session_id)
            if pinned is None:
                return None
            current = self._slots[pinned.slot].info
        if current.generation != pinned.generation:
            return self._lost_message(session_id, pinned, "was replaced")
        # The relay drops the connection the moment the worker dies; the engine records the exit a
        # little later. Look again for a moment before calling it a blip (only on failures).
        deadline = time.monotonic() + self.connection_failure_settle_s
        alive, state = self._state(current)
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive, state = self._state(current)
        if alive:
            return None
        self._retire(pinned.slot, pinned.generation, death_reason(state))
        with self._cond:
            return self._lost.get(session_id) or self._lost_message(session_id, pinned, death_reason(state))

    # -- health ----------------------------------------------------------------------------------------

    def check(self) -> list[int]:
        """Repair a dead published path (:meth:`heal_path`), then replace every worker whose
        container is not running (its replacement answers through that path); return the slots replaced."""
        self.heal_path()
        dead = []
        for slot_no, slot in list(self._slots.items()):
            if slot.replacing:
                continue
            state = self.environment.runtime.container_state(slot.info.container_id)
            if state is None or not state.running:
                how = death_reason(state)
                if self._unreplaceable_reason() is not None:
                    self._retire(slot_no, slot.info.generation, how)  # says so; nothing replaced
                    continue
                with self._cond:
                    if slot.replacing:
                        continue
                    slot.replacing = True
                self.note(f"worker {slot.info.name} (slot {slot_no}) {how}; replacing it")
                self._replace(slot_no, lost_reason=how)
                dead.append(slot_no)
        return dead

    def heal_path(self) -> bool:
        """Ping every worker through its published address; when that path is dead while the
        workers run (the engine's port forwarder died), re-create the relay on the same ports —
        sessions keep their workers (:mod:`provisioner.runtime.health`). True when it repaired.
        Only the process that deployed the workers does this; a process attached to a shared pool
        waits (up to ``ready_timeout_s``) until that one has healed the path; workers of a
        ``provision up`` run are healed by ``provision status --repair``."""
        env = self.environment
        if not isinstance(env, Deployment):
            if getattr(getattr(env, "record", None), "source", "") != "deployed":
                return False
            workers = [PublishedWorker(w.slot, w.name, w.container_id, w.host, w.port) for w in env.workers]
            token = getattr(env, "bridge_token", None)  # off loopback every ping says hello first
            probe = functools.partial(bridge_probe, token=token) if token else bridge_probe
            return wait_for_paths(workers, probe, timeout_s=env.ready_timeout_s)
        try:
            notes = heal_environment(env)
        except Exception as exc:
            self.note(f"repairing the published path failed: {exc}")
            return False
        for message in notes:
            self.note(message)
        return bool(notes)

    def report_failure(self, session_id: str) -> None:
        """Call after a connection error on a session: raises WorkerLostError if its worker died."""
        self.check()
        self.session(session_id)

    def grow(self, up_to: int | None = None) -> None:
        """Start the environment's pending worker slots (:meth:`Deployment.add_worker`), one after
        another in a background thread, until the pool has ``up_to`` workers started or starting
        (None: every planned slot); each joins the pool when it is ready and reaches the run's other
        processes through ``pool.json``. The run's shared pool starts one worker and grows so, on
        demand (:meth:`wanted_workers`): the first tests run at once, and a worker nobody needs
        never shares the cores with the ones that serve."""
        pending = getattr(self.environment, "pending_slots", None)
        if pending is None:
            return
        slots: list[int] = []

        def run() -> None:
            for slot_no in slots:
                try:
                    if self._stop_monitor.is_set():
                        continue
                    info = self.environment.add_worker(slot_no)  # type: ignore[attr-defined]
                except Exception as exc:
                    if not self._stop_monitor.is_set():  # closing: a worker still starting is dropped
                        self.note(f"starting worker slot {slot_no} failed: {exc}")
                    continue
                finally:
                    with self._cond:
                        self._starting.discard(slot_no)
                with self._cond:
                    self._slots[slot_no] = _Slot(info, self.clock())
                    self.added += 1
                    self._cond.notify_all()
                self._workers_changed(slot_no)

        with self._cond:
            if self._closed:
                return
            slots = [slot for slot in pending() if slot not in self._starting]
            if up_to is not None:
                slots = slots[:max(0, up_to - len(self._slots) - len(self._starting))]
            if not slots:
                return
            self._starting.update(slots)
            # Registered and started while the slots are claimed: a wait_replacements() that sees
            # them starting also sees (and joins) the thread that starts them.
            thread = threading.Thread(target=run, name="provision-pool-grow", daemon=True)
            self._replacers = [t for t in self._replacers if t.is_alive()] + [thread]
            thread.start()

    def wanted_workers(self) -> int:
        """How many workers the demand asks for: the most sessions this process had open at once,
        plus the other processes' peaks (``demand_elsewhere``)."""
        elsewhere = 0
        if self.demand_elsewhere is not None:
            try:
                elsewhere = self.demand_elsewhere()
            except Exception as exc:  # unreadable: this process's own demand still counts
                self.note(f"reading the other processes' demand failed: {exc}")
        return self.peak_sessions + elsewhere

    def grow_on_demand(self) -> None:
        """Grow to :meth:`wanted_workers` when the pool grows on demand (else nothing)."""
        if self.grows_on_demand:
            self.grow(self.wanted_workers())

    def _note_peak(self) -> None:
        """More sessions are open at once than ever before here: tell the others, grow if it may."""
        if self.on_peak is not None:
            try:
                self.on_peak(self.peak_sessions)
            except Exception as exc:
                self.note(f"recording this process's demand failed: {exc}")
        self.grow_on_demand()

    def _refresh(self) -> None:
        """Workers another process added to the pool (an attached environment's ``refresh``)."""
        refresh = getattr(self.environment, "refresh", None)
        if refresh is None:
            return
        for info in refresh():
            with self._cond:
                if info.slot not in self._slots:
                    self._slots[info.slot] = _Slot(info, self.clock())
                    self._cond.notify_all()

    def _workers_changed(self, slot_no: int) -> None:
        if self.on_replaced is not None:
            try:
                self.on_replaced(list(self.environment.workers))
            except Exception as exc:  # the change itself worked; the others may not see it
                self.note(f"could not record the change of slot {slot_no}: {exc}")

    def start_monitor(self, interval_s: float = 1.0) -> None:
        """Run :meth:`check` every ``interval_s`` in a daemon thread until :meth:`close`."""
        if self._monitor is not None:
            return

        def loop() -> None:
            while not self._stop_monitor.wait(interval_s):
                with contextlib.suppress(Exception):  # a failed check is retried on the next tick
                    self.check()
                    self.grow_on_demand()  # the run's other processes' demand, read here

        self._monitor = threading.Thread(target=loop, name="provision-pool-monitor", daemon=True)
        self._monitor.start()

    def stats(self) -> dict[str, Any]:
        """The pool now: per worker (slot, name, address, generation, active sessions, sessions
        served, draining), open and lost sessions, replaced/recycled/added workers, workers starting
        (growing on demand), the most sessions open at once here, connection reuse,
        engine checks, notes. Workers another process of the run added are included."""
        self._refresh()
        with self._cond:
            return {
                "workers": [
                    {
                        "slot": n,
                        "name": s.info.name,
                        "address": s.info.address,
                        "generation": s.info.generation,
                        "active_sessions": len(s.active),
                        "sessions_served": s.served,
                        "draining": s.draining,
                    }
                    for n, s in sorted(self._slots.items())
                ],
                "open_sessions": len(self._sessions),
                "lost_sessions": len(self._lost),
                "replaced": self.replaced,
                "recycled": self.recycled,
                "added": self.added,
                "starting": len(self._starting),
                "peak_sessions": self.peak_sessions,
                "replacing": sum(1 for s in self._slots.values() if s.replacing),
                "connections_reused": self.connections_reused,
                "engine_checks": self.engine_checks,
                "notes": list(self.notes),
            }

    def wait_replacements(self, timeout_s: float | None = None) -> bool:
        """Wait for replacements to finish — the background ones (a death a session found, a pool
        growing) and one :meth:`check` is making on another thread (the monitor's); False if some
        still run after ``timeout_s`` (seconds; None: no limit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        with self._cond:  # after a death _retire marked (same lock), its replacement thread is here
            replacers = list(self._replacers)
        for thread in replacers:
            thread.join(left())
        with self._cond:
            settled = self._cond.wait_for(lambda: not any(s.replacing for s in self._slots.values()), left())
        return settled and not any(t.is_alive() for t in self._replacers)

    def close(self) -> CleanupReport | None:
        """Stop the monitor, wait for replacements in flight (so nothing starts after the run's
        cleanup), close the idle connections, and stop the environment if the pool owns it."""
        self._stop_monitor.set()
        stop_booting = getattr(self.environment, "stop_booting", None)
        if stop_booting is not None:  # a worker still starting (Deployment's ready_slots) is not waited for
            stop_booting()
        with self._cond:
            self._closed = True  # from now on a lease's cleanup runs in the caller
            closer, self._cleanups = self._cleanups, None
        if closer is not None and self._closer_thread is not None:
            closer.put(None)  # after every queued session
            self._closer_thread.join(self.environment.ready_timeout_s + 30)
        with self._cond:
            idle = [c for clients in self._idle.values() for c in clients] + list(self._reserved.values())
            self._idle.clear()
            self._reserved.clear()
        for client in idle:
            client.close()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        self.wait_replacements(self.environment.ready_timeout_s + 30)
        if self.owns_environment:
            try:
                report = self.environment.stop()
            finally:
                if self.finishes_run is not None:
                    from provisioner.runtime.watchdog import finish_run

                    finish_run(self.finishes_run)  # else it stays "running" until the watchdog reaps it
            return report if isinstance(report, CleanupReport) else None
        return None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------

    def _state(self, info: WorkerInfo) -> tuple[bool, ContainerState | None]:
        """(alive, container state): alive when the container runs, or when the engine cannot tell
        (no false alarms: the connection itself will tell). A state of None: the container is gone."""
        try:
            state = self.environment.runtime.container_state(info.container_id)
        except Exception:
            return True, None
        return state is not None and state.running, state

    def note(self, message: str) -> None:
        """Log ``message`` (warning, logger ``provisioner.pool``); keep it in :attr:`notes` (last 50)."""
        log.warning(message)
        with self._cond:
            self.notes.append(message)
            del self.notes[:-50]

    def _retire(self, slot_no: int, generation: int, reason: str) -> None:
        """The worker ``generation`` of ``slot_no`` died: its sessions become lost now, a fresh
        worker is started in the background. Nothing happens if that worker was already retired."""
        with self._cond:
            slot = self._slots[slot_no]
            if slot.replacing or slot.info.generation != generation:
                return
            if slot.unreplaceable:  # said once already (below); its sessions are lost all the same
                self._mark_lost(slot, reason)
                return
            owner_only = self._unreplaceable_reason()
            if owner_only is not None:
                # Nobody here replaces it (a `provision up` run's worker): say so, not "replacing it".
                slot.unreplaceable = True
                slot.failure = f"worker {slot.info.name} is gone and not replaced: {owner_only}"
                self._mark_lost(slot, reason)
                self.note(f"worker {slot.info.name} (slot {slot_no}) {reason}; not replaced "
                          f"(no replacement attempted): {owner_only}")
                self._cond.notify_all()
                return
            slot.replacing = True
            name = slot.info.name
            self._mark_lost(slot, reason)
            self.note(f"worker {name} (slot {slot_no}) {reason}; replacing it behind the same address")
            # Registered and started in the same critical section that marks the worker dead: a
            # wait_replacements() that comes after the death sees its replacement (it could return
            # before the thread was registered, and join() fails on a thread not started yet).
            thread = threading.Thread(target=self._replace_in_background,
                                      args=(slot_no, name, reason),
                                      name=f"provision-pool-replace-{slot_no}", daemon=True)
            self._replacers = [t for t in self._replacers if t.is_alive()] + [thread]
            thread.start()

    def _replace_in_background(self, slot_no: int, name: str, reason: str) -> None:
        """:meth:`_retire`'s replacement of ``slot_no`` (worker ``name``, dead for ``reason``)."""
        started = time.time()
        try:
            self._replace(slot_no, lost_reason=reason)
        except WorkerNotReplaceableError as exc:
            self.note(f"worker {name} (slot {slot_no}) not replaced (no replacement attempted): {exc}")
            return
        except Exception as exc:
            took = time.time() - started
            self.note(f"replacing worker {name} (slot {slot_no}) failed after {took:.1f} s: {exc}")
            return
        self.note(f"replaced worker {name} (slot {slot_no}) behind the same address; "
                  f"{repair_times(None, started, time.time(), 'the replacement')}")

    def _mark_lost(self, slot: _Slot, reason: str) -> None:
        """(Caller holds the lock.) Every session of the slot becomes lost with ``reason``."""
        for sid in slot.active:
            pinned = self._sessions.pop(sid, None)
            if pinned is not None:
                self._lost[sid] = self._lost_message(sid, pinned, reason)
        slot.active.clear()

    def _due(self, slot: _Slot) -> bool:
        return slot.served >= self.recycle_after_sessions or self.clock() - slot.born >= self.recycle_after_s

    def _recycle_due(self) -> None:
        due = []
        with self._cond:
            for n, slot in self._slots.items():
                if slot.replacing or not self._due(slot):
                    continue
                if slot.active:
                    slot.draining = True
                else:
                    slot.replacing = True
                    due.append(n)
        for n in due:
            self._replace(n, lost_reason=None)
            self.recycled += 1

    def _replace(self, slot_no: int, *, lost_reason: str | None) -> None:
        """Replace the worker in ``slot_no`` (the caller set ``replacing``); its sessions become lost."""
        with self._cond:
            slot = self._slots[slot_no]
            if lost_reason is not None:
                self._mark_lost(slot, lost_reason)
        try:
            new = self.environment.replace_worker(slot_no)
        except BaseException as exc:
            with self._cond:
                slot.failure = f"{type(exc).__name__}: {exc}"
                slot.unreplaceable = isinstance(exc, WorkerNotReplaceableError)
                slot.replacing = False
                self._cond.notify_all()
            raise
        with self._cond:
            stale = [c for key in [k for k in self._idle if k[0] == slot_no] for c in self._idle.pop(key)]
            self._slots[slot_no] = _Slot(new, self.clock())
            if lost_reason is not None:  # a dead worker's, not a recycle (counted by its caller)
                self.replaced += 1  # with the swap: a wait_replacements() that sees it done sees it
            self._cond.notify_all()
        for client in stale:
            client.close()
        self._workers_changed(slot_no)

    def _unreplaceable_reason(self) -> str | None:
        """Why this pool's dead workers are not replaced by anyone it can reach, and what to do
        (``AttachedWorkers.unreplaceable_reason``: a ``provision up`` run's); None: they are replaced."""
        reason = getattr(self.environment, "unreplaceable_reason", None)
        return reason if isinstance(reason, str) else None

    def _lost_message(self, session_id: str, pinned: PooledSession, how: str) -> str:
        owner_only = self._unreplaceable_reason() if how != "was replaced" else None
        what_next = (f"It is not replaced: {owner_only}." if owner_only is not None
                     else "Open a new session.")
        return (
            f"session {session_id!r} was pinned to worker {pinned.worker} (slot {pinned.slot}), which {how}; "
            f"its programs and LM state are gone. {what_next}"
        )


class PooledBridgeClient(BridgeClient):
    """A :class:`BridgeClient` for one pooled session: a request whose connection breaks because the
    worker died raises :class:`WorkerLostError` saying how (see :meth:`WorkerPool.connection_failed`)."""

    def __init__(self, pool: WorkerPool, session_id: str, host: str, port: int, **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)
        self.pool = pool
        self.pooled_session = session_id
        self.options = dict(kwargs)  # what it was made with: reused only for the same options

    def idle_and_open(self) -> bool:
        """Connected, and the peer has not closed the connection (nothing to read between requests:
        an end-of-file, a reset or an error frame would be readable). One ``select`` without waiting."""
        with self._lock:
            sock = self._sock
            return sock is not None and not self._closed and not self._peer_closed(sock)

    def call(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        try:
            return super().call(command, args, timeout=timeout)
        except BridgeConnectionError as exc:
            if isinstance(exc.__cause__, ConnectionRefusedError) and self.pool.heal_path():
                # Refused: nothing was sent. The path is repaired, so the request is safe to send again.
                return super().call(command, args, timeout=timeout)
            lost = self.pool.connection_failed(self.pooled_session)
            if lost is None:
                raise
            raise WorkerLostError(f"{command} failed: {lost} (connection: {exc})") from exc
