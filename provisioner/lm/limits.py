"""Run-wide limits of real LM calls: requests per minute and dollars per run.

Every process of a run — pytest-xdist workers, the controller, worker containers — points its
``LMConfig.run_dir`` at the same directory (containers get it bind-mounted at the same path). The
shared state lives there in ``lm-limits.json``, read and rewritten only while holding an exclusive
``fcntl.flock`` on ``lm-limits.lock``. ``flock`` locks belong to the kernel's open file
description of one inode, so they hold across processes *and* across containers sharing a bind
mount on one host. (They do not hold across hosts on NFS; one run lives on one host.) The state
file is replaced atomically (temp file + rename) so a process killed mid-write cannot corrupt it.

Rate limit: a sliding window of request start times (wall clock, shared by every process on the
host); a request may start when fewer than ``rate_limit_rpm`` started in the last 60 s, otherwise
it waits (up to ``rate_limit_wait_s``) for the oldest to age out.

Cost limit: before a call, reserve its worst case; refuse with :class:`CostLimitExceeded` when
``spent + open reservations + this reservation`` would pass ``cost_limit_usd``; after the call,
replace the reservation by the real cost. As reservations are taken under the lock, concurrent
callers can never jointly pass the limit. A reservation of a process that died is dropped once it
is older than its ``expires_at`` (the call's own timeout budget plus a margin).

The limits themselves belong to the run, not to whoever builds an LM: the controller writes them to
``lm-run-limits.json`` in the run directory (:func:`write_run_limits`) before any worker starts, and
every :class:`RunLimits` on that directory enforces the file's values, whatever its own
configuration says — a client of a worker cannot lift the budget by configuring a new LM. Without
the file (a run directory nobody wrote limits to, or ``run_dir=None``) the configured values hold.

With ``run_dir=None`` each process uses a private temporary directory: limits then hold per
process only (fine for a single in-process run, documented in docs/lm.md).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner import _files
from provisioner.errors import ConfigError, CostLimitExceeded, RateLimitExceeded
from provisioner.lm.pricing import format_usd

# When the caller of the work that makes LM calls stops waiting for it (time.monotonic()): a bridge
# worker's request deadline (request_timeout_s). No call waits past it for a rate-limit slot, and none
# starts after it: its caller already has a Timeout reply, so a call then would be sent, and billed,
# for nobody.
_CALLER_DEADLINE: ContextVar[tuple[float, str] | None] = ContextVar("provisioner_caller_deadline",
                                                                    default=None)


@contextlib.contextmanager
def caller_deadline(deadline_monotonic: float, what: str) -> Iterator[None]:
    """LM calls made in this context (this thread) end their rate-limit wait at ``deadline_monotonic``
    (``time.monotonic()`` seconds) and are refused after it; ``what`` names that deadline in the
    error (e.g. "the request's deadline (30 s, process_timeout)")."""
    token = _CALLER_DEADLINE.set((deadline_monotonic, what))
    try:
        yield
    finally:
        _CALLER_DEADLINE.reset(token)

WINDOW_S = 60.0
STATE_FILE = "lm-limits.json"
LOCK_FILE = "lm-limits.lock"
# The run's own limits, written by the controller; LMConfig field names, so errors name the setting.
RUN_LIMITS_FILE = "lm-run-limits.json"
RUN_LIMIT_FIELDS: tuple[str, ...] = ("rate_limit_rpm", "cost_limit_usd", "rate_limit_wait_s")

_private_dir: Path | None = None
_private_lock = threading.Lock()


def private_run_dir() -> Path:
    """This process's own run directory, for configurations without ``run_dir``."""
    global _private_dir
    with _private_lock:
        if _private_dir is None:
            _private_dir = Path(tempfile.mkdtemp(prefix=f"provision-run-{os.getpid()}-"))
            atexit.register(shutil.rmtree, _private_dir, True)
        return _private_dir


