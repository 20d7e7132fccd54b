"""The published path's health check and repair on the paths the main tests do not take (issue 14's
coverage of the critical paths, docs/quality.md): an engine that cannot tell, a relay re-created on
another port or whose workers never answer again, a heal already in progress, a relay the run's
cleanup does not track, and an engine lost in the middle of provision run's check. The in-memory
engine (FakeRuntime); the real engine: tests/runtime/test_docker_health.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from provisioner.errors import DockerUnavailableError, RecreateError, RuntimeProblem
from provisioner.layers import get_layer
from provisioner.runtime import health
from provisioner.runtime.deployment import Deployment
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.engine.fake import FakeContainer
from provisioner.runtime.health import (
    FORWARDER_GONE,
    PublishedWorker,
    check_paths,
    heal_deployment,
    heal_environment,
    rebind_relay,
)
from provisioner.runtime.recipes import Owner, PlanOptions, RunTarget, plan_run
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE, FakeWorkers


def _env(settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], count: int = 2) -> Deployment:
    rt, workers = fake
    layer = get_layer(settings, "e2e")
    plan = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"),
                    RunTarget("hp1", Owner.this_process(), lm_dir=Path(settings.state_dir) / "lm"),
                    FAKE_IMAGE, PlanOptions(workers=count))
    return Deployment(plan, rt, probe=workers.probe, ready_timeout_s=5, poll_interval_s=0.005).start()


def _published(env: Deployment) -> list[PublishedWorker]:
    return [PublishedWorker(w.slot, w.name, w.container_id, w.host, w.port) for w in env.workers]


def test_an_engine_that_cannot_tell_the_relay_s_state_raises_no_false_alarm(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """The engine not answering is not a dead relay: every path that answers ping is healthy."""
    rt, _ = fake
    env = _env(settings, fake)
    try:
        rt.available = False
        try:
            with pytest.raises(DockerUnavailableError):
                rt.container_state(env.plan.relay.name)  # the engine really cannot tell
            assert check_paths(rt, env.plan.relay.name, _published(env), env.probe) == {}
        finally:
            rt.available = True
    finally:
        env.stop()
    assert rt.containers == {}


def test_a_relay_re_created_without_a_worker_s_port_is_an_error_naming_it(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """A slot the relay has no route for (slot 7 of a two-worker run) cannot be pinned: the engine
    publishes nothing there, and the repair says which worker and which port instead of going on."""
    rt, _ = fake
    env = _env(settings, fake)
    try:
        stray = PublishedWorker(7, "w-stray", "", rt.publish_host, 45999)
        with pytest.raises(RuntimeProblem, match=r"publishes worker w-stray on port None, not 45999"):
            rebind_relay(rt, env.plan.relay.name, _published(env), env.probe, timeout_s=5.0,
                         reserved=[stray])
    finally:
        env.stop()
    assert rt.containers == {}


def test_a_worker_that_never_answers_after_the_relay_s_re_creation_fails_the_repair_with_the_log(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    env = _env(settings, fake)
    try:
        first = env.workers[0]
        workers.not_ready.add(first.name)  # running, but ping never answers
        with pytest.raises(RuntimeProblem) as caught:
            rebind_relay(rt, env.plan.relay.name, _published(env), env.probe, timeout_s=0.2)
        text = str(caught.value)
        assert f"{first.name} ({first.address}) did not answer ping: no answer within 0s" in text
        assert env.workers[1].name not in text.split("did not answer")[0]  # only the silent one
        assert "its log:" in text
    finally:
        workers.not_ready.clear()
        env.stop()
    assert rt.containers == {}


def test_a_heal_in_progress_in_another_thread_is_not_started_twice(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """The pool's monitor and a refused request may both notice one dead path: the second caller
    returns at once with nothing done, and the relay is re-created once."""
    rt, workers = fake
    env = _env(settings, fake)
    try:
        workers.kill_forwarder(env.workers[0].port)
        lock = health._lock_for(env)
        with lock:  # another thread's heal holds the run's lock
            assert heal_environment(env) == []
        assert ("recreate_container", env.plan.relay.name) not in rt.calls
        (note,) = heal_environment(env)
        assert FORWARDER_GONE in note
        assert rt.calls.count(("recreate_container", env.plan.relay.name)) == 1
    finally:
        env.stop()
    assert rt.containers == {}


def test_a_relay_the_run_does_not_track_is_tracked_once_re_created(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    env = _env(settings, fake)
    try:
        old = env.container_ids[env.plan.relay.name]
        tracked = env.resources.find("container", old)
        assert tracked is not None
        env.resources.forget(tracked)
        workers.kill_forwarder(env.workers[1].port)
        assert heal_environment(env)
        new = env.container_ids[env.plan.relay.name]
        assert new != old and env.resources.find("container", new) is not None
    finally:
        env.stop()
    assert rt.containers == {}  # the re-created relay went with the run


def test_provision_run_s_check_notes_a_relay_that_cannot_be_made_again_and_the_next_check_repairs_it(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """A re-created relay that cannot start (a port taken meanwhile) is a note, the other repairs are
    still tried, and the next check repairs it: the failed attempt leaves its relay in place (created,
    not running) and the run's records follow it. Before, the failed relay was removed and every
    later check failed with "it does not exist"."""
    rt, workers = fake
    env = _env(settings, fake)
    relay = env.plan.relay.name
    try:
        first, second = env.workers
        old_id = env.container_ids[relay]
        workers.kill_forwarder(first.port)
        rt.fail_start.add(relay)
        rt.crash(second.name)
        notes = heal_deployment(env)
        assert len(notes) == 2, notes
        assert notes[0].startswith(f"re-creating the relay {relay} failed: ")
        assert "injected failure" in notes[0] and notes[0].endswith("the next check tries again")
        # The worker's replacement is still tried (and fails: no relay to reach it through) and noted.
        died = f"worker {second.name} (slot 1) exited with code 137 (SIGKILL) at "
        assert notes[1].startswith(died), notes[1]
        assert "UTC; replacing it failed after " in notes[1], notes[1]
        assert f"container {relay} is created" in notes[1], notes[1]
        left = rt.by_name(relay)
        assert left is not None and left.status == "created" and left.id != old_id
        assert env.container_ids[relay] == left.id and env.resources.find("container", left.id) is not None
        assert env.resources.find("container", old_id) is None

        rt.fail_start.clear()  # the port is free again
        notes = heal_deployment(env)
        assert len(notes) == 2, notes
        assert notes[0].startswith(f"the published paths of workers {first.name} (slot 0), {second.name} "
                                   f"(slot 1) were dead: the relay {relay} "), notes[0]
        assert f"re-created the relay {relay} on the same ports; back at " in notes[0], notes[0]
        assert notes[1].startswith(f"worker {second.name} (slot 1) "), notes
        assert "replaced it with" in notes[1], notes
        healed = rt.by_name(relay)
        assert healed is not None and healed.status == "running" and env.container_ids[relay] == healed.id
        assert [w.address for w in env.workers] == [first.address, second.address]
        assert all(env.probe(w.host, w.port, 5.0).ok for w in env.workers)
        assert heal_deployment(env) == []
    finally:
        env.stop()
    assert rt.containers == {}  # the relays of every attempt went with the run


def test_a_relay_the_engine_cannot_make_again_is_left_as_it_was(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """The engine refusing to create the new relay (here: its temporary name is taken) leaves the old
    one running and in the run's records; nothing is half-done."""
    rt, workers = fake
    env = _env(settings, fake)
    relay = env.plan.relay.name
    try:
        old_id = env.container_ids[relay]
        workers.kill_forwarder(env.workers[0].port)
        blocker = rt.create_container(replace(env.plan.relay, name=f"{relay}-next", labels={}))
        with pytest.raises(RecreateError, match="the old one is left as it was") as caught:
            heal_environment(env)
        assert caught.value.container_id == old_id == env.container_ids[relay]
        assert rt.containers[old_id].status == "running"
        rt.remove_container(blocker)
        assert heal_environment(env) and env.container_ids[relay] != old_id
    finally:
        env.stop()
    assert rt.containers == {}


