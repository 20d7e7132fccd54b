"""The command handlers in-process (BridgeService / LocalBridge), with the real mock LM of provisioner.lm."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from provisioner.bridge import COMMANDS, BridgeService, LocalBridge
from provisioner.bridge.service import Deferred
from provisioner.errors import BridgeError, ProtocolError
from provisioner.lmconfig import LMConfig, MockRule

QA_INT = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer", "type": "int"}]}


def rules(*pairs: tuple[str, Any]) -> list[MockRule]:
    return [MockRule(match={"question": q}, outputs={"answer": a}) for q, a in pairs]


@pytest.fixture
def bridge() -> LocalBridge:
    return LocalBridge(LMConfig(mode="mock", mock_rules=rules(("2+2", 4), ("colour", "blue"))))


def error_of(fn: Any, *args: Any, **kwargs: Any) -> BridgeError:
    with pytest.raises(BridgeError) as info:
        fn(*args, **kwargs)
    return info.value


def test_execute_returns_typed_outputs(bridge: LocalBridge) -> None:
    created = bridge.create_program(QA_INT, "qa")
    assert created["status"] == "created" and created["program_id"] == "qa"
    assert created["session_id"] == "anonymous" and created["program_type"] == "predict"
    result = bridge.execute_program("qa", {"question": "what is 2+2?"})
    assert result["outputs"] == {"answer": 4}
    assert isinstance(result["outputs"]["answer"], int)
    assert result["program_id"] == "qa" and result["execution_time_ms"] > 0


def test_chain_of_thought_adds_reasoning(bridge: LocalBridge) -> None:
    bridge.create_program("question -> answer: int, sure: bool", "cot", program_type="chain_of_thought")
    outputs = bridge.execute_program("cot", {"question": "2+2"})["outputs"]
    assert list(outputs) == ["reasoning", "answer", "sure"]
    assert outputs["answer"] == 4 and isinstance(outputs["sure"], bool)
    assert isinstance(outputs["reasoning"], str)
    error = error_of(bridge.create_program, "q -> reasoning", "bad", program_type="chain_of_thought")
    assert error.error_type == "InvalidSignature" and "signature.outputs[0].name" in error.message


def test_program_ids_are_generated_when_omitted_and_id_is_an_alias(bridge: LocalBridge) -> None:
    generated = bridge.create_program(QA_INT)["program_id"]
    assert generated.startswith("prog_")
    assert bridge.request("create_program", id="dspex", signature=QA_INT)["program_id"] == "dspex"
    assert bridge.request("execute_program", id="dspex", inputs={"question": "2+2"})["outputs"]["answer"] == 4
    error = error_of(bridge.request, "get_program_info", id="a", program_id="b")
    assert error.error_type == "InvalidArgument" and "'program_id' and its alias 'id'" in error.message


def test_sessions_are_namespaces(bridge: LocalBridge) -> None:
    one, two = bridge.session("one"), bridge.session("two")
    one.create_program(QA_INT, "qa")
    two.create_program("question -> answer", "qa")  # same id, other session: fine
    error = error_of(one.create_program, QA_INT, "qa")
    assert error.error_type == "ProgramExists"
    assert error.message == "Program with ID 'qa' already exists in session 'one'"
    assert one.get_program_info("qa")["signature"]["outputs"][0]["type"] == "int"
    assert two.get_program_info("qa")["signature"]["outputs"][0]["type"] == "str"
    assert error_of(bridge.get_program_info, "qa").error_type == "ProgramNotFound"  # not in anonymous
    assert [p["program_id"] for p in one.list_programs()["programs"]] == ["qa"]
    everything = bridge.list_programs(all_sessions=True)
    assert everything["total_count"] == 2
    assert sorted(p["session_id"] for p in everything["programs"]) == ["one", "two"]


def test_cleanup_session_removes_exactly_that_session(bridge: LocalBridge) -> None:
    one, two = bridge.session("one"), bridge.session("two")
    one.create_program(QA_INT, "a")
    one.create_program(QA_INT, "b")
    two.create_program(QA_INT, "a")
    one.configure_lm(mode="mock", mock_rules=[{"match": {"question": "2+2"}, "outputs": {"answer": 5}}])
    assert one.execute_program("a", {"question": "2+2"})["outputs"]["answer"] == 5
    cleaned = bridge.cleanup_session("one")
    assert cleaned == {"status": "cleaned", "session_id": "one", "programs_removed": 2, "lm_removed": True}
    assert one.list_programs()["programs"] == []
    assert two.execute_program("a", {"question": "2+2"})["outputs"]["answer"] == 4
    one.create_program(QA_INT, "a")  # back on the worker default LM
    assert one.execute_program("a", {"question": "2+2"})["outputs"]["answer"] == 4
    assert bridge.cleanup_session("never")["status"] == "not_found"


def test_session_client_close_cleans_up(bridge: LocalBridge) -> None:
    with bridge.session("tmp") as session:
        session.create_program(QA_INT, "qa")
    assert bridge.list_programs("tmp")["total_count"] == 0


def test_reset_state_drops_everything_but_keeps_the_startup_lm(bridge: LocalBridge) -> None:
    bridge.create_program(QA_INT, "qa")
    bridge.session("s").create_program(QA_INT, "qa")
    bridge.configure_lm(mode="mock", mock_default="changed")
    assert bridge.reset_state() == {"status": "reset", "sessions_removed": 2, "programs_removed": 2}
    assert bridge.list_programs(all_sessions=True)["total_count"] == 0
    assert bridge.get_stats()["lm"]["mock_default"] == "mock_response"
    bridge.create_program(QA_INT, "qa")
    assert bridge.execute_program("qa", {"question": "2+2"})["outputs"]["answer"] == 4


def test_each_session_runs_with_its_own_lm_even_concurrently(bridge: LocalBridge) -> None:
    sessions = {}
    for n in range(4):
        session = bridge.session(f"s{n}")
        rule = {"match": {"question": "who"}, "outputs": {"answer": n}}
        session.configure_lm(mode="mock", mock_rules=[rule])
        session.create_program(QA_INT, "qa")
        sessions[n] = session
    results: dict[int, list[int]] = {n: [] for n in sessions}
    barrier = threading.Barrier(len(sessions))

    def run(n: int) -> None:
        barrier.wait()
        for _ in range(20):
            results[n].append(sessions[n].execute_program("qa", {"question": "who?"})["outputs"]["answer"])

    threads = [threading.Thread(target=run, args=(n,)) for n in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {n: [n] * 20 for n in sessions}


def test_configure_lm_validates_names_fields_and_never_echoes_the_key(bridge: LocalBridge) -> None:
    secret = "sk-test-very-secret-123"
    ok = bridge.configure_lm(session_id="s", mode="mock", temperature=0.5)
    assert ok["status"] == "configured" and ok["session_id"] == "s"
    assert ok["lm"]["temperature"] == 0.5 and "api_key" not in ok["lm"]
    error = error_of(bridge.configure_lm, session_id="s", mode="mock", api_key=secret)
    assert error.error_type == "InvalidLMConfig" and "'api_key' belongs to the run" in error.message
    assert secret not in str(error)
    error = error_of(bridge.configure_lm, mode="bogus")
    assert error.error_type == "InvalidLMConfig" and "'mode'" in error.message
    error = error_of(bridge.configure_lm, temperature="hot")
    assert "'temperature'" in error.message
    error = error_of(bridge.configure_lm, provider="google")
    assert error.error_type == "InvalidArgument" and "unknown argument 'provider'" in error.message
    error = error_of(bridge.configure_lm, mock_rules=[{"match": {"q": "("}, "kind": "regex"}])
    assert "mock_rules.0" in error.message and "regex" in error.message
    assert secret not in repr(bridge.get_stats())


def test_configure_lm_merges_over_the_startup_config() -> None:
    bridge = LocalBridge(LMConfig(mode="mock", mock_default="from-startup", max_tokens=77))
    result = bridge.configure_lm(session_id="s", temperature=0.3)
    assert result["lm"]["mock_default"] == "from-startup"
    assert result["lm"]["max_tokens"] == 77 and result["lm"]["temperature"] == 0.3
    worker_default = bridge.configure_lm(mock_default="new-default")
    assert worker_default["session_id"] is None
    assert bridge.get_stats()["lm"]["mock_default"] == "new-default"


def test_executing_without_any_lm_says_to_call_configure_lm() -> None:
    service = BridgeService(None)
    assert service.call("ping", {})["lm_configured"] is False
    service.call("create_program", {"program_id": "qa", "signature": QA_INT})
    error = error_of(service.call, "execute_program", {"program_id": "qa", "inputs": {"question": "2+2"}})
    assert error.error_type == "LMNotConfigured" and "configure_lm" in error.message
    service.call("configure_lm", {"session_id": "anonymous", "mode": "mock"})
    assert service.call("execute_program", {"program_id": "qa", "inputs": {"question": "x"}})["outputs"]


@pytest.mark.parametrize(
    ("command", "args", "error_type", "fragment"),
    [
        ("nope", {}, "UnknownCommand", "known commands: ping, configure_lm"),
        ("ping", {"verbose": True}, "InvalidArgument", "unknown argument 'verbose' for ping"),
        ("create_program", {"program_id": "x"}, "InvalidArgument", "missing argument 'signature'"),
        ("create_program", {"signature": QA_INT, "program_id": 5}, "InvalidArgument", "'program_id'"),
        ("create_program", {"signature": QA_INT, "session_id": ""}, "InvalidArgument", "'session_id'"),
        ("create_program", {"signature": QA_INT, "program_type": "x"}, "InvalidArgument", "'program_type'"),
        ("create_program", {"signature": {"inputs": ["q"]}}, "InvalidSignature", "signature.outputs"),
        ("create_program", {"signature": None}, "InvalidSignature", "signature: must be an object"),
        ("execute_program", {"inputs": {}}, "InvalidArgument", "missing argument 'program_id'"),
        ("execute_program", {"program_id": "qa"}, "InvalidArgument", "missing argument 'inputs'"),
        ("execute_program", {"program_id": "qa", "inputs": "2+2"}, "InvalidArgument", "'inputs'"),
        ("execute_program", {"program_id": "qa", "inputs": {}}, "InvalidArgument", "inputs.question is"),
        ("execute_program", {"program_id": "qa", "inputs": {"question": "a", "x": 1}}, "InvalidArgument",
         "inputs.x is not an input"),
        ("execute_program", {"program_id": "typed", "inputs": {"n": "five"}}, "InvalidArgument",
         "inputs.n must be int"),
        ("execute_program", {"program_id": "ghost", "inputs": {}}, "ProgramNotFound", "'ghost'"),
        ("get_program_info", {"program_id": ["qa"]}, "InvalidArgument", "'program_id'"),
        ("delete_program", {}, "InvalidArgument", "missing argument 'program_id'"),
        ("list_programs", {"all_sessions": "yes"}, "InvalidArgument", "'all_sessions'"),
        ("cleanup_session", {}, "InvalidArgument", "missing argument 'session_id'"),
        ("cleanup_session", {"session_id": 3}, "InvalidArgument", "'session_id'"),
        ("configure_lm", {"session_id": 3}, "InvalidArgument", "'session_id'"),
        ("get_stats", {"x": 1}, "InvalidArgument", "unknown argument 'x'"),
    ],
)
def test_bad_arguments_name_the_argument(
    command: str, args: dict[str, Any], error_type: str, fragment: str
) -> None:
    service = BridgeService(LMConfig(mode="mock"))
    service.call("create_program", {"program_id": "qa", "signature": QA_INT})
    service.call("create_program", {"program_id": "typed", "signature": "n: int -> out"})
    error = error_of(service.call, command, args)
    assert error.error_type == error_type
    assert fragment in error.message
    assert service.call("get_stats", {})["errors"][error_type] == 1


def test_execution_failures_carry_dspy_or_lm_error_names(bridge: LocalBridge) -> None:
    session = bridge.session("errors")
    session.configure_lm(
        mode="mock",
        mock_rules=[
            {"match": {"question": "limit"}, "error": "rate_limit"},
            {"match": {"question": "garbage"}, "error": "malformed"},
        ],
    )
    session.create_program(QA_INT, "qa")
    limited = error_of(session.execute_program, "qa", {"question": "limit"})
    assert limited.error_type == "LMRateLimitError" and "program 'qa' failed" in limited.message
    broken = error_of(session.execute_program, "qa", {"question": "garbage"})
    assert broken.error_type == "AdapterParseError"
    info = session.get_program_info("qa")
    assert info["execution_count"] == 2 and info["error_count"] == 2


def test_execute_is_deferred_and_resolved_before_it_runs() -> None:
    service = BridgeService(LMConfig(mode="mock", mock_rules=rules(("2+2", 4))))
    service.call("create_program", {"program_id": "qa", "signature": QA_INT})
    outcome = service.begin("execute_program", {"program_id": "qa", "inputs": {"question": "2+2"}})
    assert isinstance(outcome, Deferred)
    # A later delete does not pull the program from under a request that was already accepted.
    service.call("delete_program", {"program_id": "qa"})
    assert outcome.run()["outputs"] == {"answer": 4}


def test_stats_count_commands_errors_sessions_and_memory(bridge: LocalBridge) -> None:
    bridge.ping()
    bridge.session("s").create_program(QA_INT, "qa")
    bridge.session("s").execute_program("qa", {"question": "2+2"})
    with pytest.raises(BridgeError):
        bridge.request("bogus")
    stats = bridge.get_stats()
    assert stats["commands"]["ping"] == 1 and stats["commands"]["execute_program"] == 1
    assert stats["commands"]["<unknown>"] == 1 and stats["errors"] == {"UnknownCommand": 1}
    assert stats["sessions"] == {"s": {"programs": 1, "lm_configured": False}}
    assert stats["program_count"] == 1 and stats["executions"] == 1
    assert stats["rss_bytes"] > 10_000_000 and stats["uptime_s"] >= 0
    assert stats["lm"]["mode"] == "mock" and stats["lm_configured"] is True
    assert set(COMMANDS) >= {"ping", "shutdown", "cleanup_session"}


def test_local_bridge_keeps_wire_semantics(bridge: LocalBridge) -> None:
    with pytest.raises(ProtocolError, match="JSON"):
        bridge.request("create_program", signature=QA_INT, program_id=object())
    bridge.create_program(QA_INT, "qa")
    result = bridge.execute_program("qa", {"question": "2+2"})
    assert isinstance(result, dict) and result["outputs"] == {"answer": 4}
    session = bridge.session("s")
    session.create_program(QA_INT, "qa")
    bridge.close()
    assert error_of(bridge.create_program, QA_INT, "again").error_type == "ShuttingDown"
    assert bridge.list_programs(all_sessions=True)["total_count"] == 0
    session.close()  # a session clean-up after the bridge closed is harmless
    assert bridge.ping()["status"] == "ok"


def test_shutdown_refuses_new_work_but_answers_ping() -> None:
    service = BridgeService(LMConfig(mode="mock"))
    called = []
    service.on_shutdown(lambda: called.append(True))
    service.call("shutdown", {})
    service.call("shutdown", {})
    assert called == [True]
    assert service.call("ping", {})["status"] == "ok"
    assert service.call("cleanup_session", {"session_id": "s"})["status"] == "not_found"
    for command, args in [
        ("create_program", {"signature": QA_INT}),
        ("execute_program", {"program_id": "qa", "inputs": {}}),
        ("configure_lm", {"mode": "mock"}),
    ]:
        error = error_of(service.call, command, args)
        assert error.error_type == "ShuttingDown" and command in error.message


def test_the_worker_keeps_no_dspy_history_but_local_use_does() -> None:
    service = BridgeService(LMConfig(mode="mock"))
    service.call("create_program", {"program_id": "qa", "signature": QA_INT})
    for _ in range(3):
        service.call("execute_program", {"program_id": "qa", "inputs": {"question": "2+2"}})
    assert service._default_lm.history == []  # memory stays flat in a long-running worker
    local = LocalBridge()
    local.create_program(QA_INT, "qa")
    local.execute_program("qa", {"question": "2+2"})
    assert len(local.service._default_lm.history) == 1


def test_lm_calls_are_attributed_to_the_session_in_the_run_ledger(tmp_path: Any) -> None:
    from provisioner.lm.ledger import LEDGER_FILE, read_ledger

    config = LMConfig(
        mode="cached", cached_inner="mock", cache_dir=tmp_path / "cassettes", run_dir=tmp_path / "run"
    )
    bridge = LocalBridge(config)
    for session in ("test_a", "test_b"):
        bridge.session(session).create_program(QA_INT, "qa")
        bridge.session(session).execute_program("qa", {"question": f"2+2 from {session}"})
    calls = [e for e in read_ledger(tmp_path / "run" / LEDGER_FILE) if e.get("kind")]
    assert sorted(e["test_id"] for e in calls) == ["test_a", "test_b"]
