"""A pool that grows on demand (Deployment's ``start_slots``, WorkerPool.grow) on the paths ordinary
use does not take (issue 14, coverage of the pool): a slot whose worker fails to start, a pool closed
before its growth, an environment that cannot grow, and the callbacks to the run's other processes
failing. Each failure is a note and never stops the pool from serving. The in-memory engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.layers import get_layer
from provisioner.runtime.deployment import Deployment
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.pool import WorkerPool
from provisioner.runtime.recipes import Owner, PlanOptions, RunTarget, plan_run
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE, FakeWorkers


def _growing(settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], workers: int = 2) -> WorkerPool:
    """A pool over a deployment that started one of its ``workers`` slots and grows on demand."""
    rt, probe = fake
    layer = get_layer(settings, "e2e")
    plan = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"),
                    RunTarget("pg", Owner.this_process(), lm_dir=Path(settings.state_dir) / "lm"),
                    FAKE_IMAGE, PlanOptions(workers=workers))
    env = Deployment(plan, rt, probe=probe.probe, ready_timeout_s=5, poll_interval_s=0.005,
                     start_slots=1).start()
    pool = WorkerPool(env, owns_environment=True)
    pool.grows_on_demand = True
    return pool


def _boom(*_: object) -> int:
    raise OSError("the run's folder is gone")


def test_a_slot_whose_worker_fails_to_start_is_noted_and_the_next_growth_starts_it(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    pool = _growing(settings, fake)
    try:
        env = pool.environment
        assert isinstance(env, Deployment)
        second = env.recipes[1].name
        rt.fail_start.add(second)
        pool.grow()
        assert pool.wait_replacements(30)
        assert any(n.startswith("starting worker slot 1 failed: ") and "injected failure" in n
                   for n in pool.notes), pool.notes
        assert pool.stats()["added"] == 0 and env.pending_slots() == [1]
        assert rt.by_name(second) is None  # the failed start left no container behind
        assert pool.open_session("still-served").slot == 0  # the pool serves on its one worker

        rt.fail_start.clear()
        pool.grow()  # the slot is not "starting" any more: this growth tries it again
        assert pool.wait_replacements(30)
        assert pool.stats()["added"] == 1 and env.pending_slots() == []
        assert [w.slot for w in env.workers] == [0, 1]
        pool.grow()  # nothing left to start: no thread, nothing noted
        assert pool.wait_replacements(30) and pool.stats()["added"] == 1
    finally:
        pool.close()
    assert rt.containers == {}


def test_a_closed_pool_does_not_grow(settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]) -> None:
    rt, _ = fake
    pool = _growing(settings, fake)
    env = pool.environment
    assert isinstance(env, Deployment)
    pool.close()
    pool.grow()
    assert pool.stats()["added"] == 0
    assert rt.containers == {}


def test_a_growth_under_way_when_the_pool_closes_starts_nothing_more(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """The pool closes while a growth thread waits on a worker: the slots after it are not started."""
    rt, workers = fake
    pool = _growing(settings, fake, workers=3)
    env = pool.environment
    assert isinstance(env, Deployment)
    first_added = env.recipes[1].name
    workers.not_ready.add(first_added)  # slot 1's worker never answers: the growth waits on it
    env.ready_timeout_s = 1.0
    try:
        pool.grow()
        pool._stop_monitor.set()  # what close() does first: the growth's next slot is skipped
        assert pool.wait_replacements(30)
        assert pool.stats()["added"] == 0
        assert [c.recipe.name for c in rt.containers.values() if c.recipe.role == "worker"] == [
            env.recipes[0].name]
    finally:
        workers.not_ready.clear()
        pool.close()
    assert rt.containers == {}


def test_a_pool_over_workers_it_cannot_start_does_not_grow(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """An environment with no pending slots to start (another process's workers, a fixed set)."""
    rt, workers = fake
    layer = get_layer(settings, "e2e")
    plan = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"),
                    RunTarget("pf", Owner.this_process(), lm_dir=Path(settings.state_dir) / "lm"),
                    FAKE_IMAGE, PlanOptions(workers=1))
    env = Deployment(plan, rt, probe=workers.probe, ready_timeout_s=5, poll_interval_s=0.005).start()

    class Fixed:  # the workers and the calls a pool makes, without pending_slots/add_worker
        def __init__(self) -> None:
            self.workers = env.workers
            self.runtime = env.runtime
            self.ready_timeout_s = env.ready_timeout_s

        def __getattr__(self, name: str) -> object:
            if name in ("pending_slots", "add_worker", "refresh"):
                raise AttributeError(name)
            return getattr(env, name)

    pool = WorkerPool(Fixed())  # type: ignore[arg-type]
    try:
        pool.grows_on_demand = True
        pool.open_session("a")
        pool.open_session("b")  # two sessions on one worker: growth is wanted, and impossible
        pool.grow()
        assert pool.wait_replacements(30) and pool.stats()["added"] == 0
        assert pool.wanted_workers() == 2
    finally:
        pool.close()
        env.stop()
    assert rt.containers == {}


