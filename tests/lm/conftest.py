"""Shared fixtures of the LM tests: one Gemini stand-in per module, reset before each test that uses it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provisioner.lm.standin import GeminiStandin

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
