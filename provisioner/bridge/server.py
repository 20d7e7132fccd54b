"""The bridge worker's transport: a threaded TCP server, or one connection over stdin/stdout.

Threads and why:

* one *accept* thread (TCP) that hands each connection to its own *connection* thread, up to
  ``max_connections`` (capped below the container's pids limit, read from the cgroup) — beyond
  that, or when the system cannot start another thread, a client gets a ``TooManyConnections``
  error reply and is closed. Refusals are sent by one *refuser* thread, so a flood of connections
  never costs a thread each;
* a connection thread reads frames and answers quick commands itself, so a ``ping`` on one connection
  never waits for work on another;
* ``execute_program`` runs on a pool of ``max_inflight`` threads, shared fairly between sessions
  (:class:`_Scheduler`): one session runs at most ``max_inflight_per_session`` executions at once
  (default ``max(1, max_inflight // 2)``); its further executions wait in its own queue, and a
  freed slot goes to the next session in turn, so a session that floods the worker (slow rules, a
  slow LM) delays itself, not the others. A connection with ``_MAX_QUEUED_PER_CONNECTION``
  executions waiting stops reading its socket: backpressure, not an unbounded queue. Replies go
  out from the pool thread as soon as the work is done, so pipelined requests on one connection may
  be answered out of order (the ids match them up);
* one *deadline* thread that answers an execution not done ``request_timeout_s`` after its request
  began to arrive with a ``Timeout`` error — the time it waited for input budget or for a slot counts,
  so a client that waits ``process_timeout`` plus a grace from its send always gets the worker's
  answer first. One still waiting for a slot is taken out of its queue and never runs; one running
  has its late result dropped (its slot stays taken until the work ends).

Bounds on what clients hold: an idle connection may wait between requests as long as it likes
(DSPex keeps one open for a whole suite) — idle connections are bounded by count, not time — but a
frame that has started must arrive completely within ``frame_timeout_s`` (else ``FrameTimeout``
and the connection is closed). Request bodies being read or processed may hold at most
``max_inflight_bytes`` together: beyond that a connection waits (it stops reading) until earlier
requests finish, and after ``request_timeout_s`` gets ``Overloaded`` and is closed.

Nothing a client sends can stop the worker: malformed frames get error replies, broken connections
are closed quietly. ``shutdown`` and SIGTERM refuse new work, let in-flight requests finish and
reply, then :func:`run_worker` returns 0.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import os
import resource
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

from pydantic import ValidationError

from provisioner._accept import ACCEPT_BACKOFF_S as ACCEPT_BACKOFF_S  # re-exported (forking, tests)
from provisioner._accept import ACCEPT_EXHAUSTED as ACCEPT_EXHAUSTED
from provisioner._accept import AcceptBackoff as AcceptBackoff
from provisioner._files import atomic_write
from provisioner.bridge.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER,
    HEADER_SIZE,
    ByteReader,
    ErrorType,
    RequestId,
    decode_request,
    dumps,
    encode_frame,
    error_reply,
    ok_reply,
)
from provisioner.bridge.service import Access, BridgeService, Deferred
from provisioner.errors import BridgeError, ConfigError
from provisioner.lm.limits import caller_deadline
from provisioner.lmconfig import LM_CONFIG_ENV, LMConfig

log = logging.getLogger("provisioner.bridge")

READY_PREFIX = "PROVISION_WORKER_READY"
WORKER_ID_ENV = "PROVISION_WORKER_ID"
# How long shutdown waits for in-flight work beyond the request timeout before giving up on it.
_SHUTDOWN_GRACE_S = 5.0
DEFAULT_MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
DEFAULT_FRAME_TIMEOUT_S = 30.0
# Threads a worker needs besides one per connection: main, accept, deadline, refuser, the execution
# pool, and what DSPy / google-genai / anyio start. Measured idle worker: ~12 with max_inflight=8.
_THREAD_RESERVE = 48
# Refused sockets the refuser drains at once; more are closed at once (a reset, but no thread).
_MAX_REFUSING = 256
_REFUSE_DRAIN_S = 1.0
# Executions one connection may have waiting for a slot before it stops reading. Enough that a
# DSPex-style client (one connection, many sessions) gets other sessions' requests past one
# session's backlog; each waiting execution also holds its input in max_inflight_bytes.
_MAX_QUEUED_PER_CONNECTION = 64


def default_max_inflight_per_session(max_inflight: int) -> int:
    """Executions one session may run at once when not configured: half the slots, at least one."""
    return max(1, max_inflight // 2)


class FrameTimeout(Exception):
    """A started frame did not arrive completely within the frame timeout."""


class _ConnectionLevelError(Exception):
    """An error that is answered with ``"id": null`` and ends the connection."""

    def __init__(self, error_type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class _SocketReader:
    """Exact-size reads from a socket, with an optional deadline for the frame being read.

    Without a deadline a read blocks as long as the peer is silent (an idle connection may wait for
    its next request forever). With one, every wait is a ``poll`` bounded by the time left; the
    socket itself stays blocking, so replies written by other threads are not cut short by it.
    """

    def __init__(self, sock: socket.socket, bufsize: int = 65536) -> None:
        self._sock = sock
        self._bufsize = bufsize
        self._buf = bytearray()
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self.deadline: float | None = None

    def _wait(self) -> None:
        if self.deadline is None:
            return
        remaining = self.deadline - time.monotonic()
        if remaining <= 0 or not self._poll.poll(max(1, int(remaining * 1000))):
            raise FrameTimeout

    def read(self, size: int = -1, /) -> bytes:
        if size <= len(self._buf):
            data = bytes(self._buf[:size])
            del self._buf[:size]
            return data
        if size <= self._bufsize:  # small: fill the buffer, one recv serves several reads
            while len(self._buf) < size:
                self._wait()
                chunk = self._sock.recv(self._bufsize)
                if not chunk:
                    break
                self._buf += chunk
            data = bytes(self._buf[:size])
            del self._buf[:size]
            return data
        out = bytearray(size)  # large: straight into the result, no copies through the buffer
        have = len(self._buf)
        out[:have] = self._buf
        self._buf.clear()
        view = memoryview(out)
        while have < size:
            self._wait()
            got = self._sock.recv_into(view[have:], min(size - have, 1 << 20))
            if not got:
                return bytes(out[:have])
            have += got
        return bytes(out)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            self._poll.unregister(self._sock.fileno())


class _ByteBudget:
    """Bytes of request input held at once across connections (``max_inflight_bytes``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, size: int, timeout: float) -> bool:
        """Take ``size`` bytes, waiting up to ``timeout`` s for earlier requests to finish. A request
        larger than the whole budget is admitted alone (``max_frame_bytes`` bounds it)."""
        with self._cond:
            admitted = self._cond.wait_for(lambda: self.used + size <= self.limit or self.used == 0, timeout)
            if admitted:
                self.used += size
            return admitted

    def release(self, size: int) -> None:
        if size:
            with self._cond:
                self.used -= size
                self._cond.notify_all()


