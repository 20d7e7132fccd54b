"""The history database: schema version and migrations, WAL, whole-run writes, prune, import."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from provisioner.cli import main
from provisioner.errors import HistoryError
from provisioner.history import store
from provisioner.history.rows import empty_test_row
from provisioner.history.store import History, rows_from_report


def run_row(run_id: str, started_at: str, **changes: Any) -> Any:
    row: dict[str, Any] = {name: 0 for name in store.RUN_FIELDS}
    row.update(run_id=run_id, started_at=started_at, finished_at=started_at, duration_s=1.5, project="p",
               revision="abc", branch="main", host="h", ci_job=None, shard=None, layers=["unit"],
               cost_usd=0.25, list_cost_usd=0.25, retained=[])
    row.update(changes)
    return row


def test_new_database_is_wal_at_the_current_schema_version(tmp_path: Path) -> None:
    with History(tmp_path / "h" / "history.sqlite") as db:
        assert db.schema_version == store.SCHEMA_VERSION >= 1
    raw = sqlite3.connect(tmp_path / "h" / "history.sqlite")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migrations_upgrade_an_older_database_in_place(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "history.sqlite"
    with History(path) as db:
        db.record(run_row("r1", "2026-11-01T00:00:00+00:00"), [])
    extra = "ALTER TABLE runs ADD COLUMN note TEXT; CREATE INDEX runs_note ON runs (note)"
    monkeypatch.setattr(store, "MIGRATIONS", (*store.MIGRATIONS, extra))
    monkeypatch.setattr(store, "SCHEMA_VERSION", len(store.MIGRATIONS))
    with History(path) as db:
        assert db.schema_version == store.SCHEMA_VERSION
        assert [r["run_id"] for r in db.runs()] == ["r1"]  # data kept
    columns = [c[1] for c in sqlite3.connect(path).execute("PRAGMA table_info(runs)")]
    assert "note" in columns


def test_a_newer_database_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    History(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(HistoryError, match=r"newer than this provisioner's.*upgrade provisioner"):
        History(path)


def test_not_a_database_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    path.write_text("hello, not sqlite" * 100)
    with pytest.raises(HistoryError, match="not a provisioner history database"):
        History(path)


def test_record_replaces_a_run_and_its_tests_and_prune_keeps_the_newest(tmp_path: Path) -> None:
    with History(tmp_path / "history.sqlite") as db:
        for i in range(5):
            run_id = f"r{i}"
            tests = [empty_test_row(run_id, f"t.py::test_{n}", "unit") for n in range(3)]
            db.record(run_row(run_id, f"2026-11-0{i + 1}T00:00:00+00:00"), tests)
        db.record(run_row("r4", "2026-11-05T00:00:00+00:00", failed=1),
                  [empty_test_row("r4", "t.py::test_0", "unit")])
        assert len(db.tests("r4")) == 1 and db.run("r4")["failed"] == 1  # type: ignore[index]
        assert [r["run_id"] for r in db.runs()] == ["r4", "r3", "r2", "r1", "r0"]
        assert db.prune(2) == 3
        assert [r["run_id"] for r in db.runs()] == ["r4", "r3"]
        assert db.test_rows(["r0", "r1", "r2"]) == []  # their tests went with them


def test_a_row_missing_a_field_writes_nothing(tmp_path: Path) -> None:
    with History(tmp_path / "history.sqlite") as db:
        bad = empty_test_row("r1", "t.py::test", "unit")
        del bad["xdist_worker"]  # type: ignore[misc]
        with pytest.raises(HistoryError, match="missing field 'xdist_worker'"):
            db.record(run_row("r1", "2026-11-01T00:00:00+00:00"), [bad])
        assert db.runs() == []


def test_run_prefix_and_ambiguity(tmp_path: Path) -> None:
    with History(tmp_path / "history.sqlite") as db:
        db.record(run_row("r20261101-a", "2026-11-01T00:00:00+00:00"), [])
        db.record(run_row("r20261102-b", "2026-11-02T00:00:00+00:00"), [])
        assert db.run("r20261102")["run_id"] == "r20261102-b"  # type: ignore[index]
        assert db.run("zzz") is None
        with pytest.raises(HistoryError, match="ambiguous"):
            db.run("r2026")


def test_import_checks_every_file_first(tmp_path: Path) -> None:
    state = tmp_path / ".provision"
    good = tmp_path / "good.json"
    tests = [dict(empty_test_row("r-ci", "t.py::test", "unit"))]
    good.write_text(json.dumps({"run": run_row("r-ci", "2026-11-03T00:00:00+00:00"), "tests": tests}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema_version": 1, "run_id": "x", "layers": {}}))
    runner = CliRunner()
    env = {"PROVISION_STATE_DIR": str(state)}
    result = runner.invoke(main, ["history", "import", str(good), str(old)], env=env)
    assert result.exit_code == 1 and "old.json: no 'run' object" in result.output
    result = runner.invoke(main, ["history", "list", "--json"], env=env)
    assert json.loads(result.output) == []  # nothing imported
    result = runner.invoke(main, ["history", "import", str(good)], env=env)
    assert result.exit_code == 0, result.output
    shown = json.loads(runner.invoke(main, ["history", "show", "r-ci", "--json"], env=env).output)
    assert shown["run"]["run_id"] == "r-ci" and [t["node_id"] for t in shown["tests"]] == ["t.py::test"]
    result = runner.invoke(main, ["history", "show", "nope"], env=env)
    assert result.exit_code == 2 and "nope" in result.output


def test_rows_from_report_names_the_missing_field() -> None:
    run = run_row("r1", "2026-11-01T00:00:00+00:00")
    del run["host"]
    with pytest.raises(HistoryError, match=r"x\.json: run row misses field 'host'"):
        rows_from_report({"run": run, "tests": []}, "x.json")


def test_rows_take_the_ledgers_numbers_at_the_end_of_the_run(tmp_path: Path) -> None:
    """The case from examples/qa_project's e2e layer under load: the client timed out, the worker
    finished the stand-in call after the test's teardown had read the ledger, so the row said 0 calls
    while `provision cost report` gave the test 1. At the end of the run the rows are set from the
    ledger (a session's lines are its test's), and they sum to it; mock counts stay the test's own."""
    from provisioner.history.rows import apply_ledger
    from provisioner.lm.ledger import Ledger, current_test, note_session_test, usage_by_test

    lm_dir = tmp_path / "runs" / "r1" / "lm"
    test, other, session = "t.py::test_timed_out", "t.py::test_other", "session_r1_main_1_1_abc"
    note_session_test(lm_dir, session, test)
    ledger = Ledger(lm_dir, run_id="r1", layer="e2e")
    calls = ((session, "real", "standin"), (other, "real", None), (other, "replayed", None))
    for owner, kind, endpoint in calls:
        with current_test(owner):
            ledger.call(model="gemini-2.5-flash-lite", kind=kind, input_tokens=100, output_tokens=10,
                        cost_usd=0.001, endpoint=endpoint)
    ledger.close()
    rows = [empty_test_row("r1", test, "e2e"), empty_test_row("r1", other, "e2e"),
            empty_test_row("r1", "t.py::test_mock", "e2e")]
    rows[2]["lm_mock"] = 3
    by_test = usage_by_test(lm_dir)
    assert by_test is not None and usage_by_test(tmp_path / "nothing") is None
    apply_ledger(rows, by_test)
    timed_out, rest, mock = rows
    assert (timed_out["lm_standin"], timed_out["lm_real"], timed_out["cost_usd"]) == (1, 0, 0.0)
    assert timed_out["list_cost_usd"] == pytest.approx(0.001)
    assert (rest["lm_real"], rest["lm_replayed"], rest["cache_hits"]) == (1, 1, 1)
    assert rest["cost_usd"] == pytest.approx(0.002)
    assert (mock["lm_mock"], mock["cost_usd"], mock["lm_real"]) == (3, 0.0, 0)


