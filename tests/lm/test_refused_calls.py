"""A call the run's cost or rate limit refuses is counted where calls are counted: the ledger
(``"event": "refused"``), the process counters and a worker's tally (so an ``execute_program``
error reply carries it home), the pytest summary ("N calls refused (cost limit $X)"), the JSON
report, the run history (``lm_refused``: page and Markdown) and ``provision cost report``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from dspy.utils.exceptions import LMBillingError

from provisioner.cli import main
from provisioner.lm import build_lm, stats
from provisioner.lm.ledger import cost_report, format_cost_report, read_ledger
from provisioner.lm.standin import GeminiStandin
from provisioner.lmconfig import LMConfig

from .conftest import STANDIN_KEY, real_mode_run

pytest_plugins = ["pytester"]
LIMIT = 0.00002


def _config(standin: GeminiStandin, run_dir: Path, **updates: object) -> LMConfig:
    values: dict[str, object] = {"mode": "real", "api_key": STANDIN_KEY, "base_url": standin.url,
                                 "run_dir": run_dir, "rate_limit_rpm": 1000, "run_id": "run-r",
                                 "endpoint_kind": "standin", "max_tokens": 16}
    values.update(updates)
    return LMConfig.model_validate(values)


def _until_refused(lm: object, error: type[Exception]) -> int:
    sent = 0
    with pytest.raises(error):
        for i in range(50):
            lm(f"call {i}")  # type: ignore[operator]
            sent += 1
    return sent


def test_a_call_over_the_cost_limit_is_a_refused_line_and_counted(
    standin: GeminiStandin, tmp_path: Path
) -> None:
    before = stats()
    lm = build_lm(_config(standin, tmp_path, cost_limit_usd=LIMIT))
    sent = _until_refused(lm, LMBillingError)
    refused = [line for line in read_ledger(tmp_path / "ledger.jsonl") if line["event"] == "refused"]
    assert [(r["reason"], r["limit"]) for r in refused] == [("cost_limit", LIMIT)]
    delta = stats() - before
    assert (delta.refused_cost_limit, delta.refused_rate_limit, delta.calls) == (1, 0, sent)
    report = cost_report([tmp_path / "ledger.jsonl"])
    assert report.total.refused == {"cost_limit": 1} and report.total.calls == sent  # not a call
    text = format_cost_report(report)
    assert "1 call refused (cost limit $0.00002): the run's limits stopped it before it was sent" in text


def test_a_call_without_a_rate_limit_slot_is_counted_as_refused_by_the_rate_limit(
    standin: GeminiStandin, tmp_path: Path
) -> None:
    lm = build_lm(_config(standin, tmp_path, rate_limit_rpm=1, rate_limit_wait_s=0))
    assert _until_refused(lm, Exception) == 1
    report = cost_report([tmp_path / "ledger.jsonl"])
    assert report.total.refused == {"rate_limit": 1}
    assert "1 call refused (rate limit 1/min)" in format_cost_report(report)


def test_a_bridge_worker_s_refused_call_comes_home_in_the_error_reply(standin: GeminiStandin,
                                                                      tmp_path: Path) -> None:
    from provisioner.bridge.client import BridgeClient
    from provisioner.bridge.server import BridgeServer
    from provisioner.bridge.service import BridgeService
    from provisioner.errors import BridgeError

    server = BridgeServer(BridgeService(_config(standin, tmp_path, cost_limit_usd=0.0000001)))
    port = server.listen("127.0.0.1", 0)
    try:
        with BridgeClient("127.0.0.1", port) as client:
            session = client.session("s")
            session.create_program({"inputs": [{"name": "question"}], "outputs": [{"name": "answer"}]}, "qa")
            with pytest.raises(BridgeError) as info:
                session.execute_program("qa", {"question": "too dear?"})
    finally:
        server.request_stop()
        server.close(timeout=5)
    assert info.value.lm_usage is not None and info.value.lm_usage["refused_cost_limit"] >= 1


SUITE = """
import dspy
import pytest

def test_until_refused(lm, lm_cost):
    program = dspy.Predict("question -> answer")
    with pytest.raises(Exception, match="cost limit"):
        for i in range(50):
            program(question=f"question {i}?")
