"""pytest runs that use provisioner land in the history: per-test rows from every process, the flaky
test found (and only it), per-test cost equal to the run ledger's, nothing lost to a killed worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from provisioner.history.analysis import flaky_tests
from provisioner.history.store import HISTORY_FILE, History
from provisioner.lm.ledger import cost_report, ledger_sources

pytest_plugins = ["pytester"]


def test_every_run_and_test_is_recorded(three_runs: Path) -> None:
    with History(three_runs / ".provision" / HISTORY_FILE) as db:
        runs = db.runs()
        assert len(runs) == 3
        assert {r["revision"] for r in runs} == {runs[0]["revision"]} and runs[0]["revision"]
        assert "+dirty" not in str(runs[0]["revision"])
        oldest = runs[-1]
        tests = {t["node_id"]: t for t in db.tests(oldest["run_id"])}
        assert set(tests) == {f"test_suite.py::test_{n}" for n in ("answers", "flaky", "broken", "steady")}
        assert tests["test_suite.py::test_broken"]["outcome"] == "failed"
        assert tests["test_suite.py::test_flaky"]["outcome"] == "passed"
        assert tests["test_suite.py::test_answers"]["lm_real"] == 2
        assert (oldest["passed"], oldest["failed"]) == (3, 1)
        xdist_run = runs[1]
        assert {t["worker"] for t in db.tests(xdist_run["run_id"])} <= {"gw0", "gw1"}
        assert all(t["worker"] for t in db.tests(xdist_run["run_id"]))


def test_only_the_flaky_test_is_flagged(three_runs: Path) -> None:
    with History(three_runs / ".provision" / HISTORY_FILE) as db:
        runs = db.runs()
        found = flaky_tests(runs, db.test_rows(r["run_id"] for r in runs))
    assert [f.node_id for f in found] == ["test_suite.py::test_flaky"]
    assert [outcome for _, outcome in found[0].strip] == ["passed", "failed", "passed"]
    assert "passed and failed on revision" in found[0].reasons[0]


def test_a_dirty_work_tree_is_its_own_revision(three_runs: Path, tmp_path: Path) -> None:
    from provisioner.history.rows import git_revision

    clean, _branch = git_revision(three_runs)
    suite = three_runs / "test_suite.py"
    original = suite.read_text()
    try:
        suite.write_text(original + "\n# changed\n")
        dirty, _ = git_revision(three_runs)
        suite.write_text(original + "\n# changed differently\n")
        other, _ = git_revision(three_runs)
    finally:
        suite.write_text(original)
    assert dirty and other and clean
    assert dirty.startswith(clean + "+dirty.") and other.startswith(clean + "+dirty.") and dirty != other
    assert git_revision(tmp_path) == (None, None)


def test_per_test_cost_equals_the_ledger_and_reaches_json_and_junit(three_runs: Path) -> None:
    ledger = cost_report(ledger_sources(three_runs / ".provision"))
    assert ledger.total.cost_usd > 0
    with History(three_runs / ".provision" / HISTORY_FILE) as db:
        runs = db.runs()
        rows = db.test_rows(r["run_id"] for r in runs)
    by_test: dict[str, float] = {}
    for row in rows:
        by_test[row["node_id"]] = by_test.get(row["node_id"], 0.0) + row["cost_usd"]
    for node_id, totals in ledger.by_test.items():
        assert by_test[node_id] == pytest.approx(totals.cost_usd, rel=1e-6, abs=1e-9)
    assert sum(r["cost_usd"] for r in runs) == pytest.approx(ledger.total.cost_usd, rel=1e-6)
    report = json.loads((three_runs / "run0.json").read_text())
    assert report["run"]["run_id"] == runs[-1]["run_id"]
    answers = next(t for t in report["tests"] if t["node_id"].endswith("test_answers"))
    assert answers["cost_usd"] > 0 and answers["lm_real"] == 2
    xml = (three_runs / "run0.xml").read_text()
    assert '<property name="provision_lm_real" value="2" />' in xml
    assert f'<property name="provision_cost_usd" value="{answers["cost_usd"]}" />' in xml


def test_provision_costs_lists_the_most_expensive_tests_like_durations(three_runs: Path) -> None:
    for i in range(3):
        out = (three_runs / f"run{i}.out").read_text()
        section = out.split("2 most expensive tests (billed $, LM calls)", 1)[1].splitlines()
        lines = [line for line in section[1:3]]
        assert lines[0].endswith("test_suite.py::test_answers") and "2 LM calls (real 2)" in lines[0]
        assert lines[1].endswith("test_suite.py::test_steady") and "1 LM calls (real 1)" in lines[1]
        assert float(lines[0].split()[0].lstrip("$")) > float(lines[1].split()[0].lstrip("$")) > 0


PROJECT = """
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"
"""

CRASHING = """
import os
import pytest

@pytest.mark.unit
@pytest.mark.parametrize("n", range(6))
def test_fine(lm, n):
    assert lm("hello")[0]

@pytest.mark.unit
def test_kills_its_worker(lm):
    os._exit(3)
"""


def test_two_xdist_processes_and_a_killed_worker_lose_no_test_row(pytester: pytest.Pytester) -> None:
    for name in [n for n in os.environ if n.startswith("PROVISION_")]:
        pytester._monkeypatch.delenv(name)
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_crash=CRASHING)
    result = pytester.runpytest_subprocess("--layer", "unit", "-n", "2", "--provision-report", "r.json")
    assert result.ret == 1
    with History(pytester.path / ".provision" / HISTORY_FILE) as db:
        (run,) = db.runs()
        rows = {t["node_id"]: t for t in db.tests(run["run_id"])}
    assert len(rows) == 7
    assert rows["test_crash.py::test_kills_its_worker"]["outcome"] == "failed"
    assert all(rows[f"test_crash.py::test_fine[{n}]"]["outcome"] == "passed" for n in range(6))
    assert sum(rows[f"test_crash.py::test_fine[{n}]"]["lm_mock"] for n in range(6)) == 6
    assert (run["passed"], run["failed"]) == (6, 1)
