"""A client of a worker must not control what belongs to the run (issue 14, items 1-3).

Real `provision worker` subprocesses over TCP; real-mode workers call the Gemini stand-in through
google-genai. Reproductions of the issue: a session pointing the run's key at its own listener,
lifting the run's budget, and using worker-wide commands without the run's control token.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioner.bridge import BridgeClient, BridgeService
from provisioner.bridge.protocol import BRIDGE_TOKEN_ENV, CONTROL_TOKEN_ENV
from provisioner.errors import BridgeError
from provisioner.lm.limits import RunLimits, write_run_limits
from provisioner.lm.standin import GeminiStandin
from provisioner.lmconfig import RUN_OWNED_LM_FIELDS, LMConfig

from .conftest import WorkerFactory, WorkerProcess

QA = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer"}]}
RUN_KEY = "run-key-must-stay-home-7f3a9c"
TOKEN = "control-token-for-tests-5b1e0d9a7c"
# One value of the right type per run-owned field: the refusal must not depend on the value.
OWNED_VALUES: dict[str, Any] = {
    "api_key": "sk-client-key",
    "base_url": "http://127.0.0.1:9/",
    "endpoint_kind": "standin",
    "cost_limit_usd": 1000.0,
    "rate_limit_rpm": 100000,
    "rate_limit_wait_s": 3600.0,
    "monthly_budget_usd": 1e6,
    "shards": 8,  # a share of the run's limits, or none: the run's choice
    "limits_share_of": 3,
    "prices": {"gemini-2.5-flash-lite": {"input_per_mtok": 0, "output_per_mtok": 0}},
    "run_dir": "/tmp/fresh-budget",
    "run_id": "someone-else",
    "layer": "other",
    "cache_dir": "/tmp/cassettes",
    "cache_dir_shown": "elsewhere",
    "record_mode": "all",
    "cached_inner": "real",
}


def error_of(fn: Any, *args: Any, **kwargs: Any) -> BridgeError:
    with pytest.raises(BridgeError) as info:
        fn(*args, **kwargs)
    return info.value


class Listener:
    """A TCP listener of the client's: records every connection and the bytes it was sent."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    self.received.append(conn.recv(65536))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def standin() -> Iterator[GeminiStandin]:
    with GeminiStandin(api_key=RUN_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def shared_token_worker(spawn_module_worker: WorkerFactory) -> WorkerProcess:
    return spawn_module_worker(env={CONTROL_TOKEN_ENV: TOKEN})


@pytest.fixture
def token_worker(shared_token_worker: WorkerProcess) -> WorkerProcess:
    """A mock-mode worker started with the run's control token, shared by this module's tests that
    neither stop it nor change what a reset cannot restore (one worker start instead of one per
    test). Each test gets it as started: ``reset_state`` removes every session and program and
    returns the default LM to the start-up one."""
    assert shared_token_worker.proc.poll() is None, "a test stopped the shared worker"
    with shared_token_worker.client(token=TOKEN) as controller:
        controller.reset_state()
    return shared_token_worker


def real_lm(standin: GeminiStandin, run_dir: Path, **fields: Any) -> LMConfig:
    """A real-mode start-up LM against the stand-in, as a controller would hand it to a worker."""
    values: dict[str, Any] = {
        "mode": "real",
        "base_url": standin.url,
        "endpoint_kind": "standin",
        "api_key": RUN_KEY,
        "run_dir": run_dir,
        "max_retries": 0,
        "request_timeout_s": 10.0,
        **fields,
    }
    return LMConfig.model_validate(values)


# --- 1 and 2: run-owned fields are refused, whoever asks ---------------------------------------


def test_every_run_owned_field_is_refused_by_name_with_or_without_the_token(
        token_worker: WorkerProcess) -> None:
    assert set(OWNED_VALUES) == set(RUN_OWNED_LM_FIELDS)
    worker = token_worker
    with worker.client() as anyone, worker.client(token=TOKEN) as controller:
        for client in (anyone, controller):
            for name, value in OWNED_VALUES.items():
                error = error_of(client.configure_lm, session_id="s", mode="mock", **{name: value})
                assert error.error_type == "InvalidLMConfig", name
                assert f"'{name}' belongs to the run" in error.message
            # Several at once: every one is named.
            error = error_of(client.configure_lm, session_id="s", base_url="http://x/", cost_limit_usd=9,
                             run_dir="/tmp/x")
            assert all(f"'{n}'" in error.message for n in ("base_url", "cost_limit_usd", "run_dir"))
            assert "sk-client-key" not in error.message
        # What a session may choose still works.
        anyone.configure_lm(session_id="s", mode="mock", temperature=0.2, mock_default="mine")
    assert b"sk-client-key" not in worker.stderr_bytes()


def test_a_session_cannot_send_the_run_key_to_a_url_of_its_choosing(
    spawn_worker: Any, standin: GeminiStandin, tmp_path: Path
) -> None:
    """Issue 14.1: configure_lm(session_id="e", base_url=<listener>, max_retries=0), then execute."""
    listener = Listener()
    try:
        worker = spawn_worker(lm=real_lm(standin, tmp_path / "lm"))
        before = standin.request_count
        with worker.client() as client:
            error = error_of(client.configure_lm, session_id="e", base_url=listener.url, max_retries=0)
            assert error.error_type == "InvalidLMConfig" and "'base_url'" in error.message
            session = client.session("e")
            session.configure_lm(max_retries=0)  # allowed: the session's LM, the run's endpoint
            session.create_program(QA, "qa")
            assert session.execute_program("qa", {"question": "where does this go?"})["outputs"]["answer"]
        assert listener.received == []  # not even a connection
        seen = standin.requests[before:]
        assert seen and all(r.key_ok and r.key_source == "header" for r in seen)
    finally:
        listener.close()


def test_a_session_config_never_inherits_the_key_for_another_endpoint(tmp_path: Path) -> None:
    """Defence in depth behind the refusal: the merged configuration drops the start-up key as soon
    as its endpoint is not the start-up one."""
    built: list[LMConfig] = []
    startup = LMConfig(mode="real", base_url="http://run-endpoint/", api_key=RUN_KEY, run_dir=tmp_path)
    service = BridgeService(startup, lm_factory=lambda c: built.append(c) or object())
    same = service._merged_config({"temperature": 0.5})
    assert same.api_key is not None and same.api_key.get_secret_value() == RUN_KEY
    other = service._merged_config({"base_url": "http://elsewhere/"})
    assert other.api_key is None


def test_a_session_cannot_lift_the_run_budget(
    spawn_worker: Any, standin: GeminiStandin, tmp_path: Path
) -> None:
    """Issue 14.2: configure_lm(session_id="greedy", cost_limit_usd=1000) on a real-mode worker with a
    $0.001 run limit. The refusal names each field; the run's limit still holds for the session."""
    run_dir = tmp_path / "lm"
    limit = 0.001
    write_run_limits(run_dir, rate_limit_rpm=1000, cost_limit_usd=limit, rate_limit_wait_s=5.0)
    worker = spawn_worker(lm=real_lm(standin, run_dir, cost_limit_usd=limit))
    with worker.client() as client:
        for name, value in (("cost_limit_usd", 1000.0), ("rate_limit_rpm", 100000),
                            ("rate_limit_wait_s", 3600.0), ("run_dir", str(tmp_path / "fresh"))):
            error = error_of(client.configure_lm, session_id="greedy", **{name: value})
            assert error.error_type == "InvalidLMConfig" and f"'{name}'" in error.message
        greedy = client.session("greedy")
        greedy.configure_lm(temperature=0.0)  # its own LM, still under the run's limits
        greedy.create_program(QA, "qa")
        refused = None
        calls = 0
        for n in range(300):  # each call is billed ~$0.00003 and reserves ~$0.0005 worst case
            try:
                greedy.execute_program("qa", {"question": f"spend {n}"})
                calls += 1
            except BridgeError as exc:
                refused = exc
                break
        assert refused is not None, f"{calls} calls passed a $0.001 budget"
        assert refused.error_type == "CostLimitExceeded" and "lm.cost_limit_usd=$0.001 " in refused.message
    spent = RunLimits(run_dir, rpm=1, cost_limit_usd=0).snapshot()
    assert 0 < spent.spent_usd <= limit and spent.limit_usd == limit
    assert not (tmp_path / "fresh").exists()


def test_the_run_limits_file_wins_over_the_worker_configuration(
    spawn_worker: Any, standin: GeminiStandin, tmp_path: Path
) -> None:
    """However an LM in a worker was configured, the controller's limits file is what holds."""
    run_dir = tmp_path / "lm"
    write_run_limits(run_dir, rate_limit_rpm=1000, cost_limit_usd=0.0, rate_limit_wait_s=5.0)
    worker = spawn_worker(lm=real_lm(standin, run_dir, cost_limit_usd=1000.0))
    before = standin.request_count
    with worker.client() as client:
        client.create_program(QA, "qa")
        error = error_of(client.execute_program, "qa", {"question": "free money?"})
    assert error.error_type == "CostLimitExceeded" and "lm.cost_limit_usd=$0 " in error.message
    assert standin.request_count == before  # refused before anything was sent


# --- 3: worker-wide commands need the run's control token --------------------------------------


def test_without_the_token_a_client_keeps_to_its_sessions(token_worker: WorkerProcess) -> None:
    """Issue 14.3: client A, not knowing session B's id, cannot list, reset, re-point or stop."""
    worker = token_worker
    b_session = "b-7d41c2e9f0a35b86"
    with worker.client(token=TOKEN) as owner:
        b = owner.session(b_session)
        b.create_program(QA, "qa")
        b_answer = b.execute_program("qa", {"question": "2+2"})["outputs"]
    with worker.client() as a:
        hello = a.hello()
        assert hello["capabilities"] == ["session"] and hello["control_token_required"] is True
        # Its own session works as for any DSPex client: no hello needed.
        mine = a.session("a")
        mine.configure_lm(mode="mock", mock_default="a's")
        mine.create_program(QA, "qa")
        assert mine.execute_program("qa", {"question": "x"})["outputs"] == {"answer": "a's"}
        assert a.list_programs("a")["total_count"] == 1
        for call, what in (
            (lambda: a.list_programs(all_sessions=True), "list_programs with all_sessions"),
            (lambda: a.configure_lm(mode="mock", mock_default="hijacked"), "configure_lm without session_id"),
            (a.reset_state, "reset_state"),
            (a.shutdown, "shutdown"),
        ):
            error = error_of(call)
            assert error.error_type == "Unauthorized" and what in error.message
            assert "hello" in error.message and CONTROL_TOKEN_ENV in error.message
        stats = a.get_stats()
        assert stats["scope"] == "aggregate" and "sessions" not in stats and "lm" not in stats
        assert stats["session_count"] >= 2 and b_session not in json.dumps(stats)
        # A wrong token is an error and gives nothing.
        error = error_of(a.hello, "not-the-token")
        assert error.error_type == "Unauthorized" and "not-the-token" not in error.message
        assert error_of(a.reset_state).error_type == "Unauthorized"
    with worker.client(token=TOKEN) as owner:
        # B is untouched: same programs, same default LM, the worker still up.
        assert owner.session(b_session).execute_program("qa", {"question": "2+2"})["outputs"] == b_answer
        assert worker.proc.poll() is None
    assert TOKEN.encode() not in worker.stderr_bytes()


def test_with_the_token_the_controller_has_the_worker(spawn_worker: Any, poll: Any) -> None:
    worker = spawn_worker(env={CONTROL_TOKEN_ENV: TOKEN})
    with worker.client() as other:
        other.session("other").create_program(QA, "qa")
    with worker.client(token=TOKEN) as controller:
        assert controller.hello(TOKEN)["capabilities"] == ["session", "control"]
        stats = controller.get_stats()
        assert stats["scope"] == "worker" and "other" in stats["sessions"] and stats["lm"]["mode"] == "mock"
        assert controller.list_programs(all_sessions=True)["total_count"] == 1
        assert controller.configure_lm(mode="mock", mock_default="new default")["session_id"] is None
        assert controller.reset_state()["sessions_removed"] == 1
        assert controller.shutdown()["status"] == "shutting_down"
    assert worker.wait_exit() == 0
    assert TOKEN.encode() not in worker.stderr_bytes()


def test_the_token_is_sent_again_after_a_reconnect(token_worker: WorkerProcess) -> None:
    worker = token_worker
    client = BridgeClient("127.0.0.1", worker.port, token=TOKEN)
    try:
        assert client.get_stats()["scope"] == "worker"
        client._drop_connection()  # as after a broken connection
        assert client.get_stats()["scope"] == "worker"
    finally:
        client.close()
    wrong = BridgeClient("127.0.0.1", worker.port, token="wrong")
    try:
        error = error_of(wrong.ping)  # the hello on connecting fails, loudly
        assert error.error_type == "Unauthorized"
    finally:
        wrong.close()


def test_a_worker_started_without_a_token_stays_open(spawn_worker: Any) -> None:
    """`provision worker` by hand: every connection has control, as before tokens existed."""
    worker = spawn_worker()
    with worker.client() as client:
        hello = client.hello()
        assert hello["capabilities"] == ["session", "control"] and hello["control_token_required"] is False
        assert client.hello("anything")["capabilities"] == ["session", "control"]
        assert client.get_stats()["scope"] == "worker"
        assert client.reset_state()["status"] == "reset"


def test_the_token_is_not_on_the_worker_command_line(token_worker: WorkerProcess) -> None:
    worker = token_worker
    cmdline = Path(f"/proc/{worker.proc.pid}/cmdline").read_bytes()
    assert TOKEN.encode() not in cmdline


def test_the_stdio_connection_belongs_to_whoever_spawned_the_worker(spawn_worker: Any) -> None:
    """Over --stdio only the parent holds the pipes: its one connection has control, token or not."""
    worker = spawn_worker(stdio=True, env={CONTROL_TOKEN_ENV: TOKEN})
    worker.send({"id": 1, "command": "hello"})
    assert worker.receive()["result"]["capabilities"] == ["session", "control"]
    worker.send({"id": 2, "command": "reset_state"})
    assert worker.receive()["success"]
    worker.send({"id": 3, "command": "shutdown"})
    assert worker.receive()["success"]
    assert worker.wait_exit() == 0


# --- off loopback: every connection starts with a hello carrying the run's bridge token -----------

BRIDGE_TOKEN = "bridge-token-for-tests-93c1e7d0a4"


@pytest.mark.parametrize("mode", ["thread", "fork"])
def test_off_loopback_every_connection_needs_the_bridge_token_first(spawn_worker: Any, mode: str) -> None:
    """PROVISION_BRIDGE_TOKEN set (a run published off loopback): a first frame other than a hello
    with the bridge or the control token gets an Unauthorized reply and the connection is closed;
    the bridge token admits to session commands only, the control token to everything."""
    args = ("--fork",) if mode == "fork" else ()
    worker = spawn_worker(*args, env={CONTROL_TOKEN_ENV: TOKEN, BRIDGE_TOKEN_ENV: BRIDGE_TOKEN})
    for first in (
        {"id": 1, "command": "ping"},
        {"id": 1, "command": "hello"},
        {"id": 1, "command": "hello", "args": {"token": "wrong"}},
        {"id": 1, "command": "create_program", "args": {"session_id": "s", "signature": "q -> a"}},
    ):
        with worker.raw() as raw:
            raw.send(first)
            reply = raw.receive()
            assert reply["success"] is False and reply["error_type"] == "Unauthorized", first
            assert "PROVISION_BRIDGE_TOKEN" in reply["error"] and BRIDGE_TOKEN not in reply["error"]
            assert raw.at_eof(), f"the connection stays open after {first}"
    with worker.raw() as raw:
        raw.send({"id": 1, "command": "hello", "args": {"token": BRIDGE_TOKEN}})
        hello = raw.receive()["result"]
        # A fork-mode connection is its own process: the `process` capability, never `control`.
        own = ["process"] if mode == "fork" else []
        assert hello["capabilities"] == ["session", *own] and hello["bridge_token_required"] is True
        raw.send({"id": 2, "command": "ping"})
        assert raw.receive()["success"] is True
        raw.send({"id": 3, "command": "reset_state"})
        assert raw.receive()["error_type"] == "Unauthorized"  # the bridge token is no control token
    with worker.client(token=BRIDGE_TOKEN) as client:  # hello on every (re)connect
        session = client.session("s")
        session.configure_lm(mode="mock", mock_default="x")
        session.create_program("question -> answer", "qa")
        assert session.execute_program("qa", {"question": "q"})["outputs"] == {"answer": "x"}
    with worker.client(token=TOKEN) as controller:
        assert controller.hello(TOKEN)["capabilities"] == ["session", "control", *own]
        assert controller.get_stats()["scope"] == "worker"


def test_on_loopback_no_hello_is_needed(token_worker: WorkerProcess) -> None:
    """Without PROVISION_BRIDGE_TOKEN (loopback runs) session commands need no hello (DSPex-compatible)."""
    worker = token_worker
    with worker.raw() as raw:
        raw.send({"id": 1, "command": "ping"})
        assert raw.receive()["success"] is True
        raw.send({"id": 2, "command": "hello"})
        assert raw.receive()["result"]["bridge_token_required"] is False
