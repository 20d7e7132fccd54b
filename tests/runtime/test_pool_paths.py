"""WorkerPool paths ordinary use does not take (issue 14, coverage of the pool): a pool without
workers, a session opened while every worker is being replaced, the monitor, a pool that does not
own its environment, an engine that cannot tell a container's state."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from provisioner.layers import get_layer
from provisioner.runtime.deployment import Deployment
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.pool import WorkerPool
from provisioner.runtime.recipes import Owner, PlanOptions, RunTarget, plan_run
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE, FakeWorkers


def _deployment(settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], count: int = 1) -> Deployment:
    rt, workers = fake
    layer = get_layer(settings, "e2e")
    plan = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"),
                    RunTarget("pp", Owner.this_process(), lm_dir=Path(settings.state_dir) / "lm"),
                    FAKE_IMAGE, PlanOptions(workers=count))
    return Deployment(plan, rt, probe=workers.probe, ready_timeout_s=30, poll_interval_s=0.005)


def _wait(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_pool_needs_a_started_environment(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    with pytest.raises(ValueError, match="no workers; start"):
        WorkerPool(_deployment(settings, fake))


def test_a_session_opened_while_every_worker_is_replaced_waits_for_the_replacement(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    env = _deployment(settings, fake).start()
    with WorkerPool(env, owns_environment=True) as pool:
        workers.not_ready.add(env.recipes[0].name + "-1")  # the replacement is not ready until we say
        rt.crash(env.worker(0).container_id, exit_code=137)
        checker = threading.Thread(target=pool.check)
        checker.start()
        _wait(lambda: pool.stats()["replacing"] == 1, "the replacement to start")
        assert pool.check() == []  # a slot already being replaced is not replaced twice
        opened: list[Any] = []
        opener = threading.Thread(target=lambda: opened.append(pool.open_session("patient")))
        opener.start()
        _wait(lambda: len(pool._cond._waiters) >= 1, "the session to wait for a worker")  # type: ignore[attr-defined]
        assert opened == []
        workers.not_ready.clear()
        checker.join(60)
        opener.join(60)
        (session,) = opened
        assert session.generation == 1 and pool.stats()["replaced"] == 1


def test_the_monitor_replaces_a_dead_worker_and_starts_once(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    env = _deployment(settings, fake).start()
    with WorkerPool(env, owns_environment=True) as pool:
        pool.start_monitor(interval_s=0.01)
        monitor = pool._monitor
        pool.start_monitor(interval_s=0.01)
        assert pool._monitor is monitor  # one monitor per pool
        rt.crash(env.worker(0).container_id, exit_code=137)
        _wait(lambda: pool.stats()["replaced"] == 1, "the monitor to replace the worker")
        assert any("exited with code 137" in note for note in pool.stats()["notes"])


def test_a_pool_that_does_not_own_its_environment_leaves_it_running(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    env = _deployment(settings, fake).start()
    try:
        pool = WorkerPool(env)
        pool.open_session("s")
        assert pool.close() is None
        assert rt.container_state(env.worker(0).container_id).running  # type: ignore[union-attr]
    finally:
        env.stop()


class _BlindRuntime(FakeRuntime):
    """An engine that cannot tell a container's state (a timeout, a restart of the daemon)."""

    blind = False

    def container_state(self, ident: str) -> Any:
        if self.blind:
            raise TimeoutError("the engine did not answer")
        return super().container_state(ident)


def test_an_engine_that_cannot_tell_never_makes_a_worker_dead(settings: Settings) -> None:
    rt = _BlindRuntime(images=(FAKE_IMAGE,))
    env = _deployment(settings, (rt, FakeWorkers(rt))).start()
    with WorkerPool(env, owns_environment=True, connection_failure_settle_s=0.1) as pool:
        rt.blind = True
        session = pool.open_session("s")  # no false alarm: the connection itself would tell
        assert session.generation == 0
        assert pool.connection_failed("s") is None
        assert pool.stats()["replaced"] == 0


class _Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_worker_that_ages_out_while_serving_drains_first(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    clock = _Clock()
    env = _deployment(settings, fake).start()
    with WorkerPool(env, owns_environment=True, recycle_after_s=60, clock=clock) as pool:
        first = pool.open_session("a")
        clock.now += 61
        second = pool.open_session("b")  # the only worker: still used, but draining now
        assert second.generation == first.generation and pool.stats()["workers"][0]["draining"]
        pool.close_session("a")
        pool.close_session("b")
        assert pool.stats()["recycled"] == 1 and pool.open_session("c").generation == 1


def test_connection_failures_of_lost_and_unknown_sessions(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    env = _deployment(settings, fake).start()
    with WorkerPool(env, owns_environment=True) as pool:
        pool.open_session("x")
        rt.crash(env.worker(0).container_id, exit_code=137)
        lost = pool.connection_failed("x")
        assert lost is not None and pool.connection_failed("x") == lost  # the same answer, no 2nd retire
        assert pool.connection_failed("never-opened") is None
        assert pool.wait_replacements(30) and pool.stats()["replaced"] == 1
