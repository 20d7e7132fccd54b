"""An execution that waits for a slot gets the worker's answer before its client gives up.

A client waits ``process_timeout + REPLY_GRACE_S`` from its send (``provisioner.settings.reply_timeout``).
Before the fix a worker started an execution's ``process_timeout`` when it got a slot, so one that
first waited behind its session's other executions (``max_inflight_per_session``) could still be
waiting when the client's wait ended: the user saw a client-side ``ConnectionError`` instead of the
worker's ``Timeout``, and its ``lm_usage`` was never booked. Now the deadline counts from the
request's arrival, the wait for a slot included, and one still waiting at its deadline is answered
``Timeout`` ("did not start") and never runs.

Each test holds the running execution at the latency gate for longer than everything it checks, so
the queued one cannot get a slot before its deadline however loaded the machine is: the replies come
from the deadline alone. Paths: the in-process server (what the unit tests' and the in-process
engine's workers run), a ``provision worker`` process configured as a worker container is
(``PROVISION_PROCESS_TIMEOUT`` and ``PROVISION_WORKER__MAX_INFLIGHT_PER_SESSION`` in its
environment, as ``runtime/recipes.py`` sets them), and a fork-mode (``--fork``) child.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from provisioner.bridge import BridgeClient, BridgeService
from provisioner.bridge.server import BridgeServer
from provisioner.errors import BridgeConnectionError, BridgeError
from provisioner.lmconfig import LMConfig, MockRule
from provisioner.settings import reply_timeout

from .conftest import LatencyGate, WorkerFactory, wait_until

QA = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer"}]}
LM = LMConfig(mode="mock", mock_rules=[
    MockRule(match={"question": "held"}, outputs={"answer": "late"}, latency_ms=1),  # waits on the gate
    MockRule(match={"question": "quick"}, outputs={"answer": "soon"}),
])
PROCESS_TIMEOUT_S = 1.0
# Generous bound for a reply that must come from the worker; the client's own wait is far shorter.
JOIN_S = 120.0


class Outcome:
    """What one client thread's execute_program ended with."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.result: dict[str, Any] | None = None
        self.done = threading.Event()


def execute_in_thread(client: BridgeClient, session: str, question: str) -> Outcome:
    outcome = Outcome()

    def run() -> None:
        try:
            outcome.result = client.execute_program("qa", {"question": question}, session)
        except BaseException as exc:  # the test inspects it
            outcome.error = exc
        finally:
            outcome.done.set()

    threading.Thread(target=run, daemon=True).start()
    return outcome


def worker_error(outcome: Outcome) -> BridgeError:
    """The error the worker replied with; a client-side timeout (ConnectionError) fails the test."""
    assert outcome.done.wait(JOIN_S), "no reply and no client timeout at all"
    assert not isinstance(outcome.error, BridgeConnectionError), (
        f"the client gave up before the worker answered: {outcome.error}")
    assert isinstance(outcome.error, BridgeError), (outcome.error, outcome.result)
    return outcome.error


@pytest.fixture
def server(latency_gate: LatencyGate) -> Iterator[tuple[BridgeServer, int]]:
    """2 slots, 1 per session, process_timeout 1 s; "held" executions wait for the gate."""
    srv = BridgeServer(BridgeService(LM), max_inflight=2, max_inflight_per_session=1,
                       request_timeout_s=PROCESS_TIMEOUT_S, pids=None)
    try:
        yield srv, srv.listen("127.0.0.1", 0)
    finally:
        latency_gate.release()
        srv.close(timeout=30)


def test_a_queued_execution_gets_the_workers_timeout_before_the_client_gives_up(
        server: tuple[BridgeServer, int], latency_gate: LatencyGate) -> None:
    """Two executions of one session at once on two connections: the first holds the session's one
    slot (held at the gate past its deadline), the second waits for it. Both get the worker's
    ``Timeout`` — the second's says it never started — and the slot, queue and budget come back."""
    srv, port = server
    timeout = reply_timeout(PROCESS_TIMEOUT_S)  # what the host's clients wait
    with BridgeClient("127.0.0.1", port, request_timeout=timeout) as first, \
            BridgeClient("127.0.0.1", port, request_timeout=timeout) as second:
        first.create_program(QA, "qa", session_id="s")
        running = execute_in_thread(first, "s", "held")
        wait_until(lambda: latency_gate.waiting == 1, 60, "the first execution to reach the LM")
        queued = execute_in_thread(second, "s", "quick")
        ran_out = worker_error(running)
        not_started = worker_error(queued)
        assert latency_gate.waiting == 1  # the first still holds the slot: the second never had one
        assert ran_out.error_type == not_started.error_type == "Timeout"
        assert "did not finish within 1 s" in ran_out.message
        assert "did not start within 1 s (process_timeout)" in not_started.message
        assert "waited for an execution slot" in not_started.message
        assert "max_inflight_per_session" in not_started.message and "'s'" in not_started.message
        # Booked as the worker's Timeout, with the (empty) LM usage of work that never ran.
        usage = not_started.lm_usage
        assert usage is not None and not any(v for k, v in usage.items() if k != "process")
        stats = first.get_stats()
        assert stats["errors"]["Timeout"] == 2 and stats["queued"] == 0
        latency_gate.release()
        wait_until(lambda: srv._live_stats()["inflight"] == 0, 60, "the held execution to end")
        assert srv._input_budget.used == 0
        # The session is served as before once its slot is free.
        assert second.execute_program("qa", {"question": "quick"}, "s")["outputs"] == {"answer": "soon"}


