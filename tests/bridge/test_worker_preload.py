"""A worker imports its LM's call path before it says it is ready (not inside the first request's
timeout): under load the google-genai import alone took ~30 s in a 1-CPU container."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from provisioner.lmconfig import API_KEY_ENV, LMConfig

from .._helpers import without_settings

READY = b"PROVISION_WORKER_READY port=stdio"


def _imports_before_ready(config: LMConfig, extra_env: dict[str, str]) -> list[str]:
    """Modules `python -X importtime` saw imported before the worker's ready line (both on stderr)."""
    env = without_settings()  # the worker's LM comes from config.to_worker_env() only
    env.update(config.to_worker_env(), **extra_env)
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "provisioner.cli", "worker", "--stdio"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    assert proc.stderr is not None and proc.stdin is not None
    lines: list[bytes] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if READY in line:
                return [ln.decode(errors="replace").rsplit("|", 1)[-1].strip() for ln in lines
                        if ln.startswith(b"import time:")]
            lines.append(line)
        pytest.fail(f"no ready line; stderr tail: {b''.join(lines[-20:]).decode(errors='replace')}")
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout and proc.stdout.close()
        proc.stderr.close()


def test_a_real_mode_worker_imports_google_genai_before_it_is_ready() -> None:
    modules = _imports_before_ready(LMConfig(mode="real"), {API_KEY_ENV: "k-test-not-a-secret"})
    assert "google.genai" in modules and "dspy.clients.execution" in modules


def test_a_mock_worker_does_not_import_google_genai() -> None:
    modules = _imports_before_ready(LMConfig(mode="mock"), {})
    assert "dspy.clients.execution" in modules and "google.genai" not in modules


def _fork_worker_imports(config: LMConfig, extra_env: dict[str, str], log: Path) -> list[str]:
    """Modules a fork-mode worker (parent and its first spare) imported by the time it is ready."""
    env = without_settings()  # the worker's LM comes from config.to_worker_env() only
    env.update(config.to_worker_env(), **extra_env)
    with log.open("wb") as err:  # a file, not a pipe: nobody reads it while the worker starts
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "provisioner.cli", "worker", "--fork", "--port", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env,
        )
    assert proc.stdout is not None
    try:
        ready = proc.stdout.readline()  # the ready line, or EOF if it died
        assert ready.startswith(b"PROVISION_WORKER_READY"), log.read_text(errors="replace")[-3000:]
    finally:
        proc.terminate()
        proc.communicate(timeout=120)
    return [ln.rsplit("|", 1)[-1].strip() for ln in log.read_text(errors="replace").splitlines()
            if ln.startswith("import time:")]


def test_a_mock_fork_mode_worker_does_not_import_google_genai(tmp_path: Path) -> None:
    """The fork-mode parent imports what its LM needs, as the threaded worker does (google-genai
    cost ≈ 0.5 s of CPU at start-up in the worker image: docs/benchmarks.md)."""
    modules = _fork_worker_imports(LMConfig(mode="mock"), {}, tmp_path / "stderr")
    assert "dspy.clients.execution" in modules and "google.genai" not in modules


def test_a_real_mode_fork_mode_worker_imports_google_genai_before_it_is_ready(tmp_path: Path) -> None:
    modules = _fork_worker_imports(LMConfig(mode="real"), {API_KEY_ENV: "k-test-not-a-secret"},
                                   tmp_path / "stderr")
    assert "google.genai" in modules
