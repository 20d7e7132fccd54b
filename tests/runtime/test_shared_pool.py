"""One pool per run (runtime/shared_pool.py) on the in-memory engine: deploy once under the run's
lock, attach from every other process, survive a killed deployer, remove by label at the end; and
which `provision up` run a session attaches to."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import WorkerLostError
from provisioner.layers import get_layer
from provisioner.runtime import labels as L
from provisioner.runtime import shared_pool as sp
from provisioner.runtime.deployment import Deployment
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.pool import WorkerPool
from provisioner.runtime.recipes import Owner, PlanOptions, RunTarget, plan_run
from provisioner.runtime.state import RunState, write_state
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE, FakeWorkers

RUN = "shared1"


def _deployer(settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], name: str, calls: list[str],  # type: ignore[no-untyped-def]
              start_slots: int | None = None):
    rt, workers = fake

    def deploy() -> Deployment:
        calls.append(name)
        layer = get_layer(settings, "e2e")
        target = RunTarget(RUN, Owner.this_process(), instance=sp.POOL_INSTANCE,
                           lm_dir=Path(settings.state_dir) / "lm")
        plan = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"), target, FAKE_IMAGE,
                        PlanOptions(workers=2))
        return Deployment(plan, rt, probe=workers.probe, ready_timeout_s=5, poll_interval_s=0.005,
                          start_slots=start_slots).start()

    return deploy


def _make_pool(environment: object, deployed: bool) -> WorkerPool:
    return WorkerPool(environment)  # type: ignore[arg-type]


def _obtain(settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], run_dir: Path, name: str,
            calls: list[str], start_slots: int | None = None, **kwargs: Any) -> sp.SharedPool:
    """``obtain_pool`` of the run ``RUN`` as the process ``name`` would: it deploys (``calls`` gets
    ``name``) unless a pool is there to attach to."""
    deploy = _deployer(settings, fake, name, calls, start_slots)
    return sp.obtain_pool(run_dir, RUN, runtime=fake[0], deploy=deploy, make_pool=_make_pool,
                          ready_timeout_s=5, **kwargs)


def test_the_first_process_deploys_and_the_others_attach(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    rt, _ = fake
    run_dir = tmp_path / "run"
    calls: list[str] = []
    first = _obtain(settings, fake, run_dir, "gw0", calls)
    second = _obtain(settings, fake, run_dir, "gw1", calls)
    try:
        assert calls == ["gw0"] and first.deployed and not second.deployed
        addresses = [w.address for w in first.environment.workers]
        assert [w.address for w in second.environment.workers] == addresses
        record = json.loads((run_dir / sp.POOL_FILE).read_text())
        assert record["source"] == "deployed" and len(record["workers"]) == 2
        assert "token" not in json.dumps(record).lower()  # no secrets in the run's files
        workers = [c for c in rt.containers.values() if c.recipe.role == "worker"]
        assert len(workers) == 2 and all(c.recipe.labels[L.INSTANCE] == sp.POOL_INSTANCE for c in workers)
    finally:
        second.pool.close()
        first.pool.close()
    assert sp.remove_shared_pool(run_dir, RUN, rt) == []
    assert rt.containers == {} and rt.networks == {}
    assert not (run_dir / sp.POOL_FILE).exists()


def test_concurrent_processes_deploy_once(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    rt, _ = fake
    run_dir = tmp_path / "run"
    calls: list[str] = []
    got: list[sp.SharedPool] = []

    def take(name: str) -> None:
        got.append(_obtain(settings, fake, run_dir, name, calls))

    threads = [threading.Thread(target=take, args=(f"gw{n}",)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert len(calls) == 1 and len(got) == 3 and sum(s.deployed for s in got) == 1
        assert len([c for c in rt.containers.values() if c.recipe.role == "worker"]) == 2
    finally:
        for shared in got:
            shared.pool.close()
        sp.remove_shared_pool(run_dir, RUN, rt)


def test_a_record_whose_workers_are_gone_is_deployed_over(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    """A deployer killed after writing pool.json, its containers removed (or a torn file): the next
    process deploys instead of attaching to nothing."""
    rt, _ = fake
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sp.write_record(run_dir, sp.PoolRecord(RUN, "deployed", "999999-1.0", [
        {"slot": 0, "name": "w0", "container_id": "gone", "host": "127.0.0.1", "port": 1, "generation": 0}]))
    calls: list[str] = []
    shared = _obtain(settings, fake, run_dir, "next", calls)
    try:
        assert shared.deployed and calls == ["next"]
        (run_dir / sp.POOL_FILE).write_text('{"run_id": "shared1", "source": "dep')  # torn
        assert sp.read_record(run_dir) is None
    finally:
        shared.pool.close()
        sp.remove_shared_pool(run_dir, RUN, rt)


def test_an_attached_process_takes_the_deployers_replacement(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    rt, _ = fake
    run_dir = tmp_path / "run"
    calls: list[str] = []
    owner = _obtain(settings, fake, run_dir, "gw0", calls)
    other = _obtain(settings, fake, run_dir, "gw1", calls)
    try:
        dead = owner.environment.workers[0]
        rt.crash(dead.container_id, exit_code=137)
        assert owner.pool.check() == [0]  # the deployer replaces it and rewrites pool.json
        session = other.pool.open_session("after")  # the other process sees the dead one, waits, moves on
        assert other.pool.wait_replacements(10)
        assert other.environment.worker(0).generation == 1
        assert session.slot == 1 or session.generation == 1
    finally:
        other.pool.close()
        owner.pool.close()
        sp.remove_shared_pool(run_dir, RUN, rt)


def test_workers_of_an_up_run_are_never_replaced_by_an_attached_session(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    record = sp.PoolRecord("up1", "up", "1-0", [
        {"slot": 0, "name": "w0", "container_id": "c0", "host": "127.0.0.1", "port": 1, "generation": 0}])
    attached = sp.AttachedWorkers(None, record, rt, ready_timeout_s=5)
    with pytest.raises(WorkerLostError, match=r"provision status --repair"):
        attached.replace_worker(0)


def _state(settings: Settings, *, layer: str = "integration", lm_mode: str = "cached",
           record_mode: str | None = "new_episodes") -> RunState:
    state = RunState(run_id="up1", layer=layer, lm_mode=lm_mode, instance="up1", image=FAKE_IMAGE,
                     created=1.0,
                     owner_pid=1, owner_host="h", persistent=True, uses_standin=False, egress=False,
                     networks=[], relay="r", standin=None,
                     workers=[{"slot": 0, "name": "w0", "container_id": "c0", "address": "127.0.0.1:4000"}],
                     record_mode=record_mode)
    write_state(settings, state, current=True)
    return state


@pytest.mark.parametrize(
    ("layer", "lm_mode", "record_mode", "reason"),
    [
        ("integration", "cached", "new_episodes", ""),
        ("e2e", "cached", "new_episodes", "layer e2e (this session: integration)"),
        ("integration", "mock", None, "LM mode mock (this session: cached)"),
        ("integration", "cached", "none", "record mode none (this session: new_episodes)"),
        ("integration", "cached", None, "record mode unknown (this session: new_episodes)"),
    ],
)
def test_which_up_run_a_session_attaches_to(
    settings: Settings, layer: str, lm_mode: str, record_mode: str | None, reason: str
) -> None:
    _state(settings, layer=layer, lm_mode=lm_mode, record_mode=record_mode)
    lm = get_layer(settings, "integration").lm_config(settings.lm)
    lm = lm.model_copy(update={"record_mode": "new_episodes"})
    match = sp.find_up_run(settings, "integration", lm)
    assert match.attached == (reason == "")
    assert reason in match.reason
    assert sp.find_up_run(settings, "integration", lm, run_id="other").state is None  # no such run: silent


def test_an_up_run_with_a_stopped_worker_is_not_attached(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    state = _state(settings)
    assert "no longer runs" in str(sp.attach_up_run(state, rt, ready_timeout_s=5))


def test_the_pool_starts_one_worker_and_grows_on_the_run_s_demand(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    """The first worker serves at once; the pool's other slot starts only when more sessions are
    open at once across the run's processes than workers run (each process records its peak in
    pool-demand/; the deployer sums them), and joins every process's pool through pool.json."""
    rt, _ = fake
    run_dir = tmp_path / "run"
    calls: list[str] = []
    owner = _obtain(settings, fake, run_dir, "gw0", calls, 1, process="gw0")
    other = _obtain(settings, fake, run_dir, "gw1", calls, 1, process="gw1")
    try:
        assert [w.slot for w in owner.environment.workers] == [0]
        assert [w.slot for w in other.environment.workers] == [0]
        assert owner.environment.pending_slots() == [1]  # type: ignore[union-attr]
        owner.pool.close_session(owner.pool.open_session("serial-1").session_id)
        owner.pool.close_session(owner.pool.open_session("serial-2").session_id)
        owner.pool.grow_on_demand()  # what its monitor does: one process, one session at a time
        assert owner.pool.wait_replacements(10) and owner.pool.stats()["added"] == 0
        assert other.pool.open_session("early").slot == 0  # served before the pool grew ...
        assert sp.read_demand(run_dir) == 1 and sp.read_demand(run_dir, besides="gw1") == 0  # recorded
        owner.pool.grow_on_demand()  # the owner's peak (1) + the other process's (1)
        assert owner.pool.wait_replacements(10)
        assert owner.pool.stats()["added"] == 1 and len(owner.pool.stats()["workers"]) == 2
        late = other.pool.open_session("late")  # the other process finds slot 1 in pool.json
        assert late.slot == 1 and len(other.pool.stats()["workers"]) == 2
        assert len([c for c in rt.containers.values() if c.recipe.role == "worker"]) == 2
        with pytest.raises(ValueError, match="not waiting to start"):
            owner.environment.add_worker(1)  # type: ignore[union-attr]
    finally:
        other.pool.close()
        owner.pool.close()
        sp.remove_shared_pool(run_dir, RUN, rt)
    assert rt.containers == {}