def test_ci_job_and_shard_come_from_the_ci_variables() -> None:
    from provisioner.history.rows import ci_identity

    github = {"GITHUB_RUN_ID": "123", "GITHUB_JOB": "tests", "PROVISION_SHARD": "integration-2"}
    assert ci_identity(github) == ("123/tests", "integration-2")
    assert ci_identity({"GITHUB_RUN_ID": "123"}) == ("123", None)
    assert ci_identity({"CI_JOB_ID": "77"}) == ("77", None)
    assert ci_identity({}) == (None, None)


# --- "worker" was pytest-xdist's worker id: the field is xdist_worker; old files still read ------

V1_TEST_ROW = ("r-old", "t.py::test_a", "unit", "failed", 0, None, 0.1, 0.2, 0.3, "gw1", 0, 0, 0, 0, 0,
               0.0, 0.0, 0, 0, "[]", None, None)


def test_a_version_1_database_is_migrated_and_keeps_the_xdist_worker_of_each_test(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    raw = sqlite3.connect(path)
    raw.executescript(store.MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    later = ("lm_refused", "lm_rate_limit_wait_s", "lm_errors")  # columns of migrations 3, 5 and 6
    run = {k: v for k, v in run_row("r-old", "2026-11-01T00:00:00+00:00").items() if k not in later}
    raw.execute(f"INSERT INTO runs ({', '.join(run)}) VALUES ({', '.join('?' for _ in run)})",
                [json.dumps(v) if k in ("layers", "retained") else v for k, v in run.items()])
    raw.execute(f"INSERT INTO tests VALUES ({', '.join('?' for _ in V1_TEST_ROW)})", V1_TEST_ROW)
    raw.commit()
    raw.close()
    with History(path) as db:
        assert db.schema_version == store.SCHEMA_VERSION >= 3
        (row,) = db.tests("r-old")
        (old_run,) = db.runs()
    assert row["xdist_worker"] == "gw1" and "worker" not in row
    assert old_run["lm_refused"] == 0  # migration 3: runs recorded before it refused nothing we know of
    assert old_run["lm_rate_limit_wait_s"] == 0 and row["lm_rate_limit_wait_s"] == 0  # migration 5
    assert old_run["lm_errors"] == 0 and row["lm_errors"] == 0  # migration 6


def test_import_reads_report_files_that_still_say_worker(tmp_path: Path) -> None:
    tests = [dict(empty_test_row("r-ci", "t.py::test", "unit"))]
    old_style = {**tests[0], "worker": "gw0"}
    del old_style["xdist_worker"]
    report = tmp_path / "old-report.json"
    report.write_text(json.dumps({"run": run_row("r-ci", "2026-11-03T00:00:00+00:00"), "tests": [old_style]}))
    env = {"PROVISION_STATE_DIR": str(tmp_path / ".provision")}
    result = CliRunner().invoke(main, ["history", "import", str(report)], env=env)
    assert result.exit_code == 0, result.output
    shown = json.loads(CliRunner().invoke(main, ["history", "show", "r-ci", "--json"], env=env).output)
    assert shown["tests"][0]["xdist_worker"] == "gw0" and "worker" not in shown["tests"][0]


def test_history_list_and_show_print_header_rows(tmp_path: Path) -> None:
    """A new user's `provision history list` printed rows with no header: which number is which?
    And its "worker" column was read as the bridge worker container: it is pytest-xdist's."""
    env = {"PROVISION_STATE_DIR": str(tmp_path / ".provision"), "COLUMNS": "200"}
    row = {**empty_test_row("r-ci", "t.py::test", "unit"), "xdist_worker": "gw3", "outcome": "failed"}
    with History(tmp_path / ".provision" / "history.sqlite") as db:
        db.record(run_row("r-ci", "2026-11-03T00:00:00+00:00", passed=7, failed=1), [row])
    listed = CliRunner().invoke(main, ["history", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    header, *rows = [line for line in lines if line.strip() and set(line.strip()) != {"─"}]
    assert header.split() == ["run", "started", "(UTC)", "layers", "passed", "failed", "error", "skipped",
                              "duration", "s", "billed", "$", "LM", "refused", "ended", "revision"], \
        listed.output
    assert rows[0].split()[:7] == ["r-ci", "2026-11-03", "00:00:00", "unit", "7", "1", "0"], listed.output
    assert rows[0].split()[-2] == "passed", listed.output  # how the run ended: its exit status, 0
    shown = CliRunner().invoke(main, ["history", "show", "r-ci"], env=env)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == ["outcome"])
    assert "xdist worker" in lines[at] and "test" in lines[at], shown.output
    assert "gw3" in lines[at + 2] and "t.py::test" in lines[at + 2], shown.output


def test_reading_the_history_of_a_project_without_one_creates_nothing(tmp_path: Path) -> None:
    """A new user's `provision history list` in a fresh folder made .provision/history.sqlite."""
    state = tmp_path / ".provision"
    env = {"PROVISION_STATE_DIR": str(state)}
    for args in (["history", "list"], ["history", "list", "--json"], ["report", "markdown"],
                 ["history", "prune", "--keep", "1"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 0, (args, result.output)
        assert not (state / store.HISTORY_FILE).exists(), args
    assert "no runs recorded yet" in CliRunner().invoke(main, ["history", "list"], env=env).output
    assert CliRunner().invoke(main, ["history", "show", "r1"], env=env).exit_code == 2
    assert not state.exists()
