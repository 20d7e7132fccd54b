"""Fork mode: a fresh Python process per connection, forked from a pre-imported worker.

``provision worker --fork`` runs a *parent* that imports everything a worker needs (DSPy, the LM
engines, google-genai, the bridge), warms DSPy's lazy paths with one throw-away mock execution,
starts **no threads**, and then only forks and reaps. Each connection is served by a ``fork()``-ed
*child* that built its own :class:`~provisioner.bridge.service.BridgeService` (its LM from the
worker's start-up configuration, applied before the first byte of the connection is read), serves
that one connection on its main thread with the ordinary server code, and exits when the connection
closes. The fork happens ahead of time: one *spare* child waits on the shared listening socket, and
the moment it accepts a connection the parent forks the next spare — so a client's connect is
answered by a process that is already up (the fork's cost is off the connection's path).
The connection is the unit of isolation: every client — Python, Erlang ``gen_tcp``, Elixir — gets a
fresh process by connecting; there is no extra protocol command.

Rules the parent keeps (each one checked or enforced here, not assumed):

* **single-threaded when it forks.** ``fork()`` copies only the calling thread; a lock held by any
  other thread at that moment stays locked forever in the child. The parent counts its threads
  (``/proc/self/task``) at start-up and before every fork, and refuses with
  :class:`~provisioner.errors.ForkUnsafeError` naming the threads otherwise;
* **children die with the parent**: each child asks the kernel for ``SIGKILL`` when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``, through ``ctypes``: one system call, and the PyPI wrapper
  ``python-prctl`` needs a C build against libcap for it), and leads its own process group, which
  the parent kills when the child ends (a program's stray subprocesses go with it). The parent is a
  child subreaper (``PR_SET_CHILD_SUBREAPER``), so such orphans are reaped here too;
* **every child is reaped**: ``SIGCHLD`` wakes the accept loop (``signal.set_wakeup_fd``), which
  calls ``waitpid(-1, WNOHANG)`` until nothing is left — no zombies, whatever the child died of;
* **live children are bounded**: ``max_connections``, capped by the container's pids limit (each
  child runs up to ``max_inflight`` execution threads plus a few of its own,
  :func:`child_limit`; the spare counts). Past it there is no spare, the parent accepts the
  connection itself, sends one ``TooManyConnections`` error reply ("the worker is busy") and
  closes it;
* **a child's process-wide state is its connection's**: the child serves one connection and ends
  with it, so that connection may set its process's default LM without the control token
  (``own_process`` on its :class:`~provisioner.bridge.service.Access`);
* **worker-wide commands act on the worker**: ``shutdown`` in any child (with control) stops the
  parent, which ends every child and exits; ``reset_state`` clears the calling child and ends every
  other child (their sessions are the worker's state). A child tells its parent over a pipe shared by
  all children (writes under ``PIPE_BUF`` are atomic);
* **no idle timeout**: a connection may stay open, idle, as long as its client likes — a DSPex-style
  client keeps one for a whole suite, and here that connection *is* its process.

``get_stats``, ``hello`` and ``ping`` in a child carry ``process``: ``{"mode": "fork", "pid",
"parent_pid"}``; ``get_stats`` adds the parent's counters under ``fork`` (read from a shared
anonymous memory page the parent writes).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from provisioner.bridge.protocol import ErrorType, dumps, encode_frame, error_reply
from provisioner.bridge.server import (
    ACCEPT_EXHAUSTED,
    AcceptBackoff,
    DescriptorReserve,
    out_of_descriptors_reason,
)
from provisioner.errors import ForkUnsafeError
from provisioner.lmconfig import LMConfig

log = logging.getLogger("provisioner.bridge")

PROCESS_MODE_FORK = "fork"
# The longest a child that accepted a connection holds back the next spare's fork while it waits for
# the connection's first request (seconds); see ForkingWorker.release_spare.
SPARE_RELEASE_S = 0.05
# prctl(2) options (linux/prctl.h).
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
# Threads one child runs besides its execution pool: main (which serves the connection), the deadline
# watch, and headroom for what DSPy / google-genai / anyio start on first use (measured with
# /proc/<pid>/task: 1 idle, 3 while executing with one pool thread).
_CHILD_THREADS = 6
# Processes and threads the parent itself and the container's other processes (tini, a health
# check, a `docker exec`) need below the pids limit.
_PARENT_RESERVE = 16
# Refused sockets drained at once by the parent (more are closed at once: a reset, but no memory).
_MAX_REFUSING = 256
_REFUSE_DRAIN_S = 1.0
# How long stopping waits for children to finish in-flight work beyond the request timeout.
_STOP_GRACE_S = 5.0


def thread_names() -> list[str]:
    """The names of this process's threads, as the kernel counts them (``/proc/self/task``).

    Native threads started by C libraries count too (``threading`` does not see them); without
    ``/proc`` (not Linux) the count comes from ``threading``.
    """
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return [t.name for t in threading.enumerate()]
    if len(tasks) == 1:
        return ["MainThread"]
    known = {t.native_id: t.name for t in threading.enumerate()}
    names = []
    for tid in sorted(tasks, key=int):
        name = known.get(int(tid))
        if name is None:
            with contextlib.suppress(OSError):
                name = Path(f"/proc/self/task/{tid}/comm").read_text(encoding="utf-8").strip() + " (native)"
        names.append(name or f"thread {tid}")
    return names


def require_single_threaded(what: str) -> None:
    """Raise :class:`ForkUnsafeError` unless this process runs exactly one thread.

    Raises:
        ForkUnsafeError: naming every thread, and what to do.
    """
    names = thread_names()
    if len(names) > 1:
        raise ForkUnsafeError(
            f"{what}: the fork-mode worker's parent runs {len(names)} threads ({', '.join(names)}); it"
            " must run exactly one when it forks (a lock held by another thread would stay locked in"
            " every child). Something started a thread at import or start-up: start it lazily in the"
            " child instead, or run the worker without --fork"
        )


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)`` through libc; False where there is no such call (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return True


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only)."""
    return _prctl(_PR_SET_PDEATHSIG, int(sig))


