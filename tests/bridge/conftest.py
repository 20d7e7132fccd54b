"""Helpers for the bridge tests: start `provision worker` as a real subprocess, talk raw frames.

Workers run with a scrubbed environment (no PROVISION_*, TEST_MODE or API key from the developer's
shell) in a temporary working directory, so only what a test sets reaches them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioner.bridge import BridgeClient
from provisioner.bridge.protocol import decode_reply, dumps, encode_frame, read_frame
from provisioner.bridge.server import BridgeServer
from provisioner.bridge.service import BridgeService
from provisioner.lmconfig import LMConfig, MockRule, worker_secrets

from .._helpers import GATE_TIMEOUT_S, LatencyGate, die_with_parent, without_settings  # noqa: F401 (re-exported)

START_TIMEOUT_S = 60.0
# A worker must end within this of SIGTERM (in-flight work of the tests' mock LM takes ≤ 1.5 s).
STOP_TIMEOUT_S = 30.0


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def worker_command(*args: str, gate: Path | None = None) -> list[str]:
    if gate is not None:
        return [sys.executable, "-c", GATED_WORKER, str(gate), "worker", *args]
    script = Path(sys.executable).with_name("provision")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "provisioner.cli"]
    return [*base, "worker", *args]


# `provision worker` whose mock LM latency waits for the test (ProcessGate), not for the clock: each
# call that a rule gives a latency reads one byte from the FIFO in argv[1]; the test writes them.
GATED_WORKER = """
import os, sys, time

import provisioner.lm.mock as mock

fifo = sys.argv.pop(1)  # python -c GATED_WORKER <fifo> worker ...: the rest is provision's command line


class _Gate:
    def sleep(self, seconds):
        fd = os.open(fifo, os.O_RDONLY)  # the test holds the write end open: no wait here
        try:
            os.read(fd, 1)  # one byte per call; EOF (the test's gate closed) lets it go too
        finally:
            os.close(fd)

    def __getattr__(self, name):
        return getattr(time, name)


mock.time = _Gate()
sys.argv[0] = "provision"
from provisioner.cli import main

