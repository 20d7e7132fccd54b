"""When a run is complete (may vouch for unused cassettes) and why it is partial."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from provisioner.testing.completeness import Completeness

pytest_plugins = ["pytester"]


def _selection(tmp_path: Path, args: list[str], *, testpaths: tuple[str, ...] = ("tests",),
               invocation: Path | None = None, **options: Any) -> list[str]:
    (tmp_path / "tests" / "sub").mkdir(parents=True, exist_ok=True)
    completeness = Completeness()
    completeness.selection(args=args, invocation_dir=invocation or tmp_path, rootdir=tmp_path,
                           testpaths=testpaths, options=options)
    return completeness.reasons


def test_the_whole_suite_is_complete(tmp_path: Path) -> None:
    assert _selection(tmp_path, ["tests"]) == []  # testpaths, as pytest expands them
    assert _selection(tmp_path, [str(tmp_path)]) == []  # the rootdir covers the suite
    assert _selection(tmp_path, [str(tmp_path)], testpaths=()) == []
    assert _selection(tmp_path, [], keyword="", markexpr="", lf=False, deselect=[]) == []


def test_narrower_selections_are_partial(tmp_path: Path) -> None:
    assert _selection(tmp_path, ["tests/test_a.py::test_one"]) == ["a node id (tests/test_a.py::test_one)"]
    assert _selection(tmp_path, ["tests/sub"]) == [
        "a positional path (tests/sub) narrower than the suite (tests)"]
    # `pytest` run from a subdirectory runs only that subtree
    assert _selection(tmp_path, [str(tmp_path / "tests" / "sub")], invocation=tmp_path / "tests" / "sub")
    assert _selection(tmp_path, ["tests"], keyword="qa") == ["-k 'qa'"]
    assert _selection(tmp_path, ["tests"], markexpr="slow") == ["-m 'slow'"]
    assert _selection(tmp_path, ["tests"], lf=True, deselect=["tests/x.py::t"]) == [
        "--lf", "--deselect tests/x.py::t"]


def test_runs_that_do_not_reach_their_end_are_partial() -> None:
    for exitstatus, stopped, reason in (
        (1, "stopping after 1 failures", "stopped early (stopping after 1 failures: -x/--maxfail or the "
                                         "layer's max_failures)"),
        (2, None, "interrupted"),
        (3, None, "an internal error"),
        (1, "session-timeout: 5 sec exceeded", "stopped early (session-timeout: 5 sec exceeded)"),
    ):
        completeness = Completeness()
        completeness.ending(exitstatus=exitstatus, stopped=stopped)
        assert completeness.reasons == [reason]
    for exitstatus in (0, 1):  # all passed, or some failed: the whole suite still ran
        completeness = Completeness()
        completeness.ending(exitstatus=exitstatus, stopped=None)
        assert completeness.complete
    timed_out = Completeness()
    timed_out.test_report("t.py::slow", True, "E   Failed: Timeout (>1.0s) from pytest-timeout.")
    timed_out.test_report("t.py::bad", True, "E   assert 1 == 2")
    assert timed_out.reasons == ["t.py::slow timed out"]


# -- the plugin writes it to the run's ledger --------------------------------------------------------

PROJECT = """
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[tool.provisioner.lm]
cached_inner = "mock"
cache_dir = "cassettes"
"""

SUITE = """
import time
import dspy
import pytest

# Only test_ask[1] may time out: under a loaded machine the others' set-up (the lm fixture) took
# over the run's `--timeout 1` too (a marker wins over the option).
LONG = pytest.mark.timeout(600)

@pytest.mark.parametrize("n", [pytest.param(0, marks=LONG), 1, pytest.param(2, marks=LONG)])
def test_ask(n, lm):
    dspy.Predict("question -> answer")(question=f"question {{n}}")
    if n == 1 and {trouble!r} == "timeout":
        time.sleep(60)  # cut short by pytest-timeout after 1 s
    if n == 1 and {trouble!r} == "fail":
        raise AssertionError("fails")
    if n == 1 and {trouble!r} == "interrupt":
        raise KeyboardInterrupt
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PROVISION_") or name in ("TEST_MODE", "LM_CACHE_DIR", "GEMINI_TEST_API_KEY"):
            monkeypatch.delenv(name, raising=False)


def _run_end(pytester: pytest.Pytester) -> dict[str, Any]:
    ledgers = sorted((pytester.path / ".provision" / "runs").glob("*/lm/ledger.jsonl"), key=os.path.getmtime)
    lines = [json.loads(line) for line in ledgers[-1].read_text().splitlines()]
    (end,) = [line for line in lines if line["event"] == "run_complete"]
    return end


@pytest.mark.parametrize(("trouble", "args", "reason"), [
    ("none", (), None),
    ("fail", (), None),  # a failing test does not make the run partial
    ("timeout", ("--timeout", "1", "--timeout-method", "signal"), "test_a.py::test_ask[1] timed out"),
    ("interrupt", (), "interrupted"),
    ("fail", ("-x",), "stopped early (stopping after 1 failures: -x/--maxfail or the layer's max_failures)"),
])
def test_the_run_end_in_the_ledger_says_whether_it_was_complete(
    pytester: pytest.Pytester, trouble: str, args: tuple[str, ...], reason: str | None
) -> None:
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_a=SUITE.format(trouble=trouble))
    pytester.runpytest_subprocess("--layer", "unit", "--lm", "cached", *args)
    end = _run_end(pytester)
    assert end["complete"] is (reason is None) and end["partial"] == ([] if reason is None else [reason])
    assert end["cache_dir"] == str(pytester.path / "cassettes") and end["layer"] == "unit"


def test_a_run_stopped_by_the_layers_max_failures_under_xdist_is_partial(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=PROJECT + "\n[tool.provisioner.layers.unit]\nmax_failures = 1\n")
    pytester.makepyfile(test_a=SUITE.format(trouble="fail"))
    pytester.runpytest_subprocess("--layer", "unit", "--lm", "cached", "-n", "2")
    end = _run_end(pytester)
    assert end["complete"] is False and "stopped early" in end["partial"][0]


def test_a_run_ended_by_an_internal_error_is_partial(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_a=SUITE.format(trouble="none"))
    pytester.makeconftest("""
        def pytest_runtest_logfinish(nodeid, location):
            if nodeid.endswith("[1]"):
                raise RuntimeError("a plugin broke")
        """)
    result = pytester.runpytest_subprocess("--layer", "unit", "--lm", "cached")
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    end = _run_end(pytester)
    assert end["complete"] is False and end["partial"] == ["an internal error"]