def become_subreaper() -> bool:
    """Orphaned descendants of this process are re-parented to it (and reaped by it) (Linux only)."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def child_limit(configured: int, max_inflight: int, pids: int | None) -> int:
    """Live children a worker may run: ``configured``, capped so every child's threads fit below
    the container's pids limit (``pids``; None: unlimited).

    A child runs at most ``max_inflight`` execution threads plus ``_CHILD_THREADS`` of its own; the
    parent keeps ``_PARENT_RESERVE`` for itself. Source of the per-child figure: an idle child
    measured with ``/proc/<pid>/task`` (1 idle, 3 executing) plus headroom.
    """
    if pids is None:
        return configured
    per_child = max_inflight + _CHILD_THREADS
    return max(1, min(configured, (pids - _PARENT_RESERVE) // per_child))


def warm_up(config: LMConfig) -> WarmUp:
    """Import what a child needs for ``config`` and run DSPy's lazy paths once, so children pay for
    neither; returns what each spare re-runs (:class:`WarmUp`).

    Only what the worker's LM needs is imported (:func:`provisioner.lm.preload`: google-genai only
    for a layer that may call Gemini or its stand-in — ≈ 0.5 s of CPU at start-up, measured with
    ``python -X importtime`` in the worker image). A session that later configures another mode
    imports what that needs in its own process, as a threaded worker does.
    """
    import dspy  # noqa: F401  (imported for the children)

    import provisioner.lm.mock  # noqa: F401  (warm-up and test rules)
    from provisioner.lm import preload

    preload(config)  # the worker's own engine is built once by the caller (it checks the config)
    exercise(("predict", "chain_of_thought"))
    return WarmUp()


_WARM_SIGNATURE = "question -> answer: int, note"
# A spare's own program: another signature than the parent's, so its parsing path runs too.
_SPARE_SIGNATURE = "question, context -> answer: int"


class WarmUp:
    """A throw-away mock service built in the parent, holding one created and executed ``predict``
    program; a spare re-executes it (:meth:`run`) while it waits, so the pages a first execution
    writes are copied then rather than during its connection's first request (CPython writes
    reference counts into every object it reads: each of them copies a page, copy on write).

    Built once in the parent instead of in every spare (as :func:`exercise` did until then): a spare
    then neither builds a service nor creates and removes a program, only executes.
    ``benchmarks/bench_fork_child.py`` (CPU time per child, median of 30, host, load ≈ 15): the old
    spare warm-up took 14.0 ms and left 3.1-3.4 ms for hello + create + execute (19.1-19.8 ms per
    process with the service build); this one takes 6.8-7.0 ms and leaves 5.2-5.4 ms (14.3-14.6 ms);
    none at all leaves 9.1-9.6 ms (11.3-11.7 ms). A sequential suite runs on one worker whose 1-CPU
    quota serialises the spare's warm-up with the test's own execution, so the total per process is
    what bounds it; the ≈ 2 ms more on a connection's path buy ≈ 5 ms less per process.

    With two fork-mode workers per pool, spares created *and* executed a program of their own
    (``create=True``: 1.2 ms less on the connection's path, 3.5 ms more per process) on the theory
    that each spare has a whole test's time. It does not have the CPU: a process suite keeps the
    machine's 2 cores busy (workers, relay, pytest, the engine's port forwarder). A/B of the 200-test
    suite through pytest (``--layer proc``, pool start included, variants alternating, 2026-11-30
    22:11-22:17 UTC, load 3.4-5.6): re-executing only was faster in 7 of 7 rounds against
    create + execute (200 tests in 2.84-6.04 s, median 2.96, against 3.07-8.65 s, median 4.36), and
    no warm-up at all was no better than re-executing (call p50 10-13 ms against 7.5).
    """

    def __init__(self) -> None:
        from provisioner.bridge.service import BridgeService

        self.service = BridgeService(LMConfig(mode="mock"))
        self.service.call("create_program", {"signature": _WARM_SIGNATURE, "program_id": "warm",
                                             "program_type": "predict"})
        self.run(create=False)

    def run(self, stop: Callable[[], bool] = lambda: False, *, create: bool = True) -> None:
        """Create a program (``create``) and execute it once — the pages a test's first
        ``create_program`` and ``execute_program`` write get copied here — unless ``stop()`` (a
        connection waits) says so before a step. ``create=False``: only re-execute the parent's
        program (what spares do; see the class)."""
        if stop():
            return
        program = "warm"
        if create:
            program = "warm-spare"
            self.service.call("create_program", {"signature": _SPARE_SIGNATURE, "program_id": program,
                                                 "program_type": "predict"})
            if stop():
                return
        inputs = {"question": "warm up", **({"context": "spare"} if create else {})}
        self.service.call("execute_program", {"program_id": program, "inputs": inputs})


def exercise(program_types: tuple[str, ...] = ("predict",), stop: Callable[[], bool] = lambda: False) -> None:
    """Create and execute one program of each of ``program_types`` on a throw-away mock service (no
    files, no network) and drop it: run in the parent before any fork, it takes DSPy's lazy paths
    (first-use imports, caches) so no child takes them. ``stop()`` is asked before each step.
    """
    from provisioner.bridge.service import BridgeService

    if stop():
        return
    scratch = BridgeService(LMConfig(mode="mock"))
    for program_type in program_types:
        if stop():
            return
        scratch.call("create_program", {"signature": _WARM_SIGNATURE,
                                        "program_id": program_type, "program_type": program_type})
        if stop():
            return
        scratch.call("execute_program", {"program_id": program_type, "inputs": {"question": "warm up"}})
    scratch.call("reset_state", {})


@dataclass
class _Child:
    pid: int
    peer: str = "(spare: waiting for a connection)"
    started: float = field(default_factory=time.monotonic)
    ready: bool = False  # built its service and LM; waiting on the listener
    accepted: bool = False


class _Counters:
    """The parent's counters on an anonymous shared page: children read them for ``get_stats``."""

    # ``spare_pid``: which process the parent counts as the spare (0: none); not reported, see
    # :meth:`seen_by`.
    _FIELDS = ("serving", "spare", "forks_total", "accepted_total", "refused_busy", "crashed_total",
               "exited_total", "spare_pid")
    _STRUCT = struct.Struct("<" + "q" * len(_FIELDS))

    # The last ENDED_KEPT processes that served a connection and ended: (pid, wait status as
    # os.waitstatus_to_exitcode gives it: negative = the signal), a ring after the counters.
    ENDED_KEPT = 64
    _ENDED_AT = 256
    _ENTRY = struct.Struct("<qq")

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE)  # MAP_SHARED | MAP_ANONYMOUS: shared across fork
        self.values = dict.fromkeys(self._FIELDS, 0)
        self._ended_next = 0

    def record_end(self, pid: int, code: int) -> None:
        """Note how process ``pid`` ended (``code``: exit code, or minus the signal)."""
        slot = self._ended_next % self.ENDED_KEPT
        offset = self._ENDED_AT + slot * self._ENTRY.size
        self._page[offset: offset + self._ENTRY.size] = self._ENTRY.pack(pid, code)
        self._ended_next += 1

    def ended(self) -> list[dict[str, Any]]:
        """The last processes that ended (at most :attr:`ENDED_KEPT`, any order):
        ``[{"pid", "exit_code", "signal"}]`` — ``exit_code`` None and ``signal`` its name (e.g.
        ``"SIGKILL"``) for a process a signal ended, else the exit code and None."""
        found = []
        for slot in range(self.ENDED_KEPT):
            offset = self._ENDED_AT + slot * self._ENTRY.size
            pid, code = self._ENTRY.unpack(self._page[offset: offset + self._ENTRY.size])
            if pid <= 0:
                continue
            if code < 0:
                try:
                    name: str | None = signal.Signals(-code).name
                except ValueError:
                    name = f"signal {-code}"
                found.append({"pid": pid, "exit_code": None, "signal": name})
            else:
                found.append({"pid": pid, "exit_code": code, "signal": None})
        return found

    def add(self, name: str, delta: int = 1) -> None:
        self.values[name] += delta
        self.publish()

    def set(self, **values: int) -> None:
        self.values.update(values)
        self.publish()

    def publish(self) -> None:
        self._page[: self._STRUCT.size] = self._STRUCT.pack(*(self.values[f] for f in self._FIELDS))

    def read(self) -> dict[str, int]:
        """``{serving, spare, forks_total, accepted_total, refused_busy, crashed_total, exited_total,
        spare_pid}`` as the parent last wrote them (``serving``: processes serving a connection;
        ``spare``: 0 or 1 process waiting for the next one)."""
        return dict(zip(self._FIELDS, self._STRUCT.unpack(self._page[: self._STRUCT.size]), strict=True))

    def seen_by(self, pid: int) -> dict[str, int]:
        """:meth:`read` as process ``pid`` (a serving child) reports it, without ``spare_pid``.

        The parent counts a spare as serving only once it has sent its first reply (``A`` on the
        control pipe, read by the parent's loop some time later): a connection whose first request is
        ``get_stats`` would otherwise report its own process as the spare. The asking process knows
        it serves, so it moves itself from ``spare`` to ``serving`` (the parent forks the next
        spare only after that ``A``, so there is no other spare yet)."""
        values = self.read()
        if values.pop("spare_pid") == pid:
            values["serving"] += 1
            values["spare"] = 0
        return values


