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
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioner.bridge import BridgeClient
from provisioner.bridge.protocol import decode_reply, dumps, encode_frame, read_frame
from provisioner.lmconfig import LMConfig, MockRule, worker_secrets

from .._helpers import die_with_parent

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


def worker_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("provision")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "provisioner.cli"]
    return [*base, "worker", *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PROVISION_") and k not in ("TEST_MODE", "GEMINI_TEST_API_KEY", "LM_CACHE_DIR")
    }
    env.update(extra)
    return env


class WorkerProcess:
    """One `provision worker` subprocess (TCP, or --stdio with pipes)."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None, stdio: bool = False):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.stdio = stdio
        self.ready_file = workdir / "ready" / "port"
        self.stderr_path = workdir / "worker.stderr"
        self._stderr = self.stderr_path.open("wb")
        args = ("--stdio", *args) if stdio else ("--ready-file", str(self.ready_file), *args)
        command = worker_command(*args)
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
            raise

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
        return RawConnection(socket.create_connection(("127.0.0.1", self.port), timeout=10))

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
        if hung:
            raise AssertionError(f"the worker did not end within {STOP_TIMEOUT_S} s of SIGTERM (killed):\n"
                                 + self.stderr_bytes().decode(errors="replace")[-4000:])


class RawConnection:
    """A socket speaking raw frames, for the malformed-input tests."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

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


# The mock LM every test worker starts with: deterministic answers per question, and a slow one.
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
    """``spawn(*cli_args, lm=TEST_LM, env={...}, stdio=False)``; ``lm=None`` starts a bare worker."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[WorkerProcess] = []

    def __call__(
        self,
        *args: str,
        lm: LMConfig | None = _DEFAULT,
        env: dict[str, str] | None = None,
        stdio: bool = False,
    ) -> WorkerProcess:
        config = TEST_LM if lm is _DEFAULT else lm
        # A worker process on the host reaches the API: the one secret policy decides what it gets.
        handover = {}
        if config is not None:
            handover = {**config.to_worker_env(), **worker_secrets(config, endpoint="api")}
        full_env = clean_env(**handover, **(env or {}))
        worker = WorkerProcess(self.root / f"worker{len(self.started)}", *args, env=full_env, stdio=stdio)
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


@pytest.fixture(scope="session")
def poll() -> Callable[..., Any]:
    """``poll(predicate, timeout=10, what=...)``: wait for a condition with a deadline, no fixed sleeps."""
    return wait_until


# The longest a gated mock call waits for the test's go: a test that forgets to release fails here.
GATE_TIMEOUT_S = 60.0


class LatencyGate:
    """Holds the in-process mock LM's simulated latency until the test says go.

    While installed (the ``latency_gate`` fixture), a mock rule's ``latency_ms`` no longer sleeps
    that long: the call waits until :meth:`release` (or fails after ``GATE_TIMEOUT_S``). A test that
    needs "that request is still in flight" holds it for exactly as long as it checks, instead of
    a fixed delay that is a margin under load. ``waiting`` counts calls held now; ``release(n)`` lets
    n calls through, ``release()`` all. In-process only
    (``BridgeServer``/``BridgeService`` in the test process): a worker subprocess sleeps as asked.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._arrived = 0  # calls that reached the gate, in order: each one's ticket
        self._released = 0  # calls with a ticket below this may go
        self._open = False
        self.waiting = 0

    def sleep(self, seconds: float) -> None:
        with self._changed:
            ticket = self._arrived
            self._arrived += 1
            self.waiting += 1
            try:
                if not self._changed.wait_for(lambda: self._open or ticket < self._released, GATE_TIMEOUT_S):
                    raise AssertionError(f"a gated mock LM call was not released within {GATE_TIMEOUT_S} s")
            finally:
                self.waiting -= 1

    def release(self, calls: int | None = None) -> None:
        """Let the next ``calls`` calls through in the order they reached the gate (held ones first,
        then later ones), or with ``None`` every call from now on."""
        with self._changed:
            if calls is None:
                self._open = True
            else:
                self._released += calls
            self._changed.notify_all()

    def __getattr__(self, name: str) -> Any:  # the rest of the time module, unchanged
        return getattr(time, name)


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
