"""The settings/layers edge of the CLI (other commands are tested beside their modules)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from provisioner.cli import main

from ._helpers import clear_settings


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:

    clear_settings(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        "[tool.provisioner]\nmax_pool_size = 3\n[tool.provisioner.layers.smoke]\nlm_mode = 'mock'\n"
    )
    return tmp_path


def test_layers_json_lists_builtins_and_custom(project: Path) -> None:
    result = CliRunner().invoke(main, ["layers", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert list(data) == ["unit", "integration", "e2e", "smoke"]
    assert data["e2e"]["pooling_enabled"] is True and data["e2e"]["workers"] == 3
    assert data["unit"]["lm_mode"] == "mock"
    # A user's trial: --json gave the unit layer "workers": 2 while the table said "-"; and the table
    # said integration "2" while pytest starts 1. Both now say what each entry point starts.
    assert data["unit"]["workers"] is None and data["unit"]["starts"] is None
    assert data["integration"]["starts"] == {"pytest_first": 1, "pytest_up_to": 1, "up": 3}
    assert data["e2e"]["starts"] == {"pytest_first": 1, "pytest_up_to": 3, "up": 3}


def test_layers_table(project: Path) -> None:
    result = CliRunner().invoke(main, ["layers"])
    assert result.exit_code == 0
    assert "integration" in result.output and "cached" in result.output and "smoke" in result.output
    lines = result.output.splitlines()
    at = lines[0].index("workers")
    rows = {line.split()[0]: line for line in lines[1:]}
    # The unit layer runs in-process (LocalBridge, as README says): no workers, not "workers 2".
    assert rows["unit"].split()[2] == "in-process" and rows["unit"][at:].split()[0] == "-", result.output
    # What pytest and `provision up` start, as they start it (worker_starts): integration's pytest
    # run used 1 worker while the table said its `workers` (what `provision up` starts).
    assert rows["integration"][at:].startswith("pytest 1, up 3 "), result.output
    assert rows["e2e"][at:].startswith("pytest 1-3, up 3 "), result.output


def test_config_shows_values_and_sources(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_MODE", "integration")
    monkeypatch.setenv("GEMINI_TEST_API_KEY", "top-secret-key")
    result = CliRunner().invoke(main, ["config", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["settings"]["layer"] == "integration"
    assert data["sources"]["layer"] == "env TEST_MODE"
    assert data["sources"]["max_pool_size"] == "pyproject.toml [tool.provisioner]"
    assert data["sources"]["cleanup_policy"] == "default"
    assert "top-secret-key" not in result.output
    cli = CliRunner().invoke(main, ["config", "--layer", "e2e", "--json"])
    assert json.loads(cli.output)["sources"]["layer"] == "cli --layer"


def test_config_and_doctor_show_the_mode_each_layer_runs_with(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's trial: with `[tool.provisioner.layers.e2e] lm_mode = "mock"`, `provision config` showed
    `lm_modes {... "e2e": "real"} default` and doctor warned "real-mode layers (e2e) use the local Gemini
    stand-in", though e2e ran with the mock. Both now show the mode get_layer resolves, and whence."""
    from provisioner.layers import get_layer
    from provisioner.runtime.doctor import _check_api_key
    from provisioner.settings import load_settings

    monkeypatch.delenv("GEMINI_TEST_API_KEY", raising=False)
    (project / "pyproject.toml").write_text("[tool.provisioner.layers.e2e]\nlm_mode = 'mock'\n")
    data = json.loads(CliRunner().invoke(main, ["config", "--json"]).output)
    assert data["effective"]["e2e"] == {"lm_mode": "mock", "from": "layers.e2e.lm_mode",
                                        "source": "pyproject.toml [tool.provisioner]"}
    assert data["effective"]["integration"]["from"] == "lm_modes.integration"
    table = CliRunner().invoke(main, ["config"]).output.splitlines()
    line = next(row for row in table if row.startswith("effective.e2e.lm_mode "))
    assert line.split(None, 2)[1:] == ['"mock"', "layers.e2e.lm_mode (pyproject.toml [tool.provisioner])"]
    settings = load_settings()
    assert get_layer(settings, "e2e").lm_mode == "mock"
    (check,) = _check_api_key(settings)
    assert check.status == "ok" and "no layer runs in real mode" in check.detail
    # an lm_modes entry the user sets beats the layer's own: e2e is real again, and doctor warns
    monkeypatch.setenv("PROVISION_LM_MODES__E2E", "real")
    data = json.loads(CliRunner().invoke(main, ["config", "--json"]).output)
    assert data["effective"]["e2e"] == {"lm_mode": "real", "from": "lm_modes.e2e",
                                        "source": "env PROVISION_LM_MODES__E2E"}
    (check,) = _check_api_key(load_settings())
    assert check.status == "warn" and "real-mode layers (e2e)" in check.detail


