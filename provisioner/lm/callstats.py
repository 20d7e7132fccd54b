"""Per-process counters of LM calls by kind, for the pytest plugin and benchmarks.

Kinds: ``mock`` (answered by the mock engine), ``replayed`` (served from a cassette),
``recorded`` (a cassette miss answered by the inner engine and written), ``real`` (a direct
call to Gemini, billed), ``standin`` (a direct call the Gemini stand-in answered,
``lm.endpoint_kind="standin"``: billed $0). Cost is the billed dollar figure of real and recorded
calls; ``list_cost_usd`` is every call at list prices (stand-in calls included), what the run's
cost limit counts.

The plugin takes a :func:`stats` snapshot before and after a test and subtracts them. Calls a
bridge worker made for this process (a worker container, a forked worker) count here too: the
worker tallies the calls of each ``execute_program`` (:func:`tally`) and sends them back in the
reply's ``lm_usage``, which the client adds (:func:`record_elsewhere`) — mock calls have no other
record. For replayed, recorded and real calls the run ledger (``provisioner.lm.ledger``) is the
authority (:func:`provisioner.lm.ledger.combine`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import secrets
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

CALL_KINDS: tuple[str, ...] = ("mock", "replayed", "recorded", "real", "standin")


@dataclass(frozen=True)
class LMCallStats:
    """A snapshot of this process's LM call counters (subtract two to get a delta)."""

    mock: int = 0
    replayed: int = 0
    recorded: int = 0
    real: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    standin: int = 0  # direct calls the Gemini stand-in answered (not ``real``: billed $0)
    list_cost_usd: float = 0.0
    refused_cost_limit: int = 0  # calls the run's cost limit refused (never sent; not in ``calls``)
    refused_rate_limit: int = 0  # calls the run's rate limit refused (never sent; not in ``calls``)
    rate_limit_waits: int = 0  # calls that waited for a slot of lm.rate_limit_rpm (sent or refused)
    rate_limit_wait_s: float = 0.0  # seconds those calls waited, summed

    @property
    def calls(self) -> int:
        return self.mock + self.replayed + self.recorded + self.real + self.standin

    def __sub__(self, other: LMCallStats) -> LMCallStats:
        return LMCallStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float | int]:
        data: dict[str, float | int] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["calls"] = self.calls
        return data


_lock = threading.Lock()
_counters: dict[str, float] = {f.name: 0 for f in fields(LMCallStats)}
_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LMCallStats))
# Names this process in a tally's reply: a worker served in the caller's own process (the fake
# runtime's in-process workers) has counted its calls here already, so its reply adds nothing.
_process = secrets.token_hex(8)


def _new_process_token() -> None:
    global _process
    _process = secrets.token_hex(8)


os.register_at_fork(after_in_child=_new_process_token)
_INTEGERS = frozenset(f.name for f in fields(LMCallStats) if f.type in (int, "int"))


class Tally:
    """The LM calls made inside one :func:`tally` block (one request a worker serves)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, float] = dict.fromkeys(_NAMES, 0)

    def _add(self, key: str, value: float) -> None:
        with self._lock:
            self._counts[key] += value

    def as_dict(self) -> dict[str, Any]:
        """``{mock, replayed, recorded, real, standin, errors, input_tokens, output_tokens, cost_usd,
        list_cost_usd, refused_cost_limit, refused_rate_limit, rate_limit_waits, rate_limit_wait_s,
        process}`` (counts and tokens as ints, dollars and seconds as floats; ``process``: an opaque
        token of the process that made the calls): the reply's ``lm_usage``."""
        with self._lock:
            out: dict[str, Any] = {k: (int(v) if k in _INTEGERS else float(v))
                                  for k, v in self._counts.items()}
        out["process"] = _process
        return out


_tally: contextvars.ContextVar[Tally | None] = contextvars.ContextVar("provision_lm_tally", default=None)


@contextlib.contextmanager
def tally(current: Tally | None = None) -> Iterator[Tally]:
    """Count the LM calls made in this block (this thread or task, and contexts copied from it)
    besides this process's counters: a bridge worker wraps each ``execute_program`` in one and
    sends the tally back, so the calls count for the test that asked (:func:`record_elsewhere`).
    ``current``: a tally made beforehand (one the caller can read while the block still runs: a
    ``Timeout`` reply carries the calls made until the deadline)."""
    current = Tally() if current is None else current
    token = _tally.set(current)
    try:
        yield current
    finally:
        _tally.reset(token)


def record_elsewhere(usage: Mapping[str, Any]) -> None:
    """Add calls another process made for this one (a bridge worker's ``lm_usage``: see
    :class:`Tally`) to this process's counters. Unknown keys and values that are not non-negative
    numbers are ignored: the reply comes over the wire. A tally of this very process (a worker it
    serves itself) is ignored too: its calls are counted here already."""
    if usage.get("process") == _process:
        return
    clean: dict[str, float] = {}
    for key in _NAMES:
        value = usage.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            continue
        clean[key] = value
    if clean:
        with _lock:
            for key, value in clean.items():
                _counters[key] += value


