"""A pool that started its own run ends it for the run's watchdog when it closes, whether or not a
session was ever opened (it used to stay "running" until the watchdog noticed this process gone)."""

from __future__ import annotations

import time

import pytest

from provisioner.runtime import watchdog as wd
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.lifecycle import UpOptions
from provisioner.runtime.pool import WorkerPool
from provisioner.runtime.state import run_dir_of
from provisioner.settings import Settings

IMAGE = "provisioner-worker:served"


@pytest.mark.parametrize("sessions", [0, 1], ids=["no-session", "one-session"])
def test_start_then_close_tells_the_watchdog_the_run_is_over(
    settings: Settings, served: FakeRuntime, sessions: int
) -> None:
    options = UpOptions(image=IMAGE, layer="integration", lm_mode="mock", workers=1, watchdog=True)
    pool = WorkerPool.start(settings, options, runtime=served)
    run_dir = run_dir_of(settings, pool.environment.plan.run_id).path
    try:
        assert wd.watchdog_alive(run_dir)
        for _ in range(sessions):
            session = pool.open_session()
            with pool.client(session.session_id) as client:
                client.ping()
            pool.close_session(session.session_id)
    finally:
        pool.close()
        if not (run_dir / wd.STOPPED_MARKER).exists():
            wd.mark(run_dir, wd.STOPPED_MARKER)  # don't leave the watchdog waiting for pytest to end
            pytest.fail("close() did not call finish_run: the run stayed 'running' for its watchdog")
    assert served.containers == {}
    deadline = time.monotonic() + 60
    while wd.watchdog_alive(run_dir):  # it stands down on the marker (its poll interval)
        assert time.monotonic() < deadline, "the watchdog did not stand down"
        time.sleep(0.02)
