"""Shared fixtures of the history tests: a Gemini stand-in and a project with a flaky test, run three
times (once under xdist), and the same suite run once against provisioner's own stand-in (no key),
built once per session (each run is a real pytest subprocess)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.lm.standin import GeminiStandin

from .suite import STANDIN_KEY, make_project, run_suite


@pytest.fixture(scope="session")
def history_standin() -> Iterator[GeminiStandin]:
    with GeminiStandin(api_key=STANDIN_KEY) as server:
        yield server


@pytest.fixture(scope="session")
def three_runs(history_standin: GeminiStandin, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_project(tmp_path_factory.mktemp("flaky") / "proj", history_standin.url)
    for i in range(3):
        args = ("-n", "2") if i == 1 else ()  # one run under xdist: the controller writes the rows
        done = run_suite(root, "--provision-report", f"run{i}.json", "--junitxml", f"run{i}.xml",
                         "--provision-costs", "2", *args)
        (root / f"run{i}.out").write_text(done.stdout)
        assert done.returncode == 1, done.stdout + done.stderr  # test_broken always fails
    return root


@pytest.fixture(scope="session")
def standin_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run with no GEMINI_TEST_API_KEY: real mode's calls go to provisioner's stand-in, billed $0."""
    root = make_project(tmp_path_factory.mktemp("standin") / "proj", None)
    done = run_suite(root, "--provision-report", "run.json", key=False)
    (root / "run.out").write_text(done.stdout)
    assert done.returncode == 1, done.stdout + done.stderr  # test_broken always fails
    assert "Gemini stand-in (GEMINI_TEST_API_KEY not set)" in done.stdout, done.stdout
    return root
