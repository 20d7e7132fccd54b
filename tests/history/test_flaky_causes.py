"""What the flaky-tests table counts: a failure caused by the run's limits refusing the test's LM
calls is not flakiness, and runs outside git are said to be compared as one revision. A user's trial:
7 tests refused under ``PROVISION_LM__COST_LIMIT_USD=0.0005`` and passing under 0.002 were listed as
"Flaky tests (7)" "passed and failed on revision (no git revision)"."""

from __future__ import annotations

from typing import Any

from provisioner.history.analysis import flaky_tests
from provisioner.history.rows import empty_test_row


def _run(run_id: str, minute: int, revision: str | None) -> Any:
    return {"run_id": run_id, "started_at": f"2026-11-30T22:{minute:02d}:00+00:00", "revision": revision}


def _row(run_id: str, outcome: str, lm_refused: int = 0) -> Any:
    row = empty_test_row(run_id, "t.py::test_spend", "e2e")
    row["outcome"], row["lm_refused"] = outcome, lm_refused
    return row


def test_a_failure_whose_lm_calls_the_limits_refused_is_not_flaky() -> None:
    runs = [_run("r1", 1, None), _run("r2", 2, None)]
    rows = [_row("r1", "failed", lm_refused=2), _row("r2", "passed")]
    assert flaky_tests(runs, rows) == []
    # A failure without a refused call on the same revision still is (the kind stays caught).
    assert [f.node_id for f in flaky_tests(runs, [_row("r1", "failed"), _row("r2", "passed")])] == [
        "t.py::test_spend"]


def test_a_failure_by_a_cassette_miss_is_not_flaky() -> None:
    """A user's trial: a mock rule added to pyproject.toml made every replayed test miss its cassette
    (record mode none); the report page listed them all as flaky. A miss that failed is not chance."""
    runs = [_run("r1", 1, None), _run("r2", 2, None)]
    missed = _row("r2", "failed")
    missed["cache_misses"] = 1
    assert flaky_tests(runs, [_row("r1", "passed"), missed]) == []
    # a miss that was recorded (a passing call) does not excuse a failure on the same revision
    recorded = _row("r2", "failed")
    recorded["cache_misses"], recorded["lm_recorded"] = 1, 1
    assert [f.node_id for f in flaky_tests(runs, [_row("r1", "passed"), recorded])] == ["t.py::test_spend"]


def test_runs_without_a_git_revision_say_they_were_compared_as_one() -> None:
    runs = [_run("r1", 1, None), _run("r2", 2, None)]
    (found,) = flaky_tests(runs, [_row("r1", "failed"), _row("r2", "passed")])
    assert "without a git revision" in found.reasons[0] and "compared as one revision" in found.reasons[0]
    assert "(no git revision)" not in found.reasons[0]
    (on_git,) = flaky_tests([_run("r1", 1, "abc"), _run("r2", 2, "abc")],
                            [_row("r1", "failed"), _row("r2", "passed")])
    assert on_git.reasons == ["passed and failed on revision abc"]