_PIDS_MAX_FILES = ("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max")  # cgroup v2, v1


def pids_limit(paths: tuple[str, ...] = _PIDS_MAX_FILES) -> int | None:
    """The cgroup's limit on processes+threads (``docker run --pids-limit``), or None when unlimited
    or unknown. Threads count against it, so it bounds the connections a worker can serve."""
    for path in paths:
        try:
            text = Path(path).read_text(encoding="ascii").strip()
        except OSError:
            continue
        return int(text) if text.isdigit() else None
    return None


def connection_limit(configured: int, max_inflight: int, pids: int | None) -> int:
    """``configured``, capped so that one thread per connection stays below the pids limit."""
    if pids is None:
        return configured
    return max(1, min(configured, pids - max_inflight - _THREAD_RESERVE))


def out_of_descriptors_reason(exc: OSError) -> str:
    """The refusal text for a connection accepted while the process had no descriptor to spare."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"the worker is out of file descriptors ({os.strerror(exc.errno or 0)}; RLIMIT_NOFILE {soft})"
            " and cannot take another connection now; try again later, or raise the container's"
            " nofile limit")


class DescriptorReserve:
    """One descriptor held back so that a process out of descriptors can still refuse a connection.

    ``accept()`` failing with EMFILE leaves the connection queued and the listener readable: a loop
    that retries at once spins, and the client waits in silence. With the reserve (the technique
    libev's and nginx's documentation describe) the process closes its spare descriptor, accepts the
    queued connection, sends it one ``TooManyConnections`` reply, closes it, and takes the reserve
    back. Only when that fails too (another thread took the freed slot) does the caller back off
    (:attr:`ACCEPT_BACKOFF_S`). Written here rather than taken from a library: it is a dozen lines
    over ``os.open`` and the listener the server already holds.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self.take()

    def take(self) -> bool:
        """Hold the reserve again (True when it is held)."""
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def refuse_one(self, listener: socket.socket, why: str) -> bool:
        """Refuse one queued connection with the reserve's descriptor: reply ``why``
        (``TooManyConnections``) and close at once. True when one was refused."""
        self.close()
        try:
            sock, _ = listener.accept()
        except OSError:
            self.take()
            return False  # none queued any more, or the freed slot went to another thread
        try:
            sock.setblocking(False)
            sock.send(encode_frame(dumps(error_reply(None, why, ErrorType.TOO_MANY_CONNECTIONS))))
            sock.shutdown(socket.SHUT_WR)
            # Drop what the client sent already: closing with unread data would send a reset that
            # can destroy the refusal before the client reads it. Nothing is kept to drain later.
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
        except OSError:
            pass
        finally:
            sock.close()
        self.take()
        return True


class _Connection:
    """One peer: a reader, a locked writer, and a count of requests it still has to answer."""

    _ids = itertools.count(1)

    def __init__(
        self,
        reader: ByteReader,
        write: Callable[[bytes], None],
        close: Callable[[], None],
        stop_reading: Callable[[], None] | None,
        peer: str,
        access: Access,
    ) -> None:
        self.number = next(self._ids)
        # What this connection may do; a `hello` with the run's control token widens it.
        self.access = access
        self.reader = reader
        self._write = write
        self._close = close
        self._stop_reading = stop_reading
        # A socket's reader can be woken by shutdown(SHUT_RD); a pipe's cannot.
        self.interruptible = stop_reading is not None
        self.peer = peer
        self._write_lock = threading.Lock()
        self._busy = 0
        self._idle = threading.Condition()
        # Executions of this connection waiting for a slot (guarded by _idle).
        self.queued = 0
        self.broken = False

    def send_frame(self, frame: bytes) -> bool:
        """Write one whole frame; False (and the connection marked broken) if the peer is gone."""
        if self.broken:
            return False
        try:
            with self._write_lock:
                self._write(frame)
        except (OSError, ValueError) as exc:  # ValueError: write to a closed file object
            log.debug("connection %s (%s): send failed: %s", self.number, self.peer, exc)
            self.broken = True
            return False
        return True

    def enter(self) -> None:
        with self._idle:
            self._busy += 1

    def leave(self) -> None:
        with self._idle:
            self._busy -= 1
            if self._busy == 0:
                self._idle.notify_all()

    def queue(self, delta: int) -> None:
        with self._idle:
            self.queued += delta
            if delta < 0:
                self._idle.notify_all()

    def wait_queue_below(self, limit: int) -> None:
        """Block while ``limit`` or more of this connection's executions wait for a slot."""
        with self._idle:
            self._idle.wait_for(lambda: self.queued < limit)

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def stop_reading(self) -> None:
        if self._stop_reading is not None:
            with contextlib.suppress(OSError):
                self._stop_reading()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._close()


