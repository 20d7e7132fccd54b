"""Ledger sums and the `provision cassettes` / `cost` / `standin` commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dspy
import pytest
from click.testing import CliRunner

from provisioner.cli import main
from provisioner.lm import build_lm
from provisioner.lm.cassettes import CassetteStore
from provisioner.lm.ledger import Ledger, archive_run_ledger, cost_report, current_test, ledger_sources
from provisioner.lmconfig import LMConfig


def _write_calls(run_dir: Path, run_id: str, calls: list[tuple[str, float]]) -> None:
    ledger = Ledger(run_dir, run_id=run_id, layer="integration")
    for test_id, cost in calls:
        with current_test(test_id):
            ledger.call(model="gemini-2.5-flash-lite", kind="real", input_tokens=10, output_tokens=5,
                        cost_usd=cost)


def test_report_sums_per_run_test_and_month(tmp_path: Path) -> None:
    state = tmp_path / ".provision"
    _write_calls(state / "runs" / "a", "run-a", [("t1", 0.25), ("t2", 0.5), ("t1", 0.25)])
    _write_calls(state / "runs" / "b", "run-b", [("t1", 1.0)])
    report = cost_report(ledger_sources(state), monthly_budget_usd=1.5)
    assert report.total.calls == 4 and report.total.cost_usd == pytest.approx(2.0)
    assert report.by_run["run-a"].cost_usd == pytest.approx(1.0)
    assert report.by_test["t1"].cost_usd == pytest.approx(1.5) and report.by_test["t1"].calls == 3
    (month,) = report.by_month
    assert report.over_budget_months == [month]
    only_b = cost_report(ledger_sources(state), run_id="run-b")
    assert only_b.total.calls == 1
    assert cost_report(ledger_sources(state), month="1999-01").total.calls == 0


def test_report_finds_run_ledgers_in_the_runs_lm_directory(tmp_path: Path) -> None:
    # `provision up` and the pytest plugin keep a run's LM state in .provision/runs/<id>/lm/.
    state = tmp_path / ".provision"
    _write_calls(state / "runs" / "r1" / "lm", "r1", [("t1", 0.5)])
    _write_calls(state / "runs" / "r2", "r2", [("t1", 0.25)])
    report = cost_report(ledger_sources(state))
    assert report.total.calls == 2 and set(report.by_run) == {"r1", "r2"}


def test_cost_report_attributes_a_workers_calls_to_the_test_of_its_session(tmp_path: Path) -> None:
    """The reported case: a test made one call in-process and one on a worker container (booked under
    its isolated session, `session_1130..._main_3269_1_...`); `cost report` listed the session as a
    test and the test with 1 call. The run's sessions.jsonl maps the session to the test."""
    from provisioner.lm.ledger import note_session_test

    state = tmp_path / ".provision"
    lm_dir = state / "runs" / "r1" / "lm"
    test, session = "tests/test_q.py::test_two_calls", "session_113005_main_3269_1_9f2c"
    _write_calls(lm_dir, "r1", [(test, 0.25), (session, 0.5), ("tests/test_q.py::test_other", 0.125)])
    note_session_test(lm_dir, session, test)
    for sources in (ledger_sources(state), None):
        if sources is None:  # the same, once the run's ledger is archived by month
            assert archive_run_ledger(lm_dir, state) == 3
            sources = ledger_sources(state)
            assert all(source.parent.name == "ledger" for source in sources)
        report = cost_report(sources)
        assert set(report.by_test) == {test, "tests/test_q.py::test_other"}
        assert report.by_test[test].calls == 2 and report.by_test[test].cost_usd == pytest.approx(0.75)
    result = CliRunner().invoke(main, ["cost", "report"], env={"PROVISION_STATE_DIR": str(state)})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if test in line)
    assert session not in result.output and row.split()[1:4] == ["$", "0.750000", "2"], result.output