"""
@pytest.mark.usefixtures("no_settings_env")
@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["one-process", "xdist"])
def test_the_summary_report_history_and_cost_report_say_how_many_calls_were_refused(
    pytester: pytest.Pytester, xdist: tuple[str, ...]
) -> None:
    """A user's trial: a run whose calls the cost limit refused showed no trace of them anywhere."""
    result, data, run, tests = real_mode_run(
        pytester, "refused", f"lm.cost_limit_usd = {LIMIT}\nlm.max_tokens = 16\n", SUITE, xdist)
    result.stdout.fnmatch_lines(["  LM calls: * standin", "  1 call refused (cost limit $0.00002)"])
    assert data["layers"]["unit"]["lm"]["refused_cost_limit"] == 1 and data["run"]["lm_refused"] == 1
    assert data["layers"]["unit"]["lm_refused"] == 1
    # Per test: the one the limit stopped, not the other (the JSON report's rows are the history's).
    refused_by_test = {t["node_id"]: t["lm_refused"] for t in data["tests"]}
    assert refused_by_test == {"test_refused_suite.py::test_until_refused": 1,
                               "test_other.py::test_no_lm": 0}, data["tests"]
    rows = {node_id: t["lm_refused"] for node_id, t in tests.items()}
    assert run["lm_refused"] == 1 and rows == refused_by_test
    env = {"PROVISION_STATE_DIR": str(pytester.path / ".provision")}
    listed = CliRunner().invoke(main, ["history", "list"], env=env, terminal_width=200)
    assert listed.exit_code == 0 and "LM refused" in listed.output, listed.output
    assert re.search(rf"{re.escape(run['run_id'])} .* 1 +\S+ +\S", listed.output), listed.output
    shown = CliRunner().invoke(main, ["history", "show", run["run_id"]], env=env, terminal_width=250)
    assert re.search(r"\b1 +\S+ +test_refused_suite\.py::test_until_refused", shown.output), shown.output
    assert re.search(r"\b0 +\S+ +test_other\.py::test_no_lm", shown.output), shown.output
    report = CliRunner().invoke(main, ["cost", "report"], env=env)
    assert report.exit_code == 0 and "1 call refused (cost limit $0.00002)" in report.output, report.output
    page = CliRunner().invoke(main, ["report", "markdown"], env=env)
    assert page.exit_code == 0 and "**1 LM call refused**" in page.output, page.output
    html = CliRunner().invoke(main, ["report", "html", "--out", str(pytester.path / "page")], env=env)
    assert html.exit_code == 0, html.output
    text = (pytester.path / "page" / "index.html").read_text()
    assert 'data-lm-refused="1">1 LM call was refused by the run\'s cost or rate limit' in text
    runs_table = text.split('id="runs"', 1)[1].split("</table>", 1)[0]  # the column history list shows
    assert '<th class="n">LM refused</th>' in runs_table, runs_table
    assert 'data-lm-refused="1">1<' in runs_table, runs_table
    refused_table = text.split('id="refused-tests"', 1)[1].split("</table>", 1)[0]
    assert "test_until_refused" in refused_table and "test_no_lm" not in refused_table
    assert "| `test_refused_suite.py::test_until_refused` | 1 |" in page.output, page.output


def test_a_bridge_request_whose_call_waits_for_the_rate_limit_past_its_deadline_is_refused_not_sent(
    standin: GeminiStandin, tmp_path: Path
) -> None:
    """A user's trial: with the run's 10 requests/minute used up, execute_program waited for a slot
    (lm.rate_limit_wait_s: 120 s) past the request's deadline; the client got "no reply within 30 s"
    and the worker could still send (and bill) the call for nobody. Now the call is refused at once
    when no slot frees before the request's deadline, and the reply says so."""
    from provisioner.bridge.client import BridgeClient
    from provisioner.bridge.server import BridgeServer
    from provisioner.bridge.service import BridgeService
    from provisioner.errors import BridgeError

    config = _config(standin, tmp_path, rate_limit_rpm=1, rate_limit_wait_s=120)
    server = BridgeServer(BridgeService(config), request_timeout_s=20)
    port = server.listen("127.0.0.1", 0)
    signature = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer"}]}
    try:
        with BridgeClient("127.0.0.1", port, request_timeout=60) as client:
            session = client.session("s")
            session.create_program(signature, "qa")
            session.execute_program("qa", {"question": "the one call of this minute?"})
            sent = standin.request_count
            with pytest.raises(BridgeError) as info:
                session.execute_program("qa", {"question": "one more?"})
            assert info.value.error_type != "Timeout", info.value.message  # refused, not timed out
            assert "no free slot before the request's deadline (20 s, process_timeout)" in info.value.message
            assert "not sent" in info.value.message
            assert client.ping()["status"] == "ok"
    finally:
        server.request_stop()
        server.close(timeout=5)
    assert standin.request_count == sent  # nothing sent after the refusal, not even later
    assert info.value.lm_usage is not None and info.value.lm_usage["refused_rate_limit"] == 1
