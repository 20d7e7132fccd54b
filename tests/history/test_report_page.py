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
            charts: document.querySelectorAll('figure svg').length,
            failures: document.querySelector('#last-failures').textContent,
        }))()""")
        shot = browser.screenshot(session, tmp_path / "report.png")
        errors = browser.console_errors()
        requests = [u for u in browser.requests() if not u.startswith(("file:", "data:", "about:"))]
    assert seen["flaky"] == ["test_suite.py::test_flaky"]
    assert seen["strip"] == ["✓", "✗", "✓"]
    assert seen["runs"] == 3 and seen["charts"] >= 4
    assert "test_suite.py::test_broken" in seen["failures"]
    assert set(seen["perTest"]) == set(ledger.by_test)
    for node_id, totals in ledger.by_test.items():
        assert seen["perTest"][node_id] == pytest.approx(totals.cost_usd, rel=1e-6, abs=1e-10)
    assert sum(seen["months"]) == pytest.approx(ledger.total.cost_usd, rel=1e-6)
    assert errors == [] and requests == []
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