class _InFlight:
    """A deferred request: whichever comes first, its result or its deadline, gets to reply."""

    __slots__ = ("_lock", "arrived", "conn", "deadline", "done", "held", "queued", "request_id", "running",
                 "session", "started", "submitted", "usage")

    def __init__(self, conn: _Connection, request_id: RequestId, deadline: float, held: int = 0) -> None:
        self.conn = conn
        self.request_id = request_id
        self.deadline = deadline
        self.arrived = deadline  # when its request began to arrive (set by the server)
        self.submitted = deadline  # when it was queued for a slot (set by the server)
        self.started = deadline  # when it got its execution slot (set by the server)
        self.held = held  # input-budget bytes, released when the work finishes
        self.session = ""  # the scheduler's key: its slot goes back to this session's count
        # While it waits for a slot: its place in the scheduler's queue (None once it has a slot).
        self.queued: _Queued | None = None
        # The execution's LM calls so far (Deferred.usage): a Timeout reply carries them.
        self.usage: Callable[[], dict[str, Any]] | None = None
        self.done = False
        # Set by begin(), under the same lock as done: a deadline reply knows whether the work ran.
        self.running = False
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """True for the first caller only: that one sends the reply."""
        with self._lock:
            if self.done:
                return False
            self.done = True
            return True

    def begin(self) -> bool:
        """Mark the execution as running (its slot was handed over); False, and nothing changed, when
        its reply was already claimed. Atomic with :meth:`claim`: between the scheduler taking it
        from the queue and this call, its deadline may pass, and the deadline reply must then say
        it never started."""
        with self._lock:
            if self.done:
                return False
            self.started = time.monotonic()
            self.running = True
            return True

    def claim_reply(self) -> bool | None:
        """Like :meth:`claim`, and says whether the execution had begun: None when the reply was
        already claimed, else ``running``."""
        with self._lock:
            if self.done:
                return None
            self.done = True
            return self.running


class _Queued:
    """An execution received and waiting for a slot."""

    __slots__ = ("conn", "deferred", "flight", "held", "request_id", "session")

    def __init__(self, conn: _Connection, request_id: RequestId, deferred: Deferred, held: int,
                 flight: _InFlight | None = None) -> None:
        self.conn = conn
        self.request_id = request_id
        self.deferred = deferred
        self.held = held
        self.flight = flight  # its deadline, watched from arrival (None: the scheduler's unit tests)
        # Work without a session (none today) is scheduled as its connection's own.
        self.session = deferred.session_id if deferred.session_id is not None else f"<conn {conn.number}>"


class _Scheduler:
    """Hands the ``max_inflight`` execution slots to sessions in turn.

    Each session has a FIFO queue; sessions are served round-robin, and a session already running
    ``per_session`` executions is skipped until one of them ends. So a session's extra work queues
    behind its own, never in front of another session's, and a session that keeps its slots busy
    for long leaves the rest to everyone else. ``start`` is called (outside the lock) for every
    item that gets a slot; :meth:`done` must be called once for each when it ends.
    """

    def __init__(self, max_inflight: int, per_session: int, start: Callable[[_Queued], None]) -> None:
        self.max_inflight = max_inflight
        self.per_session = per_session
        self._start = start
        self._lock = threading.Lock()
        self._queues: dict[str, collections.deque[_Queued]] = {}  # insertion order = turn order
        self._running: collections.Counter[str] = collections.Counter()
        self.running = 0
        self.waiting = 0
        self._local = threading.local()

    def submit(self, item: _Queued) -> None:
        with self._lock:
            self._queues.setdefault(item.session, collections.deque()).append(item)
            self.waiting += 1
            started = self._take()
        self._launch(started)

    def done(self, session: str) -> None:
        with self._lock:
            self.running -= 1
            self._running[session] -= 1
            if self._running[session] <= 0:
                del self._running[session]
            started = self._take()
        self._launch(started)

    def cancel(self, item: _Queued) -> bool:
        """Take ``item`` out of its session's queue if it is still waiting for a slot (its deadline
        passed there); False when it already has one."""
        with self._lock:
            queue = self._queues.get(item.session)
            if queue is None or item not in queue:
                return False
            queue.remove(item)
            if not queue:
                del self._queues[item.session]
            self.waiting -= 1
            return True

    def load(self, session: str) -> tuple[int, int]:
        """Executions running now: ``session``'s, and the worker's."""
        with self._lock:
            return self._running[session], self.running

    def _take(self) -> list[_Queued]:
        started: list[_Queued] = []
        while self.running < self.max_inflight:
            session = next((s for s in self._queues if self._running[s] < self.per_session), None)
            if session is None:
                break
            queue = self._queues.pop(session)
            started.append(queue.popleft())
            if queue:  # back to the end of the turn order
                self._queues[session] = queue
            self._running[session] += 1
            self.running += 1
            self.waiting -= 1
        return started

    def _launch(self, items: list[_Queued]) -> None:
        # A start that ends at once (the pool is shut down) calls done() and so _launch again: the
        # outermost call drains those in a loop instead of recursing once per queued item.
        local = self._local
        if getattr(local, "backlog", None) is not None:
            local.backlog.extend(items)
            return
        local.backlog = collections.deque(items)
        try:
            while local.backlog:
                item = local.backlog.popleft()
                item.conn.queue(-1)
                self._start(item)
        finally:
            local.backlog = None


