"""A test is a history row only once pytest gave it an outcome (a new user's trial: a test cut off by
Ctrl-C, and every test of a ``--setup-plan`` run, were saved as "passed")."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from provisioner.history.rows import TestRowCollector
from provisioner.history.store import HISTORY_FILE, History
from provisioner.reporting.dashboard import run_ended

from .._helpers import without_settings

pytest_plugins = ["pytester"]


def report(nodeid: str, when: str, outcome: str) -> Any:
    return SimpleNamespace(nodeid=nodeid, when=when, outcome=outcome, duration=0.01, start=time.time(),
                           user_properties=[])


def test_a_test_without_an_outcome_is_no_row() -> None:
    rows = TestRowCollector("r1", "unit")
    for when, outcome in (("setup", "passed"), ("call", "passed"), ("teardown", "passed")):
        rows.logreport(report("t.py::ran", when, outcome))
    rows.logreport(report("t.py::setup_plan", "setup", "passed"))  # --setup-plan: no call
    rows.logreport(report("t.py::setup_plan", "teardown", "passed"))
    rows.logreport(report("t.py::cut_off", "setup", "passed"))  # Ctrl-C in its call: nothing more
    rows.logreport(report("t.py::skipped", "setup", "skipped"))
    rows.logreport(report("t.py::setup_error", "setup", "failed"))
    rows.logreport(report("t.py::teardown_error", "setup", "passed"))
    rows.logreport(report("t.py::teardown_error", "teardown", "failed"))
    got = {r["node_id"]: r["outcome"] for r in rows.test_rows()}
    assert got == {"t.py::ran": "passed", "t.py::skipped": "skipped", "t.py::setup_error": "error",
                   "t.py::teardown_error": "error"}


def test_a_run_says_how_it_ended() -> None:
    names = [run_ended({"exit_status": s}) for s in (0, 1, 2, 5, 9)]  # type: ignore[typeddict-item]
    assert names == ["passed", "tests failed", "interrupted", "no tests collected", "exit status 9"]


SUITE = """
import os, time
import pytest

@pytest.mark.unit
def test_one(lm):
    pass

@pytest.mark.unit
def test_two(lm):
    pass

@pytest.mark.unit
def test_slow(lm):
    open(os.environ["STARTED_FILE"], "w").close()
    time.sleep(120)
"""


def _tests(project: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with History(project / ".provision" / HISTORY_FILE) as db:
        run = db.runs()[0]
        return dict(run), [dict(t) for t in db.tests(run["run_id"])]


def test_a_setup_plan_run_records_no_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    pytester.makefile(".toml", pyproject="[project]\nname = 'plan'\n")
    result = pytester.runpytest_subprocess("--layer", "unit", "--setup-plan", "-k", "not slow",
                                           "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    with History(pytester.path / ".provision" / HISTORY_FILE) as db:  # no run, or one of no tests
        recorded = [(r["tests"], r["passed"], list(db.tests(r["run_id"]))) for r in db.runs()]
    assert recorded in ([], [(0, 0, [])])


def test_a_test_cut_off_by_ctrl_c_is_not_recorded_as_passed(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makepyfile(test_suite=SUITE)
    pytester.makefile(".toml", pyproject="[project]\nname = 'cut'\n")
    started = tmp_path / "started"
    env = {**without_settings(), "STARTED_FILE": str(started)}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "--layer", "unit", "-p", "no:cacheprovider"],
                            cwd=pytester.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "test_slow never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, out
    run, tests = _tests(pytester.path)
    assert {t["node_id"]: t["outcome"] for t in tests} == {
        "test_suite.py::test_one": "passed", "test_suite.py::test_two": "passed"}, out
    assert run_ended(run) == "interrupted" and (run["tests"], run["passed"]) == (2, 2)