def test_bad_setting_is_a_clean_error(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVISION_MAX_POOL_SIZE", "many")
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code != 0
    assert "max_pool_size" in result.output and "'many'" in result.output
    assert "PROVISION_MAX_POOL_SIZE" in result.output
    assert "Traceback" not in result.output


# --- one project root (issue 8, item 4) --------------------------------------------------------------

EXAMPLE_CASSETTES = Path(__file__).resolve().parents[1] / "examples" / "qa_project" / "test" / "fixtures" / (
    "lm_responses")


def _project_with_data(project: Path) -> Path:
    """The project gets the example's cassettes and one run ledger with a $0.25 call."""
    import shutil

    shutil.copytree(EXAMPLE_CASSETTES, project / "test" / "fixtures" / "lm_responses")
    ledger = project / ".provision" / "runs" / "r20261130-101500-abcdef" / "lm" / "ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"ts": "2026-11-30T10:15:00+00:00", "event": "call",
                                  "run_id": "r20261130-101500-abcdef", "test_id": "tests/test_a.py::test_a",
                                  "kind": "real", "cost_usd": 0.25, "id": "c1"}) + "\n")
    sub = project / "tests"
    sub.mkdir()
    return sub


def test_cassettes_and_cost_from_a_subfolder_use_the_project_root(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_project_with_data(project))
    verify = CliRunner().invoke(main, ["cassettes", "verify"])
    assert verify.exit_code == 0, verify.output
    count = len(list(EXAMPLE_CASSETTES.rglob("*.json")))
    assert f"{count} entries checked" in verify.output
    assert str(project / "test" / "fixtures" / "lm_responses") in verify.output
    listed = CliRunner().invoke(main, ["cassettes", "list", "--json"])
    assert len(json.loads(listed.output)) == count
    cost = CliRunner().invoke(main, ["cost", "report", "--json"])
    assert json.loads(cost.output)["total"]["cost_usd"] == 0.25
    config = CliRunner().invoke(main, ["config", "--json"])
    assert json.loads(config.output)["settings"]["state_dir"] == str(project / ".provision")


def test_missing_cassette_dir_is_a_warning_and_verify_fails(project: Path) -> None:
    listed = CliRunner().invoke(main, ["cassettes", "list"])
    assert listed.exit_code == 0
    assert "warning: cassette directory" in listed.stderr and "does not exist" in listed.stderr
    verify = CliRunner().invoke(main, ["cassettes", "verify"])
    assert verify.exit_code == 1
    assert "does not exist" in verify.stderr
    assert "0 entries" not in verify.output


# --- CLI hygiene (issue 8, item 10) -------------------------------------------------------------------


