"""Calls answered by the Gemini stand-in are not money (issue 9): marked in the ledger, $0 in reports,
the pytest summary and against the monthly budget — while the run's cost limit still counts them at
list prices, so limits are testable offline. A base_url alone never makes an endpoint a stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from dspy.utils.exceptions import LMBillingError

from provisioner.cli import main
from provisioner.lm import build_lm, stats
from provisioner.lm.ledger import cost_report, format_cost_report, ledger_sources, read_ledger
from provisioner.lm.standin import GeminiStandin
from provisioner.lmconfig import LMConfig

from .._helpers import clear_settings
from .conftest import STANDIN_KEY

pytest_plugins = ["pytester"]


def _config(standin: GeminiStandin, run_dir: Path, **updates: object) -> LMConfig:
    values: dict[str, object] = {"mode": "real", "api_key": STANDIN_KEY, "base_url": standin.url,
                                 "run_dir": run_dir, "rate_limit_rpm": 1000, "run_id": "run-s"}
    values.update(updates)
    return LMConfig.model_validate(values)


def test_standin_calls_are_marked_and_cost_nothing(standin: GeminiStandin, tmp_path: Path) -> None:
    before = stats()
    lm = build_lm(_config(standin, tmp_path, endpoint_kind="standin"))
    lm("hi")
    lm("there")
    lines = read_ledger(tmp_path / "ledger.jsonl")
    assert [line["endpoint"] for line in lines] == ["standin", "standin"]
    assert all(line["kind"] == "real" and line["cost_usd"] == 0 for line in lines)
    assert all(line["list_cost_usd"] > 0 for line in lines)
    delta = stats() - before
    assert (delta.real, delta.standin, delta.calls, delta.cost_usd) == (0, 2, 2, 0)  # standin, not real
    assert delta.list_cost_usd == pytest.approx(sum(line["list_cost_usd"] for line in lines))


def test_a_base_url_alone_is_billed_as_gemini(standin: GeminiStandin, tmp_path: Path) -> None:
    build_lm(_config(standin, tmp_path))("hi")  # endpoint_kind defaults to "gemini"
    (line,) = read_ledger(tmp_path / "ledger.jsonl")
    assert line["endpoint"] == "gemini" and line["cost_usd"] == line["list_cost_usd"] > 0


def test_the_run_cost_limit_counts_standin_calls_at_list_prices(standin: GeminiStandin,
                                                                tmp_path: Path) -> None:
    lm = build_lm(_config(standin, tmp_path, endpoint_kind="standin", cost_limit_usd=0.00002, max_tokens=16))
    sent = 0
    with pytest.raises(LMBillingError, match="cost limit"):
        for i in range(50):
            lm(f"call {i}")
            sent += 1
    assert 1 <= sent < 50 and standin.request_count == sent
    lines = [line for line in read_ledger(tmp_path / "ledger.jsonl") if line["event"] == "call"]  # + refused
    assert sum(line["cost_usd"] for line in lines) == 0  # billed nothing, yet the limit held
    assert sum(line["list_cost_usd"] for line in lines) > 0.00002 - 0.00001


def test_cost_report_totals_of_a_standin_run_are_zero(standin: GeminiStandin, tmp_path: Path) -> None:
    state = tmp_path / ".provision"
    run_dir = state / "runs" / "run-s" / "lm"
    lm = build_lm(_config(standin, run_dir, endpoint_kind="standin"))
    for i in range(3):
        lm(f"q{i}")
    report = cost_report(ledger_sources(state), monthly_budget_usd=0.0)
    assert report.total.calls == 3 and report.total.cost_usd == 0
    assert report.total.standin_calls == 3 and report.total.standin_list_cost_usd > 0
    assert report.total.by_kind == {"standin": 3}  # not "real": nothing was billed
    assert report.over_budget_months == []  # the stand-in never spends the monthly budget
    text = format_cost_report(report)
    assert "3 calls were answered by the Gemini stand-in: billed $0" in text and "WARNING" not in text
    runner = CliRunner()
    result = runner.invoke(main, ["cost", "report", "--json"], env={"PROVISION_STATE_DIR": str(state)})
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["total"]["cost_usd"] == 0 and data["total"]["standin_calls"] == 3


SUITE = """
import dspy

def test_two_calls(lm, lm_cost):
    program = dspy.Predict("question -> answer")
    program(question="one?")
    program(question="two?")
    assert lm_cost.standin == 2 and lm_cost.real == 0 and lm_cost.calls == 2
    assert lm_cost.cost_usd == 0 and lm_cost.list_cost_usd > 0
"""


def test_pytest_summary_and_report_say_standin_calls_are_not_billed(pytester: pytest.Pytester,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings(monkeypatch)
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\naddopts = '-p no:cacheprovider'\n")
    pytester.makepyfile(test_standin_suite=SUITE)
    result = pytester.runpytest_subprocess("--layer", "unit", "--lm", "real", "--provision-report", "r.json")
    result.assert_outcomes(passed=1)
    # The reported wording was "LM calls (real): 4 … 4 real", "cost: $0.0000 of the run's $1.00 limit"
    # and "Gemini stand-in: 4 calls, not billed (… counted against the run's limit; $0 against …)";
    # the count is labelled by what answered, not by the layer's mode (it said "(real)").
    result.stdout.fnmatch_lines(["  LM calls: 2 — 0 mock, 0 replayed, 0 recorded, 0 real, 2 standin",
                                 "  Gemini stand-in: 2 calls, $0 billed ($0.0000* at list prices counted "
                                 "against the run's $*.** limit)"])
    assert "cost: $0.0000" not in result.stdout.str() and "not billed" not in result.stdout.str()
    data = json.loads((pytester.path / "r.json").read_text())
    section = data["layers"]["unit"]
    assert section["lm"]["real"] == 0 and section["lm"]["calls"] == 2
    assert section["lm"]["standin"] == 2 and section["cost_usd"] == 0 and section["lm"]["list_cost_usd"] > 0
    assert data["run_cost_usd"] == 0
    report = CliRunner().invoke(main, ["cost", "report", "--json"],
                                env={"PROVISION_STATE_DIR": str(pytester.path / ".provision")})
    assert report.exit_code == 0, report.output
    assert json.loads(report.output)["total"]["cost_usd"] == 0


def test_one_standin_call_is_one_call_in_the_cost_report(standin: GeminiStandin, tmp_path: Path) -> None:
    """A user's trial: `provision cost report` said "stand-in: 1 calls"."""
    state = tmp_path / ".provision"
    build_lm(_config(standin, state / "runs" / "run-1" / "lm", endpoint_kind="standin"))("q")
    text = format_cost_report(cost_report(ledger_sources(state), monthly_budget_usd=0.0))
    assert "stand-in: 1 call, $0 billed" in text and "1 call was answered by the Gemini stand-in" in text
    assert "1 calls" not in text
