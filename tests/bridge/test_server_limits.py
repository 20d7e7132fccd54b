"""The TCP server under hostile load (issue 14, items 7, 8, 10 — bridge side), in-process so limits
can be small: thread exhaustion, refusals without a thread each, partial frames, the input-byte
budget, program/session limits, replies that must fit a frame, and a client whose peer closed.

Floods are bounded in count and time and stay on loopback.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from provisioner.bridge import BridgeClient, BridgeService
from provisioner.bridge.protocol import dumps, encode_frame, read_frame
from provisioner.bridge.server import (
    ACCEPT_BACKOFF_S,
    AcceptBackoff,
    BridgeServer,
    _Connection,
    connection_limit,
    pids_limit,
)
from provisioner.errors import BridgeError
from provisioner.lmconfig import LMConfig, MockRule

from .conftest import LatencyGate, RawConnection, wait_until

QA = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer"}]}
SLOW_LM = LMConfig(mode="mock", mock_rules=[MockRule(match={"question": "slow"}, outputs={"answer": "late"},
                                                     latency_ms=2500)])


@pytest.fixture
def serve_lm() -> LMConfig:
    """The LM of this module's ``serve`` (tests/bridge/conftest.py)."""
    return SLOW_LM


raw = RawConnection.to


# --- connections: thread exhaustion, refusals, the pids cap -------------------------------------


class _NoThreads(BridgeServer):
    """Simulates the container's pids limit: the first ``failures`` connection threads cannot start."""

    failures = 3

    def _start_thread(self, target: Callable[[_Connection], None], conn: _Connection, name: str
                      ) -> threading.Thread:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("can't start new thread")
        return super()._start_thread(target, conn, name)


def test_the_accept_loop_survives_thread_exhaustion(serve: Any) -> None:
    """Issue 14.7: ~250 idle connections hit the pids limit and `can't start new thread` killed the
    accept thread; the worker stayed deaf for good. Now each such client is refused, and the next
    one is served as soon as a thread can start."""
    _, port = serve(_NoThreads)
    for _ in range(3):
        with raw(port) as conn:
            reply = conn.receive()
            assert reply["id"] is None and reply["error_type"] == "TooManyConnections"
            assert "can't start new thread" in reply["error"]
            assert conn.at_eof()
    with BridgeClient("127.0.0.1", port) as client:
        assert client.ping()["status"] == "ok"
        stats = client.get_stats()
    assert stats["connections_refused"] == 3 and stats["errors"]["TooManyConnections"] == 3


def test_refusals_do_not_cost_a_thread_each(serve: Any, poll: Any) -> None:
    server, port = serve(max_connections=2)
    held = [raw(port), raw(port)]
    try:
        for conn in held:
            conn.send({"id": 1, "command": "ping"})
            assert conn.receive()["success"]
        threads_before = threading.active_count()
        flood = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(60)]
        peak = threading.active_count()
        try:
            for sock in flood:
                reply = json.loads(read_frame(sock.makefile("rb")) or b"{}")
                assert reply["error_type"] == "TooManyConnections"
                peak = max(peak, threading.active_count())
        finally:
            for sock in flood:
                sock.close()
        assert peak <= threads_before + 1  # one refuser thread for all of them, none per refusal
        for conn in held:  # the connections being served never noticed
            conn.send({"id": 2, "command": "ping"})
            assert conn.receive()["success"]
    finally:
        for conn in held:
            conn.close()
    poll(lambda: server._live_stats()["connections"] == 0, what="the held connections to close")
    with BridgeClient("127.0.0.1", port) as client:
        assert client.get_stats()["connections_refused"] == 60


def test_the_connection_limit_stays_below_the_pids_limit(tmp_path: Path) -> None:
    assert connection_limit(256, 8, None) == 256
    assert connection_limit(256, 8, 256) == 200  # a container's default pids limit of 256
    assert connection_limit(16, 8, 256) == 16
    assert connection_limit(256, 8, 40) == 1
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.write_text("max\n")
    v1.write_text("256\n")
    assert pids_limit((str(v2),)) is None
    assert pids_limit((str(tmp_path / "missing"), str(v1))) == 256
    assert pids_limit((str(tmp_path / "missing"),)) is None
    server = BridgeServer(BridgeService(LMConfig()), max_connections=256, pids=128)
    try:
        assert server.max_connections == 128 - 8 - 48 and server.configured_max_connections == 256
    finally:
        server.close(timeout=1)


