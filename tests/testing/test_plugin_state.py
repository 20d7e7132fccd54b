"""ProvisionRun's end under xdist: the controller closes as soon as every worker reported, not after
xdist has waited for their processes to exit (task: Ctrl-C of `pytest -n 2` took ≈ 10 s)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from provisioner.errors import CleanupError
from provisioner.run import RunIdentity, RunOptions
from provisioner.testing.plugin_state import ProvisionRun

from .._helpers import clear_settings


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    clear_settings(monkeypatch)
    (tmp_path / "pyproject.toml").write_text("[tool.provisioner]\n")
    identity = RunIdentity.create(tmp_path / ".provision")
    provision_run = ProvisionRun(RunOptions(layer="unit"), tmp_path, identity)
    closes: list[str] = []
    closed = threading.Event()

    def close() -> None:
        closes.append(threading.current_thread().name)
        closed.set()
        if getattr(provision_run, "fail_close", False):
            raise CleanupError([("shared pool", "network x: has active endpoints")], what="part(s)")

    monkeypatch.setattr(provision_run.environment, "close", close)
    provision_run.closes, provision_run.closed = closes, closed
    return provision_run


class _Channel:
    def __init__(self) -> None:
        self.closed = False

    def isclosed(self) -> bool:
        return self.closed


def _node() -> Any:
    return SimpleNamespace(channel=_Channel())  # xdist's WorkerController before its workerfinished


def test_the_controller_closes_once_every_worker_reported_and_only_once(run: Any) -> None:
    reporting, crashed = _node(), _node()
    thread = run.close_once_reported([reporting, crashed], deadline_s=60)
    assert not run.closed.wait(0.3) and run.closes == []  # nobody reported yet
    reporting.workeroutput = {"provisioner_report": "{}"}  # its workerfinished (xdist's receiver thread)
    assert not run.closed.wait(0.3) and run.closes == []  # the other one still runs
    crashed.channel.closed = True  # a worker that died: its channel closed without a report
    thread.join(30)
    assert run.closes == ["provision-close-once-reported"]
    run.close()  # the session's end: nothing left to close
    assert run.closes == ["provision-close-once-reported"]


def test_a_failure_of_the_early_close_is_raised_by_the_sessions_close(run: Any) -> None:
    run.fail_close = True
    node = _node()
    node.workeroutput = {}
    run.close_once_reported([node]).join(30)
    with pytest.raises(CleanupError, match="active endpoints"):
        run.close()
    run.close()  # raised once


def test_without_reports_by_the_deadline_the_session_end_closes(run: Any) -> None:
    run.close_once_reported([_node()], deadline_s=0).join(30)
    assert run.closes == []
    run.close()
    assert run.closes == [threading.current_thread().name]
