"""From a user's project, through the Python API and a real worker container: an execution that waits
for its session's slot gets the worker's ``Timeout`` before its client gives up (docs/protocol.md,
``execute_program``). The in-process and subprocess paths are in tests/bridge/test_queued_deadline.py.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from provisioner.bridge import BridgeClient
from provisioner.errors import BridgeConnectionError, BridgeError
from provisioner.runtime.polling import poll_until

from ._helpers import slow_qa_session


@pytest.mark.docker
def test_a_queued_execution_in_a_worker_container_gets_the_workers_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """process_timeout 1 s, one slot per session: the first execution holds it for 8 s (a mock rule's
    latency), the second waits. Before, the second's deadline started with its slot (8 s on), after
    the client's wait (1 + 5 s) had ended: a client-side ConnectionError, no lm_usage."""
    settings = ("[tool.provisioner]\nprocess_timeout = 1.0\n"
                "[tool.provisioner.worker]\nmax_inflight_per_session = 1\n")
    with slow_qa_session(tmp_path, monkeypatch, "queued", settings, latency_ms=8000) as (env, _test, session):
        host, port = session.bridge.host, session.bridge.port
        replies: dict[str, Any] = {}

        def execute(name: str, question: str) -> None:
            with BridgeClient(host, port, request_timeout=env.settings.request_timeout) as client:
                try:
                    replies[name] = client.execute_program("qa", {"question": question}, session.session_id)
                except BridgeError as exc:
                    replies[name] = exc

        threads = [threading.Thread(target=execute, args=("first", "slow")),
                   threading.Thread(target=execute, args=("second", "quick"))]
        threads[0].start()
        with BridgeClient(host, port) as observer:  # the first holds the slot before the second is sent
            assert poll_until(lambda: observer.get_stats()["inflight"] >= 1, 60, 0.01), "the first never ran"
        threads[1].start()
        for thread in threads:
            thread.join(120)
    first, second = replies["first"], replies["second"]
    for reply in (first, second):
        assert isinstance(reply, BridgeError) and not isinstance(reply, BridgeConnectionError), reply
        assert reply.error_type == "Timeout" and reply.lm_usage is not None, reply
    assert "did not start within 1 s (process_timeout)" in second.message, second.message
