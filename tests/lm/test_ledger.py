"""The ledger's readers and sums on their edge cases: lines a crashed or foreign writer left,
duplicated sources, calls booked at an estimate, an empty report (the CLI paths are in
test_ledger_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provisioner.lm.ledger import (
    LEDGER_FILE,
    CostReport,
    Ledger,
    archive_run_ledger,
    cost_report,
    current_test,
    current_test_id,
    format_cost_report,
    read_ledger,
    run_report,
    session_tests,
)


def test_the_test_of_a_call_is_the_block_s_then_pytest_s_then_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/test_x.py::test_y (call)")
    assert current_test_id() == "tests/test_x.py::test_y"
    with current_test("session-1"):
        assert current_test_id() == "session-1"
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    assert current_test_id() is None  # a call outside pytest and outside any block


def test_reading_skips_blank_torn_and_non_object_lines(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    assert read_ledger(path) == []  # no ledger yet
    path.write_text('\n{"event": "call", "id": "a"}\n[1, 2]\n"text"\n\n{"event": "call", "id": "b"}\n{"torn')
    assert [e["id"] for e in read_ledger(path)] == ["a", "b"]


def test_an_empty_run_archives_nothing(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    assert archive_run_ledger(tmp_path / "run", tmp_path / "state") == 0
    assert not (tmp_path / "state").exists()


def test_a_run_without_an_lm_directory_has_no_sessions() -> None:
    assert session_tests(None) == {}


def test_estimated_calls_are_counted_and_said(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, run_id="r1", layer="integration")
    with current_test("tests/test_a.py::test_one"):
        ledger.call(model="gemini-2.5-flash-lite", kind="real", input_tokens=10, output_tokens=2,
                    cost_usd=0.001, endpoint="gemini", usage="estimated", estimated=["candidatesTokenCount"])
        ledger.call(model="gemini-2.5-flash-lite", kind="real", input_tokens=10, output_tokens=2,
                    cost_usd=0.001, endpoint="gemini")
    ledger.close()
    report = run_report(tmp_path, run_id="r1")
    assert report.total.calls == 2 and report.total.estimated_calls == 1
    assert report.by_test["tests/test_a.py::test_one"].estimated_calls == 1
    assert report.as_dict()["total"]["estimated_calls"] == 1
    text = format_cost_report(report)
    assert "estimated=1 (usage missing, booked at worst case)" in text
    assert "1 call came back without a token count and was booked" in text
    assert report.over_budget_months == []  # no monthly budget set: nothing is over it


def test_a_ledger_listed_twice_is_counted_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, run_id="r1")
    ledger.call(model="m", kind="real", cost_usd=0.5)
    ledger.close()
    report = cost_report([tmp_path / LEDGER_FILE, tmp_path / LEDGER_FILE])
    assert report.total.calls == 1 and report.total.cost_usd == pytest.approx(0.5)


def test_an_empty_report_is_a_header_and_one_total_line() -> None:
    header, total = format_cost_report(CostReport()).splitlines()
    assert header.split() == ["billed", "$", "calls", "tokens", "in", "tokens", "out", "calls", "by", "kind"]
    assert total.lstrip().startswith("total")


def test_the_cost_report_has_a_header_row_and_shows_long_test_ids_whole(tmp_path: Path) -> None:
    """A new user's `provision cost report`: rows without a header, and a test id longer than the
    first column pushed its numbers out of line."""
    long_id = "tests/test_integration.py::test_sessions_are_isolated[my order never came]"
    ledger = Ledger(tmp_path, run_id="r1")
    for test_id in (long_id, "t.py::short"):
        with current_test(test_id):
            ledger.call(model="m", kind="real", input_tokens=7, output_tokens=3, cost_usd=0.25)
    ledger.close()
    lines = format_cost_report(run_report(tmp_path, run_id="r1")).splitlines()
    header, *rows = [line for line in lines if line.startswith("  ")]
    assert "billed $" in header and any(long_id in row for row in rows), lines
    assert len({row.index("$") for row in rows}) == 1, lines  # one money column for every row
    assert len({len(row.split("  real=")[0]) for row in rows}) == 1, lines  # and every column after it
    assert json.loads(json.dumps(CostReport().as_dict()))["total"]["calls"] == 0


def test_a_run_without_an_lm_directory_has_no_usage() -> None:
    from provisioner.lm.ledger import ledger_usage

    assert ledger_usage(None) is None


def test_two_test_runs_attached_to_one_ledger_each_count_only_their_own_lines(tmp_path: Path) -> None:
    """Two pytest sessions attached to one `provision up` run write one ledger at the same time: each
    session's run totals, per-test rows and per-test cost count only its own lines — its processes'
    (marked with its test run) and its bridge sessions' (noted with its test run) — also for the
    same test node id in both sessions."""
    from provisioner.lm.ledger import (
        Ledger,
        current_test,
        ledger_usage,
        note_session_test,
        set_test_run,
        usage_by_test,
    )

    test_id = "tests/test_x.py::test_qa"
    try:
        for run, session in (("run-a", "session_a_1"), ("run-b", "session_b_1")):
            set_test_run(run)
            note_session_test(tmp_path, session, test_id)
            ledger = Ledger(tmp_path, run_id="up-run")
            with current_test(test_id):  # an in-process call of the test
                ledger.call(model="m", kind="replayed", cache="hit")
            ledger.close()
        set_test_run(None)  # a worker container's lines: no test run, the session's id as test id
        worker = Ledger(tmp_path, run_id="up-run")
        for session in ("session_a_1", "session_b_1", "session_b_1"):
            with current_test(session):
                worker.call(model="m", kind="real", cost_usd=0.25, endpoint="gemini")
        with current_test("someone-else"):  # a client of the up run that is no test run of ours
            worker.call(model="m", kind="real", cost_usd=1.0, endpoint="gemini")
        worker.close()
    finally:
        set_test_run(None)
    everything = ledger_usage(tmp_path)
    assert everything is not None and (everything.replayed, everything.real) == (2, 4)
    a = ledger_usage(tmp_path, test_run="run-a")
    b = ledger_usage(tmp_path, test_run="run-b")
    assert a is not None and (a.replayed, a.real, a.cost_usd) == (1, 1, 0.25)
    assert b is not None and (b.replayed, b.real, b.cost_usd) == (1, 2, 0.5)
    per_test = ledger_usage(tmp_path, {test_id, "session_a_1"}, test_run="run-a")
    assert per_test is not None and (per_test.replayed, per_test.real) == (1, 1)
    rows = usage_by_test(tmp_path, test_run="run-b")
    assert rows is not None and list(rows) == [test_id]
    assert (rows[test_id].replayed, rows[test_id].real) == (1, 2)


def test_a_session_that_joins_before_the_first_call_counts_every_call_after_it(tmp_path: Path) -> None:
    """`ledger_position` of a run whose ledger is not written yet is its start (0), so a session
    attached before the run's first LM call counts that call; one attached later counts only the
    lines after its position."""
    from provisioner.lm.ledger import ledger_position, ledger_usage

    early = ledger_position(tmp_path)  # no ledger file yet
    assert early == 0 and not (tmp_path / LEDGER_FILE).exists()
    ledger = Ledger(tmp_path, run_id="up-run")
    ledger.call(model="m", kind="real", cost_usd=0.5, endpoint="gemini")
    late = ledger_position(tmp_path)
    assert late == (tmp_path / LEDGER_FILE).stat().st_size > 0
    ledger.call(model="m", kind="real", cost_usd=0.25, endpoint="gemini")
    ledger.close()
    first, second = ledger_usage(tmp_path, since=early), ledger_usage(tmp_path, since=late)
    assert first is not None and (first.real, first.cost_usd) == (2, 0.75)
    assert second is not None and (second.real, second.cost_usd) == (1, 0.25)


def test_a_test_run_with_no_sessions_noted_counts_only_its_own_processes_lines(tmp_path: Path) -> None:
    """No `sessions.jsonl` (a run whose tests opened no isolated session), or one with torn and
    foreign lines: a test run's usage is its processes' lines, plus the lines of the sessions it
    noted — never another test run's."""
    from provisioner.lm.ledger import ledger_usage, set_test_run, test_run_sessions

    try:
        set_test_run("run-a")
        ledger = Ledger(tmp_path, run_id="up-run")
        ledger.call(model="m", kind="real", cost_usd=0.5, endpoint="gemini")
        ledger.close()
        set_test_run(None)
        worker = Ledger(tmp_path, run_id="up-run")
        with current_test("session_a_1"):
            worker.call(model="m", kind="real", cost_usd=0.25, endpoint="gemini")
        worker.close()
    finally:
        set_test_run(None)
    assert test_run_sessions(tmp_path, "run-a") == set()
    usage = ledger_usage(tmp_path, test_run="run-a")
    assert usage is not None and (usage.real, usage.cost_usd) == (1, 0.5)

    (tmp_path / "sessions.jsonl").write_text(
        '{"session_id": "session_b_1", "test_id": "t", "test_run": "run-b"}\n[1]\n'
        '{"session_id": "session_a_1", "test_id": "t", "test_run": "run-a"}\n{"session_id": "torn'
    )
    assert test_run_sessions(tmp_path, "run-a") == {"session_a_1"}
    usage = ledger_usage(tmp_path, test_run="run-a")
    assert usage is not None and (usage.real, usage.cost_usd) == (2, 0.75)


