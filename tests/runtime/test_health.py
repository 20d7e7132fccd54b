"""The published path's health on the in-memory engine (issue 14, item 7, host side): a dead port
forwarder is told apart from a dead or slow worker, and healed by re-creating the relay on the
same ports, with sessions intact. The real engine: tests/runtime/test_docker_health.py."""

from __future__ import annotations

import re
import time
from pathlib import Path

from provisioner.layers import get_layer
from provisioner.runtime.deployment import Deployment, Probe, ProbeResult, bridge_probe
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.health import FORWARDER_GONE, PublishedWorker, check_paths, heal_environment
from provisioner.runtime.pool import WorkerPool
from provisioner.runtime.recipes import Owner, PlanOptions, RunTarget, plan_run
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE, FakeWorkers

# When a repaired container serves again, UTC as the CLI shows times, and how long that took
# (deployment.repair_times); "down" only when the engine said when the container ended.
BACK = r"back at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: "
TOOK = r"took \d+\.\d s"
# A crash a minute ago, at a whole second: its time is known exactly and "down" is at least 60 s.
DIED_AT = float(int(time.time()) - 60)
DIED = time.strftime(" at %Y-%m-%d %H:%M:%S UTC", time.gmtime(DIED_AT))


def _env(settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], count: int = 2,
         start_slots: int | None = None) -> Deployment:
    rt, workers = fake
    plan = plan_run(
        settings,
        get_layer(settings, "e2e"),
        get_layer(settings, "e2e").lm_config(settings.lm, "mock"),
        RunTarget("h1", Owner.this_process(), lm_dir=Path(settings.state_dir) / "lm"),
        FAKE_IMAGE,
        PlanOptions(workers=count),
    )
    return Deployment(plan, rt, probe=workers.probe, ready_timeout_s=5, poll_interval_s=0.005,
                      start_slots=start_slots).start()


def _up(settings: Settings, rt: FakeRuntime, *, workers: int, probe: Probe = bridge_probe,
        persistent: bool = True) -> Deployment:
    """A run made by lifecycle.up on the in-memory engine, without a watchdog: a ``provision up`` run
    (persistent: the status tests; ``probe`` the fake workers') or a process's own (``persistent=False``,
    on a served engine with the real probe: a pool that owns it). Unlike :func:`_env` (a Deployment
    from a plan, no state files) it has the run's state, as ``provision status`` reads it."""
    from provisioner.runtime.lifecycle import UpOptions, up

    options = UpOptions(image=FAKE_IMAGE, watchdog=False, layer="integration", lm_mode="mock",
                        workers=workers, persistent=persistent)
    return up(settings, options, runtime=rt, probe=probe)


def _published(env: Deployment) -> list[PublishedWorker]:
    return [PublishedWorker(w.slot, w.name, w.container_id, w.host, w.port) for w in env.workers]


def test_every_path_answering_is_healthy(settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]) -> None:
    env = _env(settings, fake)
    try:
        assert check_paths(fake[0], env.plan.relay.name, _published(env), env.probe) == {}
        assert heal_environment(env) == []
        assert ("recreate_container", env.plan.relay.name) not in fake[0].calls
    finally:
        env.stop()


