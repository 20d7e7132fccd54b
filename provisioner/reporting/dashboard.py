"""The numbers every view shows, computed once from the history (see docs/reporting.md).

All money is billed US dollars from the test and run rows (calls answered by the Gemini stand-in are
$0; their count is shown apart). Durations are seconds (a test's = setup + call + teardown).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

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
#: How many of the last lines of a failed test's saved worker log the views show.
LOG_TAIL_LINES = 20


@dataclass
class Dashboard:
    """``runs``: the newest ``window`` runs, oldest first; ``last``/``last_tests``: the newest run and
    its tests; ``flaky``/``tests``: over the window; ``months``: over every run in the history;
    ``log_tails``: for each worker log saved for a failure of the newest run (a test row's
    ``log_path``), its last :data:`LOG_TAIL_LINES` lines — empty when the file is not on this machine
    (a run imported from CI)."""

    runs: list[RunRow]
    last: RunRow | None
    last_tests: list[TestRow]
    flaky: list[FlakyTest]
    tests: dict[str, TestSummary]
    months: list[MonthCost]
    budget_usd: float | None
    generated_at: str
    log_tails: dict[str, list[str]] = field(default_factory=dict)

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


# pytest's exit statuses (pytest.ExitCode), as a run's "ended" column says them.
EXIT_STATUS_NAMES = {0: "passed", 1: "tests failed", 2: "interrupted", 3: "internal error", 4: "usage error",
                     5: "no tests collected"}


def run_ended(run: RunRow) -> str:
    """How the run ended, from pytest's exit status: ``passed``, ``tests failed``, ``interrupted``
    (Ctrl-C: its counts stop there), ``internal error``, ``usage error``, ``no tests collected``,
    or ``exit status N`` for any other."""
    status = int(run["exit_status"])
    return EXIT_STATUS_NAMES.get(status, f"exit status {status}")


def pass_rate(run: RunRow) -> float | None:
    """Passed / (passed + failed + error), in percent; None for a run with none of them."""
    judged = run["passed"] + run["failed"] + run["error"]
    return 100.0 * run["passed"] / judged if judged else None


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a saved worker log; ``[]`` when it is missing or unreadable."""
    try:
        with Path(path).open("rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 64 * 1024))  # the tail is in the last 64 kB
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


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
    saved = [p for r in last_tests if r["outcome"] in ("failed", "error") and r["log_path"]
             for p in r["log_path"].split("; ")]
    return Dashboard(
        log_tails={p: log_tail(p) for p in saved},
        runs=runs,
        last=last,
        last_tests=last_tests,
        flaky=flaky_tests(runs, rows),
        tests=test_summaries(runs, rows),
        months=month_costs(history.runs(), budget_usd, now),
        budget_usd=budget_usd,
        generated_at=now.isoformat(timespec="seconds"),
    )