def test_sessions_open_at_once_in_the_deploying_process_grow_the_pool_at_once(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    """A new peak of sessions open at once starts the next slot without waiting for the monitor;
    a lease whose test ended no longer counts, even while its cleanup is still queued."""
    rt, _ = fake
    run_dir = tmp_path / "run"
    owner = _obtain(settings, fake, run_dir, "gw0", [], 1)
    try:
        pool = owner.pool
        _, end_first = pool.lease("first")
        end_first()  # queued to the closer thread
        _, end_second = pool.lease("second")
        assert pool.peak_sessions == 1
        _, end_third = pool.lease("third")  # two in use at once
        assert pool.peak_sessions == 2
        assert pool.wait_replacements(10) and pool.stats()["added"] == 1
        end_second()
        end_third()
        assert pool.wait_cleanups(10)
    finally:
        owner.pool.close()
        sp.remove_shared_pool(run_dir, RUN, rt)
    assert rt.containers == {}


def test_a_process_killed_while_it_holds_the_pool_lock_does_not_wedge_the_run(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    """An xdist process SIGKILLed mid-deploy (lock held, no pool.json written): the kernel releases
    its lock, and the next process deploys."""
    import signal
    import subprocess
    import sys

    rt, _ = fake
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
         "print('locked', flush=True); time.sleep(600)", str(run_dir / sp.POOL_LOCK)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        calls: list[str] = []
        shared = _obtain(settings, fake, run_dir, "next", calls)
        try:
            assert shared.deployed and calls == ["next"]
        finally:
            shared.pool.close()
            sp.remove_shared_pool(run_dir, RUN, rt)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)


def test_under_provision_run_the_session_attaches_to_that_run(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`provision run -- pytest` exports PROVISION_RUN_ID: the session (and an environment() block)
    attaches to that run — not persistent, not the project's current one — and shares its LM dir."""
    from provisioner.run import RunOptions, resolve_run

    resolved = resolve_run(RunOptions(layer="integration"), settings.project_dir)
    state = RunState(run_id="pr1", layer="integration", lm_mode="cached", instance="pr1", image=FAKE_IMAGE,
                     created=1.0, owner_pid=1, owner_host="h", persistent=False, uses_standin=False,
                     egress=False, networks=[], relay="r", standin=None,
                     workers=[{"slot": 0, "name": "w0", "container_id": "c0", "address": "127.0.0.1:4000"}],
                     lm_run_dir=str(settings.state_dir / "runs" / "pr1" / "lm"),
                     record_mode=resolved.lm_config.record_mode)
    write_state(resolved.settings, state, current=False)
    engine: Any = _Engine({"c0"})
    assert sp.choose_up_run(resolved, runtime=engine)[0].state is None  # not current, no PROVISION_RUN_ID
    monkeypatch.setenv("PROVISION_RUN_ID", "pr1")
    match, attached = sp.choose_up_run(resolved, runtime=engine)
    assert match.state is not None and match.state.run_id == "pr1"
    assert attached.lm_config.run_dir == Path(state.lm_run_dir or "")
    assert sp.choose_up_run(resolved, "", runtime=engine)[0].state is None  # xdist worker told: do not attach


class _Engine:
    """The one engine call choose_up_run makes: which of the run's containers run."""

    def __init__(self, running: set[str]) -> None:
        self.running = running

    def container_state(self, container_id: str) -> Any:
        import types

        return types.SimpleNamespace(running=container_id in self.running)


def test_a_session_does_not_attach_to_an_up_run_with_a_dead_worker_and_says_how_to_repair_it(
    settings: Settings
) -> None:
    """A user's trial: `provision up`, `docker kill <run>-w0`, pytest: the header, the attach line and
    the summary said "attached" while the session started its own workers (a raw UserWarning in the
    middle of the progress line said so). The decision is made once, at the start: not attached,
    with the reason and the repair; an xdist worker takes its controller's decision without looking."""
    from provisioner.run import RunOptions, resolve_run

    _state(settings)
    resolved = resolve_run(RunOptions(layer="integration", record_mode="new_episodes"), settings.project_dir)
    match, mine = sp.choose_up_run(resolved, runtime=_Engine(set()))  # type: ignore[arg-type]
    assert match.state is None
    assert match.reason == ("`provision up` run up1 has a worker that no longer runs (repair it: "
                            "`provision status --repair`, or `provision down` and `provision up`)")
    assert mine.lm_config.run_dir == resolved.lm_config.run_dir  # its own LM dir, not the up run's
    assert sp.choose_up_run(resolved, runtime=_Engine({"c0"}))[0].attached  # type: ignore[arg-type]
    # An xdist worker told to attach does not look again (its controller's header said "attached").
    assert sp.choose_up_run(resolved, "up1", runtime=_Engine(set()))[0].attached  # type: ignore[arg-type]


def test_the_run_s_end_without_an_engine_of_its_own_opens_one_and_says_when_none_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An xdist controller that started no containers itself has no engine at the run's end; when a
    worker process deployed the shared pool, the controller opens the engine to remove it. With no
    engine answering, the failure is returned (the run's end reports it) and nothing is removed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert sp.finish_shared_pool(run_dir, RUN) == []  # no pool was deployed: the engine is not asked
    (run_dir / sp.POOL_STARTED).touch()
    (run_dir / sp.POOL_FILE).write_text("{}")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    (problem,) = sp.finish_shared_pool(run_dir, RUN)
    assert problem.startswith(f"shared pool of run {RUN}: no Docker engine is reachable"), problem
    assert (run_dir / sp.POOL_STARTED).exists()  # nothing was removed: the next reap still finds it


@pytest.mark.docker
def test_the_run_s_end_without_an_engine_of_its_own_removes_the_pool_through_one_it_opens(
    docker_engine: Any, tmp_path: Path, watched_run: Any
) -> None:
    from provisioner.runtime.engine import DockerRuntime

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_id = f"spend{os.getpid()}"
    name = f"prov-{run_id}-pool-net"
    watched_run(run_id)  # removed by the watchdog if this process is killed before the finally
    docker_engine.api.create_network(name, internal=True, labels=L.selector(run_id, sp.POOL_INSTANCE))
    try:
        (run_dir / sp.POOL_STARTED).touch()
        (run_dir / sp.POOL_FILE).write_text("{}")
        assert sp.finish_shared_pool(run_dir, run_id) == []
        assert not (run_dir / sp.POOL_STARTED).exists() and not (run_dir / sp.POOL_FILE).exists()
        assert docker_engine.networks.list(names=[name]) == []
    finally:
        for net in docker_engine.networks.list(names=[name]):
            net.remove()
    assert DockerRuntime(docker_engine).list_resources(L.selector(run_id)) == []


@pytest.mark.parametrize("owner", ["dead", "garbage"])
def test_an_attached_process_stops_waiting_for_a_replacement_once_the_deploying_process_is_gone(
    tmp_path: Path, owner: str
) -> None:
    """A worker of the shared pool died and the process that deployed the pool (the only one that
    replaces workers) is gone too — or its entry in pool.json cannot be read: the attached process
    says so at once instead of waiting out its readiness deadline; other slots' lines do not count."""
    import subprocess
    import sys

    from provisioner.runtime import watchdog as wd

    if owner == "dead":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        entry = wd.process_entry(gone.pid)
    else:
        entry = "not-a-process"
    workers = [{"slot": n, "name": f"w{n}", "container_id": f"c{n}", "host": "127.0.0.1", "port": 4000 + n,
                "generation": 0} for n in (0, 1)]
    record = sp.PoolRecord(RUN, "deployed", entry, workers)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sp.write_record(run_dir, sp.PoolRecord(RUN, "deployed", entry,
                                           [workers[0], {**workers[1], "generation": 1}]))
    attached = sp.AttachedWorkers(run_dir, record, FakeRuntime(), ready_timeout_s=600)
    with pytest.raises(WorkerLostError, match=rf"worker w0 of run {RUN} is gone and the process that "
                                              rf"started the pool \({entry}\) did not replace it"):
        attached.replace_worker(0)
    with pytest.raises(KeyError, match="no worker in slot 7"):
        attached.worker(7)


def test_an_attached_process_waits_through_an_unreadable_pool_json_for_the_deployers_replacement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker of the shared pool died; the deploying process (alive: this one) replaces it and
    rewrites pool.json. The attached process's first read finds the file unreadable (being rewritten:
    no record) and the replacement not yet there, so it waits and reads again — and takes the new
    generation instead of failing or taking the dead worker's line."""
    from provisioner.runtime import watchdog as wd

    workers = [{"slot": n, "name": f"w{n}", "container_id": f"c{n}", "host": "127.0.0.1", "port": 4000 + n,
                "generation": 0} for n in (0, 1)]
    record = sp.PoolRecord(RUN, "deployed", wd.process_entry(), workers)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sp.write_record(run_dir, record)
    replaced = {**workers[0], "container_id": "c0-new", "port": 4100, "generation": 1}
    real_read = sp.read_record
    reads: list[bool] = []

    def read_while_rewritten(folder: Path) -> sp.PoolRecord | None:
        if not reads:  # the deploying process is rewriting pool.json right now: nothing readable yet
            reads.append(False)
            sp.write_record(folder, sp.PoolRecord(RUN, "deployed", record.owner, [replaced, workers[1]]))
            return None
        reads.append(True)
        return real_read(folder)

    monkeypatch.setattr(sp, "read_record", read_while_rewritten)
    attached = sp.AttachedWorkers(run_dir, record, FakeRuntime(), ready_timeout_s=600)
    new = attached.replace_worker(0)
    assert (new.container_id, new.port, new.generation) == ("c0-new", 4100, 1)
    assert attached.worker(0) == new and attached.worker(1).generation == 0
    assert reads == [False, True]  # it waited once, then read the rewritten file


def test_a_mock_session_attaches_without_a_record_mode_and_an_unreadable_state_file_is_named(
    settings: Settings,
) -> None:
    """A mock-mode session compares layer and LM mode only (record modes are cached mode's); an up
    run whose state file is torn is not attached, and the reason names the run and the file."""
    from provisioner.runtime.state import STATE_FILE

    _state(settings, lm_mode="mock", record_mode=None)
    lm = get_layer(settings, "integration").lm_config(settings.lm, "mock")
    assert sp.find_up_run(settings, "integration", lm).attached
    state_file = Path(settings.state_dir) / "runs" / "up1" / STATE_FILE
    assert state_file.exists()
    state_file.write_text('{"run_id": "up1", "lay')  # torn: its writer was killed mid-write
    match = sp.find_up_run(settings, "integration", lm)
    assert not match.attached and match.reason.startswith("run up1: "), match.reason
    assert STATE_FILE in match.reason, match.reason


def test_a_dead_worker_of_an_up_run_is_said_not_replaced_with_the_repair_in_every_message(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A user's trial: a worker of a `provision up` run died mid-test; the pool logged "replacing it
    behind the same address" and the test's error said "Open a new session" — nobody replaced it
    (only the run's owner does). Every message a death produces in an attached pool says that it is
    not replaced and how to repair it: the pool's note, a pinned session's error, a new session's."""
    import logging

    rt, _ = fake
    calls: list[str] = []
    deployed = _obtain(settings, fake, tmp_path / "run", "up-owner", calls)  # stands for the up run's workers
    record = sp.PoolRecord("up1", "up", "1-0", sp.PoolRecord.entries(deployed.environment.workers))
    pool = WorkerPool(sp.AttachedWorkers(None, record, rt, ready_timeout_s=5))  # type: ignore[arg-type]
    repair = "`provision status --repair` (or `provision down` and `provision up`)"
    try:
        pinned = pool.open_session("pinned")
        for w in deployed.environment.workers:
            rt.crash(w.container_id, exit_code=137)
        with caplog.at_level(logging.WARNING, logger="provisioner.pool"):
            pool.check()  # what a connection failure asks (report_failure)
            with pytest.raises(WorkerLostError) as lost:
                pool.session("pinned")
            with pytest.raises(WorkerLostError) as fresh:
                pool.open_session("next")
        said = [r.getMessage() for r in caplog.records]
        assert said and not [m for m in said if "replacing" in m], said
        assert all("not replaced (no replacement attempted)" in m and repair in m for m in said), said
        assert len(said) == 2  # once per worker
        assert f"pinned to worker {pinned.worker}" in str(lost.value)
        assert repair in str(lost.value) and "Open a new session" not in str(lost.value), lost.value
        assert "no replacement was attempted" in str(fresh.value) and repair in str(fresh.value), fresh.value
        assert pool.stats()["replaced"] == 0
    finally:
        pool.close()
        deployed.pool.close()
        sp.remove_shared_pool(tmp_path / "run", RUN, rt)