def record_call(kind: str, *, input_tokens: int = 0, output_tokens: int = 0, cost_usd: float = 0.0,
                list_cost_usd: float | None = None) -> None:
    """Count one successful call of ``kind`` (one of :data:`CALL_KINDS`; ``standin`` for a direct
    call the Gemini stand-in answered).

    ``cost_usd``: billed dollars; ``list_cost_usd``: the call at list prices (default: ``cost_usd``).

    Raises:
        ValueError: ``kind`` is not one of :data:`CALL_KINDS`.
    """
    if kind not in CALL_KINDS:
        raise ValueError(f"kind must be one of {CALL_KINDS}, got {kind!r}")
    listed = cost_usd if list_cost_usd is None else list_cost_usd
    with _lock:
        _counters[kind] += 1
        _counters["input_tokens"] += input_tokens
        _counters["output_tokens"] += output_tokens
        _counters["cost_usd"] += cost_usd
        _counters["list_cost_usd"] += listed
    current = _tally.get()
    if current is not None:
        for key, value in ((kind, 1), ("input_tokens", input_tokens), ("output_tokens", output_tokens),
                           ("cost_usd", cost_usd), ("list_cost_usd", listed)):
            current._add(key, value)


def record_error() -> None:
    """Count one call that ended in an error (injected or real)."""
    with _lock:
        _counters["errors"] += 1
    current = _tally.get()
    if current is not None:
        current._add("errors", 1)


REFUSAL_REASONS: tuple[str, ...] = ("cost_limit", "rate_limit")


def record_refused(reason: str) -> None:
    """Count one call the run's limits refused before it was sent (``reason``: ``cost_limit`` or
    ``rate_limit``); a worker's tally carries it home like a call.

    Raises:
        ValueError: ``reason`` is not one of :data:`REFUSAL_REASONS`.
    """
    if reason not in REFUSAL_REASONS:
        raise ValueError(f"reason must be one of {REFUSAL_REASONS}, got {reason!r}")
    key = f"refused_{reason}"
    with _lock:
        _counters[key] += 1
    current = _tally.get()
    if current is not None:
        current._add(key, 1)


def record_rate_limit_wait(seconds: float) -> None:
    """Count one call that waited ``seconds`` for a slot of the run's rate limit (``lm.rate_limit_rpm``);
    a worker's tally carries it home like a call."""
    if not seconds > 0:
        return
    with _lock:
        _counters["rate_limit_waits"] += 1
        _counters["rate_limit_wait_s"] += seconds
    current = _tally.get()
    if current is not None:
        current._add("rate_limit_waits", 1)
        current._add("rate_limit_wait_s", seconds)


def stats() -> LMCallStats:
    """The current counters of this process."""
    with _lock:
        snapshot = dict(_counters)
    return LMCallStats(
        mock=int(snapshot["mock"]),
        replayed=int(snapshot["replayed"]),
        recorded=int(snapshot["recorded"]),
        real=int(snapshot["real"]),
        errors=int(snapshot["errors"]),
        input_tokens=int(snapshot["input_tokens"]),
        output_tokens=int(snapshot["output_tokens"]),
        cost_usd=float(snapshot["cost_usd"]),
        standin=int(snapshot["standin"]),
        list_cost_usd=float(snapshot["list_cost_usd"]),
        refused_cost_limit=int(snapshot["refused_cost_limit"]),
        refused_rate_limit=int(snapshot["refused_rate_limit"]),
        rate_limit_waits=int(snapshot["rate_limit_waits"]),
        rate_limit_wait_s=float(snapshot["rate_limit_wait_s"]),
    )


def reset_stats() -> None:
    """Zero the counters (tests and benchmarks)."""
    with _lock:
        for name in _counters:
            _counters[name] = 0


@dataclass
class LMUsage:
    """LM calls by kind, tokens and dollars: a mutable aggregate over processes and the ledger.

    The counters of :class:`provisioner.lm.LMCallStats` (a per-process snapshot), plus
    ``cache_misses``; :meth:`from_stats` converts.
    """

    mock: int = 0
    replayed: int = 0
    recorded: int = 0
    real: int = 0
    errors: int = 0
    cache_misses: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0  # billed dollars (calls answered by the Gemini stand-in are $0)
    standin: int = 0  # direct calls the Gemini stand-in answered (a kind of its own, never ``real``)
    list_cost_usd: float = 0.0  # every call at list prices: what the run's cost limit counts
    # Calls the run's limits refused before they were sent (ledger "refused" lines; not in ``calls``).
    refused_cost_limit: int = 0  # lm.cost_limit_usd: their worst case would have passed it
    refused_rate_limit: int = 0  # lm.rate_limit_rpm: no request slot within lm.rate_limit_wait_s
    rate_limit_waits: int = 0  # calls that waited for a slot of lm.rate_limit_rpm (sent or refused)
    rate_limit_wait_s: float = 0.0  # seconds those calls waited, summed (time not spent working)

    @property
    def calls(self) -> int:
        return self.mock + self.replayed + self.recorded + self.real + self.standin

    @property
    def refused(self) -> int:
        return self.refused_cost_limit + self.refused_rate_limit

    def add(self, other: LMUsage) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    @classmethod
    def from_stats(cls, stats: Any) -> LMUsage:
        """From a :class:`provisioner.lm.LMCallStats` (or its ``as_dict()``) — a recorded call is a miss."""
        data = stats.as_dict() if hasattr(stats, "as_dict") else dict(stats)
        usage = cls(**{k: data[k] for k in asdict(cls()) if k in data})
        if "cache_misses" not in data:
            usage.cache_misses = usage.recorded
        return usage

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = asdict(self)
        data["calls"] = self.calls
        data["cost_usd"] = round(self.cost_usd, 6)
        data["rate_limit_wait_s"] = round(self.rate_limit_wait_s, 3)
        return data
