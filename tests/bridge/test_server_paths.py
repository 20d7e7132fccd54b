"""The bridge server's framing and dispatch paths that ordinary traffic does not take (issue 14,
coverage of the critical paths): peers that vanish mid-frame or mid-reply, shutdown with work still
queued, the deadline watch, refusals whose peers misbehave, a stdio host that closes its end, and a
worker stopped while an execution is stuck.

Everything runs against a real :class:`BridgeServer` on loopback (in-process, so limits can be
small), or a real ``provision worker`` / ``run_worker`` subprocess. docs/quality.md names the few
lines no test reaches and why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from provisioner.bridge import BridgeClient, BridgeService
from provisioner.bridge import server as server_module
from provisioner.bridge.protocol import HEADER, dumps, encode_frame, read_frame
from provisioner.bridge.server import (
    BridgeServer,
    PipeReader,
    _Connection,
    _DeadlineWatch,
    _InFlight,
    install_process_lm,
)
from provisioner.bridge.service import Access
from provisioner.bridge.worker import _configure_logging
from provisioner.lmconfig import LMConfig, MockRule

from .conftest import LatencyGate, RawConnection, clean_env, wait_until

QA = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer"}]}
# "held": its latency waits on the test's latency_gate (the 1 ms only makes the rule wait), so "still
# running when the test looks" is the test's to decide, not a margin of 200 ms or 1.5 s under load.
LM = LMConfig(
    mode="mock",
    mock_rules=[
        MockRule(match={"question": "held"}, outputs={"answer": "late"}, latency_ms=1),
        MockRule(match={"question": "quick"}, outputs={"answer": "soon"}),
    ],
)


@pytest.fixture
def serve_lm() -> LMConfig:
    """The LM of this module's ``serve`` (tests/bridge/conftest.py)."""
    return LM


raw = RawConnection.to


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def execute(request_id: int, session: str, question: str, program: str = "p") -> dict[str, Any]:
    return {"id": request_id, "command": "execute_program",
            "args": {"session_id": session, "program_id": program, "inputs": {"question": question}}}


# --- framing: frames that end early, empty frames ----------------------------------------------------


