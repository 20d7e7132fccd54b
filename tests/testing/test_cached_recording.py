"""A cached layer recording its misses from Gemini (``cached_inner = "real"``) is wired exactly as a
real-mode layer: the key and a route out when ``GEMINI_TEST_API_KEY`` is set, else the run's Gemini
stand-in — in-process (the ``lm`` fixture) and in worker containers, under xdist too; a
``base_url`` the run cannot use is a usage error at session start (docs/lm.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.usefixtures("no_settings_env")

# The project of the new user's trial: cassettes recorded from Gemini (the default cached_inner).
PROJECT = """
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[tool.provisioner.lm]
cached_inner = "real"
cache_dir = "cass"
"""

IN_PROCESS = """
import dspy

def test_answers(lm):
    assert dspy.Predict("question -> answer")(question="2 + 2?").answer
"""

ON_WORKER = """
import pytest

@pytest.mark.integration
@pytest.mark.parametrize("n", range(3))
def test_on_worker(bridge, n):
    bridge.create_program("question -> answer", "qa")
    assert bridge.execute_program("qa", {"question": f"question {n}"})["outputs"]["answer"]
"""


def _entries(root: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*.json"))]


def _without_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GEMINI_TEST_API_KEY", "PROVISION_LM__API_KEY", "PROVISION_LM__BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def test_the_lm_fixture_of_a_cached_layer_records_from_the_standin_and_replays_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pytest --layer e2e --lm cached` without a key: no stand-in was wired in, and the error said
    "or use lm.mode='mock'/'cached'" while the mode was cached."""
    _without_key(monkeypatch)
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_a=IN_PROCESS)
    first = pytester.runpytest_subprocess("--layer", "e2e", "--lm", "cached")
    first.assert_outcomes(passed=1)
    assert "misses recorded from the Gemini stand-in (GEMINI_TEST_API_KEY not set)" in first.stdout.str()
    (entry,) = _entries(pytester.path / "cass")
    assert entry["source"] == "standin" and entry["request"]["identity"] == "gemini-standin"  # type: ignore[index]
    # A later run's stand-in listens on another port: the recording still replays.
    again = pytester.runpytest_subprocess("--layer", "e2e", "--lm", "cached", "--record-mode", "none")
    again.assert_outcomes(passed=1)


@pytest.mark.docker
def test_worker_containers_of_a_cached_layer_record_from_the_standin_under_xdist(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`PROVISION_LM__CACHED_INNER=real LM_CACHE_DIR=cass pytest --layer integration -n 2` without a
    key: every worker call failed with "lm.api_key is not set … export it where you start the run"."""
    _without_key(monkeypatch)
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_bridge=ON_WORKER)
    first = pytester.runpytest_subprocess("--layer", "integration", "-n", "2")
    first.assert_outcomes(passed=3)
    entries = _entries(pytester.path / "cass")
    assert len(entries) == 3 and {e["source"] for e in entries} == {"standin"}, entries
    assert {e["test_id"] for e in entries} == {f"test_bridge.py::test_on_worker[{n}]" for n in range(3)}
    replay = pytester.runpytest_subprocess("--layer", "integration", "-n", "2", "--record-mode", "none")
    replay.assert_outcomes(passed=3)


@pytest.mark.parametrize(("env", "layer", "expected"), [
    pytest.param({"PROVISION_LM__BASE_URL": "http://127.0.0.1:9/"}, "integration",
                 "ERROR: provisioner: lm.base_url=http://127.0.0.1:9/ is set but GEMINI_TEST_API_KEY is not: "
                 "layer 'integration' calls Gemini there (recording cassette misses from Gemini "
                 "(lm.mode='cached', lm.cached_inner='real', lm.record_mode='new_episodes'))",
                 id="base-url-without-key"),
    pytest.param({"PROVISION_LM__BASE_URL": "http://127.0.0.1:9/", "GEMINI_TEST_API_KEY": "test-key"},
                 "integration",
                 "ERROR: provisioner: lm.base_url=http://127.0.0.1:9/ is on this machine's loopback, "
                 "which the worker containers of layer 'integration' cannot reach",
                 id="loopback-base-url-for-containers"),
    pytest.param({"PROVISION_LM__BASE_URL": "http://localhost:9/", "GEMINI_TEST_API_KEY": "test-key"}, "e2e",
                 "ERROR: provisioner: lm.base_url=http://localhost:9/ is on this machine's loopback, "
                 "which the worker containers of layer 'e2e' cannot reach (real mode (lm.mode='real'))",
                 id="loopback-base-url-real-mode"),
])
def test_a_gemini_endpoint_the_run_cannot_use_stops_it_at_start_naming_the_setting(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], layer: str, expected: str
) -> None:
    """The run went on into failing tests; now it is a usage error before any test."""
    _without_key(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_a=IN_PROCESS)
    result = pytester.runpytest_subprocess("--layer", layer)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert any(line.startswith(expected) for line in result.stderr.lines), result.stderr.str()
    assert "test-key" not in result.stderr.str() + result.stdout.str()


def test_a_loopback_base_url_is_fine_in_process_with_a_key(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unit layer's LM runs in the test process, which reaches a stand-in the user started."""
    from provisioner.lm.standin import GeminiStandin

    _without_key(monkeypatch)
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_a=IN_PROCESS)
    with GeminiStandin(api_key="test-key") as standin:
        url = standin.url
        monkeypatch.setenv("GEMINI_TEST_API_KEY", "test-key")
        monkeypatch.setenv("PROVISION_LM__BASE_URL", url)
        result = pytester.runpytest_subprocess("--layer", "unit", "--lm", "cached")
        result.assert_outcomes(passed=1)
        assert standin.request_count == 1
    (entry,) = _entries(pytester.path / "cass")
    assert entry["request"]["identity"] == f"gemini@{url.rstrip('/')}"  # type: ignore[index]