# --- frames: partial frames time out, idle connections do not ----------------------------------


def test_a_started_frame_must_arrive_in_time_but_idle_connections_stay(serve: Any, poll: Any) -> None:
    """Issue 14.7: 266 one-byte connections locked new clients out for 35 s+. A started frame now has
    `frame_timeout_s` to arrive; a connection idle between requests (DSPex keeps one open for a whole
    suite) is never closed for being idle."""
    _, port = serve(frame_timeout_s=0.5)
    with raw(port) as idle, raw(port) as half_header, raw(port) as half_body:
        idle.send({"id": 1, "command": "ping"})
        assert idle.receive()["success"]
        half_header.send_bytes(b"\x00\x00")
        body = dumps({"id": 2, "command": "ping"})
        half_body.send_bytes(struct.pack(">I", len(body)) + body[:5])
        for conn in (half_header, half_body):
            reply = conn.receive()  # blocks until the worker gives up on the frame
            assert reply["id"] is None and reply["error_type"] == "FrameTimeout"
            assert "did not arrive completely within 0.5 s" in reply["error"]
            assert conn.at_eof()
        # The idle connection has been idle longer than the frame timeout: still served.
        idle.send({"id": 3, "command": "ping"})
        assert idle.receive()["success"]
    with BridgeClient("127.0.0.1", port) as client:
        assert client.get_stats()["errors"]["FrameTimeout"] == 2


# --- memory: input bytes, programs, sessions -----------------------------------------------------


def test_input_bytes_in_flight_are_bounded(serve: Any, poll: Any, latency_gate: LatencyGate) -> None:
    """Issue 14.8: eight 15 MB inputs at once OOM-killed a 1 GiB worker. Request bodies held at once
    are bounded: a request that does not fit waits (the connection stops reading), and one that
    cannot get room within the request timeout is refused with Overloaded."""
    # The slow execution holds its input until the gate is released, after the second request was
    # refused: however long the second one waited, the first was still in flight.
    held = LMConfig(mode="mock", mock_rules=[MockRule(match={"question": "slow"}, latency_ms=1)])
    server, port = serve(lm=held, max_inflight_bytes=1_000_000, request_timeout_s=1.0)
    big = "x" * 700_000
    with BridgeClient("127.0.0.1", port, request_timeout=30) as setup:
        setup.create_program(QA, "qa")
    holder = BridgeClient("127.0.0.1", port, request_timeout=30)
    outcome: dict[str, Any] = {}

    def hold() -> None:
        try:
            outcome["result"] = holder.execute_program("qa", {"question": "slow " + big})
        except BridgeError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        poll(lambda: server._input_budget.used >= 700_000, what="the slow execution to hold its input")
        with raw(port) as second:
            second.send({"id": 7, "command": "execute_program",
                         "args": {"program_id": "qa", "inputs": {"question": "fast " + big}}})
            reply = second.receive()
            assert reply["id"] is None and reply["error_type"] == "Overloaded"
            assert "limit 1000000" in reply["error"] and second.at_eof()
        with BridgeClient("127.0.0.1", port) as small:  # small requests still fit beside it
            assert small.ping()["status"] == "ok"
    finally:
        latency_gate.release()
        thread.join(30)
        holder.close()
    assert outcome  # the slow one ended (a Timeout reply after 1 s, or its answer once released)
    poll(lambda: server._input_budget.used == 0, what="the budget to be released")
    with BridgeClient("127.0.0.1", port) as again:
        assert again.execute_program("qa", {"question": "fast " + big})["outputs"]["answer"]