def test_refusals_by_each_limit_are_counted_apart_and_said_with_the_limit_when_known(tmp_path: Path) -> None:
    """A run's cost limit and rate limit refusals: the usage counts each, the report says each with
    its limit; a refusal line without a limit (written by an older worker) is said without one."""
    from provisioner.lm.ledger import ledger_usage, refused_text

    ledger = Ledger(tmp_path, run_id="r1")
    ledger.refused(model="m", reason="cost_limit", limit=0.001)
    ledger.refused(model="m", reason="rate_limit", limit=10)
    ledger.refused(model="m", reason="rate_limit", limit=10)
    ledger.close()
    with (tmp_path / LEDGER_FILE).open("a") as f:
        f.write(json.dumps({"event": "refused", "run_id": "r1", "reason": "rate_limit", "model": "m"}) + "\n")
    usage = ledger_usage(tmp_path)
    assert usage is not None and (usage.refused_cost_limit, usage.refused_rate_limit) == (1, 3)
    report = run_report(tmp_path, run_id="r1")
    assert report.total.refused == {"cost_limit": 1, "rate_limit": 3}
    assert refused_text(report.total.refused, report.total.limits) == (
        "4 calls refused (cost limit $0.001; 3 by the rate limit 10/min)")
    assert refused_text({"rate_limit": 1}) == "1 call refused (rate limit)"


def test_a_run_without_an_lm_directory_has_no_position_and_no_test_run_sessions() -> None:
    from provisioner.lm.ledger import ledger_position, test_run_sessions

    assert ledger_position(None) == 0 and test_run_sessions(None, "run-a") == set()
