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

from .._helpers import clear_settings

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
        assert {t["xdist_worker"] for t in db.tests(xdist_run["run_id"])} <= {"gw0", "gw1"}
        assert all(t["xdist_worker"] for t in db.tests(xdist_run["run_id"]))


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


def test_report_json_rows_are_the_history_rows_and_import_merges_them(three_runs: Path,
                                                                     tmp_path: Path) -> None:
    """``--provision-report`` JSON carries the run row and per-test rows with exactly the history's
    fields and values; ``provision history import`` of the three reports (CI shards, artifacts) into an
    empty database gives the same history (again: replaced, not doubled); ``prune --keep`` bounds it."""
    from click.testing import CliRunner

    from provisioner.cli import main
    from provisioner.history.store import RUN_FIELDS, TEST_FIELDS

    with History(three_runs / ".provision" / HISTORY_FILE) as db:
        original = {r["run_id"]: (r, db.tests(r["run_id"])) for r in db.runs()}
    reports = [three_runs / f"run{i}.json" for i in range(3)]
    for path in reports:
        data = json.loads(path.read_text())
        assert list(data["run"]) == list(RUN_FIELDS)
        assert data["tests"] and all(list(row) == list(TEST_FIELDS) for row in data["tests"])
        run, tests = original[data["run"]["run_id"]]
        assert data["run"] == run and sorted(data["tests"], key=lambda t: t["node_id"]) == tests
    env = {"PROVISION_STATE_DIR": str(tmp_path / "merged")}
    runner = CliRunner()
    for _ in range(2):
        done = runner.invoke(main, ["history", "import", *map(str, reports)], env=env)
        assert done.exit_code == 0 and done.output.count("imported r") == 3, done.output
    with History(tmp_path / "merged" / HISTORY_FILE) as merged:
        runs = merged.runs()
        assert {r["run_id"]: (r, merged.tests(r["run_id"])) for r in runs} == original
        found = flaky_tests(runs, merged.test_rows(r["run_id"] for r in runs))
    assert [f.node_id for f in found] == ["test_suite.py::test_flaky"]
    done = runner.invoke(main, ["history", "prune", "--keep", "1"], env=env)
    assert done.exit_code == 0 and "deleted 2 runs, kept at most 1" in done.output, done.output
    with History(tmp_path / "merged" / HISTORY_FILE) as merged:
        (kept,) = merged.runs()
        assert kept["run_id"] == max(original, key=lambda k: original[k][0]["started_at"])
        assert len(merged.test_rows(original)) == 4  # the pruned runs' tests went with them
    done = runner.invoke(main, ["history", "prune", "--keep", "-1"], env=env)
    assert done.exit_code == 2 and "--keep" in done.output


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


@pytest.mark.slow
def test_two_xdist_processes_and_a_killed_worker_lose_no_test_row(pytester: pytest.Pytester) -> None:
    clear_settings(pytester._monkeypatch)
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


SESSION_SUITE = """
import pytest


@pytest.mark.unit
def test_on_a_session(bridge):
    bridge.create_program("question -> answer", "qa")
    assert bridge.execute_program("qa", {"question": "2+2?"})["outputs"]["answer"]
"""


def test_calls_made_for_a_session_are_the_tests_in_the_ledger_and_the_history(
    pytester: pytest.Pytester,
) -> None:
    """A bridge session's LM calls are booked under the session's id where the bridge runs (in-process
    here; in a worker container the same); the ledger's per-test report and the history name the
    test that opened the session — in real mode too (the stand-in answers: no key), not only cached."""
    clear_settings(pytester._monkeypatch)
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_session=SESSION_SUITE)
    result = pytester.runpytest_subprocess("--layer", "unit", "--lm", "real")
    assert result.ret == 0, result.stdout.str()[-3000:]
    ledger = cost_report(ledger_sources(pytester.path / ".provision"))
    assert set(ledger.by_test) == {"test_session.py::test_on_a_session"}
    assert ledger.by_test["test_session.py::test_on_a_session"].standin_calls == 1
    with History(pytester.path / ".provision" / HISTORY_FILE) as db:
        (run,) = db.runs()
        (row,) = db.tests(run["run_id"])
    assert row["lm_standin"] == 1 and row["cost_usd"] == 0 and row["list_cost_usd"] > 0