def test_the_run_s_other_processes_callbacks_failing_are_notes_and_the_pool_grows_anyway(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """Reading the others' demand, telling them ours, and recording a new worker for them
    (runtime/shared_pool.py: files in the run's folder) may fail; this process's own demand still
    counts, its worker is still added, and each failure is noted."""
    rt, _ = fake
    pool = _growing(settings, fake)
    try:
        pool.demand_elsewhere = _boom
        pool.on_peak = _boom
        pool.on_replaced = _boom
        pool.open_session("a")
        pool.open_session("b")  # peak 2 > 1 worker: grow, though nobody else can be told
        assert pool.wait_replacements(30)
        notes = pool.notes
        assert any(n == "reading the other processes' demand failed: the run's folder is gone"
                   for n in notes), notes
        assert any(n == "recording this process's demand failed: the run's folder is gone" for n in notes)
        assert any(n == "could not record the change of slot 1: the run's folder is gone" for n in notes)
        assert pool.wanted_workers() == 2 and pool.stats()["added"] == 1
        assert len(pool.stats()["workers"]) == 2
    finally:
        pool.close()
    assert rt.containers == {}


@pytest.mark.parametrize("grows", [False, True])
def test_only_a_pool_that_grows_on_demand_grows_for_a_peak(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], grows: bool
) -> None:
    rt, _ = fake
    pool = _growing(settings, fake)
    pool.grows_on_demand = grows
    try:
        pool.open_session("a")
        pool.open_session("b")
        assert pool.wait_replacements(30)
        assert pool.stats()["added"] == (1 if grows else 0)
    finally:
        pool.close()
    assert rt.containers == {}


def test_a_worker_still_starting_joins_when_ready_and_a_pool_closed_before_drops_it_quietly(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """A `process` pool's start: both workers started, the first ready serves (ready_slots=1), the
    other joins through grow() once ready. A pool closed while one still starts (a short suite)
    does not wait for it, and that is no failure: no note, and its container goes with the run."""
    rt, probe = fake
    layer = get_layer(settings, "e2e")

    def pool_of(run: str) -> WorkerPool:
        plan = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"),
                        RunTarget(run, Owner.this_process(), lm_dir=Path(settings.state_dir) / "lm"),
                        FAKE_IMAGE, PlanOptions(workers=2))
        probe.not_ready.add(plan.workers[1].name)
        env = Deployment(plan, rt, probe=probe.probe, ready_timeout_s=600, poll_interval_s=0.005,
                         start_slots=2, ready_slots=1).start()
        return WorkerPool(env, owns_environment=True)

    joins = pool_of("pj")
    try:
        assert [w.slot for w in joins.environment.workers] == [0]
        joins.grow(2)
        probe.not_ready.clear()
        assert joins.wait_replacements(30)
        assert [w["slot"] for w in joins.stats()["workers"]] == [0, 1] and joins.added == 1
        assert joins.notes == []
        # "workers started" counts both: the one that joined late once, not again as "added".
        assert joins.environment.workers_created == 2
    finally:
        joins.close()

    dropped = pool_of("pd")
    dropped.grow(2)
    assert dropped.stats()["starting"] == 1
    dropped.close()  # the worker never gets ready (600 s deadline): close does not wait for it
    assert dropped.notes == []
    # It was started all the same (`pytest --layer procs -n 2` showed -w0 and -w1 in `docker ps`
    # while the summary said "workers started: 1"): counted.
    assert dropped.environment.workers_created == 2
    assert not [c for c in rt.containers.values() if "-pd-" in c.recipe.name]
