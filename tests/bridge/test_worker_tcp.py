"""`provision worker` as a real subprocess over TCP: commands, bad input, concurrency, shutdown."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from provisioner.bridge import BridgeClient
from provisioner.errors import BridgeConnectionError, BridgeError
from provisioner.lmconfig import LM_CONFIG_ENV, LMConfig

from .._helpers import without_settings

QA_INT = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer", "type": "int"}]}
SETTINGS_ENV = {
    "PROVISION_WORKER__MAX_INFLIGHT": "2",
    # These tests use one session; let it have both slots (the per-session share is tested in
    # test_fairness.py).
    "PROVISION_WORKER__MAX_INFLIGHT_PER_SESSION": "2",
    "PROVISION_WORKER__MAX_CONNECTIONS": "12",
}


@pytest.fixture(scope="module")
def worker(spawn_module_worker: Any) -> Any:
    # gated: the "slow" and "medium" rules' latencies wait for worker.release(), not the clock
    return spawn_module_worker(env=SETTINGS_ENV, gated=True)


@pytest.fixture(scope="module")
def client(worker: Any) -> Any:
    with worker.client() as c:
        c.create_program(QA_INT, "qa")
        yield c


def test_ready_line_and_ready_file_agree(worker: Any) -> None:
    assert worker.stdout_lines == [f"PROVISION_WORKER_READY port={worker.port}\n"]
    assert worker.ready_file.read_text() == f"{worker.port}\n"
    assert not list(worker.ready_file.parent.glob(".*tmp"))  # the atomic write left no temp file


def test_worker_reports_its_lm_and_settings(client: BridgeClient, worker: Any) -> None:
    ping = client.ping()
    assert ping["status"] == "ok" and ping["lm_configured"] is True and ping["pid"] == worker.proc.pid
    stats = client.get_stats()
    assert stats["lm"]["mode"] == "mock" and len(stats["lm"]["mock_rules"]) == 4
    assert "api_key" not in stats["lm"]
    assert stats["max_inflight"] == 2 and stats["max_connections"] == 12
    assert stats["max_frame_bytes"] == 16 * 1024 * 1024 and stats["request_timeout_s"] == 30.0
    assert stats["rss_bytes"] > 0


def test_execute_over_tcp_returns_typed_outputs(client: BridgeClient) -> None:
    result = client.execute_program("qa", {"question": "what is 2+2"})
    assert result["outputs"] == {"answer": 4} and result["execution_time_ms"] > 0
    session = client.session("tcp-s1")
    session.create_program("question -> answer", "qa")
    assert session.execute_program("qa", {"question": "capital of France?"})["outputs"] == {"answer": "Paris"}
    with pytest.raises(BridgeError) as info:
        session.create_program(QA_INT, "qa")
    assert info.value.error_type == "ProgramExists"
    assert str(info.value) == "ProgramExists: Program with ID 'qa' already exists in session 'tcp-s1'"
    assert session.cleanup()["programs_removed"] == 1


def test_configure_lm_over_tcp_is_per_session_and_never_logs_the_key(
    client: BridgeClient, worker: Any
) -> None:
    secret = "sk-tcp-secret-4242"
    session = client.session("tcp-lm")
    rule = {"match": {"question": "2+2"}, "outputs": {"answer": 5}}
    configured = session.configure_lm(mode="mock", mock_rules=[rule])
    assert "api_key" not in configured["lm"]
    session.create_program(QA_INT, "qa")
    assert session.execute_program("qa", {"question": "2+2"})["outputs"]["answer"] == 5
    assert client.execute_program("qa", {"question": "2+2"})["outputs"]["answer"] == 4
    with pytest.raises(BridgeError) as info:
        client.configure_lm(session_id="tcp-lm", mode="nope", api_key=secret)
    assert info.value.error_type == "InvalidLMConfig" and "'api_key'" in info.value.message
    assert secret not in str(info.value)
    session.cleanup()
    assert secret.encode() not in worker.stderr_bytes()


# --- bad input: the worker answers, and keeps serving ---------------------------------------------


@pytest.mark.parametrize(
    ("payload", "error_type", "fragment"),
    [
        (b"{not json", "InvalidJSON", "not valid JSON"),
        (b'{"id": 1, "command": "p\xffing"}', "InvalidEncoding", "not valid UTF-8"),
        (b"[1, 2, 3]", "InvalidRequest", "must be a JSON object"),
        (b"42", "InvalidRequest", "must be a JSON object"),
        (b'{"command": "ping"}', "InvalidRequest", "'id'"),
        (b'{"id": 9, "command": "launch_rockets"}', "UnknownCommand", "known commands: ping, configure_lm"),
        (
            b'{"id": 9, "command": "execute_program", "args": {"inputs": {}}}',
            "InvalidArgument",
            "'program_id'",
        ),
        (
            b'{"id": 9, "command": "execute_program", "args": {"program_id": 3, "inputs": {}}}',
            "InvalidArgument",
            "argument 'program_id' of execute_program must be a non-empty string, got number 3",
        ),
        (
            b'{"id": 9, "command": "execute_program", "args": {"program_id": "qa", "inputs": []}}',
            "InvalidArgument",
            "argument 'inputs'",
        ),
        (
            b'{"id": 9, "command": "create_program", "args": {"signature": {"inputs": ["q"], "outputs": 1}}}',
            "InvalidSignature",
            "signature.outputs",
        ),
        (b'{"id": 9, "command": "ping", "args": "x"}', "InvalidRequest", "'args' must be an object"),
    ],
)
def test_malformed_requests_get_an_error_reply_and_the_connection_stays_usable(
    client: BridgeClient, worker: Any, payload: bytes, error_type: str, fragment: str
) -> None:
    with worker.raw() as raw:
        raw.send_payload(payload)
        reply = raw.receive()
        assert reply["success"] is False and reply["error_type"] == error_type
        assert fragment in reply["error"]
        assert reply["id"] == (9 if b'"id": 9' in payload else None)
        raw.send({"id": "after", "command": "ping", "args": {}})
        after = raw.receive()
        assert after["id"] == "after" and after["success"] is True and after["result"]["status"] == "ok"
    assert client.ping()["status"] == "ok"


def test_an_oversized_frame_gets_an_error_then_the_connection_closes(
    client: BridgeClient, worker: Any
) -> None:
    limit = client.get_stats()["max_frame_bytes"]
    with worker.raw() as raw:
        raw.send_bytes(struct.pack(">I", limit + 1) + b"{}")
        reply = raw.receive()
        assert reply == {
            "id": None,
            "success": False,
            "error": f"frame of {limit + 1} bytes exceeds the maximum of {limit} bytes",
            "error_type": "FrameTooLarge",
        }
        assert raw.at_eof()
    assert client.ping()["status"] == "ok"


def test_a_client_vanishing_mid_frame_leaves_the_worker_serving(
    client: BridgeClient, worker: Any, poll: Any
) -> None:
    before = client.get_stats()["connections"]
    for cut in (2, 4 + 5):  # inside the header, inside the body
        raw = worker.raw()
        frame = struct.pack(">I", 40) + b'{"id": 1, "command": "ping", "args": {}}'
        raw.send_bytes(frame[:cut])
        raw.reset()
    # <= : a connection of an earlier test may still be closing when `before` was taken.
    poll(lambda: client.get_stats()["connections"] <= before, what="the cut connections to be closed")
    assert client.ping()["status"] == "ok"


def test_a_client_vanishing_mid_reply_leaves_the_worker_serving(
    client: BridgeClient, worker: Any, poll: Any
) -> None:
    # A reply far larger than the socket buffers: the worker is still writing it when we reset.
    big = "x" * (8 * 1024 * 1024)
    session = client.session("tcp-big")
    session.configure_lm(mode="mock", mock_rules=[{"match": {"question": "big"}, "outputs": {"answer": big}}])
    session.create_program("question -> answer", "qa")
    errors_before = client.get_stats()["executions"]
    with worker.raw() as raw:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.send(
            {
                "id": 1,
                "command": "execute_program",
                "args": {"session_id": "tcp-big", "program_id": "qa", "inputs": {"question": "big"}},
            }
        )
        assert len(raw.reader.read(64)) == 64  # the reply has started to arrive
        raw.reset()
    poll(
        lambda: client.get_stats()["executions"] > errors_before and client.get_stats()["inflight"] == 0,
        what="the big execution to finish",
    )
    assert client.ping()["status"] == "ok"
    session.cleanup()


def test_pipelined_requests_are_answered_with_matching_ids_out_of_order(worker: Any) -> None:
    with worker.raw() as raw:
        raw.send(
            {
                "id": "slow",
                "command": "execute_program",
                "args": {"program_id": "qa", "inputs": {"question": "medium"}},
            }
        )
        raw.send({"id": 2, "command": "ping", "args": {}})
        raw.send(
            {
                "id": 3,
                "command": "execute_program",
                "args": {"program_id": "qa", "inputs": {"question": "2+2"}},
            }
        )
        replies = [raw.receive() for _ in range(2)]  # answered while "slow" is held at the gate
        worker.release(1)
        replies.append(raw.receive())
    assert [r["id"] for r in replies][-1] == "slow"  # the quick ones did not wait behind it
    by_id = {r["id"]: r for r in replies}
    assert by_id[2]["result"]["status"] == "ok"
    assert by_id[3]["result"]["outputs"] == {"answer": 4}
    assert by_id["slow"]["result"]["outputs"] == {"answer": 8}


# --- concurrency --------------------------------------------------------------------------------------


def test_a_slow_execute_does_not_delay_ping_on_another_connection(worker: Any, poll: Any) -> None:
    with worker.client() as slow_client, worker.client() as ping_client, ThreadPoolExecutor(1) as pool:
        executions = ping_client.get_stats()["executions"]
        slow = pool.submit(slow_client.execute_program, "qa", {"question": "slow"})
        poll(lambda: ping_client.get_stats()["inflight"] == 1, what="the slow execution to start")
        for _ in range(20):
            assert ping_client.ping()["status"] == "ok"
        # All those pings were answered while the slow execution was still running (held at the gate).
        assert not slow.done()
        assert ping_client.get_stats()["executions"] == executions
        worker.release(1)
        assert slow.result(timeout=30)["outputs"] == {"answer": 7}


def test_inflight_executions_are_bounded_by_max_inflight(worker: Any, poll: Any) -> None:
    with worker.client() as watcher, ThreadPoolExecutor(3) as pool:
        clients = [worker.client() for _ in range(3)]
        futures = [pool.submit(c.execute_program, "qa", {"question": "medium"}) for c in clients]
        # Two run (held at the gate), the third waits for a slot: the bound holds while it is full.
        poll(lambda: watcher.get_stats()["inflight"] == 2, what="two executions running")
        seen = [watcher.get_stats()["inflight"] for _ in range(20)]
        assert not any(f.done() for f in futures)
        worker.release(3)
        while not all(f.done() for f in futures):
            seen.append(watcher.get_stats()["inflight"])
        assert [f.result()["outputs"]["answer"] for f in futures] == [8, 8, 8]
        for c in clients:
            c.close()
    assert max(seen) == 2  # three requests at once, never more than max_inflight running


def test_many_clients_in_threads(worker: Any) -> None:
    def work(n: int) -> list[int]:
        with worker.client() as c:
            s = c.session(f"threads-{n}")
            s.create_program(QA_INT, "qa")
            answers = [s.execute_program("qa", {"question": "2+2"})["outputs"]["answer"] for _ in range(10)]
            s.cleanup()
            return answers

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(work, range(6))) == [[4] * 10] * 6


def test_one_client_shared_by_threads_is_safe(client: BridgeClient) -> None:
    results: list[Any] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(25):
            r = client.execute_program("qa", {"question": "2+2"})["outputs"]["answer"]
            with lock:
                results.append(r)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [4] * 100


def _admitted(worker: Any) -> BridgeClient | None:
    """A client the worker served a ping on, or None when it turned the connection away."""
    client: BridgeClient = worker.client()
    try:
        client.ping()
    except BridgeError as exc:
        client.close()
        if exc.error_type != "TooManyConnections":
            raise
        return None
    return client


def _fill_until_refused(worker: Any, opened: list[Any]) -> dict[str, Any]:
    """Open connections (each proven registered by a ping) until the worker turns one away.

    Filling until refusal, rather than counting from a snapshot, keeps the test exact even while
    connections of earlier tests are still being closed by the worker.
    """
    for n in range(40):
        raw = worker.raw()
        raw.send({"id": n, "command": "ping", "args": {}})
        reply = raw.receive()
        if not reply["success"]:
            assert raw.at_eof()  # the refusal is followed by the worker hanging up
            raw.close()
            return reply
        opened.append(raw)
    raise AssertionError("40 connections were accepted although max_connections is 12")


def test_connections_beyond_the_maximum_are_refused_with_an_error(worker: Any, poll: Any) -> None:
    opened: list[Any] = []
    try:
        with worker.client() as watcher:
            reply = _fill_until_refused(worker, opened)
            assert reply["error_type"] == "TooManyConnections" and reply["id"] is None
            assert "at most 12 connections" in reply["error"]
            assert len(opened) <= 11  # the watcher holds one of the 12
            # The client library surfaces the same refusal (retrying while a late close frees a slot).
            for _ in range(5):
                turned_away = worker.client()
                try:
                    turned_away.ping()
                except BridgeError as exc:
                    assert exc.error_type == "TooManyConnections"
                    break
                finally:
                    turned_away.close()
                _fill_until_refused(worker, opened)
            else:
                raise AssertionError("the client was never turned away")
            assert watcher.get_stats()["connections_refused"] >= 2
    finally:
        for raw in opened:
            raw.close()
    # The worker notices the closes above asynchronously: until it has, a new connection is still
    # turned away, so admission is polled too (it failed here once under load: TooManyConnections).
    with poll(lambda: _admitted(worker), timeout=60, what="a connection to be admitted") as again:
        # Left open: this one and the module's shared client.
        poll(lambda: again.get_stats()["connections"] <= 2, timeout=60,
             what="the extra connections to close")
        assert again.ping()["status"] == "ok"


def test_client_errors_for_unreachable_workers_and_timeouts(worker: Any) -> None:
    with pytest.raises(BridgeConnectionError, match="cannot connect"):
        BridgeClient("127.0.0.1", 1, connect_timeout=1).ping()
    with worker.client(request_timeout=0.2) as impatient:
        with pytest.raises(BridgeConnectionError, match="no reply to execute_program") as info:
            impatient.execute_program("qa", {"question": "medium"})  # held at the gate: no reply
        assert info.value.error_type == "ConnectionError"
        worker.release(1)  # the reply comes now, to the connection the client gave up
        assert impatient.ping()["status"] == "ok"  # reconnects; the late reply is never mistaken for this one


# --- separate workers: timeouts, start-up LM, shutdown --------------------------------------------------


def test_an_execution_past_process_timeout_gets_a_timeout_reply(spawn_worker: Any, poll: Any) -> None:
    worker = spawn_worker(env={"PROVISION_PROCESS_TIMEOUT": "0.2"}, gated=True)
    with worker.client() as c, worker.raw() as raw:
        c.create_program(QA_INT, "qa")
        raw.send(
            {
                "id": 1,
                "command": "execute_program",
                "args": {"program_id": "qa", "inputs": {"question": "medium"}},
            }
        )
        reply = raw.receive()  # the execution is held at the gate past the 0.2 s process timeout
        assert reply["id"] == 1 and reply["error_type"] == "Timeout" and "process_timeout" in reply["error"]
        worker.release(1)
        poll(lambda: c.get_stats()["executions"] == 1, what="the timed-out execution to end")
        raw.send({"id": 2, "command": "ping", "args": {}})
        assert raw.receive()["id"] == 2  # the late result was dropped, not sent
        assert c.get_stats()["errors"]["Timeout"] == 1


def test_bare_worker_has_the_mock_lm_and_sigterm_finishes_inflight_work(spawn_worker: Any, poll: Any) -> None:
    worker = spawn_worker(lm=None, gated=True)
    with worker.client() as c:
        lm = c.get_stats()["lm"]
        assert lm["mode"] == "mock" and lm["mock_rules"] == []
        session = c.session("s")
        slow_rule = {"match": {"question": "slow"}, "outputs": {"answer": 1}, "latency_ms": 500}
        session.configure_lm(mode="mock", mock_rules=[slow_rule])
        session.create_program(QA_INT, "qa")
        with worker.client() as slow_client, ThreadPoolExecutor(1) as pool:
            slow = pool.submit(slow_client.execute_program, "qa", {"question": "slow"}, "s")
            poll(lambda: c.get_stats()["inflight"] == 1, what="the execution to start")
            worker.proc.send_signal(signal.SIGTERM)  # while the execution is held at the gate
            worker.release(1)
            assert slow.result(timeout=30)["outputs"] == {"answer": 1}
    assert worker.wait_exit() == 0
    assert b"SIGTERM" in worker.stderr_bytes()


def test_lm_config_file_and_shutdown_command(spawn_worker: Any, tmp_path: Path, poll: Any) -> None:
    config_file = tmp_path / "lm.json"
    config_file.write_text(LMConfig(mode="mock", mock_default="from-file", max_tokens=99).model_dump_json())
    worker = spawn_worker("--lm-config", str(config_file), lm=None, gated=True)
    with worker.client() as c, worker.client() as slow_client, ThreadPoolExecutor(1) as pool:
        assert c.get_stats()["lm"]["mock_default"] == "from-file"
        rule = {"match": {"question": "slow"}, "outputs": {"answer": 3}, "latency_ms": 500}
        c.configure_lm(mode="mock", mock_rules=[rule])
        c.create_program(QA_INT, "qa")
        slow = pool.submit(slow_client.execute_program, "qa", {"question": "slow"})
        poll(lambda: c.get_stats()["inflight"] == 1, what="the execution to start")
        assert c.shutdown()["status"] == "shutting_down"  # while the execution is held at the gate
        worker.release(1)
        assert slow.result(timeout=30)["outputs"] == {"answer": 3}
    assert worker.wait_exit() == 0
    assert worker.proc.stdout.read() == b""  # the ready line was the only stdout output


def test_env_handover_wins_over_the_lm_config_file(spawn_worker: Any, tmp_path: Path) -> None:
    config_file = tmp_path / "lm.json"
    config_file.write_text(LMConfig(mode="mock", mock_default="from-file").model_dump_json())
    worker = spawn_worker("--lm-config", str(config_file), lm=LMConfig(mode="mock", mock_default="from-env"))
    with worker.client() as c:
        assert c.get_stats()["lm"]["mock_default"] == "from-env"


def test_a_bad_startup_lm_config_fails_before_ready(tmp_path: Path) -> None:
    env = without_settings()
    env[LM_CONFIG_ENV] = json.dumps({"mode": "mock", "temperature": 9})
    command = [sys.executable, "-m", "provisioner.cli", "worker"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, timeout=60)
    assert done.returncode != 0
    assert b"PROVISION_WORKER_READY" not in done.stdout
    assert b"temperature" in done.stderr and b"PROVISION_LM_CONFIG" in done.stderr


def test_the_lm_calls_a_worker_makes_for_a_request_count_in_the_callers_process(worker: Any) -> None:
    """Issue 10: mock calls made in a worker (a container, a forked worker, here a worker process)
    had no record at all — not in the ledger (mock calls are free), not in the caller's counters —
    so a test's lm_cost and the run report said 0. The reply's lm_usage carries them home."""
    from provisioner.lm.callstats import stats

    with worker.client() as bridge:
        session = bridge.session("usage")
        session.create_program(QA_INT, "qa")
        before = stats()
        result = session.execute_program("qa", {"question": "2 + 2?"})
        delta = stats() - before
    usage = result["lm_usage"]
    assert usage["mock"] == 1 and usage["errors"] == 0 and usage["input_tokens"] > 0
    assert isinstance(usage["process"], str) and usage["process"]
    assert (delta.mock, delta.calls, delta.input_tokens) == (1, 1, usage["input_tokens"])