RERUN_SUITE = """
from pathlib import Path

import pytest

ATTEMPTS = Path(__file__).with_name("attempts.txt")


@pytest.mark.unit
def test_passes_on_rerun():
    attempt = int(ATTEMPTS.read_text()) + 1 if ATTEMPTS.exists() else 1
    ATTEMPTS.write_text(str(attempt))
    assert attempt >= 2, "the first attempt fails"


@pytest.mark.unit
def test_steady(lm):
    assert lm("hello")[0]
"""


@pytest.mark.parametrize("xdist", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["one-process", "xdist"])
def test_a_test_that_passed_on_a_rerun_is_one_row_with_its_reruns_and_flaky(
    pytester: pytest.Pytester, xdist: bool,
) -> None:
    """pytest-rerunfailures: the rerun attempts are counted on the test's one row (its last attempt's
    outcome and durations), the run row sums them, and the analysis flags the test as flaky."""
    clear_settings(pytester._monkeypatch)
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_rerun=RERUN_SUITE)
    args = ["-n", "2"] if xdist else []
    result = pytester.runpytest_subprocess("--layer", "unit", "--reruns", "2", *args)
    assert result.ret == 0 and result.parseoutcomes() == {"passed": 2, "rerun": 1}, result.stdout.str()
    with History(pytester.path / ".provision" / HISTORY_FILE) as db:
        (run,) = db.runs()
        rows = {t["node_id"]: t for t in db.tests(run["run_id"])}
    rerun = rows["test_rerun.py::test_passes_on_rerun"]
    assert (rerun["outcome"], rerun["reruns"]) == ("passed", 1)
    steady = rows["test_rerun.py::test_steady"]
    assert (steady["outcome"], steady["reruns"], steady["lm_mock"]) == ("passed", 0, 1)
    assert (run["tests"], run["passed"], run["failed"], run["reruns"]) == (2, 2, 0, 1)
    found = flaky_tests([run], list(rows.values()))  # type: ignore[arg-type]
    assert [(f.node_id, f.reasons) for f in found] == [("test_rerun.py::test_passes_on_rerun",
                                                        ["passed on rerun in 1 run"])]


def test_a_pytest_split_group_is_its_runs_shard_and_the_report_path_is_normalised(
    pytester: pytest.Pytester,
) -> None:
    """A user's trial: rows of `pytest --splits 2 --group 1` had shard None (the plugin knew the split:
    it gave the shard half the run's limits), and `--provision-report ../s2/unit.json` was said as
    `…/proj/../s2/unit.json`. PROVISION_SHARD, when set, still names the shard."""
    clear_settings(pytester._monkeypatch, also=lambda name: name.startswith("GITHUB_"))
    project = pytester.mkdir("proj")
    (project / "pyproject.toml").write_text("[project]\nname = 'split'\n")
    (project / "test_a.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    pytester.chdir()
    os.chdir(project)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--splits", "2", "--group", "1",
                                           "--provision-report", "../s2/unit.json")
    result.assert_outcomes(passed=1)
    written = (pytester.path / "s2" / "unit.json").resolve()
    result.stdout.fnmatch_lines([f"report written to {written}"])
    assert json.loads(written.read_text())["run"]["shard"] == "1/2"
    pytester._monkeypatch.setenv("PROVISION_SHARD", "unit-py3.11")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--splits", "2", "--group", "2",
                                           "--provision-report", "../s2/unit.json")
    result.assert_outcomes(passed=1)
    assert json.loads(written.read_text())["run"]["shard"] == "unit-py3.11"
