"""Cassettes across whole pytest runs (issue 9): "once" is decided once per run and layer — in
process, under xdist and in worker containers — and only complete runs vouch for pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from provisioner.cli import main
from provisioner.lm.cassettes import CassetteStore

pytest_plugins = ["pytester"]

PROJECT = """
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[tool.provisioner.lm]
cached_inner = "mock"
cache_dir = "cassettes"
"""

TWO_TESTS = """
import dspy

def test_one(lm):
    assert dspy.Predict("question -> answer")(question="first question").answer == "mock_response"

def test_two(lm):
    assert dspy.Predict("question -> answer")(question="second question").answer == "mock_response"
"""

THIRD_TEST = """
import dspy

def test_three(lm):
    dspy.Predict("question -> answer")(question="third question")
"""

ONCE = ("--layer", "unit", "--lm", "cached", "--record-mode", "once")


pytestmark = pytest.mark.usefixtures("no_settings_env")


def _calls(pytester: pytest.Pytester, report: str, layer: str = "unit") -> dict[str, int]:
    section = json.loads((pytester.path / report).read_text())["layers"][layer]
    return {**section["lm_calls"], "cache_misses": section["cache_misses"]}


def _cassettes(pytester: pytest.Pytester) -> int:
    return len(CassetteStore(pytester.path / "cassettes").keys())


def test_once_records_every_test_of_the_first_run_and_replays_them_later(pytester: pytest.Pytester) -> None:
    """The issue's input: empty dir, two tests, --record-mode once, cached_inner = "mock"."""
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_qa=TWO_TESTS)
    first = pytester.runpytest(*ONCE, "--provision-report", "first.json")
    first.assert_outcomes(passed=2)
    assert _cassettes(pytester) == 2
    assert _calls(pytester, "first.json")["recorded"] == 2
    again = pytester.runpytest(*ONCE, "--provision-report", "again.json")
    again.assert_outcomes(passed=2)
    assert _calls(pytester, "again.json") == {"mock": 0, "replayed": 2, "recorded": 0, "real": 0,
                                              "standin": 0, "cache_misses": 0}
    pytester.makepyfile(test_more=THIRD_TEST)
    later = pytester.runpytest(*ONCE, "--provision-report", "later.json")
    later.assert_outcomes(passed=2, failed=1)
    later.stdout.fnmatch_lines(["*replay-only for this run*had recordings when the run started*"])
    assert _cassettes(pytester) == 2
    assert _calls(pytester, "later.json")["cache_misses"] == 1


@pytest.mark.slow
def test_once_is_shared_by_the_xdist_processes_of_a_run(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_qa="""
        import dspy
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_ask(n, lm):
            dspy.Predict("question -> answer")(question=f"question {n}")
        """)
    first = pytester.runpytest_subprocess(*ONCE, "-n", "2", "--provision-report", "first.json")
    first.assert_outcomes(passed=4)
    assert _cassettes(pytester) == 4 and _calls(pytester, "first.json")["recorded"] == 4
    again = pytester.runpytest_subprocess(*ONCE, "-n", "2", "--provision-report", "again.json")
    again.assert_outcomes(passed=4)
    assert _calls(pytester, "again.json")["replayed"] == 4


INTEGRATION_TESTS = """
import pytest

SIGNATURE = {{"inputs": [{{"name": "question"}}], "outputs": [{{"name": "answer"}}]}}

@pytest.mark.integration
@pytest.mark.parametrize("question", {questions!r})
def test_on_its_own_worker(bridge_worker, question):
    session = bridge_worker.session("s")  # a worker container started for this test only
    session.create_program(SIGNATURE, "qa")
    assert session.execute_program("qa", {{"question": question}})["outputs"] == {{"answer": "mock_response"}}
"""


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_once_in_worker_containers_is_decided_once_per_run(pytester: pytest.Pytester) -> None:
    """Integration layer: each test's LM runs in its own worker container, started after the
    previous test recorded — the run's decision, not the directory at start-up, says "record"."""
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_it=INTEGRATION_TESTS.format(questions=["first question", "second question"]))
    args = ("--layer", "integration", "--record-mode", "once")
    first = pytester.runpytest_subprocess(*args, "--provision-report", "first.json", timeout=400)
    first.assert_outcomes(passed=2)
    assert _cassettes(pytester) == 2
    assert _calls(pytester, "first.json", "integration")["recorded"] == 2
    pytester.makepyfile(test_it=INTEGRATION_TESTS.format(
        questions=["first question", "second question", "third question"]))
    later = pytester.runpytest_subprocess(*args, "-n", "2", "--provision-report", "later.json", timeout=400)
    later.assert_outcomes(passed=2, failed=1)
    later.stdout.fnmatch_lines(["*replay-only for this run*"])
    calls = _calls(pytester, "later.json", "integration")
    assert calls["replayed"] == 2 and calls["recorded"] == 0 and calls["cache_misses"] == 1
    assert _cassettes(pytester) == 2


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_a_read_only_cassette_dir_stays_read_only_and_a_worker_says_so(pytester: pytest.Pytester) -> None:
    """As root, starting the integration layer used to widen the cassette dir for the workers."""
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_it=INTEGRATION_TESTS.format(questions=["never recorded"]))
    cassettes = pytester.path / "cassettes"
    cassettes.mkdir()
    cassettes.chmod(0o555)
    try:
        result = pytester.runpytest_subprocess("--layer", "integration", "--provision-report", "r.json",
                                               timeout=400)
        mode = cassettes.stat().st_mode & 0o7777
    finally:
        cassettes.chmod(0o755)
    assert mode == 0o555
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*cassette dir not writable*use --record-mode none or fix its permissions*"])
    assert _cassettes(pytester) == 0
    assert _calls(pytester, "r.json", "integration")["cache_misses"] == 1


