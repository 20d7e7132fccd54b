"""Per-process counters of LM calls by kind, for the pytest plugin and benchmarks.

Kinds: ``mock`` (answered by the mock engine), ``replayed`` (served from a cassette),
``recorded`` (a cassette miss answered by the inner engine and written), ``real`` (a direct
call to Gemini, billed), ``standin`` (a direct call the Gemini stand-in answered,
``lm.endpoint_kind="standin"``: billed $0). Cost is the billed dollar figure of real and recorded
calls; ``list_cost_usd`` is every call at list prices (stand-in calls included), what the run's
cost limit counts.

The plugin takes a :func:`stats` snapshot before and after a test and subtracts them; for
calls made inside worker containers, the run ledger (``provisioner.lm.ledger``) is the source.
"""

from __future__ import annotations

import threading
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
    with _lock:
        _counters[kind] += 1
        _counters["input_tokens"] += input_tokens
        _counters["output_tokens"] += output_tokens
        _counters["cost_usd"] += cost_usd
        _counters["list_cost_usd"] += cost_usd if list_cost_usd is None else list_cost_usd


def record_error() -> None:
    """Count one call that ended in an error (injected or real)."""
    with _lock:
        _counters["errors"] += 1


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

    @property
    def calls(self) -> int:
        return self.mock + self.replayed + self.recorded + self.real + self.standin

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
        return data
