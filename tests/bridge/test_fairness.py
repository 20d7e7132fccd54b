"""Execution slots are shared between sessions (issue 14, follow-up of item 4: work from the wire
must not stall the worker for everyone): one session that floods a worker with slow executions
holds at most ``max_inflight_per_session`` slots, its extra work waits behind its own, and other
sessions' executions and pings are answered meanwhile. Wire-supplied delays are bounded.

Ordering, not wall-clock: the flooding session's executions are held in the mock LM (a slow rule
whose latency waits on the test's ``latency_gate``) until B has been answered, so "B was answered
before any of A's executions" cannot happen unless B got a slot that A did not hold, however
loaded the machine is.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest

from provisioner.bridge import BridgeService
from provisioner.bridge.server import (
    BridgeServer,
    _Connection,
    _Queued,
    _Scheduler,
    default_max_inflight_per_session,
)
from provisioner.bridge.service import MAX_WIRE_LATENCY_MS, WIRE_LM_MAXIMA, Access, Deferred
from provisioner.errors import BridgeError
from provisioner.lmconfig import LMConfig, MockRule

from .conftest import LatencyGate, RawConnection, wait_until

QA = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer"}]}
LM = LMConfig(mode="mock", mock_rules=[
    # Held by latency_gate until the test releases it (the 1 ms is only what makes the rule wait).
    MockRule(match={"question": "slow"}, outputs={"answer": "late"}, latency_ms=1),
    MockRule(match={"question": "quick"}, outputs={"answer": "soon"}),
])


@pytest.fixture
def server(latency_gate: LatencyGate) -> Iterator[tuple[BridgeServer, int, LatencyGate]]:
    """A TCP server with 4 slots (2 per session by default) whose "slow" executions wait for the
    gate; released and closed after the test."""
    srv = BridgeServer(BridgeService(LM), max_inflight=4, pids=None, request_timeout_s=60)
    try:
        yield srv, srv.listen("127.0.0.1", 0), latency_gate
    finally:
        latency_gate.release()
        srv.close(timeout=30)


def connect(port: int) -> RawConnection:
    return RawConnection.to(port, timeout=60)


def request(conn: RawConnection, rid: str, command: str, **args: Any) -> None:
    conn.send({"id": rid, "command": command, "args": args})


def setup_sessions(conn: RawConnection, *sessions: str) -> None:
    for i, session in enumerate(sessions):
        request(conn, f"create-{i}", "create_program", signature=QA, program_id="qa", session_id=session)
        reply = conn.receive()
        assert reply["success"], reply


def stats(port: int) -> dict[str, Any]:
    with connect(port) as conn:
        request(conn, "s", "get_stats")
        result: dict[str, Any] = conn.receive()["result"]
        return result


def test_default_share_is_half_the_slots() -> None:
    assert [default_max_inflight_per_session(n) for n in (1, 2, 3, 8)] == [1, 1, 1, 4]


def test_slots_go_to_sessions_in_turn_and_a_session_waits_behind_its_own_work() -> None:
    """The scheduler alone, step by step: 2 slots, 1 per session."""
    started: list[str] = []
    scheduler = _Scheduler(2, 1, lambda item: started.append(item.request_id))  # type: ignore[arg-type]
    conn = _Connection(io.BytesIO(), lambda _: None, lambda: None, None, "test", Access(control=False))

    def submit(session: str, rid: str) -> None:
        conn.queue(1)
        scheduler.submit(_Queued(conn, rid, Deferred("execute_program", dict, session), 0))

    for session, rid in (("A", "a1"), ("A", "a2"), ("A", "a3"), ("B", "b1"), ("C", "c1")):
        submit(session, rid)
    assert started == ["a1", "b1"]  # A's second execution does not take the second slot
    assert (scheduler.running, scheduler.waiting, conn.queued) == (2, 3, 3)
    scheduler.done("A")
    assert started[-1] == "a2"  # A's turn came before C's (a2 arrived first)...
    scheduler.done("B")
    assert started[-1] == "c1"  # ...and then C's, ahead of A's third
    scheduler.done("A")
    scheduler.done("C")
    assert started == ["a1", "b1", "a2", "c1", "a3"]
    scheduler.done("A")
    assert (scheduler.running, scheduler.waiting, conn.queued) == (0, 0, 0)


def test_a_flooding_session_holds_half_the_slots_and_others_are_served_first(
        server: tuple[BridgeServer, int, LatencyGate]) -> None:
    """Session A sends 4 slow executions on one connection (a DSPex-style client: one connection,
    many sessions), then session B one quick execution on the same connection and another on a
    second connection, and a ping. Before the fix A took all 4 slots, the connection stopped
    reading, and B waited behind A; now A runs 2, queues 2, and B and the ping are answered while
    A's executions are held (released only after B's replies arrived)."""
    srv, port, gate = server
    with connect(port) as shared, connect(port) as other:
        setup_sessions(shared, "A", "B")
        for i in range(4):
            request(shared, f"a{i}", "execute_program", program_id="qa", session_id="A",
                    inputs={"question": "slow"})
        # A is limited to its share; the rest of its work waits in its own queue.
        live = wait_until(lambda: (s := stats(port))["queued"] == 2 and s, timeout=60,
                          what="A's third and fourth executions to queue")
        assert live["inflight"] == 2 and live["max_inflight_per_session"] == 2
        wait_until(lambda: gate.waiting == 2, timeout=60, what="A's two running executions to reach the LM")
        request(shared, "b-shared", "execute_program", program_id="qa", session_id="B",
                inputs={"question": "quick"})
        request(other, "b-other", "execute_program", program_id="qa", session_id="B",
                inputs={"question": "quick"})
        request(other, "ping", "ping")
        # The other connection: B's execution and the ping, before any of A's replies exist.
        other_replies = {r["id"]: r for r in (other.receive(), other.receive())}
        assert other_replies["b-other"]["result"]["outputs"] == {"answer": "soon"}
        assert other_replies["ping"]["success"]
        # The shared connection: B's reply comes first, ahead of A's backlog on the same socket.
        first = shared.receive()
        assert first["id"] == "b-shared" and first["result"]["outputs"] == {"answer": "soon"}
        # Nothing of A's was lost or reordered within A: all four answered, in order of arrival per
        # slot round. The gate lets A's two running executions finish; a2/a3 take the freed slots
        # and are held in turn, so the first two replies are a0/a1 whatever the scheduling.
        gate.release(2)
        rest = [shared.receive(), shared.receive()]
        wait_until(lambda: gate.waiting == 2, timeout=60, what="a2 and a3 to take the freed slots")
        gate.release(2)
        rest += [shared.receive(), shared.receive()]
        assert all(r["success"] and r["result"]["outputs"] == {"answer": "late"} for r in rest)
        assert {r["id"] for r in rest[:2]} == {"a0", "a1"} and {r["id"] for r in rest[2:]} == {"a2", "a3"}
    assert srv.service.call("get_stats", {})["errors"] == {}


def test_a_session_with_the_slots_to_itself_still_uses_only_its_share(
        server: tuple[BridgeServer, int, LatencyGate]) -> None:
    """Fairness is a cap, not a reservation: the share holds even when no other session waits,
    so a session that arrives later finds a slot at once."""
    _, port, gate = server
    conns = [connect(port) for _ in range(3)]
    try:
        setup_sessions(conns[0], "A")
        for i, conn in enumerate(conns):  # one execution per connection: no connection backpressure
            request(conn, f"a{i}", "execute_program", program_id="qa", session_id="A",
                    inputs={"question": "slow"})
        # Three connections' threads submit at once: one that got its slot from the scheduler counts
        # as in flight only once its thread hands it over, so wait until all three are placed.
        live = wait_until(lambda: (s := stats(port))["queued"] + s["inflight"] == 3 and s, timeout=60,
                          what="the three executions to be running or queued")
        assert (live["inflight"], live["queued"]) == (2, 1)
        gate.release()
        for conn in conns:
            assert conn.receive()["success"]
    finally:
        for conn in conns:
            conn.close()


def test_the_share_is_a_worker_setting(spawn_worker: Any) -> None:
    worker = spawn_worker(env={"PROVISION_WORKER__MAX_INFLIGHT": "6",
                               "PROVISION_WORKER__MAX_INFLIGHT_PER_SESSION": "1"})
    with worker.client() as client:
        live = client.get_stats()
        assert (live["max_inflight"], live["max_inflight_per_session"]) == (6, 1)
    default = spawn_worker()
    with default.client() as client:
        assert client.get_stats()["max_inflight_per_session"] == 4


# --- wire-supplied delays are bounded ---------------------------------------------------------------


def configure(service: BridgeService, **fields: Any) -> dict[str, Any]:
    return service.call("configure_lm", {"session_id": "s", "mode": "mock", **fields})


def test_a_wire_rule_may_sleep_at_most_the_documented_bound() -> None:
    service = BridgeService(LMConfig(mode="mock"))
    ok = configure(service, mock_rules=[{"match": {"question": "x"}, "latency_ms": MAX_WIRE_LATENCY_MS}])
    assert ok["status"] == "configured"
    with pytest.raises(BridgeError) as info:
        configure(service, mock_rules=[{"match": {"question": "x"}},
                                       {"match": {"question": "y"}, "latency_ms": MAX_WIRE_LATENCY_MS + 1}])
    assert info.value.error_type == "InvalidLMConfig"
    assert "'mock_rules.1.latency_ms'" in info.value.message
    assert str(MAX_WIRE_LATENCY_MS) in info.value.message


@pytest.mark.parametrize("name", sorted(WIRE_LM_MAXIMA))
def test_wire_call_durations_are_bounded(name: str) -> None:
    service = BridgeService(LMConfig(mode="mock"))
    most = WIRE_LM_MAXIMA[name]
    assert configure(service, **{name: most})["status"] == "configured"
    with pytest.raises(BridgeError) as info:
        configure(service, **{name: most + 1})
    assert info.value.error_type == "InvalidLMConfig" and repr(name) in info.value.message


def test_the_layers_own_rules_are_not_bounded() -> None:
    """The start-up LM is the run's (settings, not the wire): a slow rule there is the project's
    choice, and a session that only picks a model keeps it."""
    slow = LMConfig(mode="mock", mock_rules=[MockRule(match={"q": "x"}, latency_ms=MAX_WIRE_LATENCY_MS * 3)])
    service = BridgeService(slow)
    assert configure(service, model="gemini-2.5-flash")["status"] == "configured"
