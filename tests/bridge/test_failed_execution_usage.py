"""A failed ``execute_program`` still reports the LM calls the worker made for it before it failed:
the error reply carries ``lm_usage`` (docs/protocol.md), which the client counts in its process as
it does a result's — through a worker process, the in-process server and the pool's client alike."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from provisioner.bridge.client import BridgeClient
from provisioner.bridge.protocol import error_reply, parse_reply
from provisioner.errors import BridgeError
from provisioner.lm.callstats import stats
from provisioner.lmconfig import LMConfig, MockRule

QA_INT = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer", "type": "int"}]}
# The mock LM answers "bad" with text no adapter can parse: the call is made, then the program fails.
FAILING_LM = LMConfig(mode="mock", mock_rules=[MockRule(match={"question": "bad"}, error="malformed")])


def _fail_once(client: BridgeClient) -> tuple[BridgeError, Any]:
    session = client.session("usage")
    session.create_program(QA_INT, "qa")
    before = stats()
    with pytest.raises(BridgeError) as info:
        session.execute_program("qa", {"question": "bad"})
    return info.value, stats() - before


def test_a_failed_execution_s_lm_calls_count_in_the_caller_s_process(spawn_worker: Any) -> None:
    worker = spawn_worker(lm=FAILING_LM)
    with worker.client() as client:
        error, delta = _fail_once(client)
    assert error.lm_usage is not None, error
    assert error.lm_usage["mock"] >= 1 and isinstance(error.lm_usage["process"], str)
    assert delta.mock == error.lm_usage["mock"] and delta.calls == error.lm_usage["mock"]


def test_a_failed_execution_on_an_in_process_worker_is_counted_once() -> None:
    """A worker this process serves itself counts its calls directly; the reply's usage is not added
    a second time (same rule as for a result)."""
    from provisioner.bridge.server import BridgeServer
    from provisioner.bridge.service import BridgeService

    server = BridgeServer(BridgeService(FAILING_LM))
    port = server.listen("127.0.0.1", 0)
    try:
        with BridgeClient("127.0.0.1", port) as client:
            error, delta = _fail_once(client)
    finally:
        server.request_stop()
        server.close(timeout=5)
    assert error.lm_usage is not None and error.lm_usage["mock"] >= 1
    assert delta.mock == error.lm_usage["mock"]


def test_the_error_envelope_carries_lm_usage_only_when_given() -> None:
    assert "lm_usage" not in error_reply(1, "x", "ValidationError")
    reply = parse_reply(error_reply(1, "x", "ExecutionError", lm_usage={"mock": 2, "process": "p"}))
    with pytest.raises(BridgeError) as info:
        reply.unwrap()
    assert info.value.lm_usage == {"mock": 2, "process": "p"}
    odd = {"id": 1, "success": False, "error": "x", "error_type": "E", "lm_usage": 3}
    assert parse_reply(odd).lm_usage is None


def _hold_the_second_call(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """The mock LM's second call (the JSONAdapter's retry after FAILING_LM's unparseable first answer)
    waits until ``release`` is set (at most 60 s); ``held`` is set when it starts waiting. The first
    call is answered and counted, so a Timeout reply has one call to carry."""
    from provisioner.lm.mock import MockEngine

    held = threading.Event()
    release = threading.Event()
    answered: list[int] = []
    respond = MockEngine.respond

    def second_call_held(self: MockEngine, *args: Any, **kwargs: Any) -> Any:
        answered.append(1)
        if len(answered) > 1:
            held.set()
            release.wait(60)
        return respond(self, *args, **kwargs)

    monkeypatch.setattr(MockEngine, "respond", second_call_held)
    return held, release


def _deadline_waits_for(server: Any, reached: threading.Event) -> None:
    """``server``'s deadline watch acts on a deadline only once ``reached`` is set (the execution got
    to its held second call), so the Timeout reply always has the first call to carry: a loaded
    machine can take longer than the test's process_timeout to get there (DSPy's first execution
    in a fresh process), and the reply then carried none."""
    expire = server._deadlines._on_expired

    def expire_once_reached(flight: Any) -> None:
        assert reached.wait(60), "the execution never reached its second LM call"
        expire(flight)

    server._deadlines._on_expired = expire_once_reached


def test_a_timed_out_execution_s_lm_calls_come_back_in_the_timeout_reply(monkeypatch: pytest.MonkeyPatch
                                                                         ) -> None:
    """A ``Timeout`` reply carries the LM calls the execution made before its deadline, as a failed
    execution's error reply does: their cost is booked, not lost with the discarded result. The
    first call answers unparseable text (counted), DSPy's ChatAdapter falls back to the JSONAdapter,
    and that second call is held until the Timeout reply has arrived."""

    from provisioner.bridge.server import BridgeServer
    from provisioner.bridge.service import BridgeService

    held, release = _hold_the_second_call(monkeypatch)
    server = BridgeServer(BridgeService(FAILING_LM), request_timeout_s=2.0, pids=None)
    _deadline_waits_for(server, held)
    port = server.listen("127.0.0.1", 0)
    try:
        with BridgeClient("127.0.0.1", port, request_timeout=60) as client:
            session = client.session("usage")
            session.create_program(QA_INT, "qa")
            with pytest.raises(BridgeError) as info:
                session.execute_program("qa", {"question": "bad"})
    finally:
        release.set()
        server.request_stop()
        server.close(timeout=10)
    assert info.value.error_type == "Timeout", info.value
    assert held.is_set(), "the execution never reached its second LM call"
    assert info.value.lm_usage is not None, info.value
    assert info.value.lm_usage["mock"] == 1 and isinstance(info.value.lm_usage["process"], str)


def test_a_client_s_default_wait_exceeds_the_worker_s_deadline_by_the_documented_grace() -> None:
    """The client's default was the worker's process_timeout itself (30 s each): the two timers raced,
    and a client that won dropped the worker's Timeout reply and the cost it carried. One source:
    settings (the default process_timeout, REPLY_GRACE_S); the host's clients use Settings.request_timeout."""
    from provisioner.settings import DEFAULT_PROCESS_TIMEOUT_S, REPLY_GRACE_S, Settings, reply_timeout

    assert REPLY_GRACE_S > 0
    assert BridgeClient("127.0.0.1", 1).request_timeout == DEFAULT_PROCESS_TIMEOUT_S + REPLY_GRACE_S
    assert Settings().request_timeout == reply_timeout(Settings().process_timeout) == 35.0
    assert Settings(process_timeout=2.5).request_timeout == 2.5 + REPLY_GRACE_S


