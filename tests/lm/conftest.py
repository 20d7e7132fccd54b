"""Shared fixtures of the LM tests: one Gemini stand-in per module, reset before each test that uses it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from provisioner.lm.limits import STATE_FILE, RunLimits, locked, write_json_atomic
from provisioner.lm.standin import GeminiStandin

from .._helpers import LatencyGate

STANDIN_KEY = "standin-test-key-0123456789"


@pytest.fixture(scope="module")
def standin_server() -> Iterator[GeminiStandin]:
    with GeminiStandin(api_key=STANDIN_KEY) as server:
        yield server


@pytest.fixture
def standin(standin_server: GeminiStandin) -> GeminiStandin:
    """The module's stand-in with no scripted replies, failures, latency or extra usage left over."""
    standin_server.reset()
    standin_server.set_latency(0)
    standin_server.set_usage(thoughts_tokens=0, cached_tokens=0)
    return standin_server


@pytest.fixture
def latency_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[LatencyGate]:
    """A :class:`~tests._helpers.LatencyGate` in place of ``time`` in ``provisioner.lm.mock`` and in the
    (in-process) Gemini stand-in: a mock rule's ``latency_ms`` and ``standin.set_latency`` hold the call
    until the test releases it. Released at the end."""
    import provisioner.lm.mock as mock
    import provisioner.lm.standin as standin_module

    gate = LatencyGate()
    monkeypatch.setattr(mock, "time", gate)
    monkeypatch.setattr(standin_module, "time", gate)
    try:
        yield gate
    finally:
        gate.release()


#: A test of a user's suite that makes no LM call (the row every per-test figure must leave at 0).
NO_LM_TEST = """
def test_no_lm():
    pass
"""


def real_mode_run(
    pytester: pytest.Pytester, name: str, settings: str, suite: str, xdist: tuple[str, ...]
) -> tuple[pytest.RunResult, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A user's project ``name`` (``settings``: the lines of its ``[tool.provisioner]``) with the test
    file ``test_<name>_suite.py`` (``suite``) and ``test_other.py`` (:data:`NO_LM_TEST`), run by
    ``pytest --layer unit --lm real --provision-report r.json`` in a subprocess (no key: provisioner's
    Gemini stand-in), with ``xdist``'s arguments. Both tests must pass. Returns the run's result, the
    JSON report, and from the history the run's row and its tests' rows by node id. The caller clears
    provisioner's settings from the environment first (the ``no_settings_env`` fixture)."""
    from provisioner.history.store import HISTORY_FILE, History

    pytester.makefile(".toml", pyproject=(
        f"[project]\nname = '{name}'\n[tool.pytest.ini_options]\naddopts = '-p no:cacheprovider'\n"
        f"[tool.provisioner]\n{settings}"))
    pytester.makepyfile(**{f"test_{name}_suite": suite, "test_other": NO_LM_TEST})
    result = pytester.runpytest_subprocess("--layer", "unit", "--lm", "real", "--provision-report", "r.json",
                                           *xdist)
    result.assert_outcomes(passed=2)
    report = json.loads((pytester.path / "r.json").read_text())
    with History(pytester.path / ".provision" / HISTORY_FILE) as db:
        (run,) = db.runs()
        tests = {t["node_id"]: t for t in db.tests(run["run_id"])}
    return result, report, run, tests


# The same for a pytester suite's own test module (it cannot import this conftest): paste it in,
# then ``fill_the_window_as_the_next_call_asks(monkeypatch)`` in a test waits ~0.3 s at its next call.
FULL_WINDOW_IN_SUITE = """
import json, time

from provisioner.lm.limits import STATE_FILE, RunLimits, locked, write_json_atomic


def fill_the_window_as_the_next_call_asks(monkeypatch):
    # As if the first call was 59.7 s ago when the next asks for its slot: it waits ~0.3 s
    # (written as it asks, not before the call: a loaded machine could be later than 0.3 s).
    acquire = RunLimits.acquire_request_timed

    def acquire_in_a_full_window(self):
        with locked(self.run_dir):
            state = json.loads((self.run_dir / STATE_FILE).read_text())
            state["requests"] = [time.time() - 59.7]
            write_json_atomic(self.run_dir / STATE_FILE, state)
        return acquire(self)

    monkeypatch.setattr(RunLimits, "acquire_request_timed", acquire_in_a_full_window)
"""


def fill_the_window_as_the_next_call_asks(monkeypatch: pytest.MonkeyPatch, seconds_left: float,
                                          slots: int = 1) -> None:
    """The next request for a rate-limit slot (only that one: a retry's is free) first finds the
    window's ``slots`` slots taken 60 - ``seconds_left`` s ago — written into the limiter's state
    under its lock as the request begins — so it waits ``seconds_left`` however long the call took
    to get there. Writing that state before the call raced it: on a loaded machine the call could
    reach the limiter after the slots had freed, and nothing waited."""
    acquire = RunLimits.acquire_request_timed

    def acquire_in_a_full_window(self: RunLimits) -> tuple[float, float]:
        monkeypatch.setattr(RunLimits, "acquire_request_timed", acquire)  # once
        with locked(self.run_dir):
            path = self.run_dir / STATE_FILE
            state = json.loads(path.read_text()) if path.exists() else {}
            state["requests"] = [time.time() - 60.0 + seconds_left] * slots
            write_json_atomic(path, state)
        return acquire(self)

    monkeypatch.setattr(RunLimits, "acquire_request_timed", acquire_in_a_full_window)