def test_a_client_that_has_its_not_started_timeout_sees_its_queue_place_and_budget_free(
        server: tuple[BridgeServer, int], latency_gate: LatencyGate, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline watch is held right after it sent the "did not start" reply: by then the
    request's place in the queue and its input bytes are back (the test above asserts the budget
    once the running execution ended; the watch used to free them only after the reply)."""
    srv, port = server
    sent, proceed = threading.Event(), threading.Event()
    send = BridgeServer._send

    def send_and_hold(self: BridgeServer, conn: Any, message: dict[str, Any]) -> None:
        send(self, conn, message)
        if "did not start" in str(message.get("error", "")):
            sent.set()
            assert proceed.wait(JOIN_S), "the test never let the deadline watch go on"

    monkeypatch.setattr(BridgeServer, "_send", send_and_hold)
    timeout = reply_timeout(PROCESS_TIMEOUT_S)
    try:
        with BridgeClient("127.0.0.1", port, request_timeout=timeout) as first, \
                BridgeClient("127.0.0.1", port, request_timeout=timeout) as second:
            first.create_program(QA, "qa", session_id="s")
            running = execute_in_thread(first, "s", "held")
            wait_until(lambda: latency_gate.waiting == 1, 60, "the first execution to reach the LM")
            held_by_first = srv._input_budget.used
            queued = execute_in_thread(second, "s", "quick")
            assert "did not start" in worker_error(queued).message
            assert sent.is_set()
            assert (srv._live_stats()["queued"], srv._input_budget.used) == (0, held_by_first)
            proceed.set()
            latency_gate.release()
            assert worker_error(running).error_type == "Timeout"
    finally:
        proceed.set()


def test_one_that_got_its_slot_late_runs_for_the_time_left_and_says_where_it_went(
        latency_gate: LatencyGate) -> None:
    """The deadline is the request's: one that waited for a slot and then ran out is answered at
    arrival + process_timeout, and its Timeout says how much of it went to the queue (or, had the
    slot come after the deadline, that it never started)."""
    srv = BridgeServer(BridgeService(LM), max_inflight=2, max_inflight_per_session=1,
                       request_timeout_s=3.0, pids=None)
    try:
        port = srv.listen("127.0.0.1", 0)
        timeout = reply_timeout(3.0)
        with BridgeClient("127.0.0.1", port, request_timeout=timeout) as first, \
                BridgeClient("127.0.0.1", port, request_timeout=timeout) as second:
            first.create_program(QA, "qa", session_id="s")
            running = execute_in_thread(first, "s", "held")
            wait_until(lambda: latency_gate.waiting == 1, 60, "the first execution to reach the LM")
            queued = execute_in_thread(second, "s", "held")  # held at the gate too once it runs
            wait_until(lambda: srv._live_stats()["queued"] == 1, 60, "the second execution to queue")
            latency_gate.release(1)  # the first ends; the second gets the slot and is held
            assert running.done.wait(JOIN_S)
            error = worker_error(queued)
            assert error.error_type == "Timeout"
            assert ("s of them waiting for an execution slot (max_inflight_per_session 1)" in error.message
                    or "did not start" in error.message), error.message
    finally:
        latency_gate.release()
        srv.close(timeout=30)


def test_a_deadline_that_passes_while_the_slot_is_handed_over_says_it_never_started(
        latency_gate: LatencyGate) -> None:
    """The scheduler has taken the queued execution from its queue, and its deadline passes before
    the slot is handed over: the reply says it did not start (not "did not finish" with no time in
    the queue, as CI once printed), it never runs, and the slot, queue and budget come back."""
    srv = BridgeServer(BridgeService(LM), max_inflight=2, max_inflight_per_session=1,
                       request_timeout_s=PROCESS_TIMEOUT_S, pids=None)
    start = srv._scheduler._start
    handovers: list[Outcome] = []
    in_handover, handed_over = threading.Event(), threading.Event()

    def held_handover(item: Any) -> None:
        # Hold the handover until the deadline watch has answered the queued execution.
        if not handovers:
            start(item)
            return
        in_handover.set()
        assert handovers[0].done.wait(JOIN_S), "the queued execution got no reply while held"
        handovers.clear()
        start(item)
        handed_over.set()

    expire = srv._deadlines._on_expired

    def expire_during_the_handover(flight: Any) -> None:
        # The queued execution's deadline is acted on only once its handover has begun: had the
        # test been slower than process_timeout to release the first (a loaded machine), the
        # deadline would otherwise find it still in the queue, and the handover would never come.
        if flight.queued is not None:  # the second (the first got its slot at once)
            assert in_handover.wait(JOIN_S), "the queued execution's handover never began"
        expire(flight)

    srv._scheduler._start = held_handover
    srv._deadlines._on_expired = expire_during_the_handover
    try:
        port = srv.listen("127.0.0.1", 0)
        timeout = reply_timeout(PROCESS_TIMEOUT_S)
        with BridgeClient("127.0.0.1", port, request_timeout=timeout) as first, \
                BridgeClient("127.0.0.1", port, request_timeout=timeout) as second:
            first.create_program(QA, "qa", session_id="s")
            running = execute_in_thread(first, "s", "held")
            wait_until(lambda: latency_gate.waiting == 1, 60, "the first execution to reach the LM")
            queued = execute_in_thread(second, "s", "held")
            wait_until(lambda: srv._live_stats()["queued"] == 1, 60, "the second execution to queue")
            handovers.append(queued)
            latency_gate.release(1)  # the first ends; its slot's handover to the second is held
            error = worker_error(queued)
            assert error.error_type == "Timeout"
            assert f"did not start within {PROCESS_TIMEOUT_S:g} s (process_timeout)" in error.message, (
                error.message)
            assert running.done.wait(JOIN_S) and handed_over.wait(JOIN_S)
            assert srv._live_stats()["inflight"] == 0  # the handed-over slot came back at once
            assert latency_gate.waiting == 0  # the second never reached the LM
            stats = srv._live_stats()
            assert stats["queued"] == 0 and srv._input_budget.used == 0
            latency_gate.release()
            assert second.execute_program("qa", {"question": "quick"}, "s")["outputs"] == {"answer": "soon"}
    finally:
        latency_gate.release()
        srv.close(timeout=30)


def test_a_worker_process_configured_like_a_container_answers_queued_executions(
        spawn_worker: WorkerFactory) -> None:
    """``provision worker`` with the settings a worker container gets through its environment."""
    worker = spawn_worker(gated=True, env={"PROVISION_PROCESS_TIMEOUT": str(PROCESS_TIMEOUT_S),
                                           "PROVISION_WORKER__MAX_INFLIGHT_PER_SESSION": "1"})
    timeout = reply_timeout(PROCESS_TIMEOUT_S)
    with worker.client(request_timeout=timeout) as first, worker.client(request_timeout=timeout) as second, \
            worker.client() as observer:
        first.create_program(QA, "qa", session_id="s")
        running = execute_in_thread(first, "s", "slow")  # gated: held until released
        wait_until(lambda: observer.get_stats()["inflight"] == 1, 60, "the first execution to run")
        queued = execute_in_thread(second, "s", "2+2")
        assert worker_error(running).error_type == "Timeout"
        not_started = worker_error(queued)
        assert not_started.error_type == "Timeout" and "did not start" in not_started.message
        assert observer.get_stats()["inflight"] == 1  # the first was still running all along
        worker.release(1)


def test_a_fork_mode_child_answers_its_queued_execution(spawn_worker: WorkerFactory) -> None:
    """A fork-mode child serves one connection: two executions of one session pipelined on it."""
    worker = spawn_worker("--fork", gated=True, env={"PROVISION_PROCESS_TIMEOUT": str(PROCESS_TIMEOUT_S),
                                                     "PROVISION_WORKER__MAX_INFLIGHT_PER_SESSION": "1"})
    conn = worker.raw()
    try:
        conn.sock.settimeout(reply_timeout(PROCESS_TIMEOUT_S))
        conn.send({"id": "c", "command": "create_program",
                   "args": {"session_id": "s", "program_id": "qa", "signature": QA}})
        assert conn.receive()["success"]
        for rid, question in (("first", "slow"), ("second", "2+2")):
            conn.send({"id": rid, "command": "execute_program",
                       "args": {"session_id": "s", "program_id": "qa", "inputs": {"question": question}}})
        replies = {r["id"]: r for r in (conn.receive(), conn.receive())}
        assert replies["first"]["error_type"] == replies["second"]["error_type"] == "Timeout"
        assert "did not start" in replies["second"]["error"]
    finally:
        worker.release(1)
        conn.sock.close()