@pytest.mark.parametrize("announced", [200_000, 1_000], ids=["large-body", "small-body"])
def test_a_peer_that_hangs_up_mid_frame_gives_back_its_input_budget(serve: Any, announced: int) -> None:
    """A body cut short (a large one is read straight into its result, a small one through the
    buffer) is dropped: the bytes it reserved go back to the budget, and the worker serves on."""
    server, port = serve()
    with raw(port) as conn:
        conn.send_bytes(HEADER.pack(announced) + b"x" * (announced // 2))
        wait_until(lambda: server._input_budget.used == announced, 30, "the frame's bytes to be reserved")
    wait_until(lambda: server._input_budget.used == 0, 30, "the budget to be given back")
    wait_until(lambda: server._live_stats()["connections"] == 0, 30, "the connection to close")
    with BridgeClient("127.0.0.1", port) as client:
        assert client.ping()["status"] == "ok"


def test_a_peer_that_hangs_up_mid_header_is_closed_quietly_and_the_worker_serves_on(serve: Any) -> None:
    """Part of a frame's 4-byte length and then end of file: no frame, no reply, no error counted;
    the connection closes and the next client is served."""
    server, port = serve()
    with raw(port) as conn:
        conn.send_bytes(HEADER.pack(10)[:2])
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.sock.recv(1) == b""  # closed by the worker without a reply
    wait_until(lambda: server._live_stats()["connections"] == 0, 30, "the connection to close")
    with BridgeClient("127.0.0.1", port) as client:
        assert client.ping()["status"] == "ok"
        assert client.get_stats()["errors"] == {}


def test_an_empty_frame_is_answered_and_the_connection_goes_on(serve: Any) -> None:
    _, port = serve()
    with raw(port) as conn:
        conn.send_bytes(HEADER.pack(0))
        reply = conn.receive()
        assert reply["id"] is None and reply["error_type"] == "InvalidJSON"
        conn.send({"id": 2, "command": "ping"})
        assert conn.receive()["success"]


# --- replies to peers that are gone -------------------------------------------------------------------


def test_replies_to_a_peer_that_reset_are_dropped_and_the_work_still_ends(
    serve: Any, latency_gate: LatencyGate
) -> None:
    """Two executions of one session (one slot per session: they run one after the other); the
    client resets before either answer (the first is held at the gate until then). The first reply
    finds the peer gone and marks the connection broken, the second is not even tried — and both
    slots and budgets come back."""
    server, port = serve(max_inflight=2, max_inflight_per_session=1)
    with BridgeClient("127.0.0.1", port) as client:
        client.create_program(QA, "p", session_id="s")
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"".join(encode_frame(dumps(execute(n, "s", "held"))) for n in (1, 2)))
    wait_until(lambda: latency_gate.waiting == 1 and server._live_stats()["queued"] == 1, 30,
               "one execution running (held) and one queued")
    reset(sock)
    latency_gate.release()
    wait_until(lambda: server._live_stats()["connections"] == 0, 30, "the reset connection to be let go")
    live = server._live_stats()
    assert (live["inflight"], live["queued"], server._input_budget.used) == (0, 0, 0)
    with BridgeClient("127.0.0.1", port) as client:
        stats = client.get_stats()
        assert client.execute_program("p", {"question": "quick"}, "s")["outputs"] == {"answer": "soon"}
    assert stats["executions"] == 2  # both ran to the end, their replies had nowhere to go


def test_a_reset_peers_connection_is_let_go_only_after_its_execution_stopped_counting(
    serve: Any, latency_gate: LatencyGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order the test above relies on, made certain: the pool thread is held right after the
    execution left its connection, and the connection is already gone then — so the execution must
    no longer count as in flight, nor hold budget (with the old order, leave before the in-flight
    count, a loaded machine let the test above see connections 0 and inflight 1)."""
    server, port = serve(max_inflight=2)
    with BridgeClient("127.0.0.1", port) as client:
        client.create_program(QA, "p", session_id="s")
    left, proceed = threading.Event(), threading.Event()
    leave = _Connection.leave

    def leave_and_hold(conn: _Connection) -> None:
        leave(conn)
        if threading.current_thread().name.startswith("bridge-exec"):  # _finish, not the reader
            left.set()
            assert proceed.wait(60), "the test never let the execution's thread go on"

    monkeypatch.setattr(_Connection, "leave", leave_and_hold)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(encode_frame(dumps(execute(1, "s", "held"))))
        wait_until(lambda: latency_gate.waiting == 1, 30, "the execution to be held")
        reset(sock)
        latency_gate.release()
        assert left.wait(60), "the execution never left its connection"
        wait_until(lambda: server._live_stats()["connections"] == 0, 30, "the reset connection to be let go")
        live = server._live_stats()
        assert (live["inflight"], live["queued"], server._input_budget.used) == (0, 0, 0)
    finally:
        proceed.set()
        sock.close()


# --- shutdown with work still queued ------------------------------------------------------------------


def test_close_with_executions_still_queued_refuses_them_and_frees_every_slot(
    serve: Any, latency_gate: LatencyGate
) -> None:
    """``close`` that cannot wait for the work (the running execution is held at the gate past its
    timeout): it reports an unclean stop, shuts the pool, and when the running execution ends
    the ones queued behind it are refused (not run, not lost): every slot and byte comes back."""
    server, port = serve(max_inflight=1)
    with BridgeClient("127.0.0.1", port) as client:
        client.create_program(QA, "p", session_id="a")
        client.create_program(QA, "p", session_id="b")
    conn = raw(port)
    try:
        conn.send_bytes(b"".join(encode_frame(dumps(m)) for m in (
            execute(1, "a", "held"), execute(2, "b", "quick"), execute(3, "a", "quick"))))
        wait_until(lambda: latency_gate.waiting == 1 and server._live_stats()["queued"] == 2, 30,
                   "one execution held, two waiting for the slot")
        assert server.close(timeout=0.2) is False  # the 0.2 s is close's own wait, under test
        latency_gate.release()
        wait_until(lambda: server._live_stats()["inflight"] == 0 and server._scheduler.running == 0, 60,
                   "the running execution to end and the queued ones to be refused")
        assert server._live_stats()["queued"] == 0 and server._input_budget.used == 0
        stats = server.service.call("get_stats", {})
        assert stats["executions"] == 1  # the queued two were refused, never run
    finally:
        conn.close()


# --- the deadline watch ---------------------------------------------------------------------------------


def _flight(deadline: float) -> _InFlight:
    a, b = socket.socketpair()
    conn = _Connection(a.makefile("rb"), a.sendall, a.close, None, "pair", Access(control=True))
    b.close()
    return _InFlight(conn, 1, deadline)


def test_the_deadline_watch_times_out_only_unfinished_executions() -> None:
    """Finished executions at the front of the watch are dropped, and one that finished by the
    time its (shared) deadline came is skipped: only the unfinished one is answered with Timeout."""
    expired: list[_InFlight] = []
    done = threading.Event()

    def on_expired(flight: _InFlight) -> None:
        expired.append(flight)
        done.set()

    watch = _DeadlineWatch(on_expired, timeout_s=0.05)
    try:
        now = time.monotonic()
        finished_first = _flight(now + 0.1)
        unfinished = _flight(now + 0.3)
        finished_late = _flight(now + 0.3)  # the same deadline: expired in one batch with `unfinished`
        for flight in (finished_first, unfinished, finished_late):
            watch.add(flight)
        assert finished_first.claim() and finished_late.claim()  # their results replied first
        assert done.wait(30)
    finally:
        watch.stop()
    assert expired == [unfinished]


def test_an_execution_answered_first_gets_no_timeout_reply_too(serve: Any) -> None:
    server, _ = serve()
    a, b = socket.socketpair()
    try:
        conn = _Connection(a.makefile("rb"), a.sendall, a.close, None, "pair", Access(control=True))
        flight = _InFlight(conn, 7, time.monotonic())
        assert flight.claim()  # the result was sent
        server._expire(flight)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)
        assert "Timeout" not in server.service.call("get_stats", {})["errors"]
    finally:
        a.close()
        b.close()


# --- lifecycle -------------------------------------------------------------------------------------------


def test_listen_on_a_taken_port_raises_and_leaks_no_descriptor(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every socket ``listen`` makes is closed when the bind fails. Counted per socket the code under
    test creates, not as the process's open descriptors: other threads of the process (an xdist
    worker's execnet channel, a pool's health checks) open and close descriptors meanwhile."""
    made: list[socket.socket] = []

    class Recorded(socket.socket):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if threading.current_thread() is caller:
                made.append(self)

    _, port = serve()
    other = BridgeServer(BridgeService(LM), pids=None)
    caller = threading.current_thread()
    try:
        monkeypatch.setattr(socket, "socket", Recorded)
        with pytest.raises(OSError):
            other.listen("127.0.0.1", port)
        monkeypatch.undo()
        assert made, "listen made no socket: the check would see nothing"
        assert [s for s in made if s.fileno() != -1] == []
    finally:
        monkeypatch.undo()
        assert other.close(timeout=5)


def test_close_is_idempotent_and_a_later_stop_request_writes_to_no_reused_descriptor() -> None:
    server = BridgeServer(BridgeService(LM), pids=None)
    server.listen("127.0.0.1", 0)
    assert server.close(timeout=5) is True
    assert server.close(timeout=5) is True
    pipes = [os.pipe() for _ in range(3)]  # likely to reuse the wake pipes' numbers
    try:
        server.request_stop()  # e.g. a late SIGTERM: must not write to whatever those numbers are now
        for r, _w in pipes:
            os.set_blocking(r, False)
            with pytest.raises(BlockingIOError):
                os.read(r, 1)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_lone_surrogate_request_id_is_echoed_not_fatal(serve: Any) -> None:
    """Issue 14's kind "nothing a client sends can stop the worker": an id (or program id) holding
    a lone surrogate used to make the reply unencodable — the connection was dropped without an
    answer, or the client got an InternalError. Now both are answered, the id echoed as sent."""
    _, port = serve()
    with raw(port) as conn:
        conn.send_payload(b'{"id":"\\ud800","command":"ping"}')
        reply = conn.receive()
        assert reply["id"] == "\ud800" and reply["success"]
        conn.send_payload(b'{"id":2,"command":"get_program_info","args":{"program_id":"\\udfff"}}')
        reply = conn.receive()
        assert reply["error_type"] == "ProgramNotFound" and "\udfff" in reply["error"]


# --- refusals whose peers misbehave ---------------------------------------------------------------------


def _refusal(sock: socket.socket) -> dict[str, Any]:
    payload = read_frame(sock.makefile("rb"))
    assert payload is not None, "no refusal frame"
    reply: dict[str, Any] = json.loads(payload)
    assert reply["error_type"] == "TooManyConnections"
    return reply


def _at_eof(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_refusal_to_a_peer_already_gone_is_closed_at_once() -> None:
    refuser = server_module._Refuser()
    mine, theirs = socket.socketpair()
    try:
        theirs.close()
        refuser.refuse(mine, b"refusal")
        assert mine.fileno() == -1  # closed, not queued for draining
        assert not refuser._deadlines and not refuser._incoming
    finally:
        refuser.stop()


def test_refusals_beyond_the_refuser_s_cap_are_closed_at_once_after_their_frame(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "_MAX_REFUSING", 3)
    monkeypatch.setattr(server_module, "_REFUSE_DRAIN_S", 120.0)
    server, port = serve(max_connections=1)
    held = raw(port)
    flood: list[socket.socket] = []
    try:
        held.send({"id": 1, "command": "ping"})
        assert held.receive()["success"]
        for _ in range(6):
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=30))
            _refusal(flood[-1])  # every one of them learns why
        assert server._refuser is not None
        refuser = server._refuser
        wait_until(lambda: not refuser._incoming and len(refuser._deadlines) == 3, 30, "three draining")
        # Exactly the first three drain (a peer that sends nothing is dropped only at the drain deadline);
        # the three beyond the cap were closed at once after their frame.
        with refuser._count_lock:
            draining = {sock.getpeername()[1] for sock in refuser._deadlines}
        assert draining == {sock.getsockname()[1] for sock in flood[:3]}
        for sock in flood[0::2]:
            reset(sock)  # a reset while draining: dropped on the error
        for sock in flood[1::2]:
            sock.close()  # a clean hang-up: dropped on EOF
        wait_until(lambda: len(refuser._deadlines) == 0, 30, "the peers that left to be dropped")
    finally:
        held.close()
        for sock in flood:
            with contextlib.suppress(OSError):
                sock.close()
    assert server._live_stats()["connections_refused"] == 6


def test_a_refused_peer_that_never_hangs_up_is_closed_after_the_drain_time(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "_REFUSE_DRAIN_S", 0.05)
    _, port = serve(max_connections=1)
    with raw(port) as held:
        held.send({"id": 1, "command": "ping"})
        assert held.receive()["success"]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as lingering:
            _refusal(lingering)
            assert _at_eof(lingering)  # the refuser closed it: it does not wait for the peer forever


def test_closing_the_server_closes_refusals_still_draining(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "_REFUSE_DRAIN_S", 120.0)
    server, port = serve(max_connections=1)
    held = raw(port)
    try:
        held.send({"id": 1, "command": "ping"})
        assert held.receive()["success"]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as lingering:
            _refusal(lingering)
            assert server._refuser is not None
            refuser = server._refuser
            wait_until(lambda: len(refuser._deadlines) == 1, 30, "the refusal to be draining")
            held.close()
            assert server.close(timeout=10)
            assert _at_eof(lingering)
    finally:
        held.close()


# --- stdio: the host's end of the pipes ---------------------------------------------------------------


def test_a_stdio_host_that_closed_our_stdout_stops_the_worker() -> None:
    """The host that spawned a --stdio worker closes the reading end of the worker's stdout: the
    reply cannot be written, the connection is broken, and the worker stops instead of reading on."""
    server = BridgeServer(BridgeService(LM), pids=None)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.close(out_r)
    try:
        thread = server.serve_stdio(PipeReader(in_r), os.fdopen(out_w, "wb", buffering=0))
        os.write(in_w, encode_frame(dumps({"id": 1, "command": "ping"})))
        assert server.stop_requested.wait(30)
        thread.join(30)
        assert not thread.is_alive()
    finally:
        os.close(in_w)
        with contextlib.suppress(OSError):
            os.close(in_r)
        server.close(timeout=5)


class _FailingStdin:
    """A stdin stream whose read fails with something no transport raises (a last-resort path)."""

    def read(self, size: int = -1, /) -> bytes:
        raise RuntimeError("the host's pipe is not a pipe")


def test_an_unexpected_failure_of_a_connection_is_logged_and_ends_only_that_connection() -> None:
    server = BridgeServer(BridgeService(LM), pids=None)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("provisioner.bridge")
    logger.addHandler(handler)
    try:
        out_r, out_w = os.pipe()
        thread = server.serve_stdio(_FailingStdin(), os.fdopen(out_w, "wb", buffering=0))
        assert server.stop_requested.wait(30)
        thread.join(30)
        os.close(out_r)
    finally:
        logger.removeHandler(handler)
        server.close(timeout=5)
    failed = [r for r in records if "failed" in r.getMessage()]
    assert failed and failed[0].exc_info is not None and "not a pipe" in str(failed[0].exc_info[1])


# --- the process: start without a ready file, stop with stuck work ----------------------------------


def test_a_tcp_worker_without_a_ready_file_announces_its_port_on_stdout(tmp_path: Path) -> None:
    from .conftest import worker_command

    proc = subprocess.Popen(worker_command("--host", "127.0.0.1", "--port", "0"), cwd=tmp_path,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("PROVISION_WORKER_READY port=")
        with BridgeClient("127.0.0.1", int(line.split("=", 1)[1])) as client:
            assert client.ping()["status"] == "ok"
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


STUCK_WORKER = """
import sys
from pathlib import Path
from provisioner.bridge import server, worker
from provisioner.lmconfig import LMConfig, MockRule

server._SHUTDOWN_GRACE_S = 0.2  # the grace beyond the request timeout (5 s in a real worker)
# The latency is the thing under test (an LM call stuck far past every timeout), in a worker subprocess
# that SIGTERM ends: it is never waited out (no gate reaches another process).
lm = LMConfig(mode="mock", mock_rules=[MockRule(match={"question": "stuck"}, outputs={"answer": "x"},
                                                latency_ms=60_000)])
sys.exit(worker.run_worker(host="127.0.0.1", ready_file=Path(sys.argv[1]), lm_config=lm,
                           request_timeout_s=0.5))
"""


@pytest.mark.parametrize("caller_left", [False, True], ids=["caller-connected", "caller-gone"])
def test_a_worker_stopped_with_an_execution_stuck_exits_anyway(tmp_path: Path, caller_left: bool) -> None:
    """SIGTERM while an execution is stuck in its LM call: the caller already got its Timeout, the
    server stops waiting after the request timeout plus the grace, and the process exits 0 instead
    of hanging on the stuck thread — also when the caller hung up first (the worker then used to
    count the stop as clean and wait for the stuck call to end)."""
    ready = tmp_path / "port"
    stderr = tmp_path / "stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", STUCK_WORKER, str(ready)], cwd=tmp_path,
                                env=clean_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: proc.poll() is None and ready.exists(), 60, "the worker to listen")
        with BridgeClient("127.0.0.1", int(ready.read_text())) as client:
            client.create_program(QA, "p")
            with pytest.raises(Exception, match=r"did not finish within 0\.5 s"):
                client.execute_program("p", {"question": "stuck"})
            if not caller_left:
                proc.terminate()
        if caller_left:
            with BridgeClient("127.0.0.1", int(ready.read_text())) as observer:
                wait_until(lambda: observer.get_stats()["connections"] == 1, 60,
                           "the caller's connection to be gone (only ours left)")
                assert observer.get_stats()["inflight"] == 1  # the stuck execution runs on
            proc.terminate()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "abandoned stuck work" in stderr.read_text()


def test_worker_logging_is_configured_once_per_process() -> None:
    logger = logging.getLogger("provisioner.bridge")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        logger.handlers.clear()
        _configure_logging()
        _configure_logging()  # a second run_worker in one process: no second handler, no doubled lines
        assert len(logger.handlers) == 1
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def test_a_service_without_a_default_lm_leaves_dspy_s_lm_alone() -> None:
    import dspy

    before = dspy.settings.lm
    service = BridgeService(None)
    install_process_lm(service)
    assert service.default_lm is None and dspy.settings.lm is before