def test_programs_and_sessions_per_worker_are_bounded() -> None:
    service = BridgeService(LMConfig(mode="mock"), max_programs=3, max_sessions=2)
    for n in range(3):
        service.call("create_program", {"session_id": f"s{n % 2}", "program_id": f"p{n}", "signature": QA})
    with pytest.raises(BridgeError) as info:
        service.call("create_program", {"session_id": "s0", "program_id": "p9", "signature": QA})
    assert info.value.error_type == "TooManyPrograms" and "3 programs" in info.value.message
    service.call("delete_program", {"session_id": "s0", "program_id": "p0"})
    service.call("create_program", {"session_id": "s0", "program_id": "p9", "signature": QA})
    with pytest.raises(BridgeError) as info:
        service.call("configure_lm", {"session_id": "s2", "mode": "mock"})
    assert info.value.error_type == "TooManySessions" and "cleanup_session" in info.value.message
    assert service.call("cleanup_session", {"session_id": "s1"})["programs_removed"] == 1
    service.call("configure_lm", {"session_id": "s2", "mode": "mock"})
    service.call("create_program", {"session_id": "s2", "program_id": "p1", "signature": QA})
    stats = service.call("get_stats", {})
    assert stats["program_count"] == 3 and stats["max_programs"] == 3 and stats["max_sessions"] == 2


# --- replies fit a frame --------------------------------------------------------------------------


def test_every_reply_fits_the_frame_limit_even_with_a_huge_id(serve: Any) -> None:
    """Issue 14.10: the ReplyTooLarge reply echoed a huge id and was itself over max_frame_bytes."""
    limit = 512
    _, port = serve(max_frame_bytes=limit)
    with raw(port) as conn:
        conn.send({"id": 5, "command": "get_stats"})  # a normal id: the error keeps it
        first = conn.receive()
        assert first == {**first, "id": 5, "success": False, "error_type": "ReplyTooLarge"}
        for command in ("get_stats", "no_such_command"):
            huge_id = "i" * (limit - 60)
            frame = encode_frame(dumps({"id": huge_id, "command": command}))
            assert len(frame) <= limit + 4
            conn.send_bytes(frame)
            header = conn.reader.read(4)
            (size,) = struct.unpack(">I", header)
            assert size <= limit
            reply = json.loads(conn.reader.read(size))
            assert reply["id"] is None and not reply["success"]
            assert reply["error_type"] in ("ReplyTooLarge", "UnknownCommand")
            assert "the request id was too long to echo" in reply["error"]
        conn.send({"id": 6, "command": "ping"})  # and the connection is still in step
        assert conn.receive()["success"]


# --- the client: the next request reconnects after the peer closed --------------------------------


def test_the_client_reconnects_on_the_next_request_after_the_peer_closed() -> None:
    """Issue 14.10: after the worker closed an idle connection, the next two calls failed. A peer
    that answers one request per connection and then hangs up: every call must still succeed.

    A reconnecting client first asks the new connection with a ``hello`` whether it is a fork-mode
    process (issue 12: never continue silently on a fresh process); the peer answers that without
    hanging up, as a real worker keeps a connection open between requests."""
    listener = socket.create_server(("127.0.0.1", 0))
    closed = threading.Semaphore(0)
    accepted = []

    def one_request_per_connection() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            with conn, conn.makefile("rb") as reader:
                while (payload := read_frame(reader)) is not None:
                    request = json.loads(payload)
                    hello = request["command"] == "hello"
                    result = {"status": "ok"} if hello else {"n": len(accepted)}
                    reply = {"id": request["id"], "success": True, "result": result}
                    conn.sendall(encode_frame(dumps(reply)))
                    if not hello:
                        break
            closed.release()

    thread = threading.Thread(target=one_request_per_connection, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    try:
        with BridgeClient("127.0.0.1", port, request_timeout=10) as client:
            results = []
            for _ in range(4):
                results.append(client.ping()["n"])
                assert closed.acquire(timeout=10)  # the peer has hung up before the next call
            assert results == [1, 2, 3, 4]
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        listener.close()
        thread.join(10)
        assert not thread.is_alive()


# --- the bounds are settings ------------------------------------------------------------------------


def test_the_bounds_are_worker_settings_with_the_same_defaults(spawn_worker: Any) -> None:
    from provisioner.bridge.programs import DEFAULT_MAX_PROGRAMS, DEFAULT_MAX_SESSIONS
    from provisioner.bridge.server import DEFAULT_FRAME_TIMEOUT_S, DEFAULT_MAX_INFLIGHT_BYTES
    from provisioner.settings import WorkerSettings

    defaults = WorkerSettings()
    assert (defaults.max_inflight_bytes, defaults.frame_timeout_s, defaults.max_programs,
            defaults.max_sessions) == (DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_FRAME_TIMEOUT_S,
                                       DEFAULT_MAX_PROGRAMS, DEFAULT_MAX_SESSIONS)
    worker = spawn_worker(env={"PROVISION_WORKER__MAX_PROGRAMS": "2", "PROVISION_WORKER__MAX_SESSIONS": "5",
                               "PROVISION_WORKER__FRAME_TIMEOUT_S": "0.5"})
    with worker.client() as client:
        client.create_program(QA, "a")
        client.create_program(QA, "b")
        with pytest.raises(BridgeError) as info:
            client.create_program(QA, "c")
        assert info.value.error_type == "TooManyPrograms"
        stats = client.get_stats()
        assert stats["max_programs"] == 2 and stats["max_sessions"] == 5
    with raw(worker.port) as conn:
        conn.send_bytes(b"\x00")
        assert conn.receive()["error_type"] == "FrameTimeout"


def _without_spare_descriptors(pid: int) -> tuple[int, int]:
    """Lower the process's RLIMIT_NOFILE to the descriptors it holds now (prlimit(2) through
    psutil); returns the old (soft, hard) to restore."""
    proc = psutil.Process(pid)
    old = proc.rlimit(psutil.RLIMIT_NOFILE)
    proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds(), old[1]))
    return old


