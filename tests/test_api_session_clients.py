"""From a user's project, through the Python API and a real worker container: a session's adapter is
one connection carrying one request at a time, so parallel executions in one session need a client
per thread (docs/protocol.md, ``max_inflight_per_session``; docs/pytest.md, "Without pytest"). A
user's trial saw the second of two threads sharing ``s.adapter`` answered only after the first."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from provisioner.bridge import BridgeClient
from provisioner.runtime.polling import poll_until

from ._helpers import slow_qa_session


@pytest.mark.docker
def test_a_client_per_thread_runs_one_sessions_executions_in_parallel(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented recipe: the test's adapter in one thread, a BridgeClient to the session's worker
    with the session id in another; the worker runs both at once (two of the session's two slots)."""
    replies: dict[str, Any] = {}
    settings = "[tool.provisioner.worker]\nmax_inflight_per_session = 2\n"
    with slow_qa_session(tmp_path, monkeypatch, "parallel", settings, latency_ms=6000) as (env, test,
                                                                                          session):
        host, port = session.bridge.host, session.bridge.port

        def through_the_adapter() -> None:
            replies["adapter"] = session.execute_program("qa", {"question": "slow"})

        def through_its_own_client() -> None:
            with BridgeClient(host, port, request_timeout=env.settings.request_timeout) as client:
                replies["client"] = client.execute_program("qa", {"question": "slow"}, test.session_id)

        threads = [threading.Thread(target=through_the_adapter),
                   threading.Thread(target=through_its_own_client)]
        peak = 0
        try:
            for thread in threads:
                thread.start()
            with BridgeClient(host, port) as observer:

                def both_running() -> bool:
                    nonlocal peak
                    peak = max(peak, observer.get_stats()["inflight"])
                    return peak >= 2 or not any(t.is_alive() for t in threads)

                poll_until(both_running, 120, 0.02)
        finally:
            for thread in threads:
                thread.join(120)
        assert peak >= 2, f"the two executions never ran at once (peak inflight {peak})"
    assert replies["adapter"]["outputs"] == replies["client"]["outputs"] == {"answer": "late"}, replies
