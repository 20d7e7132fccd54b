"""What the history says across runs: flaky tests, slowest tests, cost per month and its forecast.

Numbers come from the test and run rows of :mod:`provisioner.history.store` only; money is billed
dollars (``cost_usd``: calls answered by the Gemini stand-in count $0, as in the ledger).
"""

from __future__ import annotations

import calendar
import datetime as _dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from provisioner.history.rows import row_lm_calls
from provisioner.history.store import RunRow, TestRow

PASSING = frozenset({"passed"})
NO_REVISION = "(no git revision)"
FAILING = frozenset({"failed", "error"})


@dataclass
class FlakyTest:
    """A test that both passed and failed on one revision, or passed only on a rerun.

    ``reasons``: human-readable, one per finding; ``strip``: ``(run_id, outcome)`` over the runs
    looked at, oldest first (``None`` where the run did not have the test)."""

    node_id: str
    reasons: list[str] = field(default_factory=list)
    strip: list[tuple[str, str | None]] = field(default_factory=list)


def flaky_tests(runs: Sequence[RunRow], tests: Iterable[TestRow]) -> list[FlakyTest]:
    """Flaky tests over ``runs`` (any order) and their test rows.

    A test is flaky when, on one revision (a dirty work tree is its own revision, see
    :func:`provisioner.history.rows.git_revision`), it passed in one run and failed or errored in
    another, or when it passed after pytest-rerunfailures reran it. A failure with LM calls the run's
    cost or rate limit refused (``lm_refused``) is not flakiness: its cause is the run's limits (a
    configuration), not chance; nor is a failure with a cassette miss that failed (``cache_misses``
    above ``lm_recorded``: a replay-only miss, e.g. after an ``lm.mock_rules`` change or a reworded
    prompt): the recordings and the request decide it, not chance. Runs without a revision (not a git
    work tree) are compared with each other as one unknown revision, and the reason says so (a code
    change between them is invisible).
    """
    ordered = sorted(runs, key=lambda r: (r["started_at"], r["run_id"]))
    revision_of = {r["run_id"]: r["revision"] or NO_REVISION for r in ordered}
    outcomes: dict[tuple[str, str], set[str]] = defaultdict(set)
    by_test: dict[str, dict[str, str]] = defaultdict(dict)
    rerun_passes: dict[str, int] = defaultdict(int)
    for row in tests:
        if row["run_id"] not in revision_of:
            continue
        by_test[row["node_id"]][row["run_id"]] = row["outcome"]
        if row["outcome"] in FAILING and row["lm_refused"]:
            continue  # failed because the run's limits refused its LM calls: a config, not chance
        if row["outcome"] in FAILING and row["cache_misses"] > row["lm_recorded"]:
            continue  # a cassette miss failed it (a miss that records is an lm_recorded call): not chance
        outcomes[(row["node_id"], revision_of[row["run_id"]])].add(row["outcome"])
        if row["reruns"] and row["outcome"] == "passed":
            rerun_passes[row["node_id"]] += 1
    found: dict[str, FlakyTest] = {}
    for (node_id, revision), seen in sorted(outcomes.items()):
        if seen & PASSING and seen & FAILING:
            flaky = found.setdefault(node_id, FlakyTest(node_id))
            failing = "/".join(sorted(seen & FAILING))
            if revision == NO_REVISION:
                flaky.reasons.append(f"passed and {failing} in runs without a git revision (not a git work "
                                     "tree: those runs are compared as one revision, code changes unseen)")
            else:
                flaky.reasons.append(f"passed and {failing} on revision {revision[:20]}")
    for node_id, count in sorted(rerun_passes.items()):
        flaky = found.setdefault(node_id, FlakyTest(node_id))
        flaky.reasons.append(f"passed on rerun in {count} run{'s' if count != 1 else ''}")
    for node_id, flaky in found.items():
        flaky.strip = [(r["run_id"], by_test[node_id].get(r["run_id"])) for r in ordered]
    return [found[k] for k in sorted(found)]


