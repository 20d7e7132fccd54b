"""Regex mock rules sent over the wire cannot hang the worker (issue 14, item 4).

Before: ``MockRule(kind="regex", match={"question": "(a+)+$"})`` against ``"a"*26 + "!"`` held the
GIL in the stdlib's ``re`` for seconds, doubling per character: every other client's ping waited.
Now rules match with the ``regex`` package, bounded in time and input length.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from provisioner.errors import BridgeError
from provisioner.lm.mock import REGEX_MAX_INPUT_CHARS

QA = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer"}]}


def run_in_background(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fn()
        except BridgeError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize(
    ("pattern", "text"),
    [
        ("(a+)+$", "a" * 26 + "!"),  # the report's: catastrophic for the stdlib re
        ("(a|aa)+$", "a" * 60 + "!"),  # catastrophic for regex too: only the time bound stops it
    ],
)
def test_a_backtracking_rule_neither_hangs_the_worker_nor_other_clients(
    spawn_worker: Any, poll: Any, pattern: str, text: str
) -> None:
    worker = spawn_worker()
    # A ping that had to wait for the old matcher (hours for these inputs) would time out here.
    with worker.client() as attacker, worker.client(request_timeout=10) as bystander:
        session = attacker.session("evil")
        session.configure_lm(mode="mock", mock_rules=[{"kind": "regex", "match": {"question": pattern},
                                                       "outputs": {"answer": "matched"}}])
        session.create_program(QA, "qa")
        thread, outcome = run_in_background(lambda: session.execute_program("qa", {"question": text}))
        pings = 0
        while thread.is_alive() or pings < 3:
            assert bystander.ping()["status"] == "ok"
            pings += 1
        thread.join()
        assert outcome, "the execution returned nothing"
        if "error" in outcome:  # the time bound fired: a clear error naming the pattern, not a hang
            error = outcome["error"]
            assert error.error_type == "ConfigError"
            assert pattern in error.message and "did not finish matching" in error.message
        else:  # the engine decided quickly: an honest non-match, the default answer
            assert outcome["result"]["outputs"]["answer"] != "matched"
        poll(lambda: bystander.get_stats()["inflight"] == 0, what="the execution slot to be free")
        assert session.execute_program("qa", {"question": "b"})["outputs"]["answer"] != "matched"


def test_the_time_bound_is_an_error_not_a_silent_non_match(spawn_worker: Any) -> None:
    worker = spawn_worker()
    with worker.client() as client:
        session = client.session("s")
        session.configure_lm(mode="mock", mock_rules=[
            {"kind": "regex", "match": {"question": "(a|aa)+$"}, "outputs": {"answer": "never"}},
        ])
        session.create_program(QA, "qa")
        with pytest.raises(BridgeError) as info:
            session.execute_program("qa", {"question": "a" * 60 + "!"})
        assert info.value.error_type == "ConfigError"
        assert "'(a|aa)+$' did not finish matching an input of 61 characters" in info.value.message
        assert "kind 'substring'" in info.value.message


def test_regex_rules_refuse_inputs_over_the_cap(spawn_worker: Any) -> None:
    worker = spawn_worker()
    with worker.client() as client:
        session = client.session("s")
        session.configure_lm(mode="mock", mock_rules=[
            {"kind": "regex", "match": {"question": "^x"}, "outputs": {"answer": "x"}},
        ])
        session.create_program(QA, "qa")
        assert session.execute_program("qa", {"question": "x" * REGEX_MAX_INPUT_CHARS})["outputs"] == {
            "answer": "x"
        }
        with pytest.raises(BridgeError) as info:
            session.execute_program("qa", {"question": "x" * (REGEX_MAX_INPUT_CHARS + 1)})
        assert info.value.error_type == "ConfigError"
        assert f"at most {REGEX_MAX_INPUT_CHARS}" in info.value.message


def test_validation_and_matching_use_the_same_engine(spawn_worker: Any) -> None:
    worker = spawn_worker()
    with worker.client() as client:
        session = client.session("s")
        # \p{Lu} is valid for the regex package (and not for the stdlib re): accepted and matched.
        session.configure_lm(mode="mock", mock_rules=[
            {"kind": "regex", "match": {"question": r"^\p{Lu}\p{Ll}+$"}, "outputs": {"answer": "a name"}},
        ])
        session.create_program(QA, "qa")
        assert session.execute_program("qa", {"question": "Émile"})["outputs"] == {"answer": "a name"}
        with pytest.raises(BridgeError) as info:
            session.configure_lm(mode="mock", mock_rules=[{"kind": "regex", "match": {"question": "(a"}}])
        assert info.value.error_type == "InvalidLMConfig" and "not a valid regex" in info.value.message
