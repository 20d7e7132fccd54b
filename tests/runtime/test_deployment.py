"""A live run (Deployment) on the in-memory engine: start order, readiness, failures, replacement."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import RuntimeProblem, WorkerNotReadyError
from provisioner.layers import get_layer
from provisioner.runtime.deployment import Deployment
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.recipes import Owner, PlanOptions, RunTarget, plan_run
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE, FakeWorkers


def _env(
    settings: Settings,
    rt: FakeRuntime,
    workers: FakeWorkers,
    *,
    count: int = 2,
    mode: str = "mock",
    timeout: float = 5.0,
) -> Deployment:
    layer = get_layer(settings, "integration")
    plan = plan_run(
        settings,
        layer,
        get_layer(settings, "integration").lm_config(settings.lm, mode),
        RunTarget("run1", Owner.this_process(), lm_dir=Path(settings.state_dir) / "lm"),
        FAKE_IMAGE,
        PlanOptions(workers=count),
    )
    return Deployment(plan, rt, probe=workers.probe, ready_timeout_s=timeout, poll_interval_s=0.005)


def test_start_creates_networks_before_their_containers_and_stop_removes_all(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    env = _env(settings, rt, workers, count=3).start()
    creates = [name for op, name in rt.calls if op.startswith("create")]
    guards = [f"prov-run1-w{i}-guard" for i in range(3)]  # mock workers: internal network, guarded
    assert sorted(creates) == sorted(
        ["prov-run1", "prov-run1-edge", "prov-run1-relay", "prov-run1-w0", "prov-run1-w1", "prov-run1-w2",
         *guards]
    )
    # Each worker's egress guard runs after the worker started, and is gone before start() returns.
    for i in range(3):
        assert rt.calls.index(("start_container", f"prov-run1-w{i}")) < rt.calls.index(
            ("create_container", f"prov-run1-w{i}-guard")
        ) < rt.calls.index(("remove_container", f"prov-run1-w{i}-guard"))
    assert not any(c.recipe.role == "guard" for c in rt.containers.values())
    # Each network exists before the containers on it (the relay needs both).
    assert creates.index("prov-run1") < min(creates.index(f"prov-run1-w{i}") for i in range(3))
    assert creates.index("prov-run1-edge") < creates.index("prov-run1-relay")
    addresses = env.addresses()
    assert len(set(addresses)) == 3 and all(a.startswith("127.0.0.1:") for a in addresses)
    env.stop()
    assert rt.containers == {} and rt.networks == {}
    removes = [name for op, name in rt.calls if op.startswith("remove")]
    assert removes[-2:] == ["prov-run1-edge", "prov-run1"]  # networks after the containers on them


@pytest.mark.timeout(120)  # without the fix it hangs until the 600 s readiness deadline
@pytest.mark.usefixtures("sigint_default")  # a real Ctrl-C, also when pytest inherited SIGINT ignored
def test_ctrl_c_while_waiting_for_readiness_stops_every_wait_at_once(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    # Workers that never get ready, a long deadline: the interrupt must not wait for it.
    rt, workers = fake
    workers.not_ready.update({"prov-run1-w0", "prov-run1-w1", "prov-run1-w2"})
    env = _env(settings, rt, workers, count=3, timeout=600)
    # A real Ctrl-C (SIGINT to this process), sent by the first readiness probe: start() is waiting
    # for readiness when it arrives, however slow the machine (a timer could fire before start()).
    sent = threading.Event()

    def probe_then_interrupt(host: str, port: int, timeout: float) -> Any:
        if not sent.is_set():
            sent.set()
            os.kill(os.getpid(), signal.SIGINT)
        return workers.probe(host, port, timeout)

    env.probe = probe_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        env.start()
    assert sent.is_set()
    assert rt.containers == {} and rt.networks == {}


@pytest.mark.timeout(120)  # with concurrent.futures.wait it hung: shutdown(wait=True) waited forever
@pytest.mark.usefixtures("sigint_default")
def test_ctrl_c_inside_the_first_ready_wait_s_own_locking_still_stops_every_wait(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cause of the hang: ``concurrent.futures.wait`` takes every future's lock in turn on the
    waiting thread (``_AcquireFutures.__enter__``), and a Ctrl-C between two of them left the first
    locked — the readiness thread finishing that future then blocked on it for good, and the
    start's ``shutdown(wait=True)`` with it. The real SIGINT arrives exactly there if the wait takes
    futures' locks, else while the main thread waits in ``_wait_first_ready`` itself (a readiness
    probe sends it then); either way every wait must stop at once."""
    from concurrent.futures import _base

    rt, workers = fake
    workers.not_ready.update({"prov-run1-w0", "prov-run1-w1"})
    layer = get_layer(settings, "integration")
    plan = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"),
                    RunTarget("run1", Owner.this_process(), lm_dir=Path(settings.state_dir) / "lm"),
                    FAKE_IMAGE, PlanOptions(workers=2))
    sent = threading.Event()
    main = threading.main_thread()

    def interrupt() -> None:
        if not sent.is_set():
            sent.set()
            os.kill(os.getpid(), signal.SIGINT)

    def enter_then_interrupt(self: Any) -> None:
        for future in self.futures:
            future._condition.acquire()
            if threading.current_thread() is main:
                interrupt()  # handled at the next bytecode: between two futures' locks

    monkeypatch.setattr(_base._AcquireFutures, "__enter__", enter_then_interrupt)

    def probe(host: str, port: int, timeout: float) -> Any:
        # Called every 5 ms by each readiness wait: interrupt once the main thread waits in
        # _wait_first_ready's own frame (a blocking queue read there holds no Python frame).
        assert main.ident is not None
        frame = sys._current_frames().get(main.ident)
        if frame is not None and frame.f_code.co_name == "_wait_first_ready":
            interrupt()
        return workers.probe(host, port, timeout)

    env = Deployment(plan, rt, probe=probe, ready_timeout_s=600, poll_interval_s=0.005, ready_slots=1)
    with pytest.raises(KeyboardInterrupt):
        env.start()  # no worker gets ready: only the interrupt ends the wait
    assert sent.is_set()
    assert rt.containers == {} and rt.networks == {}