# -- a replay miss says the command that records it, and shows its diff once ------------------------

MOCK_PROJECT = PROJECT.replace('cached_inner = "real"', 'cached_inner = "mock"')

ASK = """
import dspy
import pytest

@pytest.mark.parametrize("q", {questions!r})
def test_ask(lm, q):
    dspy.Predict("question -> answer")(question=q)
"""


def _hint(output: str) -> str:
    (command,) = set(re.findall(r"Record it with `([^`]+)`", output))
    return command


def _run_as_written(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _failures_section(out: str) -> str:
    """pytest's report of the failures, without its short test summary: that repeats each failure's
    message, whole when CI is set (pytest does not cut it to the terminal's width there)."""
    return out.split("short test summary info")[0]


def test_the_miss_hint_is_the_command_that_records_the_missing_cassette(
    pytester: pytest.Pytester
) -> None:
    """It said `pytest --lm cached --record-mode new_episodes`: run as written it ran the default
    (unit) layer. Now it names the cassette folder, the test and the run's layer; run as written, it
    records the cassette, and the next replay-only run passes. The diff is shown once."""
    pytester.makefile(".toml", pyproject=MOCK_PROJECT)
    pytester.makepyfile(test_a=ASK.format(questions=["one"]))
    pytester.runpytest_subprocess("--layer", "integration", "--lm", "cached").assert_outcomes(passed=1)
    pytester.makepyfile(test_a=ASK.format(questions=["one", "two"]))
    replay = ("--layer", "integration", "--lm", "cached", "--record-mode", "none")
    missed = pytester.runpytest_subprocess(*replay)
    missed.assert_outcomes(passed=1, failed=1)
    out = missed.stdout.str()
    command = _hint(out)
    assert command == ("LM_CACHE_DIR=cass pytest 'test_a.py::test_ask[two]' --layer integration --lm cached "
                       "--record-mode new_episodes")
    assert _failures_section(out).count("+++ requested") == 1, out
    recorded = _run_as_written(command, pytester.path)
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    pytester.runpytest_subprocess("--layer", "integration", "--lm", "cached", "--record-mode", "none") \
        .assert_outcomes(passed=2)


@pytest.mark.docker
def test_a_worker_s_miss_hint_records_it_and_its_diff_is_shown_once(pytester: pytest.Pytester) -> None:
    """The trial's integration run on worker containers: the diff came in the E lines and again in
    the worker's log section; the hint lacked the layer."""
    pytester.makefile(".toml", pyproject=MOCK_PROJECT)
    pytester.makepyfile(test_bridge=ON_WORKER.replace("range(3)", "range(1)"))
    pytester.runpytest_subprocess("--layer", "integration").assert_outcomes(passed=1)
    pytester.makepyfile(test_bridge=ON_WORKER.replace("range(3)", "range(2)"))
    missed = pytester.runpytest_subprocess("--layer", "integration", "--record-mode", "none")
    missed.assert_outcomes(passed=1, failed=1)
    out = missed.stdout.str()
    command = _hint(out)
    assert command == ("LM_CACHE_DIR=cass pytest 'test_bridge.py::test_on_worker[1]' --layer integration "
                       "--lm cached --record-mode new_episodes")
    assert _failures_section(out).count("+++ requested") == 1, out
    assert "more lines in the error reply" in out  # the worker's log names the miss in one line
    recorded = _run_as_written(command, pytester.path)
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    pytester.runpytest_subprocess("--layer", "integration", "--record-mode", "none").assert_outcomes(passed=2)
