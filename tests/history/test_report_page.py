"""``provision report html|markdown`` on a real history (three runs of a suite with a flaky test),
the page checked in headless Chromium: the flaky row and only it, cost figures equal to the ledger's,
no console errors, no network request; a screenshot is saved under the test's tmp dir."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from provisioner.cli import main
from provisioner.history.analysis import month_costs
from provisioner.history.store import HISTORY_FILE, History
from provisioner.lm.ledger import cost_report, ledger_sources

from .chromium import CHROMIUM, Browser


def _cli(project: Path, *args: str) -> str:
    result = CliRunner().invoke(main, list(args), env={"PROVISION_STATE_DIR": str(project / ".provision")})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_the_page_in_headless_chromium(three_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert "wrote" in _cli(three_runs, "report", "html", "--out", str(out))
    page = out / "index.html"
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text  # pygal's inline config script is dropped: the page has no JS at all
    remote = r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import"""
    assert not re.search(remote, text)
    if shutil.which(CHROMIUM) is None:
        pytest.fail("Debian's chromium is missing: run `bash .ci/setup` (it installs it)")
    ledger = cost_report(ledger_sources(three_runs / ".provision"))
    with Browser(tmp_path / "profile") as browser:
        session = browser.open(page.as_uri())
        seen = browser.evaluate(session, """(() => ({
            flaky: [...document.querySelectorAll('#flaky [data-node-id]')].map(e => e.dataset.nodeId),
            strip: [...document.querySelectorAll('#flaky .strip span')].map(e => e.textContent),
            perTest: Object.fromEntries([...document.querySelectorAll('#cost-per-test tbody tr')].map(
                tr => [tr.querySelector('[data-node-id]').dataset.nodeId,
                       Number(tr.querySelector('[data-cost-usd]').dataset.costUsd)])),
            months: [...document.querySelectorAll('#months [data-cost-usd]')].map(
                e => Number(e.dataset.costUsd)),
            runs: document.querySelectorAll('#runs tbody tr').length,
            runsHead: [...document.querySelectorAll('#runs thead th')].map(th => th.textContent),
            refused: Object.fromEntries([...document.querySelectorAll('#runs tbody tr')].map(
                tr => [tr.cells[0].textContent, Number(tr.querySelector('[data-lm-refused]').textContent)])),
            charts: document.querySelectorAll('figure svg').length,
            failures: document.querySelector('#last-failures').textContent,
        }))()""")
        shot = browser.screenshot(session, tmp_path / "report.png")
        errors = browser.console_errors()
        requests = [u for u in browser.requests() if not u.startswith(("file:", "data:", "about:"))]
    assert seen["flaky"] == ["test_suite.py::test_flaky"]
    assert seen["strip"] == ["✓", "✗", "✓"]
    assert seen["runs"] == 3 and seen["charts"] >= 4
    # The runs table has the refused-calls column `history list` shows, with the history's counts.
    assert seen["runsHead"][seen["runsHead"].index("LM calls") + 1] == "LM refused"
    with History(three_runs / ".provision" / HISTORY_FILE) as db:
        assert seen["refused"] == {run["run_id"]: run["lm_refused"] for run in db.runs()}
    assert "test_suite.py::test_broken" in seen["failures"]
    assert set(seen["perTest"]) == set(ledger.by_test)
    for node_id, totals in ledger.by_test.items():
        assert seen["perTest"][node_id] == pytest.approx(totals.cost_usd, rel=1e-6, abs=1e-10)
    assert sum(seen["months"]) == pytest.approx(ledger.total.cost_usd, rel=1e-6)
    assert errors == [] and requests == []
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_stand_in_calls_show_at_0_with_their_list_price_in_headless_chromium(standin_run: Path,
                                                                            tmp_path: Path) -> None:
    """A run whose real-mode calls the Gemini stand-in answered: the page bills them $0 and shows their
    list price (what the run's cost limit counted), both equal to the ledger's."""
    out = tmp_path / "report"
    _cli(standin_run, "report", "html", "--out", str(out))
    ledger = cost_report(ledger_sources(standin_run / ".provision"))
    assert ledger.total.standin_calls == 3 and ledger.total.cost_usd == 0
    assert ledger.total.standin_list_cost_usd > 0
    if shutil.which(CHROMIUM) is None:
        pytest.fail("Debian's chromium is missing: run `bash .ci/setup` (it installs it)")
    with Browser(tmp_path / "profile") as browser:
        session = browser.open((out / "index.html").as_uri())
        seen = browser.evaluate(session, """(() => {
            const p = document.querySelector('#standin');
            const rows = [...document.querySelectorAll('#cost-per-test tbody tr')];
            return {
                standin: p && {calls: Number(p.dataset.standinCalls), billed: Number(p.dataset.costUsd),
                               list: Number(p.dataset.listCostUsd), text: p.textContent},
                tiles: Object.fromEntries([...document.querySelectorAll('.tile')].map(
                    t => [t.dataset.name, t.querySelector('b').textContent])),
                perTest: Object.fromEntries(rows.map(tr => [
                    tr.querySelector('[data-node-id]').dataset.nodeId, {
                    billed: Number(tr.querySelector('[data-cost-usd]').dataset.costUsd),
                    list: Number(tr.querySelector('[data-list-cost-usd]').dataset.listCostUsd),
                    standin: Number(tr.querySelector('[data-standin-calls]').dataset.standinCalls)}])),
            };
        })()""")
        browser.screenshot(session, tmp_path / "standin.png")
        errors = browser.console_errors()
        requests = [u for u in browser.requests() if not u.startswith(("file:", "data:", "about:"))]
    assert seen["standin"] is not None, "the last run's stand-in calls are not on the page"
    assert seen["standin"]["calls"] == 3 and seen["standin"]["billed"] == 0
    assert seen["standin"]["list"] == pytest.approx(ledger.total.standin_list_cost_usd, rel=1e-6)
    assert "billed $0" in seen["standin"]["text"]
    assert seen["tiles"]["cost"] == "$0.0000"
    assert set(seen["perTest"]) == set(ledger.by_test) == {"test_suite.py::test_answers",
                                                           "test_suite.py::test_steady"}
    for node_id, totals in ledger.by_test.items():
        row = seen["perTest"][node_id]
        assert row["billed"] == 0 and row["standin"] == totals.standin_calls > 0
        assert row["list"] == pytest.approx(totals.standin_list_cost_usd, rel=1e-6) and row["list"] > 0
    assert errors == [] and requests == []
    markdown = _cli(standin_run, "report", "markdown")
    listed = ledger.total.standin_list_cost_usd
    shown = f"${listed:.6f}" if listed < 0.01 else f"${listed:.4f}"
    assert f"3 LM calls were answered by the Gemini stand-in: billed $0; {shown} at list prices" in markdown


