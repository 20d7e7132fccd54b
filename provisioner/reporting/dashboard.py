"""The numbers every view shows, computed once from the history (see docs/reporting.md).

All money is billed US dollars from the test and run rows (calls answered by the Gemini stand-in are
$0; their count is shown apart). Durations are seconds (a test's = setup + call + teardown).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from provisioner.history.analysis import (
    FlakyTest,
    MonthCost,
    TestSummary,
    flaky_tests,
    month_costs,
    test_summaries,
)
from provisioner.history.store import History, RunRow, TestRow

DEFAULT_RUNS = 100


@dataclass
class Dashboard:
    """``runs``: the newest ``window`` runs, oldest first; ``last``/``last_tests``: the newest run and
    its tests; ``flaky``/``tests``: over the window; ``months``: over every run in the history."""

    runs: list[RunRow]
    last: RunRow | None
    last_tests: list[TestRow]
    flaky: list[FlakyTest]
    tests: dict[str, TestSummary]
    months: list[MonthCost]
    budget_usd: float | None
    generated_at: str

    @property
    def current_month(self) -> MonthCost | None:
        now = self.generated_at[:7]
        return next((m for m in self.months if m.month == now), None)

    def slowest(self, n: int = 15) -> list[TestSummary]:
        return sorted(self.tests.values(), key=lambda t: (-t.mean_s, t.node_id))[:n]

    def costliest(self, n: int = 20) -> list[TestSummary]:
        spent = [t for t in self.tests.values() if t.cost_usd > 0 or t.lm_calls]
        return sorted(spent, key=lambda t: (-t.cost_usd, -t.lm_calls, t.node_id))[:n]

    def cache_tests(self, n: int = 20) -> list[TestSummary]:
        looked_up = [t for t in self.tests.values() if t.cache_hits + t.cache_misses]
        return sorted(looked_up, key=lambda t: (-t.cache_misses, t.node_id))[:n]

    def leaky(self) -> list[TestSummary]:
        return sorted((t for t in self.tests.values() if t.leaks), key=lambda t: (-t.leaks, t.node_id))


def pass_rate(run: RunRow) -> float | None:
    """Passed / (passed + failed + error), in percent; None for a run with none of them."""
    judged = run["passed"] + run["failed"] + run["error"]
    return 100.0 * run["passed"] / judged if judged else None


def gather(
    history: History,
    *,
    window: int = DEFAULT_RUNS,
    budget_usd: float | None = None,
    now: _dt.datetime | None = None,
) -> Dashboard:
    """Read the history once: the newest ``window`` runs with their tests, every run's cost per month."""
    now = now or _dt.datetime.now(_dt.UTC)
    newest = history.runs(window)
    runs = list(reversed(newest))
    rows = history.test_rows(r["run_id"] for r in runs)
    last = newest[0] if newest else None
    last_tests = sorted(
        (r for r in rows if last and r["run_id"] == last["run_id"]), key=lambda r: r["node_id"]
    )
    return Dashboard(
        runs=runs,
        last=last,
        last_tests=last_tests,
        flaky=flaky_tests(runs, rows),
        tests=test_summaries(runs, rows),
        months=month_costs(history.runs(), budget_usd, now),
        budget_usd=budget_usd,
        generated_at=now.isoformat(timespec="seconds"),
    )