def test_out_of_file_descriptors_a_connection_is_refused_and_the_worker_recovers(spawn_worker: Any) -> None:
    """Issue 14 item 7: accept() failing with EMFILE left the connection queued and the accept loop
    retrying at once (a busy loop; the client waited in silence). Now the queued connection gets a
    TooManyConnections reply naming the limit, and the worker serves again once descriptors free."""
    worker = spawn_worker()
    with worker.client() as warm:
        warm.ping()
    # The worker closes that connection's socket on its own thread: wait until it has, or the limit
    # below would leave room for exactly one more connection.
    proc = psutil.Process(worker.proc.pid)
    wait_until(lambda: all(c.status == psutil.CONN_LISTEN for c in proc.net_connections("tcp")), 30,
               "the worker to close the warm-up connection")
    old = _without_spare_descriptors(worker.proc.pid)
    try:
        for _ in range(3):  # every queued connection is answered, not only the first
            with worker.raw() as refused:
                reply = refused.receive()
                assert reply["id"] is None and reply["error_type"] == "TooManyConnections"
                assert "out of file descriptors" in reply["error"] and "RLIMIT_NOFILE" in reply["error"]
                assert refused.at_eof()
    finally:
        psutil.Process(worker.proc.pid).rlimit(psutil.RLIMIT_NOFILE, old)
    with worker.client() as again:
        assert again.ping()["status"] == "ok"
        assert again.get_stats()["errors"].get("TooManyConnections", 0) >= 3
    assert worker.stderr_bytes().count(b"out of file descriptors") == 1  # one warning per episode


def test_accept_backoff_doubles_while_nothing_can_be_refused() -> None:
    waits: list[float] = []
    backoff = AcceptBackoff("test", waits.append)
    exc = OSError(errno.EMFILE, "Too many open files")
    for _ in range(12):
        backoff.failed(exc, refused=False)
    assert waits[0] == ACCEPT_BACKOFF_S[0] and waits[-1] == ACCEPT_BACKOFF_S[1]
    assert all(b == min(ACCEPT_BACKOFF_S[1], 2 * a) for a, b in itertools.pairwise(waits))
    backoff.failed(exc, refused=True)  # a refusal is progress: no wait
    assert len(waits) == 12 and backoff.episodes == 1
    backoff.succeeded()
    backoff.failed(exc, refused=False)
    assert waits[-1] == ACCEPT_BACKOFF_S[0] and backoff.episodes == 2