def test_unknown_layer_is_a_usage_error_with_did_you_mean(project: Path) -> None:
    for args in (["config", "--layer", "nope"], ["config", "--layer", "integraton"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert "known layers: unit, integration, e2e, smoke" in result.output
        assert "Traceback" not in result.output
    typo = CliRunner().invoke(main, ["config", "--layer", "integraton"])
    assert "did you mean 'integration'?" in typo.output


@pytest.mark.parametrize("month", ["2026-13", "2026-1", "nov", "2026-00"])
def test_cost_report_rejects_a_month_that_is_not_one(project: Path, month: str) -> None:
    result = CliRunner().invoke(main, ["cost", "report", "--month", month])
    assert result.exit_code == 2, result.output
    assert "YYYY-MM" in result.output


def test_cost_report_month_and_run_that_exist(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(_project_with_data(project))
    result = CliRunner().invoke(main, ["cost", "report", "--month", "2026-11", "--run",
                                       "r20261130-101500-abcdef", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["total"]["calls"] == 1


def test_cost_report_unknown_run_names_the_known_ones(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nothing = CliRunner().invoke(main, ["cost", "report", "--run", "nope"])
    assert nothing.exit_code == 2 and "no runs are known" in nothing.output
    monkeypatch.chdir(_project_with_data(project))
    typo = CliRunner().invoke(main, ["cost", "report", "--run", "r20261130-101500-abcdee"])
    assert typo.exit_code == 2, typo.output
    assert "did you mean 'r20261130-101500-abcdef'?" in typo.output


def test_unknown_setting_key_suggests_the_right_one(project: Path) -> None:
    (project / "pyproject.toml").write_text("[tool.provisioner]\nmax_pool_sise = 3\n")
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 2, result.output
    assert "unknown setting 'max_pool_sise' (did you mean 'max_pool_size'?)" in result.output
    assert "pyproject.toml" in result.output
    (project / "pyproject.toml").write_text("[tool.provisioner.lm]\nmdoe = 'mock'\n"
                                            "[tool.provisioner.layers.smoke]\nlm_mdoe = 'mock'\n")
    nested = CliRunner().invoke(main, ["layers"])
    assert nested.exit_code == 2
    assert "unknown setting in 'lm' 'mdoe' (did you mean 'mode'?)" in nested.output
    assert "'lm_mdoe' (did you mean 'lm_mode'?)" in nested.output


def test_log_level_flags_and_environment(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    logger = logging.getLogger("provisioner")
    assert CliRunner().invoke(main, ["-vv", "layers"]).exit_code == 0
    assert logger.level == logging.DEBUG
    assert CliRunner().invoke(main, ["-q", "layers"]).exit_code == 0
    assert logger.level == logging.ERROR
    monkeypatch.setenv("PROVISION_LOG_LEVEL", "info")
    assert CliRunner().invoke(main, ["layers"]).exit_code == 0
    assert logger.level == logging.INFO
    monkeypatch.setenv("PROVISION_LOG_LEVEL", "verbose")
    bad = CliRunner().invoke(main, ["layers"])
    assert bad.exit_code == 2
    assert "DEBUG, INFO, WARNING, ERROR, CRITICAL" in bad.output


def test_every_command_that_prints_data_takes_json() -> None:
    import click

    printing = {"layers", "config", "cassettes list", "cassettes verify", "cassettes prune", "cost report",
                "images build", "images prune", "up", "down", "status", "reap", "doctor"}
    commands: dict[str, click.Command] = {}
    for name, cmd in main.commands.items():
        if isinstance(cmd, click.Group):
            commands.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            commands[name] = cmd
    missing = [name for name in sorted(printing) if "as_json" not in {p.name for p in commands[name].params}]
    assert missing == []


@pytest.mark.docker
def test_down_and_status_reject_an_unknown_run(project: Path) -> None:
    for command in ("down", "status"):
        result = CliRunner().invoke(main, [command, "--run", "doesnotexist"])
        assert result.exit_code == 2, (command, result.output)
        assert "unknown run 'doesnotexist'" in result.output
    state = project / ".provision" / "runs" / "r20261130-101500-abcdef" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    typo = CliRunner().invoke(main, ["status", "--run", "r20261130-101500-abcdee"])
    assert typo.exit_code == 2 and "did you mean 'r20261130-101500-abcdef'?" in typo.output


def test_verbosity_options_are_accepted_after_the_subcommand(project: Path) -> None:
    """`provision up -q` was "No such option: -q" (only `provision -q up` worked): -q/-v after the
    subcommand act as before it; `provision run`'s command keeps its own -q/-v."""
    import logging

    from provisioner.cli import _hoist_verbosity

    result = CliRunner().invoke(main, ["layers", "-q", "--json"])
    assert result.exit_code == 0, result.output
    CliRunner().invoke(main, ["layers", "--json", "-vv"])
    assert logging.getLogger("provisioner").level == logging.DEBUG
    CliRunner().invoke(main, ["layers", "--json"])  # back to the default level for later tests
    assert _hoist_verbosity(["up", "--layer", "e2e", "-q"]) == ["-q", "up", "--layer", "e2e"]
    assert _hoist_verbosity(["-v", "run", "-q", "--layer", "unit", "--", "pytest", "-q"]) == \
        ["-v", "-q", "run", "--layer", "unit", "--", "pytest", "-q"]
    assert _hoist_verbosity(["run", "pytest", "-q"]) == ["run", "pytest", "-q"]


def test_global_options_work_anywhere_before_the_double_dash(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`provision run --layer integration -q -- true` was "cannot run '-q': it is not on PATH": the
    scan for -q/-v stopped at the option value 'integration', taking it for the user's command. Every
    position before `--` works; after `--` (or from the user's command's first word) nothing moves."""
    import provisioner.runtime.run_command as run_command_module
    from provisioner.cli import _hoist_verbosity, _runs_a_command, _takes_value

    seen: list[tuple[list[str], bool]] = []

    def fake_run_command(command: list[str], *args: object, **kwargs: object) -> int:
        seen.append((command, _quiet_now()))
        return 0

    def _quiet_now() -> bool:
        from provisioner.cli import _quiet
        return _quiet()

    monkeypatch.setattr(run_command_module, "run_command", fake_run_command)
    for flag in ("-q", "-v", "--quiet", "--verbose", "-qq"):
        for argv in (["run", "--layer", "unit", flag, "--", "true", "-q"],
                     ["run", flag, "--layer", "unit", "--", "true", "-q"],
                     ["run", "--layer=unit", flag, "--workers", "1", "--", "true", "-q"],
                     ["run", "--layer", "unit", "--lm", "mock", flag, "true", "-q"]):
            seen.clear()
            result = CliRunner().invoke(main, argv)
            assert result.exit_code == 0, (argv, result.output)
            assert seen and seen[0][0] == ["true", "-q"], (argv, seen)
            assert seen[0][1] == ("q" in flag), (argv, seen)
    # after `--` everything is the user's, even a word that looks like a global option
    assert _hoist_verbosity(["run", "--layer", "unit", "--", "-q"]) == ["run", "--layer", "unit", "--", "-q"]
    # the kind, over every command of the tree: after any option taking a value, -q still moves
    def commands(group: click.Group, path: list[str]) -> list[tuple[list[str], click.Command]]:
        found: list[tuple[list[str], click.Command]] = []
        for name, command in group.commands.items():
            found.append(([*path, name], command))
            if isinstance(command, click.Group):
                found.extend(commands(command, [*path, name]))
        return found
    checked = 0
    for path, command in commands(main, []):
        for opt in sorted(o for o in _takes_value(command) if o.startswith("--")):
            tail = ["--", "true"] if _runs_a_command(command) else []
            assert _hoist_verbosity([*path, opt, "value", "-v", *tail]) == \
                ["-v", *path, opt, "value", *tail], (path, opt)
            checked += 1
    assert checked > 10
    # an option whose value may be left out (`--month` alone: this month) takes no -q as its value
    assert _hoist_verbosity(["cost", "report", "--month", "-q"]) == ["-q", "cost", "report", "--month"]
    assert _hoist_verbosity(["cost", "report", "--month", "2026-11", "-q"]) == \
        ["-q", "cost", "report", "--month", "2026-11"]
    CliRunner().invoke(main, ["layers", "--json"])  # back to the default level for later tests


# --- the engine connection: one per command, closed on every path; tables show names whole ------

SERVED_IMAGE = "provisioner-worker:served"
LONG_RUN_ID = "a-long-project-name-for-the-status-table-x"[:41]


class _SharedEngine:
    """What ``engine.open_runtime`` returns in these tests: one in-process engine (its workers serve
    for real) for every command, counting the opens and closes a docker-py client would need."""

    def __init__(self) -> None:
        from provisioner.runtime.engine import FakeRuntime

        self.runtime = FakeRuntime(images=(SERVED_IMAGE,), serve=True)
        self.opened = 0
        self.closed = 0
        self.runtime.close = self._close  # type: ignore[method-assign]

    def _close(self) -> None:  # a client's close: the engine and its containers stay
        self.closed += 1

    def open(self, settings: object = None, **_kw: object) -> object:
        self.opened += 1
        return self.runtime


@pytest.fixture
def engine(project: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_SharedEngine]:
    from provisioner.runtime.engine import FakeRuntime

    (project / "pyproject.toml").write_text(f"[tool.provisioner.container]\nimage = '{SERVED_IMAGE}'\n")
    shared = _SharedEngine()
    monkeypatch.setattr("provisioner.runtime.engine.open_runtime", shared.open)
    try:
        yield shared
    finally:
        FakeRuntime.close(shared.runtime)  # stops the served workers


def test_up_status_reap_down_close_the_runtime_they_open_also_on_errors(engine: _SharedEngine) -> None:
    def run(*args: str) -> Any:
        before = engine.opened
        result = CliRunner().invoke(main, list(args))
        assert engine.opened > before, (args, result.output)
        assert engine.closed == engine.opened, (args, result.output)  # every one closed again
        return result

    up = run("up", "--layer", "integration", "--lm", "mock", "--workers", "1", "--run-id", LONG_RUN_ID)
    assert up.exit_code == 0, up.output
    again = run("up", "--layer", "integration", "--lm", "mock", "--workers", "1")  # refused: already up
    assert again.exit_code == 1 and "already up" in again.output
    assert run("status").exit_code == 0
    unknown = run("status", "--run", "nosuchrun")  # a usage error raised while the engine is open
    assert unknown.exit_code == 2 and "unknown run 'nosuchrun'" in unknown.output
    assert run("reap", "--dry-run").exit_code == 0
    assert run("status", "--all-projects").exit_code == 0
    down = run("down")
    assert down.exit_code == 0 and f"run {LONG_RUN_ID}: removed" in down.output


def test_status_shows_long_container_names_whole(engine: _SharedEngine) -> None:
    """A new user's `provision status` cut `prov-<run>-w0` to `prov-r2026…` (rich fits the table to 80
    columns): the names people copy into `docker logs` are never cut."""
    up = CliRunner().invoke(main, ["up", "--layer", "integration", "--lm", "mock", "--workers", "2",
                                   "--run-id", LONG_RUN_ID])
    assert up.exit_code == 0, up.output
    try:
        for output in (up.output, CliRunner().invoke(main, ["status"]).output):
            for slot in (0, 1):
                assert f"prov-{LONG_RUN_ID}-w{slot}" in output, output
            assert "…" not in output, output
    finally:
        CliRunner().invoke(main, ["down"])


def test_status_of_all_projects_has_a_header_and_long_project_names_whole(
    engine: _SharedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = Path.cwd() / "a-project-with-a-rather-long-folder-name-indeed"
    project.mkdir()
    (project / "pyproject.toml").write_text((Path.cwd() / "pyproject.toml").read_text())
    monkeypatch.chdir(project)
    up = CliRunner().invoke(main, ["up", "--layer", "integration", "--lm", "mock", "--workers", "1"])
    assert up.exit_code == 0, up.output
    try:
        from provisioner.runtime.labels import project_id

        listed = CliRunner().invoke(main, ["status", "--all-projects"])
        assert listed.exit_code == 0, listed.output
        lines = [line for line in listed.output.splitlines() if line.strip()]
        assert lines[0].split() == ["run", "project", "layer", "owner", "resources"], listed.output
        assert f"{project_id(project)} (this one)" in listed.output, listed.output
        assert "persistent" in listed.output and "…" not in listed.output
    finally:
        CliRunner().invoke(main, ["down"])


def test_on_a_narrow_terminal_long_cells_wrap_inside_their_column(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    from rich.table import Table

    from provisioner.cli import _print_table

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: a terminal, whatever stdout is
    monkeypatch.setenv("COLUMNS", "50")
    name = f"prov-{LONG_RUN_ID}-w0"
    table = Table()
    for column in ("worker", "container", "address"):
        table.add_column(column)
    table.add_row("w0", name, "127.0.0.1:40001")
    _print_table(table)
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert max(len(line) for line in out.splitlines()) <= 50, out  # fits the terminal
    pieces = [line.split("│")[2].strip() for line in out.splitlines() if line.count("│") == 4]
    assert "".join(pieces) == name and "…" not in out, out  # wrapped, never cut


# --- the human output of commands (the --json forms are tested above; a user reads these) ----------


def test_config_table_shows_each_value_and_where_it_came_from(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_TEST_API_KEY", "sk-never-printed-0123456789")
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    pool = next(line for line in lines if line.startswith("max_pool_size "))
    assert pool.split()[1:] == ["3", "pyproject.toml", "[tool.provisioner]"], pool  # field, value, source
    key = next(line for line in lines if line.startswith("lm.api_key "))
    assert '"**********"' in key and "sk-never-printed" not in result.output
    width = max(len(line.split()[0]) for line in lines)  # the value column starts at one place
    assert all(line[width:width + 2] == "  " and line[width + 2] != " " for line in lines), result.output


def test_cassettes_verify_json_of_a_missing_folder_says_it_is_missing_and_fails(project: Path) -> None:
    result = CliRunner().invoke(main, ["cassettes", "verify", "--json"])
    assert result.exit_code == 1
    out = json.loads(result.stdout)  # the JSON alone on stdout; the warning naming the folder on stderr
    assert "cassette directory" in result.stderr and "does not exist" in result.stderr
    assert out["exists"] is False and out["checked"] == 0 and out["problems"] == []
    assert Path(out["cache_dir"]).name == "lm_responses"


def test_cassettes_prune_refuses_yes_with_dry_run_and_a_folder_no_run_used(project: Path) -> None:
    both = CliRunner().invoke(main, ["cassettes", "prune", "--yes", "--dry-run"])
    assert both.exit_code == 2 and "--yes and --dry-run contradict each other" in both.output
    (project / "cassettes").mkdir()
    (project / "cassettes" / "keep.json").write_text("{}")
    unvouched = CliRunner().invoke(main, ["cassettes", "prune", "--cache-dir", "cassettes", "--yes"])
    assert unvouched.exit_code == 1
    assert f"cannot prune: no run used {project / 'cassettes'}" in unvouched.output
    assert (project / "cassettes" / "keep.json").exists()  # nothing removed


def test_doctor_text_marks_every_check_and_exits_1_only_on_a_failure(engine: _SharedEngine) -> None:
    result = CliRunner().invoke(main, ["doctor"])
    checks = json.loads(CliRunner().invoke(main, ["doctor", "--json"]).output)
    lines = result.output.splitlines()
    marks = {"ok": "[ok  ]", "warn": "[warn]", "fail": "[FAIL]"}
    assert lines == [f"{marks[c['status']]} {c['name']}: {c['detail']}" for c in checks]
    assert result.exit_code == (1 if any(c["status"] == "fail" for c in checks) else 0)
    custom = next(c for c in checks if c["name"] == "worker image")  # container.image is set here
    assert custom["status"] == "ok"
    assert f"{SERVED_IMAGE} (settings container.image) is present" in custom["detail"]


def test_doctor_names_a_custom_image_the_engine_does_not_have(engine: _SharedEngine, project: Path) -> None:
    (project / "pyproject.toml").write_text("[tool.provisioner.container]\nimage = 'team/worker:absent'\n")
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1, result.output
    line = next(line for line in result.output.splitlines() if "] worker image:" in line)
    assert line.startswith("[FAIL]") and "team/worker:absent" in line, line


def test_reap_status_and_down_say_what_they_did_in_words(engine: _SharedEngine) -> None:
    assert CliRunner().invoke(main, ["reap"]).output == "nothing to reap\n"
    none = CliRunner().invoke(main, ["status", "--all-projects"])
    assert none.exit_code == 0 and none.output == "no runs on this engine\n"
    both = CliRunner().invoke(main, ["status", "--all-projects", "--repair"])
    assert both.exit_code == 2 and "--repair works on one run; drop --all-projects" in both.output
    nothing = CliRunner().invoke(main, ["down"])
    assert nothing.exit_code == 0 and "nothing to do: no current run" in nothing.output
    up = CliRunner().invoke(main, ["up", "--layer", "integration", "--lm", "mock", "--workers", "1",
                                   "--run-id", "words1"])
    assert up.exit_code == 0, up.output
    kept = CliRunner().invoke(main, ["reap", "--all"])  # this process is the run's owner: alive
    assert kept.exit_code == 0 and kept.output.startswith("kept run words1 (--all): owner pid "), kept.output
    assert "alive; --force removes it anyway" in kept.output
    dry = CliRunner().invoke(main, ["reap", "--all", "--force", "--dry-run"])
    assert dry.exit_code == 0 and dry.output.startswith("would remove run words1 (--all): "), dry.output
    assert dry.output.rstrip().endswith("resource(s)")
    gone = CliRunner().invoke(main, ["reap", "--all", "--force"])
    assert gone.exit_code == 0 and gone.output.startswith("removed run words1 (--all): "), gone.output
    assert CliRunner().invoke(main, ["status", "--all-projects"]).output == "no runs on this engine\n"


def test_config_lists_only_settings_a_user_can_set(project: Path) -> None:
    """A new user's `provision config` listed lm.cache_dir_shown, lm.run_dir, lm.run_id, lm.layer and
    lm.endpoint_kind with source "default": the run fills them in itself. Which fields are internal
    comes from their Field mark (json_schema_extra), so a new internal field is hidden too."""
    from provisioner.lmconfig import INTERNAL_LM_FIELDS, LMConfig

    assert set(INTERNAL_LM_FIELDS) == {"cache_dir_shown", "run_dir", "run_id", "layer", "endpoint_kind",
                                       "limits_share_of"}
    text = CliRunner().invoke(main, ["config"])
    assert text.exit_code == 0, text.output
    fields = {line.split()[0] for line in text.output.splitlines()}
    as_json = json.loads(CliRunner().invoke(main, ["config", "--json"]).output)
    for name in LMConfig.model_fields:
        shown = name not in INTERNAL_LM_FIELDS
        assert (f"lm.{name}" in fields) == (shown and name != "api_key"), name
        assert (name in as_json["settings"]["lm"]) == (shown and name != "api_key"), name
        assert (f"lm.{name}" in as_json["sources"]) == (shown and name != "api_key"), name