@dataclass
class TestSummary:
    """One test over many runs: ``runs`` it appeared in, mean/max total duration in seconds, billed
    dollars summed (``list_cost_usd``: every call at list prices, stand-in calls included — what the
    runs' cost limits counted), LM calls, cache hits (replayed) and misses, leaks found, last outcome."""

    __test__ = False

    node_id: str
    runs: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    cost_usd: float = 0.0
    list_cost_usd: float = 0.0
    lm_calls: int = 0
    standin_calls: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    leaks: int = 0
    last_outcome: str | None = None
    # Of total_s: seconds its LM calls waited for a slot of the run's rate limit (lm.rate_limit_rpm).
    rate_limit_wait_s: float = 0.0

    @property
    def mean_s(self) -> float:
        return self.total_s / self.runs if self.runs else 0.0

    @property
    def mean_rate_limit_wait_s(self) -> float:
        """Of :attr:`mean_s`, the seconds per run its LM calls waited for the rate limit."""
        return self.rate_limit_wait_s / self.runs if self.runs else 0.0

    @property
    def hit_ratio(self) -> float | None:
        looked_up = self.cache_hits + self.cache_misses
        return self.cache_hits / looked_up if looked_up else None


def test_summaries(runs: Sequence[RunRow], tests: Iterable[TestRow]) -> dict[str, TestSummary]:
    """Per node id sums over the test rows of ``runs`` (``last_outcome``: of the newest run)."""
    started = {r["run_id"]: r["started_at"] for r in runs}
    out: dict[str, TestSummary] = {}
    newest: dict[str, str] = {}
    for row in tests:
        if row["run_id"] not in started:
            continue
        summary = out.setdefault(row["node_id"], TestSummary(row["node_id"]))
        duration = row["setup_s"] + row["call_s"] + row["teardown_s"]
        summary.runs += 1
        summary.total_s += duration
        summary.max_s = max(summary.max_s, duration)
        summary.cost_usd += row["cost_usd"]
        summary.list_cost_usd += row["list_cost_usd"]
        summary.lm_calls += row_lm_calls(row)
        summary.standin_calls += row["lm_standin"]
        summary.cache_hits += row["cache_hits"]
        summary.cache_misses += row["cache_misses"]
        summary.leaks += len(row["leaks"])
        summary.rate_limit_wait_s += row["lm_rate_limit_wait_s"]
        when = started[row["run_id"]]
        if row["node_id"] not in newest or when >= newest[row["node_id"]]:
            newest[row["node_id"]] = when
            summary.last_outcome = row["outcome"]
    return out


@dataclass
class MonthCost:
    """Billed dollars of the runs started in ``month`` (``YYYY-MM``) and the month's forecast: the
    spend so far divided by the elapsed fraction of the month (the whole month once it is over)."""

    month: str
    runs: int
    cost_usd: float
    forecast_usd: float
    budget_usd: float | None

    @property
    def over_budget(self) -> bool:
        return self.budget_usd is not None and self.forecast_usd > self.budget_usd


def month_costs(runs: Iterable[RunRow], budget_usd: float | None,
                now: _dt.datetime | None = None) -> list[MonthCost]:
    """Cost per month (oldest first) from the run rows, with a linear forecast for the current month."""
    now = now or _dt.datetime.now(_dt.UTC)
    sums: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for run in runs:
        entry = sums[run["started_at"][:7]]
        entry[0] += 1
        entry[1] += run["cost_usd"]
    out = []
    current = now.strftime("%Y-%m")
    for month in sorted(sums):
        count, cost = sums[month]
        forecast = cost
        if month == current:
            days = calendar.monthrange(now.year, now.month)[1]
            elapsed = (now.day - 1 + (now.hour * 3600 + now.minute * 60 + now.second) / 86400) / days
            forecast = cost / elapsed if elapsed > 0 else cost
        out.append(MonthCost(month, int(count), round(cost, 8), round(forecast, 8), budget_usd))
    return out