# -- prune: only complete runs vouch -----------------------------------------------------------------

FIVE_TESTS = """
import dspy
import pytest

@pytest.mark.parametrize("n", range(5))
def test_ask(n, lm):
    dspy.Predict("question -> answer")(question=f"question {{n}}")
    assert n != 1 or {fail!r} != "fail"
"""

PRUNE_PROJECT = PROJECT + """
[tool.provisioner.lm_modes]
integration = "mock"   # only the unit layer (run with --lm cached) uses the cassettes here
"""

CACHED = ("--layer", "unit", "--lm", "cached")


def _prune(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["cassettes", "prune", *args])
    return result.exit_code, result.output


def test_a_partial_run_never_vouches_for_pruning(pytester: pytest.Pytester) -> None:
    """The issue's input: after `pytest tests/test_a.py::test_one` or a run stopped by -x, prune
    proposed removing 4 of 5 cassettes."""
    pytester.makefile(".toml", pyproject=PRUNE_PROJECT)
    pytester.makepyfile(test_a=FIVE_TESTS.format(fail="pass"))
    pytester.runpytest(*CACHED, "test_a.py::test_ask[0]").assert_outcomes(passed=1)
    code, output = _prune()
    assert code != 0 and "layer 'unit' has no complete run" in output
    assert "was partial: a node id (test_a.py::test_ask[0])" in output
    pytester.makepyfile(test_a=FIVE_TESTS.format(fail="fail"))
    pytester.runpytest(*CACHED, "-x").assert_outcomes(passed=1, failed=1)
    code, output = _prune()
    assert code != 0 and "stopped early" in output and "-x/--maxfail" in output
    assert _cassettes(pytester) == 2

    pytester.makepyfile(test_a=FIVE_TESTS.format(fail="pass"))
    pytester.runpytest(*CACHED).assert_outcomes(passed=5)  # complete: vouches for all five
    assert _cassettes(pytester) == 5
    pytester.runpytest(*CACHED, "test_a.py::test_ask[0]").assert_outcomes(passed=1)  # partial again
    pytester.runpytest(*CACHED, "-k", "ask[2]").assert_outcomes(passed=1, deselected=4)
    code, output = _prune("--dry-run")
    assert code == 0, output
    assert "0 unused, 5 kept" in output and "would remove" not in output


def test_prune_deletes_only_with_yes(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=PRUNE_PROJECT)
    pytester.makepyfile(test_a=FIVE_TESTS.format(fail="pass"), test_gone=THIRD_TEST)
    pytester.runpytest(*CACHED).assert_outcomes(passed=6)
    (pytester.path / "test_gone.py").unlink()
    # Entries recorded while the vouching run ran are kept: age the recordings of the first run.
    for path in CassetteStore(pytester.path / "cassettes").paths():
        entry = json.loads(path.read_text())
        entry["recorded_at"] = "2026-01-01T00:00:00+00:00"
        path.write_text(json.dumps(entry, indent=2))
    pytester.runpytest(*CACHED).assert_outcomes(passed=5)
    code, output = _prune()
    assert code == 0 and "1 unused, 5 kept" in output and "add --yes" in output
    assert _cassettes(pytester) == 6
    code, output = _prune("--yes")
    assert code == 0 and output.count("removed ") == 1 and _cassettes(pytester) == 5


def test_prune_refuses_while_another_layer_using_the_dir_has_no_complete_run(
    pytester: pytest.Pytester,
) -> None:
    pytester.makefile(".toml", pyproject=PROJECT)  # the integration layer is cached: it uses the dir too
    pytester.makepyfile(test_a=FIVE_TESTS.format(fail="pass"))
    pytester.runpytest(*CACHED).assert_outcomes(passed=5)
    code, output = _prune()
    assert code != 0 and "layer 'integration' has no complete run" in output
    assert "layer 'unit'" not in output


def test_list_names_the_test_of_a_recording_made_in_a_bridge_session(pytester: pytest.Pytester) -> None:
    """A bridge worker attributes calls to the session; the controller noted the session's test."""
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_bridge="""
        SIGNATURE = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer"}]}

        def test_through_the_bridge(isolated):
            isolated.adapter.create_program(SIGNATURE, "qa")
            outputs = isolated.adapter.execute_program("qa", {"question": "via a session"})["outputs"]
            assert outputs == {"answer": "mock_response"}
        """)
    pytester.runpytest("--layer", "unit", "--lm", "cached").assert_outcomes(passed=1)
    result = CliRunner().invoke(main, ["cassettes", "list", "--json"])
    (entry,) = json.loads(result.stdout)
    assert entry["test_id"] == "test_bridge.py::test_through_the_bridge"
    assert entry["source"] == "mock"
    recorded = json.loads(Path(entry["path"]).read_text())
    assert recorded["session_id"].startswith("session_")