def test_a_slow_request_gets_the_worker_s_timeout_reply_not_a_client_side_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client waiting ``reply_timeout(process_timeout)`` (what BridgeClient's default and the host's
    clients wait) gets the worker's ``Timeout`` reply with the call made so far, the connection kept."""

    from provisioner.bridge.server import BridgeServer
    from provisioner.bridge.service import BridgeService
    from provisioner.settings import reply_timeout

    held, release = _hold_the_second_call(monkeypatch)
    deadline_s = 1.0
    server = BridgeServer(BridgeService(FAILING_LM), request_timeout_s=deadline_s, pids=None)
    _deadline_waits_for(server, held)
    port = server.listen("127.0.0.1", 0)
    try:
        with BridgeClient("127.0.0.1", port, request_timeout=reply_timeout(deadline_s)) as client:
            session = client.session("slow")
            session.create_program(QA_INT, "qa")
            with pytest.raises(BridgeError) as info:
                session.execute_program("qa", {"question": "bad"})
            release.set()
            assert client.ping()["status"] == "ok"  # the same client goes on: nothing was dropped
    finally:
        release.set()
        server.request_stop()
        server.close(timeout=10)
    assert type(info.value) is BridgeError and info.value.error_type == "Timeout", info.value
    assert info.value.lm_usage is not None and info.value.lm_usage["mock"] == 1, info.value
