"""Shared fixtures of the LM tests: one Gemini stand-in per module, reset before each test that uses it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provisioner.lm.standin import GeminiStandin

from .._helpers import LatencyGate

STANDIN_KEY = "standin-test-key-0123456789"


@pytest.fixture(scope="module")
def standin_server() -> Iterator[GeminiStandin]:
    with GeminiStandin(api_key=STANDIN_KEY) as server:
        yield server


@pytest.fixture
def standin(standin_server: GeminiStandin) -> GeminiStandin:
    """The module's stand-in with no scripted replies, failures, latency or extra usage left over."""
    standin_server.reset()
    standin_server.set_latency(0)
    standin_server.set_usage(thoughts_tokens=0, cached_tokens=0)
    return standin_server


@pytest.fixture
def latency_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[LatencyGate]:
    """A :class:`~tests._helpers.LatencyGate` in place of ``time`` in ``provisioner.lm.mock`` and in the
    (in-process) Gemini stand-in: a mock rule's ``latency_ms`` and ``standin.set_latency`` hold the call
    until the test releases it. Released at the end."""
    import provisioner.lm.mock as mock
    import provisioner.lm.standin as standin_module

    gate = LatencyGate()
    monkeypatch.setattr(mock, "time", gate)
    monkeypatch.setattr(standin_module, "time", gate)
    try:
        yield gate
    finally:
        gate.release()
