"""A call that reached the run's limits and then failed writes exactly one ledger line.

A new user's trial: a real-LM call waited for a rate-limit slot, and the Gemini stand-in answered
429 (or 500) after every retry. The ledger had no line for it, so the test's rate-limit wait and
its failed call were missing from ``provision cost report``, the run history's rows and the JSON
report. Now every call that reached the limiter has one line — ``call``, ``refused`` or ``error``
(its error type, HTTP status, attempts and wait) — and the views count it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from provisioner.cli import main
from provisioner.history.store import HISTORY_FILE, History
from provisioner.lm import build_lm, stats
from provisioner.lm.ledger import cost_report, format_cost_report, ledger_usage, read_ledger
from provisioner.lm.standin import GeminiStandin
from provisioner.lmconfig import LMConfig

from .conftest import FULL_WINDOW_IN_SUITE, STANDIN_KEY, fill_the_window_as_the_next_call_asks

pytest_plugins = ["pytester"]


def _config(standin: GeminiStandin, run_dir: Path, **extra: object) -> LMConfig:
    return LMConfig.model_validate({"mode": "real", "api_key": STANDIN_KEY, "base_url": standin.url,
                                    "run_dir": run_dir, "rate_limit_rpm": 1, "run_id": "run-f",
                                    "endpoint_kind": "standin", "max_tokens": 16, "max_retries": 1,
                                    "retry_base_delay_s": 0.0, **extra})


@pytest.mark.parametrize("status, error_type", [(429, "RateLimitError"), (500, "ServerError")])
def test_a_call_that_waited_and_then_failed_writes_one_error_line_with_its_wait(
        standin: GeminiStandin, tmp_path: Path, status: int, error_type: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    lm = build_lm(_config(standin, tmp_path, rate_limit_rpm=2))
    lm("answered at once")  # the engine is built and warm: what follows waits for the limit only
    # Both slots taken as the call asks for one: it waits ~0.3 s, its retry not.
    fill_the_window_as_the_next_call_asks(monkeypatch, 0.3, slots=2)
    standin.fail_next(2, status=status)  # the call and its one retry
    before = stats()
    with pytest.raises(Exception, match=str(status)):
        lm("fails after waiting")
    lines = read_ledger(tmp_path / "ledger.jsonl")
    assert [line["event"] for line in lines] == ["call", "error"]
    line = lines[1]
    assert (line["error_type"], line["status"], line["attempts"]) == (error_type, status, 2)
    assert line["kind"] == "real"
    assert line["rate_limit_wait_s"] > 0 and line["endpoint"] == "standin"
    assert line["cost_usd"] == line["list_cost_usd"] == 0  # the API answered: nothing was billed
    delta = stats() - before
    assert delta.errors == 1 and delta.rate_limit_waits == 1
    assert delta.rate_limit_wait_s == pytest.approx(line["rate_limit_wait_s"], abs=0.001)
    usage = ledger_usage(tmp_path)
    assert usage is not None and usage.errors == 1 and usage.calls == 1 and usage.rate_limit_waits == 1
    report = cost_report([tmp_path / "ledger.jsonl"])
    assert report.total.failed == {error_type: 1} and report.total.calls == 1
    assert report.as_dict()["total"]["failed"] == {error_type: 1}
    text = format_cost_report(report)
    assert f"1 call failed ({error_type} 1)" in text and "1 call waited" in text


def test_a_cassette_recording_that_failed_writes_one_error_line_of_kind_recorded(
        standin: GeminiStandin, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lm = build_lm(_config(standin, run_dir, mode="cached", cache_dir=tmp_path / "cassettes",
                          rate_limit_rpm=5))
    standin.fail_next(2, status=503)
    with pytest.raises(Exception, match="503"):
        lm("not recorded")
    (line,) = read_ledger(run_dir / "ledger.jsonl")
    assert (line["event"], line["kind"], line["error_type"], line["attempts"]) == ("error", "recorded",
                                                                                   "ServerError", 2)


def test_every_call_that_reached_the_limits_has_exactly_one_line(standin: GeminiStandin,
                                                                  tmp_path: Path) -> None:
    """Answered, failed, refused by the rate limit: three calls, three lines."""
    lm = build_lm(_config(standin, tmp_path, rate_limit_rpm=3, rate_limit_wait_s=0.0))
    lm("answered")
    standin.fail_next(2, status=429)
    with pytest.raises(Exception, match="429"):
        lm("failed")  # its retry takes the window's third slot
    with pytest.raises(Exception, match="rate limit"):
        lm("refused: the window is full and the wait is 0 s")
    assert [line["event"] for line in read_ledger(tmp_path / "ledger.jsonl")] == ["call", "error", "refused"]


SUITE = FULL_WINDOW_IN_SUITE + """
import dspy
import pytest