def test_archive_is_idempotent_and_counted_once(tmp_path: Path) -> None:
    state = tmp_path / ".provision"
    run_dir = state / "runs" / "a"
    _write_calls(run_dir, "run-a", [("t1", 0.1), ("t2", 0.2)])
    assert archive_run_ledger(run_dir, state) == 2
    assert archive_run_ledger(run_dir, state) == 0
    # The run directory may be deleted after archiving: the month archive keeps the numbers.
    for path in run_dir.iterdir():
        path.unlink()
    report = cost_report(ledger_sources(state))
    assert report.total.calls == 2 and report.total.cost_usd == pytest.approx(0.3)


def test_cost_report_cli_warns_over_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROVISION_LM__MONTHLY_BUDGET_USD", "0.5")
    _write_calls(tmp_path / ".provision" / "runs" / "r", "run-r", [("tests/a.py::test_x", 0.75)])
    result = CliRunner().invoke(main, ["cost", "report", "--month"])
    assert result.exit_code == 0, result.output
    assert "tests/a.py::test_x" in result.output and "0.750000" in result.output
    assert "over lm.monthly_budget_usd" in result.output
    as_json = CliRunner().invoke(main, ["cost", "report", "--run", "run-r", "--json"])
    data = json.loads(as_json.stdout)
    assert "over the monthly budget" in as_json.stderr
    assert data["by_run"]["run-r"]["cost_usd"] == pytest.approx(0.75)
    assert data["over_budget_months"]


def _record(cache_dir: Path, run_dir: Path, run_id: str, questions: list[str], layer: str = "unit") -> None:
    lm = build_lm(LMConfig(mode="cached", cached_inner="mock", cache_dir=cache_dir, run_dir=run_dir,
                           run_id=run_id, layer=layer))
    with dspy.context(lm=lm):
        for question in questions:
            with current_test(f"tests/test_q.py::test_{question.split()[0]}"):
                dspy.Predict("question -> answer")(question=question)


def test_cassettes_list_shows_source_and_test_and_verify_passes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cassettes"
    _record(cache, tmp_path / "run", "r1", ["kept question", "stale question"])
    runner = CliRunner()
    listed = runner.invoke(main, ["cassettes", "list", "--cache-dir", str(cache)])
    assert listed.exit_code == 0 and "2 entries" in listed.output
    line = next(line for line in listed.output.splitlines() if "stale question" in line)
    assert "mock" in line and "tests/test_q.py::test_stale" in line
    listed_json = runner.invoke(main, ["cassettes", "list", "--cache-dir", str(cache), "--json"])
    as_json = json.loads(listed_json.stdout)
    assert {(e["source"], e["test_id"]) for e in as_json} == {
        ("mock", "tests/test_q.py::test_kept"), ("mock", "tests/test_q.py::test_stale")}
    assert runner.invoke(main, ["cassettes", "verify", "--cache-dir", str(cache)]).exit_code == 0


def test_prune_needs_a_complete_run_and_yes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cassettes"
    runs = tmp_path / ".provision" / "runs"
    _record(cache, runs / "old" / "lm", "run-old", ["kept question", "stale question"])
    _record(cache, runs / "new" / "lm", "run-new", ["kept question"])
    # Age the entries: a complete run vouches only for entries recorded before it started.
    for path in CassetteStore(cache).paths():
        entry = json.loads(path.read_text())
        entry["recorded_at"] = "2026-01-01T00:00:00+00:00"
        path.write_text(json.dumps(entry))
    runner = CliRunner()
    prune = ["cassettes", "prune", "--cache-dir", str(cache)]

    # The newest run was partial (a node id): it cannot vouch, and there is no complete one.
    Ledger(runs / "new" / "lm", run_id="run-new", layer="unit").mark_run_complete(
        complete=False, partial=["a node id (tests/test_q.py::test_kept)"], cache_dir=cache)
    refused = runner.invoke(main, prune)
    assert refused.exit_code != 0
    assert "layer 'unit' has no complete run" in refused.output
    assert "run-new was partial: a node id (tests/test_q.py::test_kept)" in refused.output
    assert len(CassetteStore(cache).keys()) == 2

    Ledger(runs / "new" / "lm", run_id="run-new2", layer="unit").mark_run_complete(
        complete=True, cache_dir=cache, started_at="2026-02-01T00:00:00+00:00")
    Ledger(runs / "new" / "lm", run_id="run-new2", layer="unit").call(
        model="gemini-2.5-flash-lite", kind="replayed", cassette=_key_of(cache, "kept question"))
    dry = runner.invoke(main, prune)  # dry-run is the default
    assert dry.exit_code == 0, dry.output
    stale = CassetteStore(cache).path_for(_key_of(cache, "stale question"))
    assert [line for line in dry.output.splitlines() if "would remove" in line] == [f"would remove {stale}"]
    assert "1 unused, 1 kept (vouched for: unit by run run-new2)" in dry.output
    assert "add --yes" in dry.output and len(CassetteStore(cache).keys()) == 2
    pruned = runner.invoke(main, [*prune, "--yes"])
    assert pruned.exit_code == 0, pruned.output
    assert "removed" in pruned.output
    kept = runner.invoke(main, ["cassettes", "list", "--cache-dir", str(cache), "--json"])
    assert [entry["request"] for entry in json.loads(kept.stdout)] == [
        "gemini-2.5-flash-lite `question -> answer` (question='kept question')"]


