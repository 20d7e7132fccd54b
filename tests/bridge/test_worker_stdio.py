"""`provision worker --stdio`: the same protocol over stdin/stdout, as a host that spawns a port uses it."""

from __future__ import annotations

import signal
from typing import Any

import pytest

QA_INT = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer", "type": "int"}]}


@pytest.fixture(scope="module")
def worker(spawn_module_worker: Any) -> Any:
    worker = spawn_module_worker(stdio=True, gated=True)  # "medium" waits for worker.release()
    worker.send({"id": 0, "command": "create_program", "args": {"program_id": "qa", "signature": QA_INT}})
    assert worker.receive()["success"] is True
    return worker


def test_ready_line_goes_to_stderr_and_stdout_carries_only_frames(worker: Any) -> None:
    assert b"PROVISION_WORKER_READY port=stdio" in worker.stderr_bytes()
    worker.send({"id": 1, "command": "ping", "args": {}})
    reply = worker.receive()  # would fail to parse if anything but frames reached stdout
    assert reply["id"] == 1 and reply["result"]["status"] == "ok" and reply["result"]["lm_configured"] is True


def test_programs_execute_with_typed_outputs(worker: Any) -> None:
    worker.send(
        {"id": "e", "command": "execute_program", "args": {"program_id": "qa", "inputs": {"question": "2+2"}}}
    )
    reply = worker.receive()
    assert reply["id"] == "e" and reply["result"]["outputs"] == {"answer": 4}


@pytest.mark.parametrize(
    ("payload", "error_type"),
    [
        (b"{oops", "InvalidJSON"),
        (b"\xfe\xff", "InvalidEncoding"),
        (b"[]", "InvalidRequest"),
        (b'{"id": 5, "command": "fly"}', "UnknownCommand"),
        (b'{"id": 5, "command": "get_program_info", "args": {"program_id": null}}', "InvalidArgument"),
    ],
)
def test_bad_input_gets_an_error_reply_and_the_worker_keeps_serving(
    worker: Any, payload: bytes, error_type: str
) -> None:
    worker.send(payload)
    reply = worker.receive()
    assert reply["success"] is False and reply["error_type"] == error_type
    worker.send({"id": "next", "command": "ping", "args": {}})
    assert worker.receive()["id"] == "next"


def test_pipelined_requests_over_stdio(worker: Any) -> None:
    worker.send(
        {
            "id": "m",
            "command": "execute_program",
            "args": {"program_id": "qa", "inputs": {"question": "medium"}},
        }
    )
    worker.send({"id": "p", "command": "ping", "args": {}})
    first = worker.receive()  # while "medium" is held at the gate
    worker.release(1)
    second = worker.receive()
    assert (first["id"], second["id"]) == ("p", "m")
    assert second["result"]["outputs"] == {"answer": 8}


def test_closing_stdin_ends_the_worker_cleanly(spawn_worker: Any) -> None:
    worker = spawn_worker(stdio=True)
    worker.send({"id": 1, "command": "ping", "args": {}})
    assert worker.receive()["success"] is True
    worker.proc.stdin.close()
    assert worker.wait_exit() == 0
    assert worker.proc.stdout.read() == b""


def _executing_at_the_gate(spawn_worker: Any) -> Any:
    """A stdio worker whose request 2 (``execute_program``, answer 8) is in flight, held at its gate
    until ``worker.release(1)``."""
    worker = spawn_worker(stdio=True, gated=True)
    worker.send({"id": 1, "command": "create_program", "args": {"program_id": "qa", "signature": QA_INT}})
    assert worker.receive()["success"] is True
    worker.send({"id": 2, "command": "execute_program",
                 "args": {"program_id": "qa", "inputs": {"question": "medium"}}})
    return worker


def test_shutdown_over_stdio_answers_inflight_work_first(spawn_worker: Any) -> None:
    worker = _executing_at_the_gate(spawn_worker)
    worker.send({"id": 3, "command": "shutdown", "args": {}})
    first = worker.receive()  # the shutdown's answer: the execution is held at the gate
    worker.release(1)
    replies = {r["id"]: r for r in (first, worker.receive())}
    assert replies[3]["result"]["status"] == "shutting_down"
    assert replies[2]["result"]["outputs"] == {"answer": 8}
    assert worker.wait_exit() == 0


def test_sigterm_over_stdio_answers_inflight_work_first(spawn_worker: Any, poll: Any) -> None:
    worker = _executing_at_the_gate(spawn_worker)
    worker.send({"id": 3, "command": "get_stats", "args": {}})
    stats = worker.receive()
    assert stats["id"] == 3 and stats["result"]["inflight"] == 1
    worker.proc.send_signal(signal.SIGTERM)  # while the execution is held at the gate
    worker.release(1)
    reply = worker.receive()
    assert reply["id"] == 2 and reply["result"]["outputs"] == {"answer": 8}
    assert worker.wait_exit() == 0
