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


pytestmark = pytest.mark.usefixtures("no_settings_env")


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


# -- sessions that run no test body vouch for nothing (and leave no run folder) ---------------------

FOUR = """
import dspy
import pytest

@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_ask(n, lm):
    dspy.Predict("question -> answer")(question=f"question {n}")
"""


# Only the unit layer uses the cassettes (integration's default is cached too: it would need its own run).
ONLY_UNIT_CACHED = PROJECT + """
[tool.provisioner.lm_modes]
unit = "cached"
integration = "mock"
"""


def _prune(pytester: pytest.Pytester) -> dict[str, Any]:
    from click.testing import CliRunner

    from provisioner.cli import main

    result = CliRunner().invoke(main, ["cassettes", "prune", "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def _runs(pytester: pytest.Pytester) -> set[str]:
    return {p.name for p in (pytester.path / ".provision" / "runs").iterdir()}


@pytest.mark.parametrize("args", [
    pytest.param(("--setup-plan",), id="setup-plan"),
    pytest.param(("--setup-only",), id="setup-only"),
    pytest.param(("--fixtures",), id="fixtures"),
    pytest.param(("--fixtures-per-test",), id="fixtures-per-test"),
    pytest.param(("--markers",), id="markers"),
    pytest.param(("--collect-only",), id="collect-only"),
    pytest.param(("-k", "nothing_matches"), id="empty-selection"),
    pytest.param(("--setup-plan", "-n", "2"), id="setup-plan-xdist"),
    pytest.param(("--setup-only", "-n", "2"), id="setup-only-xdist"),
    pytest.param(("--collect-only", "-n", "2"), id="collect-only-xdist", marks=pytest.mark.slow),
])
def test_a_session_that_runs_no_test_body_leaves_prune_keeping_the_cassettes(
    pytester: pytest.Pytester, args: tuple[str, ...]
) -> None:
    """The new user's trial: 4 passed, then `pytest --setup-plan` made prune call all 4 cassettes
    unused (the no-body session had written itself down as complete, using none)."""
    pytester.makefile(".toml", pyproject=ONLY_UNIT_CACHED)
    pytester.makepyfile(test_a=FOUR)
    assert pytester.runpytest_subprocess("--layer", "unit", "--lm", "cached").ret == 0
    before = _prune(pytester)
    assert before["removed"] == [] and before["kept"] == 4
    (full_run,) = _runs(pytester)
    pytester.runpytest_subprocess("--layer", "unit", "--lm", "cached", *args)
    after = _prune(pytester)
    assert after["removed"] == [] and after["kept"] == 4, after
    assert after["vouching"] == {"unit": full_run}
    # Nor does it leave a run folder (a ledger, its lock, xdist's progress marker): `provision cost
    # report`'s known runs are the runs that ran tests.
    assert _runs(pytester) == {full_run}


def test_a_run_whose_tests_did_not_all_run_their_body_is_partial(pytester: pytest.Pytester) -> None:
    """A test skipped (or failed) before its body used none of its cassettes: the run cannot say
    they are unused."""
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_a=FOUR + """
@pytest.mark.skip(reason="not today")
def test_skipped(lm):
    dspy.Predict("question -> answer")(question="skipped")

@pytest.fixture
def broken():
    raise RuntimeError("set-up fails")

def test_errored(lm, broken):
    pass
""")
    pytester.runpytest_subprocess("--layer", "unit", "--lm", "cached")
    end = _run_end(pytester)
    assert end["complete"] is False
    assert end["partial"] == ["2 of 6 selected tests did not run their body (skipped or failed in set-up: "
                              "test_a.py::test_errored, test_a.py::test_skipped)"]


def test_bodies_decide_only_a_run_otherwise_complete() -> None:
    whole = Completeness()
    for nodeid in ("t.py::a", "t.py::b"):
        for when in ("setup", "call", "teardown"):
            whole.phase(nodeid, when)
    whole.ending(exitstatus=0, stopped=None, selected=2)
    assert whole.complete
    set_up_only = Completeness()
    set_up_only.phase("t.py::a", "setup")
    set_up_only.phase("t.py::a", "teardown")
    set_up_only.ending(exitstatus=0, stopped=None, selected=2)
    assert set_up_only.reasons == ["no test body ran (0 of 2 selected)"]
    empty = Completeness()
    empty.ending(exitstatus=0, stopped=None, selected=0)
    assert empty.reasons == ["no test selected"]
    interrupted = Completeness()  # the interrupt says why; the bodies it did not reach are not listed
    interrupted.phase("t.py::a", "call")
    interrupted.ending(exitstatus=2, stopped=None, selected=2)
    assert interrupted.reasons == ["interrupted"]


def test_the_options_that_run_no_body_are_named() -> None:
    for options, reason in (({"setupplan": True, "setuponly": True}, ["--setup-plan"]),
                            ({"setuponly": True}, ["--setup-only"]), ({"showfixtures": True}, ["--fixtures"]),
                            ({"show_fixtures_per_test": True}, ["--fixtures-per-test"])):
        completeness = Completeness()
        completeness.selection(args=[], invocation_dir=Path("/"), rootdir=Path("/"), testpaths=(),
                               options=options)
        assert completeness.reasons == reason


# -- a collected test the selection left out: a pytest-split shard, a plugin dropping items ----------

# A plugin that removes items without telling pytest (no pytest_deselected), the way some do.
DROPPING_PLUGIN = """
def pytest_collection_modifyitems(config, items):
    items[:] = [item for item in items if not item.name.endswith("[3]")]
"""


@pytest.mark.parametrize("args", [
    pytest.param(("--splits", "2", "--group", "1", "--splitting-algorithm", "least_duration"),
                 id="pytest-split"),
    pytest.param(("--splits", "2", "--group", "2", "-n", "2"), id="pytest-split-xdist"),
    pytest.param(("-p", "dropper"), id="dropping-plugin"),
    pytest.param(("-p", "dropper", "-n", "2", "--dist", "loadfile"), id="dropping-plugin-xdist"),
])
def test_a_run_of_part_of_the_collected_suite_is_partial_and_prune_keeps_the_rest(
    pytester: pytest.Pytester, args: tuple[str, ...]
) -> None:
    """The new user's trial: `--splits 2 --group 1` ran 1 of 12 tests, its ledger said complete, and
    prune then removed the other shard's cassettes. Any collected test of the layer the selection
    leaves out makes the run partial, whoever left it out."""
    pytester.makefile(".toml", pyproject=ONLY_UNIT_CACHED)
    pytester.makepyfile(test_a=FOUR, dropper=DROPPING_PLUGIN)
    pytester.syspathinsert()
    assert pytester.runpytest_subprocess("--layer", "unit", "--lm", "cached").ret == 0
    (full_run,) = _runs(pytester)
    shard = pytester.runpytest_subprocess("--layer", "unit", "--lm", "cached", "--record-mode", "none", *args)
    assert shard.ret == 0, shard.stdout.str()
    end = _run_end(pytester)
    assert end["complete"] is False, end
    (reason,) = end["partial"]
    if "pytest-split" in reason:
        assert reason.startswith("2 of 4 collected tests did not run (pytest-split ran group ")
    else:
        assert reason == ("1 of 4 collected tests did not run (dropped by a plugin (without "
                          "pytest_deselected): test_a.py::test_ask[3])")
    after = _prune(pytester)
    assert after["removed"] == [] and after["kept"] == 4, after
    assert after["vouching"] == {"unit": full_run}


def test_collection_names_who_left_tests_out() -> None:
    tests = ["t.py::a", "t.py::b", "t.py::c"]
    whole = Completeness()
    whole.collection(layer_tests=tests, selected=tests, deselected=[])
    assert whole.dropped is None
    deselected = Completeness()
    deselected.collection(layer_tests=tests, selected=["t.py::a"], deselected=["t.py::b", "t.py::c"])
    deselected.selection(args=[], invocation_dir=Path("/p"), rootdir=Path("/p"), testpaths=[], options={})
    assert deselected.reasons == [
        "2 of 3 collected tests did not run (deselected by a plugin: t.py::b, t.py::c)"]
    # -k (or -m, --deselect …) already says why: named once.
    by_k = Completeness()
    by_k.collection(layer_tests=tests, selected=["t.py::a"], deselected=["t.py::b", "t.py::c"])
    by_k.selection(args=[], invocation_dir=Path("/p"), rootdir=Path("/p"), testpaths=[],
                   options={"keyword": "a"})
    assert by_k.reasons == ["-k 'a'"]
    shard = Completeness()
    shard.collection(layer_tests=tests, selected=["t.py::c"], deselected=["t.py::a", "t.py::b"], shard="2/2")
    shard.selection(args=[], invocation_dir=Path("/p"), rootdir=Path("/p"), testpaths=[], options={})
    assert shard.reasons == ["2 of 3 collected tests did not run (pytest-split ran group 2 of 2: one shard "
                             "is not the whole suite: t.py::a, t.py::b)"]