class _DeadlineWatch:
    """One thread that times out requests, waiting for a slot or running.

    Deadlines count from a request's arrival, and requests are added when they are submitted (after
    their body was read and parsed), so they come roughly, not exactly, in deadline order: a heap.
    Adding wakes the thread only when the new deadline is earlier than its next wake-up (that would
    otherwise cost a thread switch on every request, right when the execution should start): an
    idle watcher sleeps for one timeout, and anything that arrives after it fell asleep expires no
    earlier than that.
    """

    def __init__(self, on_expired: Callable[[_InFlight], None], timeout_s: float) -> None:
        self._heap: list[tuple[float, int, _InFlight]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._on_expired = on_expired
        self._idle_wait = timeout_s
        self._wakes_at = float("inf")  # when the thread next looks (inf: not started, or stopped)
        self._stopped = False
        # Started with the first execution: a connection that never executes (a fork-mode child that
        # only pings, a health check) costs no thread.
        self._thread: threading.Thread | None = None

    def add(self, flight: _InFlight) -> None:
        with self._cond:
            self._start()
            heapq.heappush(self._heap, (flight.deadline, next(self._order), flight))
            if flight.deadline < self._wakes_at:
                self._cond.notify()

    def start(self) -> None:
        """Start the watching thread now (it starts with the first execution otherwise)."""
        with self._cond:
            self._start()

    def _start(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._loop, name="bridge-deadlines", daemon=True)
            self._thread.start()

    def finished(self) -> None:
        """Drop finished requests from the front so the heap stays short."""
        with self._cond:
            self._drop_done()

    def _drop_done(self) -> None:
        while self._heap and self._heap[0][2].done:
            heapq.heappop(self._heap)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            expired: list[_InFlight] = []
            with self._cond:
                while not self._stopped:
                    self._drop_done()
                    now = time.monotonic()
                    if not self._heap:
                        self._wakes_at = now + self._idle_wait
                        self._cond.wait(self._idle_wait)
                        continue
                    wait = self._heap[0][0] - now
                    if wait <= 0:
                        break
                    self._wakes_at = self._heap[0][0]
                    self._cond.wait(wait)
                self._wakes_at = float("inf") if self._stopped else time.monotonic()
                if self._stopped:
                    return
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    expired.append(heapq.heappop(self._heap)[2])
            for flight in expired:
                if not flight.done:
                    self._on_expired(flight)


class BridgeServer:
    """Serves a :class:`BridgeService` over TCP (:meth:`listen`) and/or one stdio connection.

    ``max_connections`` is capped below the cgroup's pids limit (``pids`` overrides the lookup, for
    tests); ``max_inflight_bytes`` bounds request bodies held at once; ``frame_timeout_s`` bounds
    how long a started frame may take to arrive; ``max_inflight_per_session`` bounds the execution
    slots one session holds at once (None: :func:`default_max_inflight_per_session`).
    """

    def __init__(
        self,
        service: BridgeService,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_inflight: int = 8,
        max_connections: int = 256,
        request_timeout_s: float = 30.0,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        frame_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S,
        pids: int | Literal["cgroup"] | None = "cgroup",
        max_inflight_per_session: int | None = None,
    ) -> None:
        self.service = service
        self.max_frame_bytes = max_frame_bytes
        self.max_inflight = max_inflight
        self.configured_max_connections = max_connections
        self.max_connections = connection_limit(
            max_connections, max_inflight, pids_limit() if pids == "cgroup" else pids
        )
        if self.max_connections < max_connections:
            log.info("max_connections %d capped to %d: the container allows %s processes/threads",
                     max_connections, self.max_connections, pids_limit() if pids == "cgroup" else pids)
        self.request_timeout_s = request_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self._input_budget = _ByteBudget(max_inflight_bytes)
        self._refuser: _Refuser | None = None
        self._pool = ThreadPoolExecutor(max_inflight, thread_name_prefix="bridge-exec")
        self.max_inflight_per_session = min(
            max_inflight, max_inflight_per_session or default_max_inflight_per_session(max_inflight)
        )
        self._scheduler = _Scheduler(max_inflight, self.max_inflight_per_session, self._start_flight)
        self._inflight = 0
        # A condition, not a bare lock: close() waits on it for executions whose peer already left.
        self._inflight_lock = threading.Condition()
        self._deadlines = _DeadlineWatch(self._expire, request_timeout_s)
        self._connections: dict[_Connection, threading.Thread] = {}
        self._connections_lock = threading.Lock()
        self._connections_total = 0
        self._refused_connections = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        # Wakes the accept loop when the server stops.
        self._wake_r, self._wake_w = os.pipe()
        # Wakes wait_for_stop(); also the signal wake-up fd (see run_worker). Non-blocking, as
        # signal.set_wakeup_fd requires.
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_r, False)
        os.set_blocking(self._stop_w, False)
        self.stop_requested = threading.Event()
        self._closed = False
        service.on_shutdown(self.request_stop)
        service.stats_hooks.append(self._live_stats)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start_threads(self) -> None:
        """Start the execution pool's first thread and the deadline watch now rather than with the
        first ``execute_program``. A fork-mode spare calls it while it waits for its connection, so
        neither thread start is on that connection's path (≈ 1.3 ms of CPU per process, median of
        80 forked children at load 28: server path 11.3 → 10.0 ms for hello + create + execute)."""
        self._pool.submit(lambda: None).result()
        self._deadlines.start()

    def listen(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind and start accepting; returns the port (the OS's choice when ``port`` is 0)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # The backlog is not the connection limit: a small one makes the kernel drop SYNs in a
        # burst, and clients then wait seconds in connect() instead of getting a clear refusal.
        listener = socket.create_server((host, port), family=family, backlog=socket.SOMAXCONN)
        self._listener = listener
        self._refuser = _Refuser()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="bridge-accept", daemon=True)
        self._accept_thread.start()
        bound_port: int = listener.getsockname()[1]
        log.info("bridge worker listening on %s:%d", host, bound_port)
        return bound_port

    def request_stop(self) -> None:
        """Ask the server to stop (from a signal handler, the shutdown command, or stdin EOF)."""
        self.service.begin_shutdown()
        self.stop_requested.set()
        self._wake_accept_loop()

    def _wake_accept_loop(self) -> None:
        # After close() the descriptor number may belong to something else: never write to it then.
        if not self._closed:
            for fd in (self._wake_w, self._stop_w):
                with contextlib.suppress(OSError):  # a full pipe is already a wake-up
                    os.write(fd, b"x")

    @property
    def signal_wakeup_fd(self) -> int:
        """Give this to ``signal.set_wakeup_fd`` so a signal wakes :meth:`wait_for_stop`."""
        return self._stop_w

    def wait_for_stop(self) -> None:
        """Block until :meth:`request_stop` (shutdown command, stdin EOF, or a signal handler).

        A signal may be delivered to any thread; Python runs its handler in the main thread only
        when that thread runs bytecode. Waiting in ``select`` on the signal wake-up fd (instead of
        on an Event) guarantees the main thread wakes up, runs the handler and sees the stop.
        """
        while not self.stop_requested.is_set():
            select.select([self._stop_r], [], [])
            with contextlib.suppress(OSError):
                os.read(self._stop_r, 4096)

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting, let every in-flight request finish and reply, close everything.

        Returns True when all work finished in time.
        """
        if self._closed:
            return True
        self.service.begin_shutdown()
        self.stop_requested.set()
        self._wake_accept_loop()
        self._closed = True
        if self._accept_thread is not None:
            self._accept_thread.join()
        if self._listener is not None:
            self._listener.close()
        if timeout is None:
            timeout = self.request_timeout_s + _SHUTDOWN_GRACE_S
        deadline = time.monotonic() + timeout
        with self._connections_lock:
            connections = dict(self._connections)
        for conn in connections:
            conn.stop_reading()
        clean = True
        for conn, thread in connections.items():
            remaining = max(0.0, deadline - time.monotonic())
            if conn.interruptible:
                thread.join(remaining)
                finished = not thread.is_alive()
            else:  # its reader stays blocked on the pipe; what matters is that its work is done
                finished = conn.wait_idle(remaining)
            if not finished:
                clean = False
                log.warning("connection %s (%s) still busy at shutdown", conn.number, conn.peer)
            conn.close()
        if clean:
            # Executions of connections that are already gone (their peer hung up after sending)
            # count too: a stuck one must not make the pool shutdown below wait for it forever.
            with self._inflight_lock:
                clean = self._inflight_lock.wait_for(
                    lambda: self._inflight == 0 and self._scheduler.waiting == 0,
                    max(0.0, deadline - time.monotonic()),
                )
            if not clean:
                log.warning("executions still running at shutdown, after their connections closed")
        self._deadlines.stop()
        if self._refuser is not None:
            self._refuser.stop()
        self._pool.shutdown(wait=clean, cancel_futures=True)
        for fd in (self._wake_r, self._wake_w, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        return clean

    # -- TCP ---------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        reserve = DescriptorReserve()
        backoff = AcceptBackoff(f"worker {self.service.worker_id}", self._wait_for_wake, log)
        try:
            while not self.stop_requested.is_set():
                for key, _ in selector.select():
                    if key.fileobj is not self._listener or self.stop_requested.is_set():
                        continue
                    try:
                        sock, address = self._listener.accept()
                    except OSError as exc:
                        if exc.errno in ACCEPT_EXHAUSTED:
                            self._refuse_out_of_descriptors(reserve, backoff, exc)
                        else:  # e.g. the peer reset before we accepted; keep serving
                            log.debug("accept failed: %s", exc)
                        continue
                    backoff.succeeded()
                    self._start_connection(sock, address)
        finally:
            reserve.close()
            selector.close()

    def _refuse_out_of_descriptors(self, reserve: DescriptorReserve, backoff: AcceptBackoff,
                                   exc: OSError) -> None:
        assert self._listener is not None
        refused = reserve.refuse_one(self._listener, out_of_descriptors_reason(exc))
        if refused:
            with self._connections_lock:
                self._refused_connections += 1
            self.service.count_error(ErrorType.TOO_MANY_CONNECTIONS)
        backoff.failed(exc, refused)

    def _wait_for_wake(self, seconds: float) -> None:
        """The accept loop's back-off: returns after ``seconds`` or at once when the server stops."""
        select.select([self._wake_r], [], [], seconds)

    def _start_connection(self, sock: socket.socket, address: Any) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        with self._connections_lock:
            full = len(self._connections) >= self.max_connections
        if full:
            self._refuse(
                sock, f"the worker serves at most {self.max_connections} connections at once; try again later"
            )
            return
        conn = self._socket_connection(sock, peer)
        reader = conn.reader
        assert isinstance(reader, _SocketReader)
        with self._connections_lock:
            self._connections[conn] = threading.current_thread()  # replaced below once started
            self._connections_total += 1
        try:
            thread = self._start_thread(self._serve_and_forget, conn, f"bridge-conn-{conn.number}")
        except RuntimeError as exc:  # "can't start new thread": the pids limit, memory
            with self._connections_lock:
                self._connections.pop(conn, None)
            reader.close()
            log.warning("cannot start a thread for connection %s (%s): %s", conn.number, peer, exc)
            self._refuse(sock, f"the worker cannot serve another connection now ({exc}); try again later")
            return
        with self._connections_lock:
            if conn in self._connections:
                self._connections[conn] = thread

    def _socket_connection(self, sock: socket.socket, peer: str) -> _Connection:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A peer that never reads its replies must not pin a thread forever: sends time out.
        seconds = max(1, int(self.request_timeout_s))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, 0))
        reader = _SocketReader(sock)

        def close() -> None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            reader.close()
            sock.close()

        access = self.service.new_access()
        return _Connection(reader, sock.sendall, close, lambda: sock.shutdown(socket.SHUT_RD), peer, access)

    def adopted(
        self, sock: socket.socket, peer: str, on_first_reply: Callable[[], None], *, own_process: bool = False
    ) -> _Adopted:
        """An already-accepted connection to serve in the calling thread (a fork-mode child's one
        connection, see :mod:`provisioner.bridge.forking`): no thread to start, none to wake at the
        end. ``.serve()`` serves it until it closes; ``.stop()`` (signal-handler safe) ends that:
        the reading stops, in-flight work still replies. ``on_first_reply`` is called once, right
        after the first frame went out. ``own_process``: this process serves no other connection and
        ends with this one, so its process-wide state is the connection's
        (:attr:`~provisioner.bridge.service.Access.own_process`)."""
        conn = self._socket_connection(sock, peer)
        conn.access.own_process = own_process
        write = conn._write

        def first_write(frame: bytes) -> None:  # under the connection's write lock
            write(frame)
            conn._write = write
            on_first_reply()

        conn._write = first_write
        with self._connections_lock:
            self._connections[conn] = threading.current_thread()
            self._connections_total += 1
        return _Adopted(self, conn)

    def _start_thread(
        self, target: Callable[[_Connection], None], conn: _Connection, name: str
    ) -> threading.Thread:
        """Start a connection's thread (a seam for tests that simulate thread exhaustion)."""
        thread = threading.Thread(target=target, args=(conn,), name=name, daemon=True)
        thread.start()
        return thread

    def _refuse(self, sock: socket.socket, why: str) -> None:
        with self._connections_lock:
            self._refused_connections += 1
        self.service.count_error(ErrorType.TOO_MANY_CONNECTIONS)
        frame = encode_frame(dumps(error_reply(None, why, ErrorType.TOO_MANY_CONNECTIONS)))
        if self._refuser is not None:
            self._refuser.refuse(sock, frame)
        else:
            sock.close()

    def _serve_and_forget(self, conn: _Connection) -> None:
        try:
            self.serve_connection(conn)
        finally:
            with self._connections_lock:
                self._connections.pop(conn, None)

    # -- one connection ----------------------------------------------------------------------------

    def serve_connection(self, conn: _Connection) -> None:
        """Read and answer requests until the peer goes away (or sends an oversized frame, or a
        frame that does not arrive in time, or waits too long for the input budget)."""
        log.debug("connection %s from %s", conn.number, conn.peer)
        try:
            while not conn.broken:
                try:
                    frame = self._read_request(conn)
                except _ConnectionLevelError as exc:
                    # The body was not (fully) read, so the stream is out of step: reply, hang up.
                    self.service.count_error(exc.error_type)
                    self._send(conn, error_reply(None, exc.message, exc.error_type))
                    break
                except (OSError, ValueError):  # reset by peer, or our own close during shutdown
                    break
                if frame is None:
                    break
                payload, held, arrived = frame
                conn.enter()
                try:
                    self._dispatch(conn, payload, held, arrived)
                finally:
                    conn.leave()
                if not conn.access.admitted:  # the first frame was no hello with the token: hang up
                    break
        except Exception:  # never let one connection's problem escape its thread silently
            log.exception("connection %s (%s) failed", conn.number, conn.peer)
        finally:
            # Replies to requests still running go out before the socket closes.
            conn.wait_idle(self.request_timeout_s + _SHUTDOWN_GRACE_S)
            conn.close()
            log.debug("connection %s closed", conn.number)

    def _read_request(self, conn: _Connection) -> tuple[bytes, int, float] | None:
        """The next frame's payload, the input-budget bytes it holds, and when it began to arrive
        (``time.monotonic()``: its deadline counts from then); None at EOF.

        Raises :class:`_ConnectionLevelError` (``FrameTooLarge``, ``FrameTimeout``, ``Overloaded``)
        when the connection must be closed.
        """
        reader = conn.reader
        try:
            if isinstance(reader, _SocketReader):
                first = reader.read(1)  # idle between requests: no deadline
                if not first:
                    return None
                arrived = time.monotonic()
                reader.deadline = arrived + self.frame_timeout_s
                header = first + reader.read(HEADER_SIZE - 1)
            else:
                header = reader.read(HEADER_SIZE)
                arrived = time.monotonic()
            if len(header) < HEADER_SIZE:
                return None
            (length,) = HEADER.unpack(header)
            if length > self.max_frame_bytes:
                raise _ConnectionLevelError(
                    ErrorType.FRAME_TOO_LARGE,
                    f"frame of {length} bytes exceeds the maximum of {self.max_frame_bytes} bytes",
                )
            if isinstance(reader, _SocketReader):
                reader.deadline = None  # waiting for the budget is the worker's doing, not the client's
            if not self._input_budget.acquire(length, self.request_timeout_s):
                raise _ConnectionLevelError(
                    ErrorType.OVERLOADED,
                    f"the worker holds {self._input_budget.used} bytes of request input in flight (limit"
                    f" {self._input_budget.limit}) and none was freed within {self.request_timeout_s:g} s;"
                    " send smaller inputs, fewer at once, or retry later",
                )
            try:
                if isinstance(reader, _SocketReader):
                    reader.deadline = time.monotonic() + self.frame_timeout_s
                payload = reader.read(length) if length else b""
            except BaseException:
                self._input_budget.release(length)
                raise
            if len(payload) < length:
                self._input_budget.release(length)
                return None
            return payload, length, arrived
        except FrameTimeout:
            raise _ConnectionLevelError(
                ErrorType.FRAME_TIMEOUT,
                f"a frame was started but did not arrive completely within {self.frame_timeout_s:g} s;"
                " send each frame whole (header and body)",
            ) from None
        finally:
            if isinstance(reader, _SocketReader):
                reader.deadline = None

    def _dispatch(self, conn: _Connection, payload: bytes, held: int, arrived: float) -> None:
        """Answer one request; ``held`` input-budget bytes are released when it is done (for an
        execution, when it finishes on the pool). An execution's deadline is ``arrived`` (when the
        request began to arrive) plus ``request_timeout_s``."""
        deferred_to_pool = False
        try:
            try:
                request = decode_request(payload)
            except BridgeError as exc:
                self.service.count_error(exc.error_type)
                self._send(conn, error_reply(cast(RequestId, exc.request_id), exc.message, exc.error_type))
                return
            del payload
            try:
                outcome = self.service.begin(request.command, request.args, conn.access)
            except BridgeError as exc:
                self._send(conn, error_reply(request.id, exc.message, exc.error_type))
                return
            if isinstance(outcome, Deferred):
                deferred_to_pool = True
                self._submit(conn, request.id, outcome, held, arrived)
            else:
                self._send(conn, ok_reply(request.id, outcome))
        finally:
            if not deferred_to_pool:
                self._input_budget.release(held)

    def _submit(self, conn: _Connection, request_id: RequestId, deferred: Deferred, held: int,
                arrived: float) -> None:
        """Queue an execution for a slot. Its deadline is watched from now on: one still waiting
        for a slot at ``arrived + request_timeout_s`` is answered ``Timeout`` and never runs."""
        conn.enter()
        conn.queue(1)
        flight = _InFlight(conn, request_id, arrived + self.request_timeout_s, held)
        flight.arrived = arrived
        flight.submitted = flight.started = time.monotonic()
        flight.session = deferred.session_id if deferred.session_id is not None else f"<conn {conn.number}>"
        flight.usage = deferred.usage
        item = _Queued(conn, request_id, deferred, held, flight)
        flight.queued = item
        self._deadlines.add(flight)
        self._scheduler.submit(item)
        # Backpressure: with this many of its executions waiting, the connection stops reading.
        conn.wait_queue_below(_MAX_QUEUED_PER_CONNECTION)

    def _start_flight(self, item: _Queued) -> None:
        """Run a queued execution on the pool (it has a slot) until its deadline (set on arrival)."""
        flight = item.flight
        assert flight is not None, "the server submits every execution with its flight"
        flight.queued = None
        with self._inflight_lock:
            self._inflight += 1
        if time.monotonic() >= flight.deadline and flight.claim():
            # Its deadline passed while the slot was being handed to it: nothing to run.
            self._send_unstarted_timeout(flight)
            self._finish(flight)
            return
        if not flight.begin():  # the deadline watch answered (it never started) during the handover
            self._finish(flight)
            return
        try:
            self._pool.submit(self._run, flight, item.deferred)
        except RuntimeError:  # the pool is already shut down
            self._finish(flight)
            if flight.claim():
                refusal = error_reply(item.request_id, "the worker is shutting down", ErrorType.SHUTTING_DOWN)
                self._send(item.conn, refusal)

    def _run(self, flight: _InFlight, deferred: Deferred) -> None:
        try:
            try:
                what = f"the request's deadline ({self.request_timeout_s:g} s, process_timeout)"
                with caller_deadline(flight.deadline, what):
                    message = ok_reply(flight.request_id, deferred.run())
            except BridgeError as exc:  # a failed execution's LM calls go back too (lm_usage)
                message = error_reply(flight.request_id, exc.message, exc.error_type, lm_usage=exc.lm_usage)
            except Exception as exc:  # BridgeService converts everything; this is a last resort
                log.exception("internal error running %s", deferred.command)
                self.service.count_error(ErrorType.INTERNAL_ERROR)
                message = error_reply(
                    flight.request_id, f"{deferred.command} failed: {exc}", ErrorType.INTERNAL_ERROR
                )
            if flight.claim():
                self._send(flight.conn, message)
        finally:
            self._finish(flight)

    def _finish(self, flight: _InFlight) -> None:
        # What the execution held goes back in this order: its budget and deadline, then it stops
        # counting as in flight, then it leaves its connection. Whoever sees ``inflight`` drop
        # (close(), get_stats) sees its budget and deadline free; whoever sees the connection go (a
        # peer that hung up is let go when its last execution leaves) sees it no longer in flight.
        self._input_budget.release(flight.held)
        self._deadlines.finished()
        with self._inflight_lock:
            self._inflight -= 1
            self._inflight_lock.notify_all()
        flight.conn.leave()
        self._scheduler.done(flight.session)

    def _expire(self, flight: _InFlight) -> None:
        item = flight.queued
        if item is not None and self._scheduler.cancel(item):
            self._expire_queued(flight, item)
            return
        began = flight.claim_reply()
        if began is False:
            # The scheduler had taken it from the queue, but its slot was not handed over yet (begin):
            # it never runs, and its reply says so.
            self._send_unstarted_timeout(flight)
        elif began:
            self.service.count_error(ErrorType.TIMEOUT)
            # The LM calls made until now go back too, as a failed execution's do: the caller books
            # them (calls the work makes after this reply are in the run ledger, not in any reply).
            usage = flight.usage() if flight.usage is not None else None
            # process_timeout counts from the request's arrival: say when part of it went to the queue.
            queued_s = max(0.0, flight.started - flight.submitted)
            queued = (f", {queued_s:.3g} s of them waiting for an execution slot (max_inflight_per_session"
                      f" {self.max_inflight_per_session})" if queued_s >= 0.001 else "")
            self._send(
                flight.conn,
                error_reply(
                    flight.request_id,
                    f"execute_program did not finish within {self.request_timeout_s:g} s (process_timeout"
                    f"{queued}); its result will be discarded",
                    ErrorType.TIMEOUT,
                    lm_usage=usage,
                ),
            )

    def _send_unstarted_timeout(self, flight: _InFlight) -> None:
        """The ``Timeout`` reply of an execution whose deadline passed before it got a slot."""
        self.service.count_error(ErrorType.TIMEOUT)
        session_running, running = self._scheduler.load(flight.session)
        usage = flight.usage() if flight.usage is not None else None
        self._send(
            flight.conn,
            error_reply(
                flight.request_id,
                f"execute_program did not start within {self.request_timeout_s:g} s (process_timeout): it"
                f" waited for an execution slot all that time and was not run (session {flight.session!r}"
                f" runs {session_running} of at most {self.max_inflight_per_session} at once,"
                f" max_inflight_per_session; the worker {running} of {self.max_inflight}, max_inflight)."
                " Send fewer executions at once, or raise process_timeout or worker.max_inflight_per_session",
                ErrorType.TIMEOUT,
                lm_usage=usage,
            ),
        )

    def _expire_queued(self, flight: _InFlight, item: _Queued) -> None:
        """``flight`` was still waiting for a slot at its deadline (now out of the queue): answer
        ``Timeout`` saying so, and free what it held. It never ran, so it made no LM calls."""
        flight.queued = None
        claimed = flight.claim()
        # What it held goes back before the reply: a client that has its Timeout sees the queue
        # place and input budget of that request free (only the connection waits for the reply).
        item.conn.queue(-1)
        self._input_budget.release(flight.held)
        self._deadlines.finished()
        with self._inflight_lock:
            self._inflight_lock.notify_all()  # close() waits for the queue to drain too
        if claimed:
            self._send_unstarted_timeout(flight)
        flight.conn.leave()

    def _send(self, conn: _Connection, message: dict[str, Any]) -> None:
        conn.send_frame(encode_frame(self._encode_fitting(message)))

    def _encode_fitting(self, message: dict[str, Any]) -> bytes:
        """``message`` as JSON no larger than ``max_frame_bytes``.

        A result over the limit becomes a ``ReplyTooLarge`` error with the same id; an error reply
        still over it (a huge request id) goes out with ``"id": null`` and its message shortened —
        the client must be able to read whatever the worker sends.
        """
        try:
            body = dumps(message)
        except (TypeError, ValueError) as exc:
            self.service.count_error(ErrorType.INTERNAL_ERROR)
            message = error_reply(message.get("id"), f"the reply could not be encoded as JSON: {exc}",
                                  ErrorType.INTERNAL_ERROR)
            body = dumps(message)
        if len(body) <= self.max_frame_bytes:
            return body
        if message.get("success"):
            self.service.count_error(ErrorType.REPLY_TOO_LARGE)
            message = error_reply(
                message.get("id"),
                f"the reply of {len(body)} bytes exceeds the maximum frame of {self.max_frame_bytes} bytes",
                ErrorType.REPLY_TOO_LARGE,
            )
            body = dumps(message)
            if len(body) <= self.max_frame_bytes:
                return body
        text = str(message.get("error", ""))
        error_type = str(message.get("error_type", ErrorType.INTERNAL_ERROR))
        note = " (the request id was too long to echo)"
        room = max(0, self.max_frame_bytes - len(dumps(error_reply(None, note, error_type))))
        return dumps(error_reply(None, text.encode()[:room].decode(errors="ignore") + note, error_type))

    def _live_stats(self) -> dict[str, Any]:
        with self._connections_lock:
            connections = len(self._connections)
            total = self._connections_total
            refused = self._refused_connections
        with self._inflight_lock:
            inflight = self._inflight
        return {
            "connections": connections,
            "connections_total": total,
            "connections_refused": refused,
            "inflight": inflight,
            "queued": self._scheduler.waiting,
            "max_inflight": self.max_inflight,
            "max_inflight_per_session": self.max_inflight_per_session,
            "max_connections": self.max_connections,
            "max_frame_bytes": self.max_frame_bytes,
            "request_timeout_s": self.request_timeout_s,
        }

    # -- stdio -------------------------------------------------------------------------------------

    def serve_stdio(self, stdin: ByteReader, stdout: BinaryIO) -> threading.Thread:
        """Serve one connection over a pair of byte streams (a host that spawned us as a port).

        Returns the reading thread; when the host closes stdin the server stops by itself.
        """

        def write(frame: bytes) -> None:
            stdout.write(frame)
            stdout.flush()

        # A pipe read cannot be interrupted from another thread: at shutdown the server waits for
        # the connection's work instead, and the reading thread ends with the process.
        # The host that spawned us owns the pipes: the one stdio connection has control.
        conn = _Connection(stdin, write, stdout.close, None, "stdio", Access(control=True))

        def serve() -> None:
            try:
                self.serve_connection(conn)
            finally:
                self.request_stop()

        thread = threading.Thread(target=serve, name="bridge-stdio", daemon=True)
        with self._connections_lock:
            self._connections[conn] = thread
            self._connections_total += 1
        thread.start()
        return thread