def test_a_dead_forwarder_is_found_and_the_relay_re_created_on_the_same_ports(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    env = _env(settings, fake)
    try:
        victim = env.workers[0]
        old_relay = env.container_ids[env.plan.relay.name]
        workers.kill_forwarder(victim.port)
        assert not env.probe(victim.host, victim.port, 1.0).ok

        assert check_paths(rt, env.plan.relay.name, _published(env), env.probe) == {
            0: f"{victim.address} {FORWARDER_GONE}"
        }
        notes = heal_environment(env)
        assert len(notes) == 1 and re.fullmatch(re.escape(
            f"the published path of worker {victim.name} (slot 0) was dead: {victim.address} "
            f"{FORWARDER_GONE}; re-created the relay {env.plan.relay.name} on the same ports; "
        ) + f"{BACK}the repair {TOOK}", notes[0]), notes  # no "down": nobody knows when a forwarder died
        new_relay = env.container_ids[env.plan.relay.name]
        assert new_relay != old_relay and rt.container_state(old_relay) is None
        # Same addresses: every worker answers where it did; the workers were not touched.
        assert [env.probe(w.host, w.port, 1.0).ok for w in env.workers] == [True, True]
        assert [rt.published_port(new_relay, env.plan.relay_port_for(w.slot)) for w in env.workers] == [
            w.port for w in env.workers
        ]
        assert ("remove_container", victim.name) not in rt.calls
        # The run's cleanup knows the new relay, not the old one.
        tracked = {r.ident for r in env.resources.tracked() if r.kind == "container"}
        assert new_relay in tracked and old_relay not in tracked
        assert heal_environment(env) == []
    finally:
        env.stop()
    assert rt.containers == {}


def test_a_healed_relay_keeps_the_port_of_a_slot_the_pool_has_not_started_yet(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """A pool that grows on demand starts slot 1 later, at the port the relay published for it at
    the start: a relay re-created meanwhile pins that port too, so the late worker answers there."""
    rt, workers = fake
    env = _env(settings, fake, start_slots=1)
    try:
        late_port = env.slot_port(1)
        workers.kill_forwarder(env.workers[0].port)
        assert heal_environment(env)  # re-created the relay
        new_relay = env.container_ids[env.plan.relay.name]
        assert rt.published_port(new_relay, env.plan.relay_port_for(1)) == late_port
        late = env.add_worker(1)
        assert late.port == late_port and env.probe(late.host, late.port, 1.0).ok
    finally:
        env.stop()
    assert rt.containers == {}


def test_a_stopped_relay_is_a_dead_path_for_every_worker(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    env = _env(settings, fake)
    try:
        rt.crash(env.plan.relay.name, exit_code=137, at=DIED_AT)
        found = check_paths(rt, env.plan.relay.name, _published(env), env.probe)
        why = f"the relay {env.plan.relay.name} exited with code 137 (SIGKILL){DIED}"
        assert found == {w.slot: why for w in env.workers}
        (note,) = heal_environment(env)  # one cause, one message naming every worker behind it
        names = ", ".join(f"{w.name} (slot {w.slot})" for w in env.workers)
        said = re.fullmatch(re.escape(f"the published paths of workers {names} were dead: {why}; "
                                      f"re-created the relay {env.plan.relay.name} on the same ports; ")
                            + rf"{BACK}down (\d+\.\d) s, the repair {TOOK}", note)
        assert said and float(said.group(1)) >= 60, note
        assert [env.probe(w.host, w.port, 1.0).ok for w in env.workers] == [True, True]
    finally:
        env.stop()


def test_a_dead_worker_or_a_slow_one_is_not_a_dead_path(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """The worker's own death is the pool's (replacement) or status --repair's (restart); a timeout
    or an error reply is load, not a dead path: the relay is left alone in both cases."""
    rt, workers = fake
    env = _env(settings, fake)
    try:
        rt.crash(env.workers[0].name)
        slow_port = env.workers[1].port

        def probe(host: str, port: int, timeout: float) -> ProbeResult:
            if port == slow_port:
                return ProbeResult(False, detail="timed out")
            return workers.probe(host, port, timeout)

        assert check_paths(rt, env.plan.relay.name, _published(env), probe) == {}
        # A refusal that does not repeat (a blip) is not one either.
        refusals = iter([True])

        def blip(host: str, port: int, timeout: float) -> ProbeResult:
            if port == slow_port and next(refusals, False):
                return ProbeResult(False, detail="refused", refused=True)
            return ProbeResult(True, True)

        assert check_paths(rt, env.plan.relay.name, _published(env), blip) == {}
        assert ("recreate_container", env.plan.relay.name) not in rt.calls
    finally:
        env.stop()


def test_the_pool_heals_a_dead_path_and_keeps_its_sessions(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    _, workers = fake
    with WorkerPool(_env(settings, fake), owns_environment=True) as pool:
        pinned = pool.open_session("kept")
        workers.kill_forwarder(pinned.port)
        assert pool.check() == []  # no worker replaced ...
        assert pool.session("kept") == pinned  # ... the session keeps its worker and address
        assert pool.replaced == 0
        assert any("re-created the relay" in n and FORWARDER_GONE in n for n in pool.stats()["notes"])
        assert workers.probe(pinned.host, pinned.port, 1.0).ok
        assert pool.heal_path() is False  # healthy again: nothing to do


def test_a_failed_repair_is_a_note_not_a_crash(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    with WorkerPool(_env(settings, fake), owns_environment=True) as pool:
        workers.kill_forwarder(pool.environment.workers[0].port)
        rt.fail_start.add(pool.environment.plan.relay.name)
        assert pool.heal_path() is False
        notes = pool.stats()["notes"]
        assert any("repairing the published path failed" in n and "injected failure" in n for n in notes)
        # The relay that could not start stays (created), in the run's records, for the next heal
        # to start from; removing it made every later heal fail with "it does not exist".
        relay = pool.environment.plan.relay.name
        left = rt.by_name(relay)
        assert left is not None and left.status == "created"
        assert pool.environment.container_ids[relay] == left.id
        rt.fail_start.clear()
        assert pool.heal_path() is True
        assert [workers.probe(w.host, w.port, 1.0).ok for w in pool.environment.workers] == [True, True]
    assert rt.containers == {}


def test_a_dead_worker_behind_a_dead_port_gets_both_repaired(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """The path first (a refusal is the forwarder's, whatever the worker does: the relay accepts and
    closes for a dead worker), then the worker: its replacement answers through the healed port."""
    rt, workers = fake
    with WorkerPool(_env(settings, fake), owns_environment=True) as pool:
        victim = pool.environment.workers[0]
        rt.crash(victim.name)
        workers.kill_forwarder(victim.port)
        assert pool.check() == [0]
        assert pool.replaced == 1 and pool.environment.worker(0).generation == 1
        notes = pool.stats()["notes"]
        assert any(FORWARDER_GONE in n for n in notes) and any("exited with code 137" in n for n in notes)
        assert [workers.probe(w.host, w.port, 1.0).ok for w in pool.environment.workers] == [True, True]


def test_on_the_served_engine_a_real_ping_finds_and_the_heal_fixes_a_dead_port(
    settings: Settings,
) -> None:
    """FakeRuntime(serve=True): real in-process workers and relay, the real bridge probe. The relay's
    listener for a worker's port closes (the forwarder died); a pooled session's next request is
    refused, healed, resent and answered, at the same address."""
    served = FakeRuntime(images=(FAKE_IMAGE,), serve=True)
    try:
        env = _up(settings, served, persistent=False, workers=2)
        with WorkerPool(env, owns_environment=True) as pool:
            pool.open_session("kept")
            session = pool.client("kept")
            session.create_program("question -> answer", "p")
            pinned = pool.session("kept")
            served.kill_forwarder(pinned.port)
            assert env.probe(pinned.host, pinned.port, 2.0).refused
            assert "answer" in session.execute_program("p", {"question": "q"})["outputs"]
            assert pool.session("kept") == pinned and pool.replaced == 0
            assert any(FORWARDER_GONE in n for n in pool.stats()["notes"])
            assert [env.probe(w.host, w.port, 2.0).ok for w in env.workers] == [True, True]
            session.close()
    finally:
        served.close()


def test_a_process_attached_to_a_shared_pool_waits_for_the_owners_heal(settings: Settings) -> None:
    """xdist: one process deployed the pool, another attached (AttachedWorkers over pool.json). The
    attached process's refused request waits until the owner's monitor has re-created the relay,
    then is sent again and answered; a `provision up` run's attached pool does not wait."""
    import threading

    from provisioner.runtime.shared_pool import AttachedWorkers, PoolRecord

    served = FakeRuntime(images=(FAKE_IMAGE,), serve=True)
    try:
        env = _up(settings, served, persistent=False, workers=1)
        owner = WorkerPool(env, owns_environment=True)
        record = PoolRecord(env.plan.run_id, "deployed", "owner", PoolRecord.entries(env.workers))
        attached = WorkerPool(AttachedWorkers(None, record, served, ready_timeout_s=30))
        attached.open_session("s")
        session = attached.client("s")
        session.create_program("question -> answer", "p")
        served.kill_forwarder(env.workers[0].port)
        impatient = WorkerPool(AttachedWorkers(None, record, served, ready_timeout_s=0.3))
        assert impatient.heal_path() is False  # nobody healed it within 0.3 s: it was seen refused
        healer = threading.Thread(target=owner.check)  # the owner's monitor tick
        healer.start()
        try:
            assert "answer" in session.execute_program("p", {"question": "q"})["outputs"]
        finally:
            healer.join()
        session.close()
        assert any(FORWARDER_GONE in n for n in owner.stats()["notes"])

        up_record = PoolRecord(env.plan.run_id, "up", "provision up", PoolRecord.entries(env.workers))
        assert WorkerPool(AttachedWorkers(None, up_record, served, ready_timeout_s=30)).heal_path() is False
        owner.close()
    finally:
        served.close()


def test_status_names_a_dead_path_and_repair_re_creates_the_relay(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """`provision up` heals on request: status says which path is dead and why; --repair re-creates
    the relay on the same ports and says so; a worker that also exited is restarted after it."""
    from provisioner.runtime.lifecycle import down, status

    rt, workers = fake
    env = _up(settings, rt, probe=workers.probe, workers=2)
    try:
        first, second = env.workers
        workers.kill_forwarder(first.port)
        rt.crash(second.container_id, at=DIED_AT)
        report = status(settings, runtime=rt, probe=workers.probe)
        assert not report.healthy
        by_name = {w.name: w for w in report.workers}
        assert by_name[first.name].reason == (
            f"dead path: {first.address} {FORWARDER_GONE}; `provision status --repair` re-creates the relay"
        )
        assert by_name[second.name].reason == f"exited with code 137 (SIGKILL){DIED}"

        repaired = status(settings, runtime=rt, probe=workers.probe, repair=True)
        assert repaired.healthy, repaired
        by_name = {w.name: w for w in repaired.workers}
        relay = env.plan.relay.name
        assert by_name[first.name].repaired == (
            f"re-created the relay {relay} on the same ports: {first.address} {FORWARDER_GONE}"
        )
        said = re.fullmatch(re.escape(f"restarted: the worker exited with code 137 (SIGKILL){DIED}; ")
                            + rf"{BACK}down (\d+\.\d) s, the restart {TOOK}", by_name[second.name].repaired)
        assert said and float(said.group(1)) >= 60, by_name[second.name].repaired
        assert [w.address for w in repaired.workers] == [first.address, second.address]
        assert status(settings, runtime=rt, probe=workers.probe, repair=True).workers[0].repaired == ""
    finally:
        down(settings, runtime=rt)
    assert rt.containers == {}


def test_status_repair_says_when_the_relay_cannot_be_made_again(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    from provisioner.runtime.lifecycle import down, status

    rt, workers = fake
    env = _up(settings, rt, probe=workers.probe, workers=1)
    try:
        rt.remove_container(env.plan.relay.name)
        report = status(settings, runtime=rt, probe=workers.probe, repair=True)
        assert not report.healthy
        done = report.workers[0].repaired
        assert done.startswith("re-creating the relay failed:") and "is gone" in done, done
        assert "`provision down` and `provision up`" in done
        assert report.others == {env.plan.relay.name: "missing"}
    finally:
        down(settings, runtime=rt)


def test_heal_deployment_reports_a_failed_replacement_and_still_heals_the_rest(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """provision run's check: a replacement that does not become ready is a note ("the next check
    tries again"), not an exception that would skip the other repairs of the same check."""
    from provisioner.runtime.health import heal_deployment

    rt, workers = fake
    env = _env(settings, fake)
    try:
        first, second = env.workers
        workers.not_ready.add(f"{first.name}-1")  # its replacement never answers
        env.ready_timeout_s = 0.3
        rt.crash(first.name, at=DIED_AT)
        rt.crash(second.name, at=DIED_AT)
        notes = heal_deployment(env)
        assert len(notes) == 2, notes
        assert re.match(re.escape(f"worker {first.name} (slot 0) exited with code 137 (SIGKILL){DIED}; ")
                        + r"replacing it failed after \d+\.\d s: ", notes[0]), notes[0]
        assert notes[0].endswith("the next check tries again")
        said = re.fullmatch(re.escape(
            f"worker {second.name} (slot 1) exited with code 137 (SIGKILL){DIED}; replaced it with "
            f"{second.name}-1 behind the same address {second.address} (its sessions and programs are gone); "
        ) + rf"{BACK}down (\d+\.\d) s, the repair {TOOK}", notes[1])
        assert said and float(said.group(1)) >= 60, notes[1]
        workers.not_ready.clear()
        (again,) = heal_deployment(env)  # the next check: the slot whose replacement failed
        assert again.startswith(f"worker {first.name} (slot 0) is gone") and "replaced it" in again
        assert heal_deployment(env) == []
    finally:
        env.stop()


def test_rebinding_the_relay_does_not_wait_for_a_worker_that_dies_meanwhile(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """The relay and a worker killed together: the relay's re-creation used to wait for the dead
    worker until ready_timeout_s and fail, so its replacement (pool, provision run) came a check later."""
    from provisioner.runtime.health import rebind_relay

    rt, workers = fake
    env = _env(settings, fake)
    try:
        first = env.workers[0]
        rt.crash(env.plan.relay.name)

        def probe(host: str, port: int, timeout: float) -> ProbeResult:
            if port == first.port and rt.container_state(first.container_id).running:  # type: ignore[union-attr]
                rt.crash(first.name)  # dies while the relay comes back
            return workers.probe(host, port, timeout)

        rebind_relay(rt, env.plan.relay.name, _published(env), probe, timeout_s=30.0)  # no RuntimeProblem
        assert workers.probe(env.workers[1].host, env.workers[1].port, 1.0).ok
    finally:
        env.stop()


def test_status_repair_that_cannot_start_the_relay_says_to_try_again_and_the_next_one_does_it(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """`provision status --repair` while a port is taken: it says so and that the next repair tries
    again; the relay it made is left (created) for that, and the next repair starts it."""
    from provisioner.runtime.lifecycle import down, status

    rt, workers = fake
    env = _up(settings, rt, probe=workers.probe, workers=1)
    relay = env.plan.relay.name
    try:
        rt.crash(relay)
        rt.fail_start.add(relay)  # the engine cannot start it: a port taken meanwhile
        report = status(settings, runtime=rt, probe=workers.probe, repair=True)
        done = report.workers[0].repaired
        assert not report.healthy and done.startswith("re-creating the relay failed:"), done
        assert "`provision status --repair` tries again" in done, done
        assert report.others == {relay: "created"}
        rt.fail_start.clear()
        report = status(settings, runtime=rt, probe=workers.probe, repair=True)
        assert report.healthy, report
        assert report.workers[0].repaired.startswith(f"re-created the relay {relay} on the same ports")
        assert report.others == {relay: "running"}
    finally:
        down(settings, runtime=rt)
    assert rt.containers == {}


def test_a_replacement_the_run_s_stop_interrupts_is_not_called_a_failure_to_try_again(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """Found trying `provision run` from the wheel: the command ended while a killed worker was being
    replaced, and the note said "replacing it failed ...: the run is being stopped; the next check
    tries again" — there is no next check once the run stops."""
    from provisioner.runtime.health import heal_deployment

    rt, _ = fake
    env = _env(settings, fake, count=1)
    try:
        (worker,) = env.workers
        rt.crash(worker.name, at=DIED_AT)
        env.interrupt()  # what provision run's stop does first
        assert heal_deployment(env) == [
            f"worker {worker.name} (slot 0) exited with code 137 (SIGKILL){DIED}; not replaced: the run is "
            "being stopped"
        ]
    finally:
        env.stop()
    assert rt.containers == {}