def test_fails_after_waiting(lm, lm_cost, monkeypatch):
    program = dspy.Predict("question -> answer")
    program(question="first?")
    env = lm_cost._environment
    fill_the_window_as_the_next_call_asks(monkeypatch)
    env._standin.fail_next(1, status=429)  # the in-process stand-in of a run without a key
    with pytest.raises(Exception, match="429"):
        program(question="second?")
    assert lm_cost.rate_limit_wait_s > 0


def test_no_lm():
    pass
"""


@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["one-process", "xdist"])
def test_the_summary_report_history_and_cost_report_count_a_failed_call_and_its_wait(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: tuple[str, ...]) -> None:
    for name in list(os.environ):
        if name.startswith("PROVISION_") or name in ("TEST_MODE", "GEMINI_TEST_API_KEY"):
            monkeypatch.delenv(name, raising=False)
    pytester.makefile(".toml", pyproject=(
        "[project]\nname = 'fails'\n[tool.pytest.ini_options]\naddopts = '-p no:cacheprovider'\n"
        "[tool.provisioner]\nlm.rate_limit_rpm = 1\nlm.max_tokens = 16\nlm.max_retries = 0\n"))
    pytester.makepyfile(test_fails=SUITE)
    result = pytester.runpytest_subprocess("--layer", "unit", "--lm", "real", "--provision-report", "r.json",
                                           *xdist)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["  LM errors: 1 (calls that raised an error*",
                                 "  1 call waited * s for the rate limit (1 rpm: lm.rate_limit_rpm)"])
    data = json.loads((pytester.path / "r.json").read_text())
    layer = data["layers"]["unit"]
    assert layer["lm_errors"] == 1 and layer["lm"]["errors"] == 1 and layer["lm_rate_limit_waits"] == 1
    rows = {t["node_id"]: t for t in data["tests"]}
    failing = rows["test_fails.py::test_fails_after_waiting"]
    assert failing["lm_errors"] == 1 and failing["lm_rate_limit_wait_s"] > 0
    assert rows["test_fails.py::test_no_lm"]["lm_errors"] == 0
    assert data["run"]["lm_errors"] == 1
    state = pytester.path / ".provision"
    with History(state / HISTORY_FILE) as db:
        (run,) = db.runs()
        stored = {t["node_id"]: t["lm_errors"] for t in db.tests(run["run_id"])}
    assert run["lm_errors"] == 1 and stored["test_fails.py::test_fails_after_waiting"] == 1
    env = {"PROVISION_STATE_DIR": str(state)}
    shown = CliRunner().invoke(main, ["history", "show", run["run_id"]], env=env, terminal_width=250)
    assert shown.exit_code == 0 and "LM errors" in shown.output, shown.output
    row = next(line for line in shown.output.splitlines() if "test_fails_after_waiting" in line)
    assert row.split()[6] == "1", row  # outcome, duration, wait, billed, calls, refused, errors
    costs = CliRunner().invoke(main, ["cost", "report", "--run", run["run_id"]], env=env, terminal_width=250)
    assert costs.exit_code == 0 and "1 call failed (RateLimitError 1)" in costs.output, costs.output


def test_the_cost_report_names_calls_outside_any_test_so(standin: GeminiStandin, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A script's calls (no test id) were listed as a test called "None"."""
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    build_lm(_config(standin, tmp_path))("from a script")
    report = cost_report([tmp_path / "ledger.jsonl"])
    assert list(report.by_test) == ["(outside any test)"]
    assert "None" not in format_cost_report(report)