def test_markdown_summary_has_the_headline_and_the_flaky_test(three_runs: Path) -> None:
    text = _cli(three_runs, "report", "markdown")
    assert text.startswith("## provisioner: run `r")
    assert "**3 passed, 1 failed, 0 errors, 0 skipped** of 4 tests" in text
    assert "### Flaky tests (1, last 3 runs)" in text and "`test_suite.py::test_flaky`" in text
    assert "| `test_suite.py::test_broken` | failed |" in text


def test_history_list_and_show(three_runs: Path) -> None:
    runs = json.loads(_cli(three_runs, "history", "list", "--json"))
    assert len(runs) == 3
    shown = json.loads(_cli(three_runs, "history", "show", runs[0]["run_id"], "--json"))
    assert len(shown["tests"]) == 4
    assert runs[0]["run_id"] in _cli(three_runs, "history", "list")


def test_month_forecast_is_linear_in_the_elapsed_month() -> None:
    run = {"started_at": "2026-11-10T00:00:00+00:00", "cost_usd": 3.0}
    (month,) = month_costs([run], 10.0, now=dt.datetime(2026, 11, 16, tzinfo=dt.UTC))  # type: ignore[list-item]
    assert month.cost_usd == 3.0 and month.forecast_usd == pytest.approx(3.0 / (15 / 30))
    assert not month.over_budget
    (past,) = month_costs([run], 1.0, now=dt.datetime(2027, 1, 1, tzinfo=dt.UTC))  # type: ignore[list-item]
    assert past.forecast_usd == 3.0 and past.over_budget


def test_a_failed_tests_saved_worker_log_tail_is_on_the_page(tmp_path: Path) -> None:
    from provisioner.history.rows import empty_test_row
    from provisioner.history.store import History
    from provisioner.reporting.dashboard import LOG_TAIL_LINES, gather
    from provisioner.reporting.html import render

    from .test_store import run_row

    log = tmp_path / "runs" / "r1" / "logs" / "prov-r1-main-1-d1-w0.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i} <b>\n" for i in range(30)))
    failed = empty_test_row("r1", "t.py::test_fails", "integration")
    failed.update(outcome="failed", log_path=f"{log}; {tmp_path / 'gone.log'}",
                  retained="prov-r1-main-1-d1-w0")
    passed = empty_test_row("r1", "t.py::test_passes", "integration")
    passed["log_path"] = str(log)  # a passed test's log is not shown
    with History(tmp_path / "history.sqlite") as db:
        db.record(run_row("r1", "2026-11-01T00:00:00+00:00", failed=1, retained=["container prov-r1"]),
                  [failed, passed])
        board = gather(db)
    assert board.log_tails == {str(log): [f"line {i} <b>" for i in range(30 - LOG_TAIL_LINES, 30)],
                               str(tmp_path / "gone.log"): []}
    page = render(board)
    failures = page.split('id="last-failures"', 1)[1].split("</table>", 1)[0]
    assert f'data-log-path="{log}"' in failures and "retained: <code>prov-r1-main-1-d1-w0</code>" in failures
    assert "line 29 &lt;b&gt;" in failures and "line 10 &lt;b&gt;" in failures
    assert "line 9 &lt;b&gt;" not in failures
    assert "(not on this machine, or empty)" in failures