def test_prune_keeps_entries_recorded_after_the_vouching_run_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cassettes"
    run = tmp_path / ".provision" / "runs" / "r" / "lm"
    Ledger(run, run_id="r-complete", layer="unit").mark_run_complete(
        complete=True, cache_dir=cache, started_at="2026-01-01T00:00:00+00:00")
    _record(cache, tmp_path / "later", "r-later", ["recorded later"])  # not used by r-complete: newer
    result = CliRunner().invoke(main, ["cassettes", "prune", "--cache-dir", str(cache), "--yes"])
    assert result.exit_code == 0 and "0 unused, 1 kept" in result.output


def _key_of(cache: Path, question: str) -> str:
    for path in CassetteStore(cache).paths():
        if question in path.read_text():
            return path.stem
    raise AssertionError(question)


def test_verify_finds_edits_keys_and_corrupt_files(tmp_path: Path) -> None:
    cache = tmp_path / "cassettes"
    _record(cache, tmp_path / "run", "r", ["one", "two", "three", "four"])
    first, second, third, _ = CassetteStore(cache).paths()
    entry = json.loads(first.read_text())
    entry["request"]["messages"][-1][1] += " edited"
    first.write_text(json.dumps(entry))
    second.write_text(second.read_text().replace("mock_response", "AIza" + "x" * 35))
    third.write_text(third.read_text()[:40])
    result = CliRunner().invoke(main, ["cassettes", "verify", "--cache-dir", str(cache)])
    assert result.exit_code == 1
    assert "key does not match" in result.output
    assert "contains an API key" in result.output
    assert f"{third}: not valid JSON" in result.output
    listed = CliRunner().invoke(main, ["cassettes", "list", "--cache-dir", str(cache)])
    assert listed.exit_code == 0 and f"CORRUPT {third}: not valid JSON" in listed.output


def test_standin_command_serves_until_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    env = {**os.environ, "GEMINI_TEST_API_KEY": "cli-key"}
    process = subprocess.Popen([sys.executable, "-m", "provisioner.cli", "standin", "gemini", "--port", "0",
                                "--ready-file", str(ready)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("PROVISION_STANDIN_READY port=")
        port = int(line.split("=", 1)[1])
        assert ready.read_text().strip() == str(port)
        url = f"http://127.0.0.1:{port}/v1beta/models/gemini-2.5-flash-lite:generateContent"
        body = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()
        good = urllib.request.Request(url, data=body, headers={"x-goog-api-key": "cli-key"})
        ok = urllib.request.urlopen(good, timeout=10)
        assert json.loads(ok.read())["modelVersion"] == "gemini-2.5-flash-lite"
        with pytest.raises(urllib.error.HTTPError) as wrong:
            bad = urllib.request.Request(url, data=body, headers={"x-goog-api-key": "other"})
            urllib.request.urlopen(bad, timeout=10)
        assert wrong.value.code == 400
    finally:
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the exit with a deadline
    assert process.returncode == 0
