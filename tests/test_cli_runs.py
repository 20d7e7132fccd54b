"""Every run-id argument of the CLI answers an unknown id the same way: close matches (a typo, a
prefix, the time part), at most a few of the newest ids and the command that lists them all. A new
user's `provision cost report --run nope` printed all 45 run ids on one line and no close match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from provisioner.cli import RUNS_SHOWN, main
from provisioner.history import store

from ._helpers import clear_settings

RUN_IDS = [f"r20261130-{10 + i // 60:02d}{i % 60:02d}00-{i:06x}" for i in range(45)]  # oldest first
NEWEST = sorted(RUN_IDS, reverse=True)
TYPO = RUN_IDS[7][:-1] + ("x" if RUN_IDS[7][-1] != "x" else "y")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project with 45 runs: a state file each (cost report, status, down, reap) and a history row
    each (history show)."""
    clear_settings(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'runs'\n")
    with store.History(tmp_path / ".provision" / store.HISTORY_FILE) as db:
        for run_id in RUN_IDS:
            state = tmp_path / ".provision" / "runs" / run_id / "state.json"
            state.parent.mkdir(parents=True)
            state.write_text("{}")
            row: dict[str, Any] = {name: 0 for name in store.RUN_FIELDS}
            started = f"2026-11-30T{run_id[10:12]}:{run_id[12:14]}:00+00:00"
            row.update(run_id=run_id, started_at=started, finished_at=started, duration_s=1.0, project="runs",
                       revision=None, branch=None, host="h", ci_job=None, shard=None, layers=["unit"],
                       cost_usd=0.0, list_cost_usd=0.0, retained=[])
            db.record(row, [])  # type: ignore[arg-type]
    return tmp_path


def _check(argv: list[str], list_with: str) -> None:
    unknown = CliRunner().invoke(main, [*argv, "nope"] if argv[-1] == "show" else [*argv, "--run", "nope"])
    assert unknown.exit_code == 2, unknown.output
    out = unknown.output
    assert "unknown run 'nope'" in out and "did you mean" not in out
    # The newest few, then how many more. On the shared engine, other runs the engine lists for this
    # project (e.g. unlabelled runs of older versions) may be newer: they come first, as they should.
    shown_text, more = out.split("newest: ", 1)[1].split(" more;", 1)[0].rsplit(" and ", 1)
    shown = shown_text.split(", ")
    assert len(shown) == RUNS_SHOWN and shown == sorted(shown, reverse=True), out
    ours = [i for i in shown if i in RUN_IDS]
    assert ours == NEWEST[:len(ours)] and all(i > NEWEST[0] for i in shown if i not in RUN_IDS), out
    assert int(more) >= 45 - RUNS_SHOWN, out
    assert NEWEST[RUNS_SHOWN] not in out  # not all 45
    assert f"`{list_with}` lists them" in out
    typo = CliRunner().invoke(main, [*argv, TYPO] if argv[-1] == "show" else [*argv, "--run", TYPO])
    assert typo.exit_code == 2 and f"(did you mean '{RUN_IDS[7]}'?)" in typo.output, typo.output
    part = RUN_IDS[7][10:16]  # the time part, as a user remembers it
    timed = CliRunner().invoke(main, [*argv, part] if argv[-1] == "show" else [*argv, "--run", part])
    assert timed.exit_code == 2 and f"(did you mean '{RUN_IDS[7]}'?)" in timed.output, timed.output


def test_cost_report_suggests_close_runs_and_shows_a_few(project: Path) -> None:
    _check(["cost", "report"], "provision history list")


def test_history_show_suggests_close_runs_and_shows_a_few(project: Path) -> None:
    _check(["history", "show"], "provision history list")
    prefix = CliRunner().invoke(main, ["history", "show", RUN_IDS[7][:16]])  # an unambiguous prefix works
    assert prefix.exit_code == 0, prefix.output


def test_cassettes_prune_checks_its_run_like_the_others(project: Path) -> None:
    result = CliRunner().invoke(main, ["cassettes", "prune", "--run", "nope"])
    assert result.exit_code == 2, result.output
    assert "unknown run 'nope'; no runs are known; `provision history list` lists them" in result.output


@pytest.mark.docker
@pytest.mark.parametrize("command", ["status", "down", "reap"])
def test_engine_commands_suggest_close_runs_and_show_a_few(project: Path, command: str) -> None:
    _check([command], "provision status --all-projects")