class _Adopted:
    """A connection served by the thread that calls :meth:`serve` (see :meth:`BridgeServer.adopted`)."""

    def __init__(self, server: BridgeServer, conn: _Connection) -> None:
        self._server = server
        self._conn = conn

    def serve(self) -> None:
        try:
            self._server.serve_connection(self._conn)
        finally:
            with self._server._connections_lock:
                self._server._connections.pop(self._conn, None)

    def stop(self) -> None:
        """Stop reading (from a signal handler too): the blocked read sees EOF, in-flight work replies."""
        self._server.service.begin_shutdown()
        self._conn.stop_reading()


class _Refuser:
    """One thread that turns connections away: it sends the refusal, then reads until the peer hangs
    up (at most ``_REFUSE_DRAIN_S``) before closing.

    Closing a socket with unread data makes the kernel send a reset, which can destroy the refusal
    before the client reads it; draining first lets the client see why it was turned away. One
    thread for all refusals: a flood of connections must not cost a thread each (threads are what
    the worker ran out of in the first place).
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._incoming: collections.deque[socket.socket] = collections.deque()
        self._deadlines: dict[socket.socket, float] = {}
        # Guards the count of refusals (incoming + draining) against the hand-over between the two:
        # unlocked, a socket between popleft() and its deadline was in neither, and the cap let one more in.
        self._count_lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="bridge-refuser", daemon=True)
        self._thread.start()

    def refuse(self, sock: socket.socket, frame: bytes) -> None:
        try:
            sock.setblocking(False)
            sock.send(frame)  # a small frame on a fresh socket: fits in the send buffer
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        with self._count_lock:
            admitted = not self._stopped and len(self._incoming) + len(self._deadlines) < _MAX_REFUSING
            if admitted:
                self._incoming.append(sock)
        if not admitted:
            sock.close()
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(_REFUSE_DRAIN_S + 1)

    def _loop(self) -> None:
        try:
            while not self._stopped:
                with self._count_lock:
                    while self._incoming:
                        sock = self._incoming.popleft()
                        self._deadlines[sock] = time.monotonic() + _REFUSE_DRAIN_S
                        self._selector.register(sock, selectors.EVENT_READ)
                timeout = None
                if self._deadlines:
                    timeout = max(0.0, min(self._deadlines.values()) - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.fileobj == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                        continue
                    sock = cast(socket.socket, key.fileobj)
                    try:
                        more = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        more = b""
                    if not more:
                        self._drop(sock)
                now = time.monotonic()
                for sock in [s for s, d in self._deadlines.items() if d <= now]:
                    self._drop(sock)
        finally:
            for sock in list(self._deadlines):
                self._drop(sock)
            with self._count_lock:
                left = list(self._incoming)
                self._incoming.clear()
            for sock in left:
                sock.close()
            self._selector.close()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _drop(self, sock: socket.socket) -> None:
        with self._count_lock:
            self._deadlines.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        sock.close()


class PipeReader:
    """Exact-size reads straight from a file descriptor.

    The stdio reading thread is still blocked in a read when the worker exits. A buffered reader
    (``sys.stdin.buffer``) would then hold its lock during interpreter shutdown, which CPython
    treats as a fatal error; plain ``os.read`` holds no lock.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, size: int = -1, /) -> bytes:
        chunks: list[bytes] = []
        remaining = size
        while remaining > 0:
            chunk = os.read(self.fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


# --- the `provision worker` entry point -------------------------------------------------------------


def startup_lm_config(
    environ: Mapping[str, str] | None = None, lm_config_file: Path | None = None
) -> LMConfig:
    """The worker's start-up LM: the controller's env hand-over (``PROVISION_LM_CONFIG`` and
    ``GEMINI_TEST_API_KEY``), else the ``--lm-config`` JSON file, else the mock.

    Raises :class:`ConfigError` naming the source and the bad fields (never their values: the
    configuration may carry the API key).
    """
    env = os.environ if environ is None else environ
    source = f"env {LM_CONFIG_ENV}"
    try:
        from_env = LMConfig.from_worker_env(env)
        if from_env is not None:
            return from_env
        if lm_config_file is not None:
            source = f"--lm-config {lm_config_file}"
            return LMConfig.model_validate_json(lm_config_file.read_text(encoding="utf-8"))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid start-up LM configuration from {source}: {problems}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"invalid start-up LM configuration from {source}: {exc}") from None
    return LMConfig(mode="mock")


def install_process_lm(service: BridgeService) -> None:
    """Make the worker's start-up LM DSPy's process-wide LM (``dspy.configure``).

    Executions run under ``dspy.context(lm=<session or default LM>)``, which a thread started
    inside a program does not inherit; with the start-up LM configured process-wide such a thread
    still sees the layer's LM instead of failing with "No LM is loaded". Call it once, from the main
    thread (DSPy lets only the thread that configured it first change the global settings).
    """
    if service.default_lm is None:
        return
    import dspy

    dspy.configure(lm=service.default_lm, disable_history=not service.record_history)


def write_ready_file(path: Path, port: int) -> None:
    """Write the port atomically: readers see either nothing or the whole number."""
    atomic_write(path, f"{port}\n")
