"""The time a call waited for a slot of the run's rate limit (``lm.rate_limit_rpm``) is recorded and
shown wherever calls are counted: the call's ledger line (``rate_limit_wait_s``), the process counters
and a worker's tally, the pytest summary ("N calls waited X s for the rate limit (R rpm:
lm.rate_limit_rpm)"), the JSON report, the run history (``history show``) and the report page's
slowest-tests table. A user's trial: a stand-in run spent 137 s waiting for 10 rpm, and every view
called its tests slow."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from provisioner.cli import main
from provisioner.lm import build_lm, stats
from provisioner.lm.ledger import cost_report, format_cost_report, read_ledger
from provisioner.lm.limits import RunLimits
from provisioner.lm.standin import GeminiStandin
from provisioner.lmconfig import LMConfig

from .conftest import FULL_WINDOW_IN_SUITE, STANDIN_KEY, fill_the_window_as_the_next_call_asks, real_mode_run

pytest_plugins = ["pytester"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_slot_taken_at_once_waited_nothing_and_one_after_a_full_window_says_how_long(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    limits = RunLimits(tmp_path, rpm=2, cost_limit_usd=1.0, clock=clock, sleep=clock.sleep)
    assert limits.acquire_request_timed() == (1000.0, 0.0)
    clock.now += 10
    assert limits.acquire_request_timed() == (1010.0, 0.0)
    clock.now += 5  # both slots used: the next frees when the first is 60 s old, at 1060
    start, waited = limits.acquire_request_timed()
    assert (start, waited) == (1060.0, 45.0)


def test_a_refusal_after_waiting_says_how_long_it_waited(tmp_path: Path) -> None:
    from provisioner.errors import RateLimitExceeded

    clock = FakeClock()
    limits = RunLimits(tmp_path, rpm=1, cost_limit_usd=1.0, wait_s=30, clock=clock, sleep=clock.sleep)
    limits.acquire_request()
    with pytest.raises(RateLimitExceeded) as info:
        limits.acquire_request()  # the next slot is 60 s away: refused at once, no wait
    assert info.value.waited_s == 0.0


def test_a_call_that_waited_for_the_rate_limit_says_so_in_its_ledger_line_and_counters(
    standin: GeminiStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = LMConfig.model_validate({"mode": "real", "api_key": STANDIN_KEY, "base_url": standin.url,
                                      "run_dir": tmp_path, "rate_limit_rpm": 1, "run_id": "run-w",
                                      "endpoint_kind": "standin", "max_tokens": 16})
    lm = build_lm(config)
    before = stats()
    lm("no wait")
    fill_the_window_as_the_next_call_asks(monkeypatch, 0.3)
    started = time.monotonic()
    lm("waits for the slot")
    elapsed = time.monotonic() - started
    calls = [line for line in read_ledger(tmp_path / "ledger.jsonl") if line["event"] == "call"]
    assert calls[0]["rate_limit_wait_s"] == 0
    assert 0 < calls[1]["rate_limit_wait_s"] <= elapsed + 0.001
    delta = stats() - before
    assert delta.rate_limit_waits == 1
    assert delta.rate_limit_wait_s == pytest.approx(calls[1]["rate_limit_wait_s"], abs=0.001)
    report = cost_report([tmp_path / "ledger.jsonl"])
    assert report.total.rate_limit_waits == 1
    assert "1 call waited" in format_cost_report(report)


def test_a_cassette_recording_that_waited_for_the_rate_limit_says_so_in_its_ledger_line(
    standin: GeminiStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    config = LMConfig.model_validate({"mode": "cached", "cache_dir": tmp_path / "cassettes",
                                      "api_key": STANDIN_KEY, "base_url": standin.url, "run_dir": run_dir,
                                      "rate_limit_rpm": 1,
                                      "run_id": "run-c", "endpoint_kind": "standin", "max_tokens": 16})
    lm = build_lm(config)
    lm("recorded at once")
    fill_the_window_as_the_next_call_asks(monkeypatch, 0.3)
    before = stats()
    lm("recorded after a wait")
    recorded = [line for line in read_ledger(run_dir / "ledger.jsonl") if line["event"] == "call"]
    assert [line["kind"] for line in recorded] == ["recorded", "recorded"]
    assert recorded[0]["rate_limit_wait_s"] == 0 and recorded[1]["rate_limit_wait_s"] > 0
    assert (stats() - before).rate_limit_waits == 1


SUITE = FULL_WINDOW_IN_SUITE + """
import dspy


def test_waits(lm, lm_cost, monkeypatch):
    program = dspy.Predict("question -> answer")
    program(question="first?")
    fill_the_window_as_the_next_call_asks(monkeypatch)
    program(question="second?")
    assert lm_cost.rate_limit_wait_s > 0
"""
@pytest.mark.usefixtures("no_settings_env")
@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["one-process", "xdist"])
def test_the_summary_report_history_and_page_say_how_long_calls_waited_for_the_rate_limit(
    pytester: pytest.Pytester, xdist: tuple[str, ...]
) -> None:
    result, data, run, tests = real_mode_run(
        pytester, "waits", "lm.rate_limit_rpm = 1\nlm.max_tokens = 16\n", SUITE, xdist)
    result.stdout.fnmatch_lines(["  1 call waited * s for the rate limit (1 rpm: lm.rate_limit_rpm)"])
    layer = data["layers"]["unit"]
    assert layer["lm_rate_limit_waits"] == 1 and layer["lm_rate_limit_wait_s"] > 0
    waited = {t["node_id"]: t["lm_rate_limit_wait_s"] for t in data["tests"]}
    assert waited["test_other.py::test_no_lm"] == 0 and waited["test_waits_suite.py::test_waits"] > 0
    assert data["run"]["lm_rate_limit_wait_s"] == pytest.approx(waited["test_waits_suite.py::test_waits"])
    rows = {node_id: t["lm_rate_limit_wait_s"] for node_id, t in tests.items()}
    assert rows == pytest.approx(waited) and run["lm_rate_limit_wait_s"] > 0
    env = {"PROVISION_STATE_DIR": str(pytester.path / ".provision")}
    shown = CliRunner().invoke(main, ["history", "show", run["run_id"]], env=env, terminal_width=250)
    assert shown.exit_code == 0 and "rate-limit wait s" in shown.output, shown.output
    assert "LM calls waited" in shown.output and "for the rate limit" in shown.output, shown.output
    html = CliRunner().invoke(main, ["report", "html", "--out", str(pytester.path / "page")], env=env)
    assert html.exit_code == 0, html.output
    text = (pytester.path / "page" / "index.html").read_text()
    slowest = text.split('id="slowest"', 1)[1].split("</table>", 1)[0]
    assert "of which rate-limit wait s" in slowest
    cell = slowest.split("test_waits", 1)[1].split('data-rate-limit-wait-s="', 1)[1]
    wait_of = float(cell.split('"', 1)[0])
    assert wait_of == pytest.approx(waited["test_waits_suite.py::test_waits"], abs=0.001)
    page = CliRunner().invoke(main, ["report", "markdown"], env=env)
    assert page.exit_code == 0 and "of which rate-limit wait s" in page.output, page.output