class ForkingWorker:
    """The fork-mode parent: keep one forked *spare* ready, reap, refuse when full, stop.

    Forking is kept off a connection's critical path: the parent forks a spare child ahead of time;
    the spare builds its service and LM, then waits on the shared listening socket. The spare that
    accepts a connection tells the parent (``C <pid> <peer>`` on the control pipe) and, once it has
    sent its first reply (``A <pid>``), the parent forks the next spare. With ``max_children``
    processes alive there is no spare: the parent watches the listener itself and answers each
    connection "busy".

    ``make_child(parent)`` runs in a new child before it waits for a connection and returns the
    function that serves the accepted one (``serve(sock, peer) -> exit code``); see
    :func:`run_fork_worker`. ``idle_work(pending)`` then runs in the spare, after it told the
    parent it is ready; it should return soon after ``pending()`` (a connection waits) is true.
    ``max_children`` is already capped (:func:`child_limit`).
    """

    def __init__(
        self,
        make_child: Callable[[ForkingWorker], Callable[[socket.socket, str], int]],
        *,
        max_children: int,
        worker_id: str,
        stop_timeout_s: float = 30.0 + _STOP_GRACE_S,
        idle_work: Callable[[Callable[[], bool]], None] | None = None,
    ) -> None:
        self.make_child = make_child
        self.idle_work = idle_work
        self.max_children = max_children
        self.worker_id = worker_id
        self.stop_timeout_s = stop_timeout_s
        self.parent_pid = os.getpid()
        self.counters = _Counters()
        self.counters.publish()
        self.children: dict[int, _Child] = {}
        self.spare: int | None = None
        self._spare_failures = 0
        self._spare_retry_at = 0.0
        self._fork_problem: str | None = None
        self._listener: socket.socket | None = None
        self._watching_listener = False
        self._wake_r, self._wake_w = os.pipe()
        self._ctl_r, self.ctl_w = os.pipe()  # children -> parent: C/A/S/R lines, see _read_control
        for fd in (self._wake_r, self._wake_w, self._ctl_r):
            os.set_blocking(fd, False)
        self._ctl_buf = b""
        self._refusing: dict[int, tuple[socket.socket, float]] = {}
        self._poll = select.poll()  # no descriptor of its own: nothing for a child to inherit
        self._stopping = False
        self._on_ready: Callable[[], None] | None = None
        # Out of descriptors: the listener is not watched again before this time (the loop must
        # keep reaping, so the back-off is a deadline, not a wait).
        self._accept_retry_at = 0.0
        self._reserve: DescriptorReserve | None = None
        self._accept_backoff = AcceptBackoff(f"worker {worker_id}", self._defer_accept)

    # -- set-up ------------------------------------------------------------------------------------

    def listen(self, host: str = "127.0.0.1", port: int = 0) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family, backlog=socket.SOMAXCONN)
        # Non-blocking for good: the flag belongs to the socket shared with every child, and neither
        # the parent nor a spare may ever block in accept() when the other took the connection.
        listener.setblocking(False)
        self._listener = listener
        self._reserve = DescriptorReserve()  # for refusing while out of descriptors (the parent's only)
        bound: int = listener.getsockname()[1]
        log.info("fork-mode worker %s listening on %s:%d (at most %d processes at once)",
                 self.worker_id, host, bound, self.max_children)
        return bound

    # -- the parent's loop -------------------------------------------------------------------------

    def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        """Keep a spare, reap, refuse when full, until ``shutdown`` (from a child) or SIGTERM/SIGINT;
        then end every child.

        ``on_ready`` is called once, when the first spare has built its service and LM and waits
        on the listener: the worker's ready line goes out then, so the first connection after it
        (the host's readiness ``ping``) is answered by a process that is already up instead of
        waiting for one to be forked and built — under load that took longer than the probe's
        2 s timeout, every timed-out probe used up the spare being built, and the worker never
        became ready within ``container.ready_timeout_s``.

        Raises:
            ForkUnsafeError: the process is not single-threaded.
        """
        assert self._listener is not None, "listen() first"
        require_single_threaded(f"worker {self.worker_id}")
        self._on_ready = on_ready
        become_subreaper()
        previous = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_stop_signal),
            signal.SIGINT: signal.signal(signal.SIGINT, self._on_stop_signal),
            signal.SIGCHLD: signal.signal(signal.SIGCHLD, _ignore_signal),
        }
        previous_wakeup = signal.set_wakeup_fd(self._wake_w)
        poll = self._poll
        poll.register(self._wake_r, select.POLLIN)
        poll.register(self._ctl_r, select.POLLIN)
        # Objects that exist now stay out of the collector's reach: a child's collections then never
        # write to (and so copy) the parent's pages.
        gc.collect()
        gc.freeze()
        try:
            while not self._stopping:
                self._ensure_spare()
                self._watch_listener(self.spare is None and time.monotonic() >= self._accept_retry_at)
                events = poll.poll(self._poll_timeout_ms())
                # Control lines first: a spare that accepted, served and ended since the last turn
                # must be known as a served connection before its exit is looked at.
                self._read_control()
                self._reap()
                listener_ready = False
                for fd, _ in events:
                    if fd == self._wake_r:
                        _drain(self._wake_r)
                    elif fd in self._refusing:
                        self._drain_refused(fd)
                    elif fd == self._listener.fileno():
                        listener_ready = True
                self._expire_refused()
                if listener_ready and not self._stopping and self.spare is None:
                    self._ensure_spare()  # a process may have ended meanwhile: let a spare take it
                    if self.spare is None:
                        self._refuse_pending()
            self._stop_children()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close_parent_fds()

    def _watch_listener(self, on: bool) -> None:
        """The parent watches the listener only while there is no spare to accept."""
        assert self._listener is not None
        if on and not self._watching_listener:
            self._poll.register(self._listener.fileno(), select.POLLIN)
        elif not on and self._watching_listener:
            self._poll.unregister(self._listener.fileno())
        self._watching_listener = on

    def _poll_timeout_ms(self) -> int:
        deadlines = [deadline for _, deadline in self._refusing.values()]
        if self._accept_retry_at > time.monotonic():
            deadlines.append(self._accept_retry_at)
        if self.spare is None and self._spare_retry_at > time.monotonic():
            deadlines.append(self._spare_retry_at)
        if not deadlines:
            return -1
        return max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("worker %s: %s, ending every child process", self.worker_id, signal.Signals(signum).name)
        self._stopping = True

    def _ensure_spare(self) -> None:
        """Fork the next spare when there is none, room for one, and no back-off after failures."""
        if (self.spare is not None or self._stopping or len(self.children) >= self.max_children
                or time.monotonic() < self._spare_retry_at):
            return
        try:
            require_single_threaded(f"worker {self.worker_id}: forking a process")
            # What the loop allocated since the last fork goes out of the collector's reach too: a
            # child's collection would otherwise walk (and write to, so copy) those pages.
            gc.freeze()
            pid, mask = fork_with_default_stop_signals()
        except (ForkUnsafeError, OSError) as exc:
            self._fork_problem = str(exc)
            self._spare_failed(f"cannot fork: {exc}")
            return
        if pid == 0:
            self._run_child(mask)
        self.children[pid] = _Child(pid)
        self.spare = pid
        self.counters.set(spare=1, spare_pid=pid, serving=len(self.children) - 1,
                          forks_total=self.counters.values["forks_total"] + 1)

    def _run_child(self, mask: set[int | signal.Signals]) -> NoReturn:
        """The forked process: a spare until its connection ends; never returns into the parent's loop.
        (A function of its own, so that coverage's tracer, started anew in the child, sees it.)"""
        code = 70
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a SIGTERM sent meanwhile ends it now
            code = self._become_spare()
        except BaseException:
            with contextlib.suppress(Exception):
                log.exception("worker %s: process %d failed", self.worker_id, os.getpid())
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _spare_failed(self, why: str) -> None:
        self._spare_failures += 1
        delay = min(5.0, 0.05 * 2 ** self._spare_failures)
        self._spare_retry_at = time.monotonic() + delay
        log.error("worker %s: no process ready for the next connection (%s); retrying in %.2f s",
                  self.worker_id, why, delay)

    def _refuse_pending(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in ACCEPT_EXHAUSTED:  # the peer reset before we accepted
                    log.debug("accept failed: %s", exc)
                    continue
                # Out of descriptors (issue 14, item 7): refuse with the reserve, else back off.
                # Held refusals go first: they only wait for their peer to read the reply.
                for fd in list(self._refusing):
                    self._drop_refused(fd)
                assert self._reserve is not None
                refused = self._reserve.refuse_one(self._listener, out_of_descriptors_reason(exc))
                if refused:
                    self.counters.add("refused_busy")
                self._accept_backoff.failed(exc, refused)
                if not refused:
                    return
                continue
            self._accept_backoff.succeeded()
            if len(self.children) >= self.max_children:
                why = (f"the worker is busy: it runs at most {self.max_children} processes (one per"
                       " connection) at once; try again later")
            else:
                why = ("the worker cannot start a process for this connection now: "
                       f"{self._fork_problem or 'its waiting process ended early'}; try again later")
            self._refuse(sock, why)

    def _defer_accept(self, seconds: float) -> None:
        self._accept_retry_at = time.monotonic() + seconds

    def _become_spare(self) -> int:
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != self.parent_pid:  # the parent died before the request above took effect
            return 0
        os.setpgid(0, 0)  # its own group: the parent kills stray subprocesses with it
        self._close_parent_fds(child=True)
        serve = self.make_child(self)  # the service and its LM, before any connection
        self.tell_parent(f"W {os.getpid()}")  # ready: waiting for a connection
        assert self._listener is not None
        listener = self._listener
        waiting = select.poll()
        waiting.register(listener.fileno(), select.POLLIN)
        if self.idle_work is not None:
            # Only while no connection waits: one that does is served first.
            self.idle_work(lambda: bool(waiting.poll(0)))
        while True:
            waiting.poll()
            try:
                sock, address = listener.accept()
                break
            except BlockingIOError:  # the parent refused it (it was at its limit): wait again
                continue
        listener.close()
        sock.setblocking(True)
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        self.tell_parent(f"C {os.getpid()} {peer}")
        return serve(sock, peer)

    def release_spare(self) -> None:
        """From the child that accepted: let the parent fork the next spare now. Sent after the
        connection's first reply (or ``SPARE_RELEASE_S`` after accepting, for a client that sends
        nothing), so the parent's fork does not compete for the CPU with that first answer."""
        self.tell_parent(f"A {os.getpid()}")

    def _close_parent_fds(self, *, child: bool = False) -> None:
        """Close what the parent holds: in a child, all but the listener and the control pipe's
        write end."""
        if self._listener is not None and not child:
            with contextlib.suppress(OSError):
                self._listener.close()
        for sock, _ in self._refusing.values():
            with contextlib.suppress(OSError):
                sock.close()
        self._refusing.clear()
        for fd in (self._wake_r, self._wake_w, self._ctl_r, *(() if child else (self.ctl_w,))):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._reserve is not None:
            self._reserve.close()

    # -- children ----------------------------------------------------------------------------------

    def _reap(self) -> None:
        """Collect every child (and adopted orphan) that has ended."""
        changed = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.children.pop(pid, None)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # what the child left running in its group
            if child is None:
                continue  # an orphan re-parented to us (subreaper), now reaped
            changed = True
            code = os.waitstatus_to_exitcode(status)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if pid == self.spare:
                self._read_control()  # its "accepted" line may have arrived with its exit
            if pid == self.spare:
                self.spare = None
                if not child.accepted:
                    if not self._stopping:
                        self._spare_failed(f"the waiting process {pid} ended by {how}")
                    self.counters.values["crashed_total"] += 1
                    continue
            self.counters.record_end(pid, code)  # a client that lost it may ask how (get_stats)
            if code == 0:
                self.counters.values["exited_total"] += 1
                log.debug("worker %s: process %d (%s) ended", self.worker_id, pid, child.peer)
            else:
                self.counters.values["crashed_total"] += 1
                log.warning("worker %s: process %d serving %s ended by %s after %.1f s; its connection is"
                            " closed, other connections are unaffected", self.worker_id, pid, child.peer,
                            how, time.monotonic() - child.started)
        if changed:
            self._publish_children()

    def _publish_children(self) -> None:
        spare = 1 if self.spare is not None else 0
        self.counters.set(serving=len(self.children) - spare, spare=spare, spare_pid=self.spare or 0)

    def _read_control(self) -> None:
        while True:
            try:
                data = os.read(self._ctl_r, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            self._ctl_buf += data
        *lines, self._ctl_buf = self._ctl_buf.split(b"\n")
        for line in lines:
            word, _, rest = line.decode("ascii", "replace").partition(" ")
            arg, _, peer = rest.partition(" ")
            sender = int(arg) if arg.isdigit() else -1
            if word == "W":  # a spare is ready
                child = self.children.get(sender)
                if child is not None:
                    child.ready = True
                if self._on_ready is not None:
                    on_ready, self._on_ready = self._on_ready, None
                    on_ready()
            elif word == "C":  # the spare accepted a connection (it is serving, not failing, now)
                child = self.children.get(sender)
                if child is not None:
                    child.accepted, child.peer, child.started = True, peer, time.monotonic()
                self._spare_failures = 0
                self.counters.add("accepted_total")
            elif word == "A":  # ... and has answered first: fork the next spare
                if sender == self.spare:
                    self.spare = None
                self._publish_children()
            elif word == "S":
                log.info("worker %s: shutdown requested by process %s", self.worker_id, arg or "?")
                self._stopping = True
            elif word == "R":
                # The spare holds no state yet: it stays.
                others = [pid for pid in self.children if pid not in (sender, self.spare)]
                log.info("worker %s: reset_state by process %s: ending %d other process(es)",
                         self.worker_id, arg, len(others))
                for pid in others:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)

    def _stop_children(self) -> None:
        """SIGTERM every child (each finishes its in-flight work and replies), wait, SIGKILL the rest."""
        if self._listener is not None:
            self._watch_listener(False)
            self._listener.close()
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        while self.children and time.monotonic() < deadline:
            self._poll.poll(max(1, int((deadline - time.monotonic()) * 1000)))
            _drain(self._wake_r)
            _drain(self._ctl_r)  # a second shutdown or a reset changes nothing now
            self._expire_refused()
            self._reap()
        for pid in list(self.children):
            log.warning("worker %s: process %d still busy at shutdown; killing it", self.worker_id, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:
            pid, _ = os.waitpid(-1, 0)
            self.children.pop(pid, None)
        self._reap()
        self.spare = None
        self._publish_children()

    # -- refusals (single-threaded: drained by the loop itself) -----------------------------------

    def _refuse(self, sock: socket.socket, why: str) -> None:
        self.counters.add("refused_busy")
        frame = encode_frame(dumps(error_reply(None, why, ErrorType.TOO_MANY_CONNECTIONS)))
        try:
            sock.setblocking(False)
            sock.send(frame)  # a small frame on a fresh socket: fits in the send buffer
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if len(self._refusing) >= _MAX_REFUSING:
            sock.close()
            return
        # Read until the peer hangs up before closing: closing with unread data sends a reset that
        # can destroy the refusal before the client reads it.
        self._refusing[sock.fileno()] = (sock, time.monotonic() + _REFUSE_DRAIN_S)
        self._poll.register(sock.fileno(), select.POLLIN)

    def _drain_refused(self, fd: int) -> None:
        sock, _ = self._refusing[fd]
        try:
            more = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            more = b""
        if not more:
            self._drop_refused(fd)

    def _expire_refused(self) -> None:
        now = time.monotonic()
        for fd in [fd for fd, (_, deadline) in self._refusing.items() if deadline <= now]:
            self._drop_refused(fd)

    def _drop_refused(self, fd: int) -> None:
        sock, _ = self._refusing.pop(fd)
        with contextlib.suppress(KeyError, ValueError):
            self._poll.unregister(fd)
        sock.close()

    # -- what a child may ask of its parent --------------------------------------------------------

    def tell_parent(self, message: str) -> None:
        """Send one control line to the parent (from a child): ``S`` (shutdown), ``R <pid>`` (reset)."""
        with contextlib.suppress(OSError):
            os.write(self.ctl_w, message.encode("ascii") + b"\n")


# Signals that stop a process: the parent's handlers for them must never run in a child.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def fork_with_default_stop_signals() -> tuple[int, set[int | signal.Signals]]:
    """``os.fork()`` with SIGTERM and SIGINT blocked across it; ``(pid, mask to restore)``.

    In the child the stop signals and SIGCHLD are back at their default action (and the wake-up fd
    is off) *before* they are unblocked; the caller restores the mask in both processes (the parent
    at once, here; the child when it is ready to be stopped: from then on a SIGTERM ends it).
    Without the block, a SIGTERM that reached a child between ``fork()`` and resetting its handlers
    ran the parent's handler there (which only sets a flag in the parent's loop), was lost, and
    the parent's stop waited its whole grace (35 s) for a spare that never ended: found as a random
    ≈ 30 s wait when a fork-mode worker stopped (2 in 18 tests of tests/bridge/test_forking.py per
    run). A signal blocked meanwhile stays pending and is delivered once unblocked.

    Raises:
        OSError: ``fork()`` failed (the mask is restored).
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid == 0:
        _reset_signals_in_child()
    else:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return pid, mask


def _reset_signals_in_child() -> None:
    """The child's signal state before it unblocks its stop signals: no wake-up fd (the parent's
    loop's) and default handlers. (A function of its own, so that coverage sees it in the child.)"""
    signal.set_wakeup_fd(-1)
    for sig in (*_STOP_SIGNALS, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


def _ignore_signal(_signum: int, _frame: FrameType | None) -> None:
    """SIGCHLD's handler: nothing to do here; the wake-up fd makes the loop reap."""


def _drain(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 4096):
            pass


def run_fork_worker(
    *,
    host: str,
    port: int,
    ready_file: Path | None,
    lm_config: LMConfig,
    worker_id: str | None,
    control_token: str | None,
    server_options: dict[str, Any],
    service_options: dict[str, Any],
    max_connections: int,
    pids: int | None,
    ready_line: Callable[[int], None],
    bridge_token: str | None = None,
) -> int:
    """Run the fork-mode parent until ``shutdown`` or SIGTERM/SIGINT; returns the exit code (0).

    ``server_options`` / ``service_options`` are the keyword arguments of every child's
    :class:`~provisioner.bridge.server.BridgeServer` / :class:`~provisioner.bridge.service.BridgeService`.

    Raises:
        ForkUnsafeError: the parent runs more than one thread after importing and warming up.
        ConfigError: the start-up LM configuration cannot make an LM (checked once in the parent,
            so a bad configuration fails the worker, not every connection).
    """
    from provisioner.bridge.server import BridgeServer, install_process_lm
    from provisioner.bridge.service import BridgeService

    warm = warm_up(lm_config)
    worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    # Every child's service, built once here: a bad configuration fails start-up, not every
    # connection (mock, cached and Gemini engines start no threads; the single-thread check below
    # would say if one did), and each child gets it by fork() — as fresh as one it built itself
    # (the parent never serves with it), for ≈ 1 ms less CPU per process (half the page copies;
    # median of 60 forked children, host, load ≈ 9: 1.8 → 0.8 ms, 461 → 230 faults).
    template = BridgeService(lm_config, worker_id=worker_id, control_token=control_token,
                             bridge_token=bridge_token, **service_options)
    max_inflight = int(server_options.get("max_inflight", 8))
    limit = child_limit(max_connections, max_inflight, pids)
    if limit < max_connections:
        log.info("max_connections %d capped to %d processes: the container allows %s processes/threads"
                 " and each process may run %d threads", max_connections, limit, pids,
                 max_inflight + _CHILD_THREADS)
    timeout = float(server_options.get("request_timeout_s", 30.0)) + _STOP_GRACE_S

    built: dict[str, BridgeServer] = {}  # in a spare: its server, for idle_work

    def make_child(parent: ForkingWorker) -> Callable[[socket.socket, str], int]:
        # Before any connection: the child's own service (the parent's template, this process's copy),
        # its LM applied (no byte is read before).
        service = template
        service.restart_clock()  # its uptime is this process's
        service.process = {"mode": PROCESS_MODE_FORK, "pid": os.getpid(), "parent_pid": parent.parent_pid}
        install_process_lm(service)
        server = BridgeServer(service, **server_options, max_connections=1, pids=None)
        built["server"] = server
        service.stats_hooks.append(lambda: {"fork": {**parent.counters.seen_by(os.getpid()),
                                                     "max_processes": parent.max_children,
                                                     "ended": parent.counters.ended()}})
        service.on_shutdown(lambda: parent.tell_parent(f"S {os.getpid()}"))
        service.on_reset(lambda: parent.tell_parent(f"R {os.getpid()}"))

        def serve(sock: socket.socket, peer: str) -> int:
            # The connection is served on this (the main) thread: nothing to start, nothing to wake
            # at the end. SIGTERM (the parent stopping, or another process's reset_state) interrupts
            # the blocked read; its handler stops the reading, so the read sees EOF after in-flight
            # work has replied.
            released = False

            def release(*_: object) -> None:
                nonlocal released
                if not released:
                    released = True
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    parent.release_spare()

            # The process serves this one connection and ends with it: its own default LM and
            # sessions are the connection's to change, without the run's token (Access.own_process).
            connection = server.adopted(sock, peer, on_first_reply=release, own_process=True)

            def on_signal(signum: int, _frame: FrameType | None) -> None:
                connection.stop()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGALRM, release)  # a client that sends nothing: release anyway
            signal.setitimer(signal.ITIMER_REAL, SPARE_RELEASE_S)
            connection.serve()  # returns once every reply went out (or its work outlived the grace)
            return 0  # the caller's os._exit ends whatever thread is left

        # What the spare built stays out of the collector's reach too (see serve_forever).
        gc.freeze()
        return serve

    def idle_work(pending: Callable[[], bool]) -> None:
        # Copy the pages an execution writes now, while no connection waits: re-execute the parent's
        # program only (see WarmUp: a process suite is bound by the machine's CPU).
        warm.run(stop=pending, create=False)
        if not pending():
            built["server"].start_threads()  # nor start the execution threads on the connection's path
        gc.freeze()

    parent = ForkingWorker(make_child, max_children=limit, worker_id=worker_id, stop_timeout_s=timeout,
                           idle_work=idle_work)
    bound = parent.listen(host, port)
    require_single_threaded(f"worker {worker_id}")
    from provisioner.bridge.server import write_ready_file

    def ready() -> None:  # the first spare waits on the listener
        if ready_file is not None:
            write_ready_file(ready_file, bound)
        ready_line(bound)

    parent.serve_forever(on_ready=ready)
    log.info("fork-mode worker %s stopped (%d processes forked)", worker_id,
             parent.counters.values["forks_total"])
    return 0