def test_a_relay_whose_workers_do_not_answer_through_it_is_followed_by_the_run_s_records(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """The relay was re-created but a worker did not answer through it in time: the error names the
    new relay, which the run tracks (and removes at its end); the next check finds the path answers."""
    rt, workers = fake
    env = _env(settings, fake)
    relay = env.plan.relay.name
    try:
        old_id = env.container_ids[relay]
        first = env.workers[0]
        workers.kill_forwarder(first.port)
        workers.not_ready.add(first.name)
        env.ready_timeout_s = 0.2
        with pytest.raises(RecreateError, match="did not answer ping") as caught:
            heal_environment(env)
        assert caught.value.container_id != old_id
        assert env.container_ids[relay] == caught.value.container_id
        assert env.resources.find("container", caught.value.container_id) is not None
        workers.not_ready.clear()
        assert heal_environment(env) == []
    finally:
        env.stop()
    assert rt.containers == {}


def test_provision_run_s_check_passes_an_engine_lost_during_the_relay_s_repair_on(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """The engine gone is not a failed repair to note and retry per worker: the caller (provision
    run's thread) says so once and checks again later."""
    rt, workers = fake
    env = _env(settings, fake)
    try:
        workers.kill_forwarder(env.workers[0].port)
        rt.available = False  # the relay's state cannot be read (no false alarm), its re-creation fails
        try:
            with pytest.raises(DockerUnavailableError):
                heal_deployment(env)
        finally:
            rt.available = True
    finally:
        env.stop()
    assert rt.containers == {}


def test_provision_run_s_check_passes_an_engine_lost_during_a_worker_s_replacement_on(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    env = _env(settings, fake, count=1)
    victim = env.workers[0]

    def engine_goes(container: FakeContainer) -> None:
        if container.recipe.name == f"{victim.name}-1":  # the replacement started: the engine goes away
            rt.available = False

    try:
        rt.crash(victim.name)
        rt.on_start = engine_goes
        with pytest.raises(DockerUnavailableError):
            heal_deployment(env)
    finally:
        rt.on_start = None
        rt.available = True
        env.stop()
    assert rt.containers == {}  # the half-made replacement went with the run too


def test_a_relay_re_created_while_every_worker_is_dead_waits_for_none(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """Dead workers are their replacer's: the relay comes back at once, on the same ports."""
    rt, _ = fake
    env = _env(settings, fake)
    try:
        for w in env.workers:
            rt.crash(w.name)
        new_id = rebind_relay(rt, env.plan.relay.name, _published(env), env.probe, timeout_s=0.0)
        assert [rt.published_port(new_id, env.plan.relay_port_for(w.slot)) for w in env.workers] == [
            w.port for w in env.workers
        ]
    finally:
        env.stop()
    assert rt.containers == {}  # the run's cleanup removes the relay by name, whatever its id


def test_an_engine_lost_right_after_the_relay_s_re_creation_is_the_engine_s_error_not_a_failed_repair(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], monkeypatch: pytest.MonkeyPatch
) -> None:
    """provision run's check passes a lost engine on (it says so once and checks again later); the
    relay's re-creation succeeded, so the run's records were not told of a failed one."""
    rt, workers = fake
    env = _env(settings, fake)
    try:
        workers.kill_forwarder(env.workers[0].port)

        def gone(*_: object) -> int:
            raise DockerUnavailableError("no Docker engine is reachable (gone after the re-creation)")

        monkeypatch.setattr(rt, "published_port", gone)
        with pytest.raises(DockerUnavailableError, match="gone after the re-creation"):
            heal_deployment(env)
    finally:
        monkeypatch.undo()
        env.stop()
    assert rt.containers == {}
