"""A small project with a deliberately flaky test, run as real pytest subprocesses (shared by the
history, report and browser tests).

``test_flaky`` passes on odd runs and fails on even ones (a counter file next to it); ``test_broken``
always fails (consistently failing is not flaky); ``test_answers`` calls the LM twice through
``lm.base_url`` (the Gemini stand-in, billed as Gemini at list prices: a nonzero cost to compare with
the ledger) — or, without a base URL and key, provisioner's own stand-in (billed $0). The project is a
git repository with one commit, so every run has the same revision.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .._helpers import without_settings

STANDIN_KEY = "history-standin-key-0123456789"

PYPROJECT = """
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[tool.provisioner]
layer = "unit"
{base_url}lm.rate_limit_rpm = 1000
"""

TESTS = '''
from pathlib import Path

import pytest

COUNTER = Path(__file__).with_name("counter.txt")


@pytest.mark.unit
def test_answers(lm):
    assert lm("What is 2+2?")[0]
    assert lm("And 3+3?")[0]


@pytest.mark.unit
def test_flaky(lm):
    runs = int(COUNTER.read_text()) + 1 if COUNTER.exists() else 1
    COUNTER.write_text(str(runs))
    assert runs % 2 == 1, f"even run {runs}"


@pytest.mark.unit
def test_broken(lm):
    assert 1 + 1 == 3


@pytest.mark.unit
def test_steady(lm):
    assert lm("steady?")[0]
'''


def make_project(root: Path, standin_url: str | None) -> Path:
    """The project at ``root``; ``standin_url``: a stand-in it calls as if it were Gemini (billed at
    list prices), or None: real mode without a key then uses provisioner's own stand-in ($0 billed)."""
    root.mkdir(parents=True, exist_ok=True)
    base_url = "" if standin_url is None else f'lm.base_url = "{standin_url}"\n'
    (root / "pyproject.toml").write_text(PYPROJECT.format(base_url=base_url))
    (root / "test_suite.py").write_text(TESTS)
    (root / ".gitignore").write_text(".provision/\ncounter.txt\n*.json\n*.xml\nreport/\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "suite"]):
        subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)
    return root


def suite_env(key: bool = True) -> dict[str, str]:
    env = {k: v for k, v in without_settings().items() if k not in ("PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    if key:
        env["GEMINI_TEST_API_KEY"] = STANDIN_KEY
    return env


def run_suite(root: Path, *args: str, key: bool = True) -> subprocess.CompletedProcess[str]:
    """One pytest run of the project in real mode: against ``lm.base_url`` with a key, or without a key
    against provisioner's Gemini stand-in."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "--lm", "real", *args],
                          cwd=root, env=suite_env(key), capture_output=True, text=True, timeout=600,
                          check=False)
