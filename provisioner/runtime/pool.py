"""The worker pool: warm workers, sessions pinned to one worker for life, replacement and recycling.

DSPex's "Session not found" bug came from a session's create and execute landing on different
workers. Here a session is bound to one worker *generation* when it opens: every call for it goes
to that worker, and if that worker dies or is replaced the session fails loudly with
:class:`~provisioner.errors.WorkerLostError` instead of silently continuing on a fresh worker that
has never seen its programs.

* :meth:`WorkerPool.open_session` picks the least-loaded live worker;
* :meth:`WorkerPool.check` (also run by an optional monitor thread) replaces dead workers — their
  sessions become *lost*;
* a worker that served ``recycle_after_sessions`` sessions or is older than ``recycle_after_s``
  is drained (no new sessions) and replaced once its last session closes.

Replacements keep the slot's address (the relay forwards by alias), so clients need no new port.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from provisioner.errors import WorkerLostError
from provisioner.runtime.environment import RunEnvironment, WorkerInfo
from provisioner.runtime.resources import CleanupReport


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


class WorkerPool:
    """Session routing over a started :class:`RunEnvironment`. Thread-safe.

    ``owns_environment``: :meth:`close` also stops the environment (the default for
    :meth:`WorkerPool.start`).
    """

    def __init__(
        self,
        environment: RunEnvironment,
        *,
        recycle_after_sessions: int = 200,
        recycle_after_s: float = 3600.0,
        owns_environment: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not environment.workers:
            raise ValueError("the environment has no workers; start() it before building a pool")
        self.environment = environment
        self.recycle_after_sessions = recycle_after_sessions
        self.recycle_after_s = recycle_after_s
        self.owns_environment = owns_environment
        self.clock = clock
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {w.slot: _Slot(w, clock()) for w in environment.workers}
        self._sessions: dict[str, PooledSession] = {}
        self._lost: dict[str, str] = {}
        self.replaced = 0
        self.recycled = 0
        self._monitor: threading.Thread | None = None
        self._stop_monitor = threading.Event()

    @classmethod
    def start(cls, settings: Any = None, *, layer: str | None = None, **up_kwargs: Any) -> WorkerPool:
        """Bring a layer's workers up (not persistent: the watchdog removes them if we die) as a pool."""
        from provisioner.runtime.environment import _settings, up

        settings = _settings(settings)
        env = up(settings, layer=layer, persistent=False, **up_kwargs)
        return cls(
            env,
            recycle_after_sessions=settings.container.recycle_after_sessions,
            recycle_after_s=settings.container.recycle_after_s,
            owns_environment=True,
        )

    # -- sessions ------------------------------------------------------------------------------------

    def open_session(self, session_id: str | None = None) -> PooledSession:
        """Pin a new session to the least-loaded live worker (recycling due, idle workers first)."""
        session_id = session_id or f"s-{uuid.uuid4().hex[:12]}"
        self._recycle_due()
        with self._cond:
            if session_id in self._sessions:
                raise ValueError(f"session {session_id!r} is already open")
            while True:
                candidates = [s for s in self._slots.values() if not s.replacing]
                if candidates:
                    break
                self._cond.wait(timeout=1.0)
            fresh = [s for s in candidates if not s.draining] or candidates
            slot = min(fresh, key=lambda s: (len(s.active), s.served, s.info.slot))
            slot.active.add(session_id)
            slot.served += 1
            if self._due(slot):
                slot.draining = True
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
            return pinned

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
        """A ``SessionClient`` for the session on its pinned worker (close it when done); its
        connection presents the run's control token unless ``token=`` says otherwise."""
        from provisioner.bridge.client import BridgeClient

        pinned = self.session(session_id)
        client_kwargs.setdefault("token", self.environment.control_token)
        return BridgeClient(pinned.host, pinned.port, **client_kwargs).session(session_id)

    # -- health ----------------------------------------------------------------------------------------

    def check(self) -> list[int]:
        """Replace every worker whose container is not running; return the slots replaced."""
        dead = []
        for slot_no, slot in list(self._slots.items()):
            if slot.replacing:
                continue
            state = self.environment.runtime.container_state(slot.info.container_id)
            if state is None or not state.running:
                how = "is gone" if state is None else f"exited with code {state.exit_code}"
                if state is not None and state.oom_killed:
                    how += " (out of memory)"
                with self._cond:
                    if slot.replacing:
                        continue
                    slot.replacing = True
                self._replace(slot_no, lost_reason=how)
                dead.append(slot_no)
                self.replaced += 1
        return dead

    def report_failure(self, session_id: str) -> None:
        """Call after a connection error on a session: raises WorkerLostError if its worker died."""
        self.check()
        self.session(session_id)

    def start_monitor(self, interval_s: float = 1.0) -> None:
        """Run :meth:`check` every ``interval_s`` in a daemon thread until :meth:`close`."""
        if self._monitor is not None:
            return

        def loop() -> None:
            while not self._stop_monitor.wait(interval_s):
                with contextlib.suppress(Exception):  # a failed check is retried on the next tick
                    self.check()

        self._monitor = threading.Thread(target=loop, name="provision-pool-monitor", daemon=True)
        self._monitor.start()

    def stats(self) -> dict[str, Any]:
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
            }

    def close(self) -> CleanupReport | None:
        self._stop_monitor.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        if self.owns_environment:
            return self.environment.stop()
        return None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------

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
            old = slot.info
            if lost_reason is not None:
                for sid in slot.active:
                    pinned = self._sessions.pop(sid, None)
                    if pinned is not None:
                        self._lost[sid] = self._lost_message(sid, pinned, lost_reason)
                slot.active.clear()
        try:
            new = self.environment.replace_worker(slot_no)
        finally:
            with self._cond:
                slot.replacing = False
                self._cond.notify_all()
        with self._cond:
            self._slots[slot_no] = _Slot(new, self.clock())
        del old

    @staticmethod
    def _lost_message(session_id: str, pinned: PooledSession, how: str) -> str:
        return (
            f"session {session_id!r} was pinned to worker {pinned.worker} (slot {pinned.slot}), which {how}; "
            "its programs and LM state are gone. Open a new session."
        )