def test_a_failed_start_removes_what_it_made(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    rt.fail_start.add("prov-run1-w1")
    with pytest.raises(RuntimeProblem, match="injected failure"):
        _env(settings, rt, workers).start()
    assert rt.containers == {} and rt.networks == {}


def test_a_worker_that_exits_fails_readiness_at_once_with_its_logs(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake

    def crash_w0(container):  # type: ignore[no-untyped-def]
        if container.recipe.name == "prov-run1-w0":
            container.log_lines += ["Traceback ...", "ConfigError: lm.model must not be empty"]
            container.status, container.exit_code = "exited", 1

    rt.on_start = crash_w0
    # A deadline no test run reaches: had start() sat it out, pytest's timeout (300 s) would fail
    # the test — no wall-clock assertion needed, none to lose under load.
    with pytest.raises(WorkerNotReadyError) as info:
        _env(settings, rt, workers, timeout=3600).start()
    assert "exited" in str(info.value) and "was not ready within" not in str(info.value)
    assert "lm.model must not be empty" in info.value.last_logs
    assert rt.containers == {} and rt.networks == {}


def test_readiness_deadline_reports_the_last_ping_and_logs(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    workers.not_ready.add("prov-run1-w1")
    rt.on_start = lambda c: c.log_lines.append(f"hello from {c.recipe.name}")
    with pytest.raises(WorkerNotReadyError) as info:
        _env(settings, rt, workers, timeout=0.3).start()
    assert "prov-run1-w1" in str(info.value) and "was not ready within" in str(info.value)
    assert "hello from prov-run1-w1" in info.value.last_logs
    # Polled at a fine interval, not once a second: at 1 s, w1 is probed twice in its 0.3 s (at the
    # start and after one wait) and w0 once. More than 3 probes needs 3 of w1's 5 ms waits to end
    # within 0.3 s: it held on a loaded machine, where "more than 10" asked 30 ms per cycle.
    assert workers.probes > 3


def test_replace_worker_keeps_the_address(settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]) -> None:
    rt, workers = fake
    env = _env(settings, rt, workers).start()
    old = env.worker(1)
    new = env.replace_worker(1)
    assert (new.address, new.generation, new.name) == (old.address, 1, "prov-run1-w1-1")
    assert rt.container_state(old.container_id) is None
    assert rt.container_state(new.container_id).running  # type: ignore[union-attr]
    env.stop()
    assert rt.containers == {}


def test_stop_sweeps_only_its_own_share_of_the_run(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """Two processes' deployments of one run (xdist workers): stopping one leaves the other's."""
    from provisioner.runtime import labels as L

    rt, workers = fake
    layer = get_layer(settings, "integration")
    shares = []
    for instance in ("gw0", "gw1"):
        lm = layer.lm_config(settings.lm, "mock")
        target = RunTarget("run1", Owner.this_process(), instance=instance)
        plan = plan_run(settings, layer, lm, target, FAKE_IMAGE, PlanOptions(workers=1))
        shares.append(Deployment(plan, rt, probe=workers.probe, ready_timeout_s=5.0,
                                 poll_interval_s=0.005).start())
    mine, theirs = shares
    mine.stop()
    left = rt.list_resources(L.selector("run1"))
    assert left and {r.labels[L.INSTANCE] for r in left} == {"gw1"}
    assert all(rt.container_state(w.container_id) is not None for w in theirs.workers)
    theirs.stop()
    assert rt.list_resources(L.selector("run1")) == []


def test_ready_slots_returns_with_the_first_ready_worker_and_the_other_joins_when_ready(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """``ready_slots=1`` (a `process` pool's start): start() returns once one worker is ready — here
    w1, while w0 is still starting — and add_worker waits for the other instead of making another."""
    rt, workers = fake
    workers.not_ready.add("prov-run1-w0")
    layer = get_layer(settings, "integration")
    plan = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"),
                    RunTarget("run1", Owner.this_process(), lm_dir=Path(settings.state_dir) / "lm"),
                    FAKE_IMAGE, PlanOptions(workers=3))
    env = Deployment(plan, rt, probe=workers.probe, ready_timeout_s=30, poll_interval_s=0.005,
                     start_slots=2, ready_slots=1).start()
    try:
        assert [w.name for w in env.workers] == ["prov-run1-w1"]
        assert env.pending_slots() == [0, 2]  # w0 starting, w2 not started
        assert {c.recipe.name for c in rt.containers.values() if c.recipe.role == "worker"} == {
            "prov-run1-w0", "prov-run1-w1"}
        creates = sum(1 for op, _ in rt.calls if op == "create_container")
        workers.not_ready.discard("prov-run1-w0")
        joined = env.add_worker(0)
        assert joined.name == "prov-run1-w0" and joined.port == env.slot_port(0)
        assert sum(1 for op, _ in rt.calls if op == "create_container") == creates  # the same container
        assert [w.slot for w in env.workers] == [0, 1] and env.pending_slots() == [2]
    finally:
        env.stop()
    assert rt.containers == {} and rt.networks == {}


def test_a_booting_worker_that_fails_fails_only_its_add_worker_and_stop_booting_ends_the_wait(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """A worker still starting after start() returned: its failure is its add_worker's error (the
    ready one keeps serving), and stop_booting (a pool closing) ends a wait at once."""
    rt, workers = fake
    workers.not_ready.update({"prov-run1-w0", "prov-run1-w2"})
    layer = get_layer(settings, "integration")
    plan = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"),
                    RunTarget("run1", Owner.this_process(), lm_dir=Path(settings.state_dir) / "lm"),
                    FAKE_IMAGE, PlanOptions(workers=3))
    env = Deployment(plan, rt, probe=workers.probe, ready_timeout_s=600, poll_interval_s=0.005,
                     ready_slots=1).start()
    try:
        assert [w.name for w in env.workers] == ["prov-run1-w1"]
        [w0] = [c for c in rt.containers.values() if c.recipe.name == "prov-run1-w0"]
        w0.log_lines.append("ConfigError: lm.model must not be empty")
        w0.status, w0.exit_code = "exited", 1
        with pytest.raises(WorkerNotReadyError, match="prov-run1-w0") as info:
            env.add_worker(0)
        assert "lm.model must not be empty" in info.value.last_logs
        assert "prov-run1-w0" not in {c.recipe.name for c in rt.containers.values()}  # removed
        env.stop_booting()
        with pytest.raises(RuntimeProblem, match="no longer waited for"):
            env.add_worker(2)  # never ready, a 600 s deadline: the wait ends at once
        assert [w.name for w in env.workers] == ["prov-run1-w1"]
    finally:
        env.stop()
    assert rt.containers == {} and rt.networks == {}


def test_ready_slots_still_fails_the_start_when_a_worker_fails_first(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """A worker that exits before any is ready fails the start, with its logs, as before."""
    rt, workers = fake
    workers.not_ready.update({"prov-run1-w0", "prov-run1-w1"})

    def crash_w1(container):  # type: ignore[no-untyped-def]
        if container.recipe.name == "prov-run1-w1":
            container.log_lines.append("ConfigError: lm.model must not be empty")
            container.status, container.exit_code = "exited", 1

    rt.on_start = crash_w1
    layer = get_layer(settings, "integration")
    plan = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"),
                    RunTarget("run1", Owner.this_process(), lm_dir=Path(settings.state_dir) / "lm"),
                    FAKE_IMAGE, PlanOptions(workers=2))
    env = Deployment(plan, rt, probe=workers.probe, ready_timeout_s=600, poll_interval_s=0.005, ready_slots=1)
    with pytest.raises(WorkerNotReadyError, match="prov-run1-w1"):
        env.start()
    assert rt.containers == {} and rt.networks == {}