def resolve_run_dir(run_dir: Path | None) -> Path:
    if run_dir is None:
        return private_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def share_fd(fd: int) -> int:
    """Make a file of the run directory readable and writable by its group, whatever the umask.

    The run directory is shared by the host (often root) and the worker containers (a non-root user
    in the directory's group, see runtime.recipes.prepare_shared_dir): a lock, ledger or state file
    the host creates first with mode 0644 (or mkstemp's 0600) would lock the workers out. Files of
    other owners are left alone (their owner made them shared). Returns ``fd``.
    """
    st = os.fstat(fd)
    wanted = st.st_mode | stat.S_IRGRP | stat.S_IWGRP
    if st.st_uid == os.geteuid() and wanted != st.st_mode:
        os.fchmod(fd, stat.S_IMODE(wanted))
    return fd


@contextlib.contextmanager
def locked(run_dir: Path, name: str = LOCK_FILE) -> Iterator[None]:
    """Hold the run's exclusive lock (across threads, processes and containers of one host)."""
    with _files.locked(run_dir / name, on_open=share_fd):
        yield


def after_torn_line(fd: int, data: bytes) -> bytes:
    """``data`` to append to the line file open (readable) at ``fd``, starting with a newline when
    the file's last line is torn (its writer was killed mid-write): the torn line stays one bad
    line, which readers skip, instead of swallowing the new one."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        return b"\n" + data
    return data


def append_line(path: Path, data: bytes) -> None:
    """Append ``data`` (whole lines) to ``path`` in one ``write`` (see :func:`after_torn_line`)."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, after_torn_line(fd, data))
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` so readers see the old or the new content, never a mix (group
    read-write: shared by the host and the run's worker containers, see :func:`share_fd`)."""
    _files.atomic_write(path, json.dumps(data, indent=1, sort_keys=True) + "\n", mode=0o660)


def write_run_limits(run_dir: Path, *, rate_limit_rpm: int, cost_limit_usd: float,
                     rate_limit_wait_s: float) -> Path:
    """Write the run's limits to ``run_dir/lm-run-limits.json`` (atomically); returns the path.

    The file holds ``{"rate_limit_rpm": int, "cost_limit_usd": float (USD per run),
    "rate_limit_wait_s": float (seconds)}``. Every :class:`RunLimits` on ``run_dir`` enforces
    these values from then on.

    Raises:
        ConfigError: a value is out of range (rpm < 1, negative dollars or seconds).
    """
    limits = {"rate_limit_rpm": rate_limit_rpm, "cost_limit_usd": cost_limit_usd,
              "rate_limit_wait_s": rate_limit_wait_s}
    _check_run_limits(limits, "write_run_limits")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_LIMITS_FILE
    write_json_atomic(path, limits)
    # Workers may run under another uid (group 0 when the controller is root): they read it only.
    path.chmod(0o644)
    return path


def read_run_limits(run_dir: Path) -> dict[str, Any] | None:
    """The limits the controller wrote to ``run_dir`` (keys as in :func:`write_run_limits`), or None.

    Raises:
        ConfigError: the file exists but is not a valid limits file — refusing calls is safer than
            guessing a budget.
    """
    path = run_dir / RUN_LIMITS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the run's limits file {path} cannot be read: {exc}") from None
    _check_run_limits(data, str(path))
    return {name: data[name] for name in RUN_LIMIT_FIELDS}


def _check_run_limits(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the run's limits must be a JSON object")
    for name in RUN_LIMIT_FIELDS:
        value: Any = data.get(name)
        integral = name == "rate_limit_rpm"
        valid = isinstance(value, int) if integral else isinstance(value, int | float)
        # NaN compares false with everything: it would disable the limit, so only finite numbers.
        if not valid or isinstance(value, bool) or not math.isfinite(value) or value < (1 if integral else 0):
            wanted = "an integer >= 1" if integral else "a finite number >= 0"
            raise ConfigError(f"{source}: lm.{name} must be {wanted}, got {value!r}")


@dataclass(frozen=True)
class Reservation:
    """A cost reservation held for one call attempt."""

    id: str
    amount_usd: float


@dataclass(frozen=True)
class CostSnapshot:
    spent_usd: float
    reserved_usd: float
    limit_usd: float
    calls: int


class RunLimits:
    """The rate limit and cost budget of one run, shared through ``run_dir``.

    ``rpm``, ``cost_limit_usd`` and ``wait_s`` are the configured values; when the run directory
    holds the run's limits file (:func:`write_run_limits`), its values win (:meth:`effective`).
    """

    def __init__(self, run_dir: Path | None, *, rpm: int, cost_limit_usd: float,
                 wait_s: float = 120.0, reservation_ttl_s: float = 600.0, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, note: str = "") -> None:
        self.run_dir = resolve_run_dir(run_dir)
        # Appended to the limits' errors (LMConfig.limits_note: a shard's share of the run's limits).
        self.note = note
        self.rpm = rpm
        self.cost_limit_usd = cost_limit_usd
        self.wait_s = wait_s
        self.reservation_ttl_s = reservation_ttl_s
        # The window is a minute in production; tests shrink it to observe a full window quickly.
        self.window_s = window_s
        self._clock = clock
        self._sleep = sleep

    # -- state ------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def effective(self) -> tuple[int, float, float]:
        """``(rpm, cost_limit_usd, wait_s)`` in force: the run's limits file, else the configuration.

        Read on every call, so limits written after this object was made still apply.

        Raises:
            ConfigError: the limits file is corrupt.
        """
        run = read_run_limits(self.run_dir)
        if run is None:
            return self.rpm, self.cost_limit_usd, self.wait_s
        return int(run["rate_limit_rpm"]), float(run["cost_limit_usd"]), float(run["rate_limit_wait_s"])

    def _load(self) -> dict[str, Any]:
        """The run's counters. Raises ConfigError when the file is unreadable: the spend so far is
        then unknown, and refusing calls is safer than starting the budget from zero."""
        try:
            data = json.loads(self.state_path.read_bytes())
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            raise self._unreadable(exc) from None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k, d), t) for k, d, t in
            (("requests", [], list), ("spent_usd", 0.0, int | float), ("calls", 0, int),
             ("reservations", {}, dict))
        ):
            raise self._unreadable("not the counters this version writes")
        data.setdefault("requests", [])
        data.setdefault("spent_usd", 0.0)
        data.setdefault("calls", 0)
        data.setdefault("reservations", {})
        return data

    def _unreadable(self, why: object) -> ConfigError:
        return ConfigError(
            f"the run's LM budget file {self.state_path} is unreadable ({why}): its spend so far is unknown, "
            "so LM calls are refused; remove the file to count the run's budget from zero"
        )

    def _save(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.state_path, data)

    def _drop_expired(self, data: dict[str, Any], now: float) -> None:
        reservations = data["reservations"]
        for key in [k for k, v in reservations.items() if v.get("expires_at", 0) < now]:
            del reservations[key]

    # -- rate -------------------------------------------------------------------------------

    def acquire_request(self) -> float:
        """Take one request slot of the run's per-minute budget; returns the slot's start time
        (see :meth:`acquire_request_timed`, which also says how long it waited).

        Raises:
            RateLimitExceeded: as :meth:`acquire_request_timed`.
        """
        return self.acquire_request_timed()[0]

    def acquire_request_timed(self) -> tuple[float, float]:
        """Take one request slot of the run's per-minute budget; returns ``(the slot's start time,
        seconds waited for it)`` — 0.0 when a slot was free at once (the time taken by the lock is
        not waiting for the limit). A refusal after waiting carries the wait in the exception's
        ``waited_s``.

        Waits up to ``lm.rate_limit_wait_s`` for a slot, and no longer than the caller's deadline
        (:func:`caller_deadline`), so a call is never sent for a caller that has stopped waiting.

        Raises:
            RateLimitExceeded: no slot frees before the wait (or the caller's deadline) ends; refused at
                once when the next free slot is already known to be later.
        """
        wait_s = self.effective()[2]
        started = self._clock()
        deadline = started + wait_s
        caller = _CALLER_DEADLINE.get()
        if caller is not None:
            left = caller[0] - time.monotonic()
            if left <= 0:
                raise RateLimitExceeded(f"not sent: {caller[1]} has passed, so its caller no longer waits "
                                        "for this call")
            deadline = min(deadline, started + left)
        slept = False
        while True:
            with locked(self.run_dir):
                rpm = self.effective()[0]
                data = self._load()
                now = self._clock()
                window = [t for t in data["requests"] if t > now - self.window_s]
                if len(window) < rpm:
                    window.append(now)
                    data["requests"] = window
                    self._save(data)
                    return now, (max(now - started, 0.0) if slept else 0.0)
                wait = min(window) + self.window_s - now
            remaining = deadline - self._clock()
            if remaining <= 0 or wait > remaining:
                within = (f"before {caller[1]}" if caller is not None and deadline < started + wait_s
                          else f"within lm.rate_limit_wait_s={wait_s:g}s")
                refused = RateLimitExceeded(
                    f"the run's rate limit of {rpm} requests/minute (lm.rate_limit_rpm{self.note}) had no "
                    f"free slot {within} (the next in {max(wait, 0):.0f}s); the call was not sent. Raise "
                    "the limit, make fewer real calls, or wait for the window to move"
                )
                refused.waited_s = max(self._clock() - started, 0.0) if slept else 0.0
                raise refused
            # Waiting for the window to move is the point of a rate limiter, not synchronisation.
            self._sleep(max(wait, 0.001))
            slept = True

    def requests_in_window(self) -> int:
        with locked(self.run_dir):
            data = self._load()
        now = self._clock()
        return sum(1 for t in data["requests"] if t > now - self.window_s)

    # -- cost -------------------------------------------------------------------------------

    def reserve(self, amount_usd: float, *, what: str = "call") -> Reservation:
        """Reserve ``amount_usd`` of the run's budget or raise :class:`CostLimitExceeded`."""
        with locked(self.run_dir):
            limit = self.effective()[1]
            data = self._load()
            now = self._clock()
            self._drop_expired(data, now)
            reserved = sum(float(v["amount"]) for v in data["reservations"].values())
            spent = float(data["spent_usd"])
            if spent + reserved + amount_usd > limit + 1e-12:
                raise CostLimitExceeded(
                    f"refusing {what}: its worst case ${amount_usd:.6f} would pass the run's cost limit "
                    f"lm.cost_limit_usd={format_usd(limit)} (spent ${spent:.6f}, "
                    f"reserved by calls in flight ${reserved:.6f}){self.note}"
                )
            reservation = Reservation(uuid.uuid4().hex, amount_usd)
            data["reservations"][reservation.id] = {
                "amount": amount_usd,
                "pid": os.getpid(),
                "expires_at": now + self.reservation_ttl_s,
            }
            self._save(data)
            return reservation

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Replace a reservation by what the call really cost (0 for a call that was not billed)."""
        with locked(self.run_dir):
            data = self._load()
            data["reservations"].pop(reservation.id, None)
            data["spent_usd"] = float(data["spent_usd"]) + actual_usd
            if actual_usd > 0:
                data["calls"] = int(data["calls"]) + 1
            self._drop_expired(data, self._clock())
            self._save(data)

    def snapshot(self) -> CostSnapshot:
        with locked(self.run_dir):
            data = self._load()
        reserved = sum(float(v["amount"]) for v in data["reservations"].values())
        return CostSnapshot(float(data["spent_usd"]), reserved, self.effective()[1], int(data["calls"]))
