"""The cost ledger: one JSON line per real, recorded or replayed LM call.

Per run: ``<run_dir>/ledger.jsonl``, appended under an ``fcntl.flock`` (``ledger.lock``) so lines
from many processes and containers never interleave. Fields of a call line::

    {"ts": "2026-11-25T10:00:00.123+00:00", "event": "call", "run_id": "...", "layer": "integration",
     "test_id": "tests/test_x.py::test_y", "model": "gemini-2.5-flash-lite", "kind": "real",
     "cache": null | "hit" | "miss", "cassette": "<sha256>" | null, "input_tokens": 120,
     "output_tokens": 14, "thoughts_tokens": 0, "cached_tokens": 0, "cost_usd": 0.0000176,
     "list_cost_usd": 0.0000176, "endpoint": "gemini" | "standin" | null,
     "usage": "reported" | "estimated", "estimated": ["candidatesTokenCount", ...],
     "test_run": "<the test run's id>",   # lines of a test run's own processes (set_test_run)
     "rate_limit_wait_s": 0.0}            # seconds the call waited for a slot of lm.rate_limit_rpm

``kind`` is ``real`` (a direct call), ``recorded`` (a cassette miss answered by the inner LM and
written) or ``replayed`` (a cassette hit, $0). Mock calls are free and not written.
``endpoint`` says who answered a real or recorded call: Gemini, or the Gemini stand-in the
controller wired in (``LMConfig.endpoint_kind``). ``cost_usd`` is billed dollars — 0 for the
stand-in — and is what reports and the monthly budget sum; ``list_cost_usd`` is the call at list
prices, what the run's cost limit counted. Summaries count a real call the stand-in answered as
kind ``standin`` (:func:`usage_kind`), never ``real``. ``usage: "estimated"`` marks a call whose
answer lacked a token count: it was booked at that count's worst case (``estimated`` names the counts).
The end of a run is a line ``{"event": "run_complete", "complete": true|false, "partial": [why...],
"cache_dir": "...", "started_at": "..."}``: pruning cassettes needs a *complete* run of every layer
using the directory. A cached LM's failed miss is a line ``{"event": "cassette_miss", "cassette":
"<sha256>", "reason": "replay_only" | "corrupt" | "not_writable", "test_id": ...}``. A call the run's
limits refused before sending it is a line ``{"event": "refused", "reason": "cost_limit" |
"rate_limit", "model": ..., "test_id": ..., "limit": <lm.cost_limit_usd $ | lm.rate_limit_rpm>,
"rate_limit_wait_s": <seconds it waited first>}``:
summaries say "N calls refused (cost limit $X)" where they count calls. A call that was sent and
failed (the API answered an error after every retry, or did not answer) is a line ``{"event":
"error", "kind": "real" | "recorded", "model": ..., "test_id": ..., "error_type": "RateLimitError" |
"ServerError" | "TimeoutError" | ... (DSPy's lm15 error class), "status": <HTTP status> | null,
"attempts": <sent this many times>, "endpoint": ..., "cost_usd": ..., "list_cost_usd": <what the
run's cost limit counted: the worst case of attempts that may have been billed (timeouts), else 0>,
"rate_limit_wait_s": ...}``: not among the calls; summaries say "N calls failed (RateLimitError 2)",
and a usage counts it, like a refused call, among its ``errors`` (calls that raised). So every call
that reached the run's limits has exactly one line: ``call``, ``refused`` or ``error``.
Summaries say how long calls
waited for the rate limit ("N calls waited X s for the rate limit") from ``rate_limit_wait_s``.

Across runs: the ledgers of finished runs are archived under the state directory
(``<state_dir>/ledger/<YYYY-MM>.jsonl``, see :func:`archive_run_ledger`) — run directories are
temporary, the archive is what ``provision cost report --month`` sums. The report also reads the
ledgers of runs still under ``<state_dir>/runs/*/ledger.jsonl`` that were not archived yet.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from provisioner._files import flocked
from provisioner.lm.callstats import LMUsage
from provisioner.lm.limits import after_torn_line, append_line, locked, resolve_run_dir, share_fd
from provisioner.lm.pricing import format_usd

LEDGER_FILE = "ledger.jsonl"
RUN_LM_SUBDIR = "lm"
LEDGER_LOCK = "ledger.lock"
ARCHIVE_DIR = "ledger"
ARCHIVED_RUNS = "archived-runs.txt"

_test_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("provision_test_id", default=None)
# The test run (a pytest session, shared by its xdist processes, or an ``environment()`` block) of
# this process: written into its lines, so sessions attached to one ``provision up`` run each
# count their own calls (set_test_run).
_test_run: str | None = None


_PROCESS_RUN = object()  # the process's test run (set_test_run), unless a block says otherwise
_block_run: contextvars.ContextVar[object] = contextvars.ContextVar("provision_test_run",
                                                                  default=_PROCESS_RUN)


def current_test_run() -> str | None:
    """The test run a call made now belongs to: the process's (:func:`set_test_run`), or none inside
    :func:`for_session` (the session's test run is in ``sessions.jsonl``)."""
    value = _block_run.get()
    return _test_run if value is _PROCESS_RUN else value  # type: ignore[return-value]


@contextlib.contextmanager
def for_session(session_id: str) -> Iterator[None]:
    """Calls a bridge worker makes for bridge session ``session_id`` (this thread/task): attributed
    to the session — whose test and test run ``sessions.jsonl`` names — never to the test run of
    the process serving it (a worker served in a test's own process, e.g. the fake runtime's)."""
    token = _block_run.set(None)
    try:
        with current_test(session_id):
            yield
    finally:
        _block_run.reset(token)


def set_test_run(run_id: str | None) -> None:
    """Mark this process's ledger lines (and the sessions it notes) as test run ``run_id``'s: two
    test runs attached to one ``provision up`` run share its ledger, and each counts only the lines
    of its own test run (``test_run`` of :func:`ledger_usage` and :func:`usage_by_test`)."""
    global _test_run
    _test_run = run_id


@contextlib.contextmanager
def current_test(test_id: str | None) -> Iterator[None]:
    """Attribute LM calls made inside this block (this thread/task) to ``test_id``."""
    token = _test_id.set(test_id)
    try:
        yield
    finally:
        _test_id.reset(token)


def current_test_id() -> str | None:
    """The test the current call belongs to: set by :func:`current_test`, else pytest's own variable."""
    explicit = _test_id.get()
    if explicit:
        return explicit
    env = os.environ.get("PYTEST_CURRENT_TEST")
    if env:
        return env.rsplit(" (", 1)[0]
    return None


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


class Ledger:
    """Appends call lines to one run's ``ledger.jsonl``."""

    def __init__(self, run_dir: Path | None, *, run_id: str | None = None, layer: str | None = None) -> None:
        self.run_dir = resolve_run_dir(run_dir)
        self.run_id = run_id
        self.layer = layer
        # The lock and ledger files stay open (a replay appends a line per call, so opening them
        # each time would dominate its cost). flock excludes other processes and containers; the
        # thread lock excludes this process's threads, which share one open file description.
        self._thread_lock = threading.Lock()
        self._fds: tuple[int, int, int] | None = None  # (pid, lock fd, ledger fd)

    def _open(self) -> tuple[int, int]:
        pid = os.getpid()
        if self._fds is None or self._fds[0] != pid:  # reopen in a forked child
            create = os.O_CREAT | os.O_CLOEXEC
            lock_fd = share_fd(os.open(self.run_dir / LEDGER_LOCK, os.O_RDWR | create, 0o666))
            ledger_fd = share_fd(os.open(self.path, os.O_RDWR | os.O_APPEND | create, 0o666))
            self._fds = (pid, lock_fd, ledger_fd)
        return self._fds[1], self._fds[2]

    def close(self) -> None:
        with self._thread_lock:
            if self._fds is not None and self._fds[0] == os.getpid():
                os.close(self._fds[1])
                os.close(self._fds[2])
            self._fds = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @property
    def path(self) -> Path:
        return self.run_dir / LEDGER_FILE

    def append(self, entry: dict[str, Any]) -> None:
        test_run = current_test_run()
        mark = {"test_run": test_run} if test_run else {}
        line = json.dumps({"id": uuid.uuid4().hex, "ts": _now_iso(), "run_id": self.run_id,
                           "layer": self.layer, **mark, **entry},
                          sort_keys=True, separators=(",", ":"))
        data = (line + "\n").encode("utf-8")
        with self._thread_lock:
            lock_fd, ledger_fd = self._open()
            with flocked(lock_fd):
                # O_APPEND plus one write() per line: even a reader without the lock sees whole lines.
                os.write(ledger_fd, after_torn_line(ledger_fd, data))

    def call(self, *, model: str, kind: str, input_tokens: int = 0, output_tokens: int = 0,
             thoughts_tokens: int = 0, cached_tokens: int = 0, cost_usd: float = 0.0,
             cache: str | None = None, cassette: str | None = None, status: str = "ok",
             list_cost_usd: float | None = None, endpoint: str | None = None,
             usage: str = "reported", estimated: Iterable[str] = (), rate_limit_wait_s: float = 0.0) -> None:
        """Append a call line (fields: see the module docstring). ``list_cost_usd`` defaults to
        ``cost_usd``; ``endpoint`` is ``"gemini"``/``"standin"`` for calls an endpoint answered;
        ``rate_limit_wait_s``: seconds the call waited for a slot of the run's rate limit."""
        self.append({
            "event": "call", "test_id": current_test_id(), "model": model, "kind": kind, "cache": cache,
            "cassette": cassette, "input_tokens": input_tokens, "output_tokens": output_tokens,
            "thoughts_tokens": thoughts_tokens, "cached_tokens": cached_tokens,
            "cost_usd": round(cost_usd, 10),
            "list_cost_usd": round(cost_usd if list_cost_usd is None else list_cost_usd, 10),
            "endpoint": endpoint, "usage": usage, "estimated": list(estimated), "status": status,
            "rate_limit_wait_s": round(rate_limit_wait_s, 3),
        })

    def refused(self, *, model: str, reason: str, limit: float, rate_limit_wait_s: float = 0.0) -> None:
        """Append a refusal line: ``reason`` ``"cost_limit"`` (``limit`` in dollars) or
        ``"rate_limit"`` (``limit`` in requests per minute); ``rate_limit_wait_s``: seconds it
        waited for a rate-limit slot before it was refused."""
        self.append({"event": "refused", "test_id": current_test_id(), "model": model, "reason": reason,
                     "limit": limit, "rate_limit_wait_s": round(rate_limit_wait_s, 3)})

    def error(self, *, model: str, kind: str, error_type: str, status: int | None, attempts: int,
              endpoint: str | None, cost_usd: float = 0.0, list_cost_usd: float = 0.0,
              rate_limit_wait_s: float = 0.0) -> None:
        """Append the line of a call that was sent and failed (fields: see the module docstring):
        ``error_type`` the error raised (DSPy's lm15 class name), ``status`` the HTTP status when the
        API answered, ``attempts`` how often it was sent, ``rate_limit_wait_s`` the seconds its
        attempts waited for a slot of the run's rate limit."""
        self.append({"event": "error", "test_id": current_test_id(), "model": model, "kind": kind,
                     "error_type": error_type, "status": status, "attempts": attempts, "endpoint": endpoint,
                     "cost_usd": round(cost_usd, 10), "list_cost_usd": round(list_cost_usd, 10),
                     "rate_limit_wait_s": round(rate_limit_wait_s, 3)})

    def mark_run_complete(self, *, complete: bool, partial: Iterable[str] = (), cache_dir: Path | None = None,
                          started_at: str | None = None) -> None:
        """Say the run ended. ``complete``: the layer's whole suite ran to the end, so the run may
        vouch for which cassettes under ``cache_dir`` are unused (``provision cassettes prune``);
        ``partial``: why it is not (a node id given, ``-k``, stopped by ``-x``, a timeout, ...)."""
        self.append({"event": "run_complete", "complete": complete, "partial": list(partial),
                     "cache_dir": None if cache_dir is None else str(cache_dir), "started_at": started_at})


def ledger_position(run_dir: Path | None) -> int:
    """Where the run's ledger ends now (its size in bytes; 0 without one). A session that joins a
    run already under way (attaching to ``provision up``) reads only the lines after it: see the
    ``since`` of :func:`read_ledger`. Lines are appended with one ``write`` each, so the size is
    always at a line boundary."""
    if run_dir is None:
        return 0
    try:
        return (run_dir / LEDGER_FILE).stat().st_size
    except OSError:
        return 0


def read_ledger(path: Path, since: int = 0) -> list[dict[str, Any]]:
    """The lines of a ledger file (a torn last line of a crashed writer is skipped); ``since``: only
    the lines from that byte offset on (:func:`ledger_position`)."""
    entries: list[dict[str, Any]] = []
    try:
        with path.open("rb") as handle:
            if since:
                handle.seek(since)
            text = handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return entries
    for raw in text.splitlines():
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if isinstance(value, dict):
            entries.append(value)
    return entries


def _month_of(entry: dict[str, Any]) -> str:
    return str(entry.get("ts", ""))[:7]


def archive_run_ledger(run_dir: Path, state_dir: Path) -> int:
    """Copy a finished run's ledger into the monthly archive (idempotent). Returns lines archived."""
    entries = read_ledger(run_dir / LEDGER_FILE)
    if not entries:
        return 0
    archive = state_dir / ARCHIVE_DIR
    archive.mkdir(parents=True, exist_ok=True)
    run_ids = sorted({str(e.get("run_id")) for e in entries})
    marker = "|".join(run_ids) + f"@{run_dir.resolve()}"
    with locked(archive, "archive.lock"):
        done_path = archive / ARCHIVED_RUNS
        done = set(done_path.read_text(encoding="utf-8").splitlines()) if done_path.exists() else set()
        if marker in done:
            return 0
        by_month: dict[str, list[str]] = {}
        for entry in entries:
            by_month.setdefault(_month_of(entry) or "unknown", []).append(json.dumps(entry, sort_keys=True))
        for month, lines in by_month.items():
            append_line(archive / f"{month}.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
        with done_path.open("a", encoding="utf-8") as handle:
            handle.write(marker + "\n")
    return len(entries)


def ledger_sources(state_dir: Path, extra: Iterable[Path] = ()) -> list[Path]:
    """Archived monthly ledgers plus the ledgers of runs not archived yet."""
    sources = sorted((state_dir / ARCHIVE_DIR).glob("*.jsonl"))
    archived_markers: set[str] = set()
    done_path = state_dir / ARCHIVE_DIR / ARCHIVED_RUNS
    if done_path.exists():
        archived_markers = set(done_path.read_text(encoding="utf-8").splitlines())
    archived_dirs = {m.rsplit("@", 1)[-1] for m in archived_markers}
    # A run's LM directory is the run directory itself or its ``lm/`` subdirectory (how `provision
    # up` and the pytest plugin lay runs out: .provision/runs/<id>/lm/).
    runs = state_dir / "runs"
    run_ledgers = [*runs.glob(f"*/{LEDGER_FILE}"), *runs.glob(f"*/{RUN_LM_SUBDIR}/{LEDGER_FILE}")]
    for run_ledger in sorted(run_ledgers):
        if str(run_ledger.parent.resolve()) not in archived_dirs:
            sources.append(run_ledger)
    sources.extend(extra)
    return sources


SESSIONS_FILE = "sessions.jsonl"


def note_session_test(run_dir: Path, session_id: str, test_id: str, test_run: str | None = None) -> None:
    """Say that bridge session ``session_id`` belongs to test ``test_id`` (the controller does, when it
    opens an isolated session), so what a worker container does for the session (ledger lines,
    cassettes) is the test's. One JSON line ``{"session_id", "test_id", "test_run"}`` appended to
    ``<run_dir>/sessions.jsonl`` (one ``write``: lines never interleave); ``test_run``: the test
    run the session belongs to (default: :func:`current_test_run`), when there is one.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    test_run = test_run or current_test_run()
    entry = {"session_id": session_id, "test_id": test_id, **({"test_run": test_run} if test_run else {})}
    line = json.dumps(entry, separators=(",", ":")) + "\n"
    append_line(run_dir / SESSIONS_FILE, line.encode("utf-8"))


def session_tests(run_dir: Path | None) -> dict[str, str]:
    """Every isolated session of a run's LM directory mapped to its test (``{session_id: test_id}``,
    from ``<run_dir>/sessions.jsonl``; the last line for a session wins). The one reader of that file:
    cassettes, ``cost report`` and run history use it. Empty when the run has none."""
    if run_dir is None:
        return {}
    try:
        text = (run_dir / SESSIONS_FILE).read_bytes().decode("utf-8", "replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for raw in text.splitlines():  # a torn line (a writer killed mid-write) is skipped
        with contextlib.suppress(ValueError):
            line = json.loads(raw)
            if isinstance(line, dict) and line.get("session_id") and line.get("test_id"):
                out[str(line["session_id"])] = str(line["test_id"])
    return out


def test_run_sessions(run_dir: Path | None, test_run: str) -> set[str]:
    """The isolated sessions test run ``test_run`` noted in ``<run_dir>/sessions.jsonl``."""
    if run_dir is None:
        return set()
    try:
        text = (run_dir / SESSIONS_FILE).read_bytes().decode("utf-8", "replace")
    except OSError:
        return set()
    out: set[str] = set()
    for raw in text.splitlines():
        with contextlib.suppress(ValueError):
            line = json.loads(raw)
            if isinstance(line, dict) and line.get("test_run") == test_run and line.get("session_id"):
                out.add(str(line["session_id"]))
    return out


def _of_test_run(entry: dict[str, Any], test_run: str, sessions: set[str]) -> bool:
    """A ledger line of ``test_run``: written by one of its processes, or by a bridge worker for one
    of its sessions (the worker's lines name the session as their ``test_id``)."""
    return (entry.get("test_run") == test_run or str(entry.get("test_id")) in sessions
            or str(entry.get("session_id")) in sessions)


#: The test of a ledger line made outside any test (a script, ``provision up``'s clients, set-up):
#: how ``provision cost report`` names it (it said "None").
NO_TEST = "(outside any test)"


def entry_test(entry: dict[str, Any], sessions: dict[str, str]) -> str:
    """The test a ledger line belongs to: its ``test_id``, or, when that names an isolated session
    (a worker container's call), the session's test from :func:`session_tests`; :data:`NO_TEST`
    for a line without one."""
    raw = entry.get("test_id")
    test_id = NO_TEST if raw is None else str(raw)
    return sessions.get(test_id) or sessions.get(str(entry.get("session_id"))) or test_id


def _run_lm_dirs(source: Path, entry: dict[str, Any]) -> list[Path]:
    """Where the LM directory of ``entry``'s run is: next to a run ledger, or (an archived line)
    under the state dir the archive is in."""
    if source.parent.name == ARCHIVE_DIR:
        run = str(entry.get("run_id"))
        runs = source.parent.parent / "runs" / run
        return [runs / RUN_LM_SUBDIR, runs]
    return [source.parent]


def usage_kind(entry: dict[str, Any]) -> str:
    """The kind a call line counts as in summaries (``cost report``, the pytest summary, ``lm_cost``):
    its ``kind``, except that a direct call the Gemini stand-in answered (``kind`` real, ``endpoint``
    standin) is ``standin``, never ``real`` (it was not billed)."""
    kind = str(entry.get("kind"))
    return "standin" if kind == "real" and entry.get("endpoint") == "standin" else kind


@dataclass
class Totals:
    calls: int = 0
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    standin_calls: int = 0  # answered by the Gemini stand-in: billed $0
    standin_list_cost_usd: float = 0.0  # what those calls would cost at list prices
    estimated_calls: int = 0  # booked at a worst case because the answer lacked a token count
    refused: dict[str, int] = field(default_factory=dict)  # refused calls by reason (not in ``calls``)
    limits: dict[str, float] = field(default_factory=dict)  # the limit each reason last refused at
    rate_limit_waits: int = 0  # calls (sent or refused) that waited for a slot of lm.rate_limit_rpm
    rate_limit_wait_s: float = 0.0  # the seconds they waited, summed
    failed: dict[str, int] = field(default_factory=dict)  # calls sent that failed, by error type

    def add(self, entry: dict[str, Any]) -> None:
        waited = _waited(entry)
        if waited > 0:
            self.rate_limit_waits += 1
            self.rate_limit_wait_s += waited
        if entry.get("event") == "error":  # sent and failed: not a call, but its cost limit share is money
            error_type = str(entry.get("error_type"))
            self.failed[error_type] = self.failed.get(error_type, 0) + 1
            if entry.get("endpoint") != "standin":
                self.cost_usd += float(entry.get("cost_usd") or 0.0)
            return
        if entry.get("event") == "refused":
            reason = str(entry.get("reason"))
            self.refused[reason] = self.refused.get(reason, 0) + 1
            if isinstance(entry.get("limit"), int | float):
                self.limits[reason] = float(entry["limit"])
            return
        self.calls += 1
        if entry.get("endpoint") == "standin":
            # Not money, whatever an older writer put in cost_usd.
            self.standin_calls += 1
            self.standin_list_cost_usd += float(entry.get("list_cost_usd") or entry.get("cost_usd") or 0.0)
        else:
            self.cost_usd += float(entry.get("cost_usd") or 0.0)
        if entry.get("usage") == "estimated":
            self.estimated_calls += 1
        self.input_tokens += int(entry.get("input_tokens") or 0)
        self.output_tokens += int(entry.get("output_tokens") or 0) + int(entry.get("thoughts_tokens") or 0)
        kind = usage_kind(entry)
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


@dataclass
class CostReport:
    """Sums of call lines per run, per test and per month."""

    total: Totals = field(default_factory=Totals)
    by_run: dict[str, Totals] = field(default_factory=dict)
    by_test: dict[str, Totals] = field(default_factory=dict)
    by_month: dict[str, Totals] = field(default_factory=dict)
    monthly_budget_usd: float | None = None

    @property
    def over_budget_months(self) -> list[str]:
        if self.monthly_budget_usd is None:
            return []
        return [m for m, t in sorted(self.by_month.items()) if t.cost_usd > self.monthly_budget_usd]

    def as_dict(self) -> dict[str, Any]:
        def plain(t: Totals) -> dict[str, Any]:
            return {"calls": t.calls, "cost_usd": round(t.cost_usd, 8), "input_tokens": t.input_tokens,
                    "output_tokens": t.output_tokens, "by_kind": dict(sorted(t.by_kind.items())),
                    "standin_calls": t.standin_calls,
                    "standin_list_cost_usd": round(t.standin_list_cost_usd, 8),
                    "estimated_calls": t.estimated_calls,
                    "refused": dict(sorted(t.refused.items())),
                    "rate_limit_waits": t.rate_limit_waits,
                    "rate_limit_wait_s": round(t.rate_limit_wait_s, 3),
                    "failed": dict(sorted(t.failed.items()))}

        return {
            "total": plain(self.total),
            "by_run": {k: plain(v) for k, v in sorted(self.by_run.items())},
            "by_test": {k: plain(v) for k, v in sorted(self.by_test.items())},
            "by_month": {k: plain(v) for k, v in sorted(self.by_month.items())},
            "monthly_budget_usd": self.monthly_budget_usd,
            "over_budget_months": self.over_budget_months,
        }


def cost_report(sources: Iterable[Path], *, run_id: str | None = None, month: str | None = None,
                monthly_budget_usd: float | None = None) -> CostReport:
    """Sum the call, refused and error lines of ``sources``, optionally of one run and/or one month
    (``YYYY-MM``).

    ``by_test`` is keyed by test node id: a line a worker container wrote for an isolated session is
    the test's that opened the session (the run's ``sessions.jsonl``, :func:`session_tests`)."""
    report = CostReport(monthly_budget_usd=monthly_budget_usd)
    seen: set[str] = set()
    sessions_of_dir: dict[Path, dict[str, str]] = {}

    def sessions(source: Path, entry: dict[str, Any]) -> dict[str, str]:
        merged: dict[str, str] = {}
        for lm_dir in _run_lm_dirs(source, entry):
            if lm_dir not in sessions_of_dir:
                sessions_of_dir[lm_dir] = session_tests(lm_dir)
            merged.update(sessions_of_dir[lm_dir])
        return merged

    for source in sources:
        for entry in read_ledger(source):
            if entry.get("event") not in ("call", "refused", "error"):
                continue
            if run_id is not None and entry.get("run_id") != run_id:
                continue
            entry_month = _month_of(entry)
            if month is not None and entry_month != month:
                continue
            identity = entry.get("id") or json.dumps(entry, sort_keys=True)
            if identity in seen:  # a run ledger that was also archived is counted once
                continue
            seen.add(identity)
            report.total.add(entry)
            report.by_run.setdefault(str(entry.get("run_id")), Totals()).add(entry)
            # A worker's line names its isolated session: it is the test's that opened the session.
            report.by_test.setdefault(entry_test(entry, sessions(source, entry)), Totals()).add(entry)
            report.by_month.setdefault(entry_month, Totals()).add(entry)
    return report


def format_cost_report(report: CostReport, *, top_tests: int = 20) -> str:
    """The report as text: a header row, then totals, per month, per run, the costliest tests (names
    whole: the first column is as wide as the longest), and budget warnings."""
    sections: list[tuple[str, list[tuple[str, Totals]]]] = []
    for title, table, limit in (("per month", report.by_month, None), ("per run", report.by_run, None),
                                ("per test (costliest first)", report.by_test, top_tests)):
        if not table:
            continue
        items = sorted(table.items())
        if limit:
            items.sort(key=lambda kv: (-kv[1].cost_usd, kv[0]))
        sections.append((title, items[:limit]))
    width = max([len("total"), *(len(name) for _, items in sections for name, _ in items)])

    def row(name: str, totals: Totals) -> str:
        kinds = " ".join(f"{k}={v}" for k, v in sorted(totals.by_kind.items()))
        notes = ""
        if totals.standin_calls:
            notes += (f"  stand-in: {_calls(totals.standin_calls)}, $0 billed "
                      f"(${totals.standin_list_cost_usd:.6f} at list prices)")
        if totals.estimated_calls:
            notes += f"  estimated={totals.estimated_calls} (usage missing, booked at worst case)"
        if totals.refused:
            notes += f"  {refused_text(totals.refused, totals.limits)}"
        if totals.failed:
            notes += f"  {failed_text(totals.failed)}"
        if totals.rate_limit_waits:
            notes += f"  {rate_limit_wait_text(totals.rate_limit_waits, totals.rate_limit_wait_s)}"
        return (f"  {name:<{width}}  ${totals.cost_usd:>10.6f}  {totals.calls:>6}  "
                f"{totals.input_tokens:>10}  {totals.output_tokens:>10}  {kinds}{notes}")

    header = (f"  {'':<{width}}  {'billed $':>11}  {'calls':>6}  {'tokens in':>10}  {'tokens out':>10}  "
              "calls by kind")
    lines = [header, row("total", report.total)]
    for title, items in sections:
        lines.append(title + ":")
        for name, totals in items:
            lines.append(row(name, totals))
    if report.total.standin_calls:
        n = report.total.standin_calls
        lines.append(f"{_calls(n)} {'was' if n == 1 else 'were'} answered by the Gemini stand-in: billed $0, "
                     "not counted against lm.monthly_budget_usd (a run's lm.cost_limit_usd counted them at "
                     f"list prices: ${report.total.standin_list_cost_usd:.6f})")
    if report.total.refused:
        them = "it before it was" if sum(report.total.refused.values()) == 1 else "them before they were"
        lines.append(f"{refused_text(report.total.refused, report.total.limits)}: the run's limits stopped "
                     f"{them} sent (not in the calls above)")
    if report.total.failed:
        lines.append(f"{failed_text(report.total.failed)}: sent, and answered with an error after every retry"
                     " (not in the calls above)")
    if report.total.rate_limit_waits:
        lines.append(rate_limit_wait_text(report.total.rate_limit_waits, report.total.rate_limit_wait_s)
                     + ": time a test spent waiting, not working")
    if report.total.estimated_calls:
        n = report.total.estimated_calls
        lines.append(f"{_calls(n)} came back without a token count and {'was' if n == 1 else 'were'} "
                     "booked at their worst case (ledger usage: \"estimated\")")
    for month in report.over_budget_months:
        spent = report.by_month[month].cost_usd
        lines.append(f"WARNING: {month} spent ${spent:.4f}, over lm.monthly_budget_usd="
                     f"{format_usd(report.monthly_budget_usd or 0.0)}")
    return "\n".join(lines)


def refused_text(by_reason: dict[str, int], limits: dict[str, float] | None = None) -> str:
    """"3 calls refused (cost limit $0.001; 1 by the rate limit 10/min)": what every summary says
    of the calls the run's limits refused. ``limits``: the limit per reason, when known."""
    limits = limits or {}
    parts = []
    for reason in sorted(by_reason, key=lambda r: (r != "cost_limit", r)):
        name = reason.replace("_", " ")
        if reason in limits:
            value = limits[reason]
            name += f" {format_usd(value)}" if reason == "cost_limit" else f" {value:g}/min"
        parts.append((by_reason[reason], name))
    total = sum(by_reason.values())
    head = f"{total} call{'s' if total != 1 else ''} refused ({parts[0][1]}"
    rest = "".join(f"; {n} by the {name}" for n, name in parts[1:])
    return head + rest + ")"


def failed_text(by_type: dict[str, int]) -> str:
    """"3 calls failed (RateLimitError 2, ServerError 1)": what every summary says of the calls that
    were sent and failed (the ledger's ``error`` lines)."""
    total = sum(by_type.values())
    kinds = ", ".join(f"{name} {n}" for name, n in sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{total} call{'s' if total != 1 else ''} failed ({kinds})"


def _waited(entry: dict[str, Any]) -> float:
    value = entry.get("rate_limit_wait_s")
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        return 0.0
    return float(value)


def rate_limit_wait_text(calls: int, seconds: float, rpm: float | None = None) -> str:
    """"3 calls waited 41.2 s for the rate limit (10 rpm: lm.rate_limit_rpm)": what every summary
    says of the time calls spent waiting for a slot of the run's rate limit (``rpm``: the limit in
    force, when known)."""
    limit = f"{rpm:g} rpm: lm.rate_limit_rpm" if rpm is not None else "lm.rate_limit_rpm"
    return (f"{calls} call{'s' if calls != 1 else ''} waited {seconds:.1f} s for the rate limit "
            f"({limit})")


def run_report(run_dir: Path, *, run_id: str | None = None) -> CostReport:
    """Totals of one run's ledger (per test, by kind) — what the pytest plugin reports per test."""
    return cost_report([run_dir / LEDGER_FILE], run_id=run_id)


LEDGER_KINDS: tuple[str, ...] = ("replayed", "recorded", "real")



def ledger_usage(run_dir: Path | None, attributed_to: set[str] | None = None,
                 since: int = 0, test_run: str | None = None) -> LMUsage | None:
    """Non-mock LM calls of the run from its shared ledger (all processes and containers).

    ``attributed_to`` keeps only calls whose ``test_id`` is one of these (a pytest node id, or the
    session id a bridge worker attributes its calls to); ``since``: only lines from that byte offset
    on (a session attached to a ``provision up`` run counts its own calls, not earlier sessions');
    ``test_run``: only lines of that test run (:func:`set_test_run`: a session attached to a
    ``provision up`` run does not count another attached session's calls made meanwhile).
    ``None`` when the run has no ledger.
    """
    if run_dir is None:
        return None
    path = run_dir / LEDGER_FILE
    if not path.exists():
        return None
    sessions = test_run_sessions(run_dir, test_run) if test_run is not None else set()
    usage = LMUsage()
    for entry in read_ledger(path, since):
        if attributed_to is not None and entry.get("test_id") not in attributed_to:
            continue
        if test_run is not None and not _of_test_run(entry, test_run, sessions):
            continue
        _count(usage, entry)
    return usage


def usage_by_test(run_dir: Path | None, since: int = 0, test_run: str | None = None
                  ) -> dict[str, LMUsage] | None:
    """The run ledger's non-mock LM calls per test node id, in one read (a bridge session's lines are
    its test's, from the run's ``sessions.jsonl``: :func:`entry_test`); ``since`` and ``test_run``:
    as for :func:`ledger_usage`. ``None`` without a ledger."""
    if run_dir is None or not (run_dir / LEDGER_FILE).exists():
        return None
    sessions = session_tests(run_dir)
    mine = test_run_sessions(run_dir, test_run) if test_run is not None else set()
    out: dict[str, LMUsage] = {}
    for entry in read_ledger(run_dir / LEDGER_FILE, since):
        if test_run is not None and not _of_test_run(entry, test_run, mine):
            continue
        _count(out.setdefault(entry_test(entry, sessions), LMUsage()), entry)
    return out


def _count(usage: LMUsage, entry: dict[str, Any]) -> None:
    """Add one ledger line to ``usage`` (calls by kind, tokens, dollars, cassette misses)."""
    waited = _waited(entry)
    if waited > 0:
        usage.rate_limit_waits += 1
        usage.rate_limit_wait_s += waited
    if entry.get("event") == "cassette_miss":  # a miss that failed (replay-only, corrupt, not writable)
        usage.cache_misses += 1
        return
    if entry.get("event") == "refused":  # raised to the program too: an error, as in the process counters
        usage.errors += 1
        if entry.get("reason") == "rate_limit":
            usage.refused_rate_limit += 1
        else:
            usage.refused_cost_limit += 1
        return
    if entry.get("event") == "error":  # sent and failed: an error, not a call; what the limit counted
        usage.errors += 1
        cost = float(entry.get("cost_usd") or 0.0)
        usage.list_cost_usd += float(entry.get("list_cost_usd") or 0.0)
        if entry.get("endpoint") != "standin":
            usage.cost_usd += cost
        return
    if entry.get("event") != "call" or entry.get("kind") not in LEDGER_KINDS:
        return
    kind = usage_kind(entry)
    setattr(usage, kind, getattr(usage, kind) + 1)
    usage.input_tokens += int(entry.get("input_tokens") or 0)
    usage.output_tokens += int(entry.get("output_tokens") or 0) + int(entry.get("thoughts_tokens") or 0)
    cost = float(entry.get("cost_usd") or 0.0)
    list_cost = entry.get("list_cost_usd")
    usage.list_cost_usd += cost if list_cost is None else float(list_cost)
    if entry.get("endpoint") != "standin":  # the stand-in's answers are not money
        usage.cost_usd += cost
    if entry.get("cache") == "miss" or kind == "recorded":
        usage.cache_misses += 1


def combine(process: LMUsage, ledger: LMUsage | None) -> LMUsage:
    """Mock calls from the process counters; every other kind from the ledger when there is one.

    The ledger sees calls made inside worker containers too, and it is shared by all processes, so
    it is the authority for the run; mock calls are free and never written there.
    """
    if ledger is None:
        return process
    merged = LMUsage(**asdict(ledger))
    merged.mock = process.mock
    merged.errors = process.errors
    return merged


def _calls(n: int) -> str:
    return f"{n} call" if n == 1 else f"{n} calls"
