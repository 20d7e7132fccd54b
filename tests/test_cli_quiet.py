"""`provision -q` drops progress lines from every command (README, "CLI"): under -q a command's
stderr holds only warnings and errors; its results (stdout) stay. A new user's
`provision run --layer smoke -q -- true` still said `provision run: run r…, layer smoke, 2 worker(s)`.

Every leaf command of the CLI is in :data:`QUIET` (run here without an engine) or in
:data:`WITH_ENGINE` (run against the real engine) or :data:`EXEMPT` (with why): a new command
fails :func:`test_every_command_is_checked` until it is added."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from provisioner.cli import main

from ._helpers import clear_settings, scratch_env

# The words a line that may stay under -q starts with: warnings and errors (click's "Error:").
ALLOWED = ("warning:", "Error:", "WARNING", "ERROR")

# argv after `provision -q` (the same with -q after the command: tests/test_cli.py, hoisting).
QUIET: dict[str, list[str]] = {
    "layers": ["layers"],
    "config": ["config"],
    "cassettes list": ["cassettes", "list"],
    "cassettes verify": ["cassettes", "verify"],
    "cassettes prune": ["cassettes", "prune"],
    "cost report": ["cost", "report"],
    "compose export": ["compose", "export", "--layer", "integration", "-o", "{compose}"],
    "history list": ["history", "list"],
    "history show": ["history", "show", "{run_id}"],
    "history import": ["history", "import", "{report}"],
    "history merge": ["history", "merge", "--no-import", "--out", "{merged}", "{report}"],
    "history prune": ["history", "prune", "--keep", "100"],
    "report html": ["report", "html", "--out", "{html}"],
    "report markdown": ["report", "markdown"],
}
WITH_ENGINE = {"up", "status", "run", "down", "reap", "doctor", "images build", "images prune"}
EXEMPT = {
    "worker": "a server: it logs through logging (-q raises its level), it prints no progress lines",
    "standin gemini": "a server, as `worker`",
    "images lock": "rewrites the installed package's requirements.txt in place (not from a test); it "
                   "prints one result line on stdout, nothing on stderr",
}


def _leaves(group: click.Group, prefix: tuple[str, ...] = ()) -> set[str]:
    out: set[str] = set()
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out |= _leaves(command, (*prefix, name))
        else:
            out.add(" ".join((*prefix, name)))
    return out


def test_every_command_is_checked() -> None:
    assert _leaves(main) == set(QUIET) | WITH_ENGINE | set(EXEMPT)


def _progress(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(ALLOWED)]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A project with one recorded run (a unit-layer pytest) and its --provision-report file."""
    folder = tmp_path_factory.mktemp("quiet")
    (folder / "pyproject.toml").write_text("[project]\nname = 'quiet'\n[tool.provisioner]\nlayer = 'unit'\n")
    (folder / "test_a.py").write_text("def test_a(lm):\n    assert lm('hi')\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--layer", "unit",
                           "--provision-report", "report.json"], cwd=folder, env=scratch_env(folder),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    import json

    run_id = json.loads((folder / "report.json").read_text())["run_id"]
    return {"dir": folder, "run_id": run_id, "report": str(folder / "report.json"),
            "merged": str(folder / "merged"), "html": str(folder / "html"),
            "compose": str(folder / "compose.yml")}


@pytest.mark.parametrize("name", sorted(QUIET))
@pytest.mark.parametrize("where", ["before", "after"])
def test_a_command_prints_no_progress_under_q(name: str, where: str, project: dict[str, Any],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings(monkeypatch)
    monkeypatch.chdir(project["dir"])
    monkeypatch.setenv("PROVISION_LM__CACHE_DIR", str(project["dir"] / "cassettes"))
    argv = [part.format(**project) for part in QUIET[name]]
    argv = ["-q", *argv] if where == "before" else [*argv, "-q"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code in (0, 1), (argv, result.output, result.stderr)  # 1: e.g. nothing to prune
    assert _progress(result.stderr) == [], (argv, result.stderr)


@pytest.mark.docker
def test_engine_commands_print_no_progress_under_q(tmp_path: Path) -> None:
    """up, status, run (-q before the command, and after it), down, reap, doctor and images build
    against the real engine: nothing on stderr but warnings; without -q, `run` says its run."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'quiet-engine'\n")
    env = scratch_env(tmp_path, os.environ)

    def provision(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(Path(sys.executable).parent / "provision"), *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    try:
        loud = provision("run", "--layer", "integration", "--lm", "mock", "--workers", "1", "--", "true")
        assert loud.returncode == 0, loud.stderr
        assert "provision run: run r" in loud.stderr  # the progress line -q must drop (so this can fail)
        for argv in (["-q", "run", "--layer", "integration", "--lm", "mock", "--workers", "1", "--", "true"],
                     ["run", "--layer", "integration", "-q", "--lm", "mock", "--workers", "1", "--", "true"],
                     ["-q", "up", "--layer", "integration", "--lm", "mock", "--workers", "1"],
                     ["-q", "status"], ["status", "-q"], ["-q", "down"], ["-q", "reap", "--dry-run"],
                     ["-q", "doctor"], ["-q", "images", "build"], ["-q", "images", "prune", "--dry-run"]):
            done = provision(*argv)
            assert done.returncode == 0, (argv, done.stdout, done.stderr)
            assert _progress(done.stderr) == [], (argv, done.stderr)
    finally:
        provision("down")