main()
"""


class ProcessGate:
    """The :class:`~tests._helpers.LatencyGate` of a worker subprocess: a FIFO whose write end the
    test holds; a gated worker's mock call with a latency waits for one byte of it. ``release(n)``
    lets n calls through (in the order they read, earlier releases first); ``close()`` lets every
    call through (EOF) — a teardown never leaves a worker's call stuck."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self._fd: int | None = os.open(path, os.O_RDWR)  # read-write: opening never blocks

    def release(self, calls: int = 1) -> None:
        assert self._fd is not None, "the gate is closed"
        os.write(self._fd, b"g" * calls)

    def open_wide(self) -> None:
        """Let every call through from now on (enough bytes for any test; the pipe keeps them)."""
        if self._fd is not None:
            os.write(self._fd, b"g" * 4096)

    def close(self) -> None:
        """After the worker ended: the write end goes (a call still reading would see EOF)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def clean_env(**extra: str) -> dict[str, str]:
    env = without_settings()
    env.update(extra)
    return env


class WorkerProcess:
    """One `provision worker` subprocess (TCP, or --stdio with pipes)."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None, stdio: bool = False,
                 gated: bool = False):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.stdio = stdio
        self.ready_file = workdir / "ready" / "port"
        self.stderr_path = workdir / "worker.stderr"
        self._stderr = self.stderr_path.open("wb")
        args = ("--stdio", *args) if stdio else ("--ready-file", str(self.ready_file), *args)
        # gated: the mock LM's latencies wait for release(), not the clock (ProcessGate).
        self.gate = ProcessGate(workdir / "gate.fifo") if gated else None
        command = worker_command(*args, gate=self.gate.path if self.gate else None)
        self.proc = subprocess.Popen(
            command,
            cwd=workdir,
            env=env if env is not None else clean_env(),
            stdin=subprocess.PIPE if stdio else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            preexec_fn=die_with_parent(os.getpid()),
        )
        self.port = 0
        self.stop_s: float | None = None  # how long the worker took to end after stop()'s SIGTERM
        self.stdout_lines: list[str] = []
        try:
            self._wait_ready(stdio)
        except BaseException:  # not ready in time, or Ctrl-C while starting: nobody else would stop it
            self.proc.kill()
            self.proc.wait()
            self._stderr.close()
            if self.gate is not None:
                self.gate.close()
            raise

    def release(self, calls: int = 1) -> None:
        """A gated worker: let ``calls`` held (or later) LM calls through."""
        assert self.gate is not None, "not a gated worker: spawn it with gated=True"
        self.gate.release(calls)

    def _wait_ready(self, stdio: bool) -> None:
        if stdio:
            wait_until(lambda: self._alive_or_fail() and b"PROVISION_WORKER_READY" in self.stderr_bytes(),
                       START_TIMEOUT_S, "the stdio worker's ready line on stderr")
        else:
            wait_until(lambda: self._alive_or_fail() and self.ready_file.exists(), START_TIMEOUT_S,
                       "the worker's ready file")
            self.port = int(self.ready_file.read_text())
            assert self.proc.stdout is not None
            self.stdout_lines.append(self.proc.stdout.readline().decode())

    def _alive_or_fail(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"worker exited early with {self.proc.returncode}:\n"
                + self.stderr_bytes().decode(errors="replace")
            )
        return True

    def stderr_bytes(self) -> bytes:
        return self.stderr_path.read_bytes()

    def client(self, **kwargs: Any) -> BridgeClient:
        return BridgeClient("127.0.0.1", self.port, **kwargs)

    def raw(self) -> RawConnection:
        return RawConnection.to(self.port, timeout=10)

    # stdio
    def send(self, message: dict[str, Any] | bytes) -> None:
        assert self.proc.stdin is not None
        payload = message if isinstance(message, bytes) else dumps(message)
        self.proc.stdin.write(encode_frame(payload))
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        payload = read_frame(self.proc.stdout)
        assert payload is not None, "the stdio worker closed stdout"
        return json.loads(payload)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, and wait for the worker to end; fails (after killing it) when it has not ended
        within ``STOP_TIMEOUT_S``: a worker that outlives SIGTERM that long is a bug (``provision down``,
        the pool's close and Ctrl-C wait on it), not something for a teardown to hide."""
        hung = False
        if self.gate is not None:
            self.gate.open_wide()  # SIGTERM finishes in-flight work: none may wait for a release
        if self.proc.poll() is None:
            started = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                hung = True
                self.proc.kill()
                self.proc.wait(10)
            self.stop_s = time.monotonic() - started
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stderr.close()
        if self.gate is not None:
            self.gate.close()
        if hung:
            raise AssertionError(f"the worker did not end within {STOP_TIMEOUT_S} s of SIGTERM (killed):\n"
                                 + self.stderr_bytes().decode(errors="replace")[-4000:])


class RawConnection:
    """A socket speaking raw frames, for the malformed-input tests."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

    @classmethod
    def to(cls, port: int, timeout: float = 30) -> RawConnection:
        """A connection to ``127.0.0.1:port`` (``timeout``: seconds each receive may wait)."""
        return cls(socket.create_connection(("127.0.0.1", port), timeout=timeout))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: Any) -> None:
        self.sock.sendall(encode_frame(dumps(message)))

    def send_payload(self, payload: bytes) -> None:
        self.sock.sendall(encode_frame(payload))

    def receive(self) -> dict[str, Any]:
        payload = read_frame(self.reader)
        assert payload is not None, "the worker closed the connection"
        message: dict[str, Any] = json.loads(payload)
        decode_reply(payload)  # and it is a well-formed reply envelope
        return message

    def at_eof(self) -> bool:
        return self.reader.read(1) == b""

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0): the worker's next send fails at once."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The mock LM every test worker starts with: deterministic answers per question, and two with a
# latency. A gated worker (spawn_worker(gated=True)) holds those until the test's worker.release():
# "still running when the test looks" is then the test's to decide (tests/bridge/test_worker_tcp.py,
# test_worker_stdio.py). Ungated, they sleep 1.5 s / 0.5 s (test_forking.py kills a process in one).
TEST_LM = LMConfig(
    mode="mock",
    mock_rules=[
        MockRule(match={"question": "2+2"}, outputs={"answer": 4}),
        MockRule(match={"question": "capital of France"}, outputs={"answer": "Paris"}),
        MockRule(match={"question": "slow"}, outputs={"answer": 7}, latency_ms=1500),
        MockRule(match={"question": "medium"}, outputs={"answer": 8}, latency_ms=500),
    ],
)
_DEFAULT: Any = object()


class WorkerFactory:
    """``spawn(*cli_args, lm=TEST_LM, env={...}, stdio=False, gated=False)``; ``lm=None`` starts a bare
    worker; ``gated=True``: its mock LM latencies wait for ``worker.release(n)`` (:class:`ProcessGate`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[WorkerProcess] = []

    def __call__(
        self,
        *args: str,
        lm: LMConfig | None = _DEFAULT,
        env: dict[str, str] | None = None,
        stdio: bool = False,
        gated: bool = False,
    ) -> WorkerProcess:
        config = TEST_LM if lm is _DEFAULT else lm
        # A worker process on the host reaches the API: the one secret policy decides what it gets.
        handover = {}
        if config is not None:
            handover = {**config.to_worker_env(), **worker_secrets(config, endpoint="api")}
        full_env = clean_env(**handover, **(env or {}))
        worker = WorkerProcess(self.root / f"worker{len(self.started)}", *args, env=full_env, stdio=stdio,
                               gated=gated)
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        """Stop every worker (all of them, even when one fails to stop); raise the first failure."""
        failures = []
        for worker in self.started:
            try:
                worker.stop()
            except AssertionError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[WorkerFactory]:
    """Start workers for one test; every one is stopped at the end."""
    factory = WorkerFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def spawn_module_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerFactory]:
    """Start workers shared by a whole test module (cheaper than one per test)."""
    factory = WorkerFactory(tmp_path_factory.mktemp("workers"))
    yield factory
    factory.stop_all()


@pytest.fixture
def serve_lm() -> LMConfig:
    """The LM config of the servers ``serve`` starts (a module overrides this fixture for its own)."""
    return TEST_LM


@pytest.fixture
def serve(serve_lm: LMConfig) -> Iterator[Callable[..., tuple[BridgeServer, int]]]:
    """``serve(server_class=BridgeServer, lm=serve_lm, **server_kwargs)``: a real TCP bridge server
    on loopback (no PID limit unless ``pids`` is given) and its port; closed after the test."""
    servers: list[BridgeServer] = []

    def start(server_class: type[BridgeServer] = BridgeServer, lm: LMConfig = serve_lm,
              **kwargs: Any) -> tuple[BridgeServer, int]:
        kwargs.setdefault("pids", None)
        server = server_class(BridgeService(lm), **kwargs)
        servers.append(server)
        return server, server.listen("127.0.0.1", 0)

    yield start
    for server in servers:
        server.close(timeout=10)


@pytest.fixture(scope="session")
def poll() -> Callable[..., Any]:
    """``poll(predicate, timeout=10, what=...)``: wait for a condition with a deadline, no fixed sleeps."""
    return wait_until


@pytest.fixture
def latency_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[LatencyGate]:
    """A :class:`LatencyGate` in place of ``time`` in ``provisioner.lm.mock``; released at the end."""
    import provisioner.lm.mock as mock

    gate = LatencyGate()
    monkeypatch.setattr(mock, "time", gate)
    try:
        yield gate
    finally:
        gate.release()
