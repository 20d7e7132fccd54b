"""RunEnvironment and the up/down/status/reap API, on the in-memory engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import ConfigError, RuntimeProblem, WorkerNotReadyError
from provisioner.layers import get_layer
from provisioner.lm.limits import read_run_limits
from provisioner.runtime import environment as E
from provisioner.runtime import labels as L
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.recipes import plan_run
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
) -> E.RunEnvironment:
    layer = get_layer(settings, "integration")
    plan = plan_run(
        settings,
        layer,
        settings.lm_for("integration", mode),
        run_id="run1",  # type: ignore[arg-type]
        image=FAKE_IMAGE,
        workers=count,
        run_dir=Path(settings.state_dir) / "lm",
    )
    return E.RunEnvironment(plan, rt, probe=workers.probe, ready_timeout_s=timeout, poll_interval_s=0.005)


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
def test_ctrl_c_while_waiting_for_readiness_stops_every_wait_at_once(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    # Workers that never get ready, a long deadline: the interrupt must not wait for it.
    rt, workers = fake
    workers.not_ready.update({"prov-run1-w0", "prov-run1-w1", "prov-run1-w2"})
    env = _env(settings, rt, workers, count=3, timeout=600)
    interrupted = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))  # a real Ctrl-C
    interrupted.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            env.start()
    finally:
        interrupted.cancel()
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
    start = time.monotonic()
    with pytest.raises(WorkerNotReadyError) as info:
        _env(settings, rt, workers, timeout=30).start()
    assert time.monotonic() - start < 5  # did not sit out the 30 s deadline
    assert "exited" in str(info.value) and "lm.model must not be empty" in info.value.last_logs
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
    assert workers.probes > 10  # polled at a fine interval, not once a second


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


def test_up_writes_state_and_a_sourceable_env_file_and_down_is_idempotent(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    env = _up(settings, fake, layer="integration", lm_mode="mock", workers=2)
    assert env.state is not None
    run_id = env.state.run_id
    state_file = E.state_file_of(settings, run_id)
    data = json.loads(state_file.read_text())
    assert data["run_id"] == run_id and len(data["workers"]) == 2 and data["lm_mode"] == "mock"
    current = Path(settings.state_dir) / "current.env"
    out = subprocess.run(
        ["bash", "-c", f"source {current} && echo $PROVISION_RUN_ID $PROVISION_BRIDGE_ADDRS"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [run_id, ",".join(env.addresses())]
    report = E.status(settings, runtime=rt, probe=workers.probe)
    assert report.healthy and [w.healthy for w in report.workers] == [True, True]
    rt.crash(env.workers[0].container_id)
    assert not E.status(settings, runtime=rt, probe=workers.probe).healthy

    first = E.down(settings, runtime=rt)
    assert first.run_id == run_id and len(first.removed) == 5  # relay, 2 workers, 2 networks
    assert rt.containers == {} and rt.networks == {}
    assert E.down(settings, runtime=rt).removed == []
    assert E.down(settings, run_id=run_id, runtime=rt).removed == []
    assert json.loads(state_file.read_text())["status"] == "down" and not current.exists()


def test_up_refuses_the_in_process_layer_and_a_missing_key_when_required(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    with pytest.raises(ConfigError, match="in-process"):
        E.up(settings, layer="unit", runtime=rt, image=FAKE_IMAGE, watchdog=False)
    with pytest.raises(ConfigError, match="require-key"):
        E.up(settings, layer="e2e", require_key=True, runtime=rt, image=FAKE_IMAGE, watchdog=False)
    assert rt.calls == []



def _up(settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], **kwargs: Any) -> E.RunEnvironment:
    """``environment.up`` on the fake runtime, its fake workers' probe, and no watchdog process."""
    runtime, workers = fake
    kwargs.setdefault("image", FAKE_IMAGE)
    kwargs.setdefault("watchdog", False)
    return E.up(settings, runtime=runtime, probe=workers.probe, **kwargs)

def test_the_control_token_goes_to_the_env_files_only_and_the_limits_file_to_the_run_dir(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    env = _up(settings, fake, layer="integration", lm_mode="cached", workers=1, persistent=True)
    assert env.state is not None and env.control_token
    token = env.control_token
    state_file = E.state_file_of(settings, env.state.run_id)
    assert token not in state_file.read_text()
    for env_file in (state_file.with_name("env"), Path(settings.state_dir) / "current.env"):
        assert env_file.stat().st_mode & 0o777 == 0o600
        out = subprocess.run(["bash", "-c", f"source {env_file} && echo $PROVISION_CONTROL_TOKEN"],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == token
    worker = next(c for c in rt.containers.values() if c.recipe.role == "worker")
    assert worker.recipe.secret_environment["PROVISION_CONTROL_TOKEN"] == token
    assert token not in json.dumps(worker.recipe.labels) + " ".join(worker.recipe.command)
    # The run's limits were written to the shared LM dir before the workers started.
    assert env.state.lm_run_dir is not None
    limits = read_run_limits(Path(env.state.lm_run_dir))
    lm = settings.lm_for("integration", "cached")
    assert limits == {"rate_limit_rpm": lm.rate_limit_rpm, "cost_limit_usd": lm.cost_limit_usd,
                      "rate_limit_wait_s": lm.rate_limit_wait_s}
    E.down(settings, runtime=rt)
    assert token not in state_file.with_name("env").read_text()  # a run that is down has no token


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_reap_picks_stale_old_or_all_runs(settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]) -> None:
    rt = fake[0]
    kept = _up(
        settings, fake, layer="integration", lm_mode="mock", workers=1, persistent=True, owner_pid=_dead_pid()
    )
    stale = _up(
        settings,
        fake,
        layer="integration",
        lm_mode="mock",
        workers=1,
        persistent=False,
        owner_pid=_dead_pid(),
    )
    mine = _up(settings, fake, layer="integration", lm_mode="mock", workers=1, persistent=False)
    ids = {e.plan.run_id for e in (kept, stale, mine)}
    runs = {r.run_id: r for r in E.list_runs(rt)}
    assert set(runs) == ids and runs[stale.plan.run_id].stale and not runs[mine.plan.run_id].stale

    later = _up(settings, fake, layer="integration", lm_mode="mock", workers=1, new=True)
    assert any(stale.plan.run_id in w for w in later.warnings)  # up warns about stale runs

    dry = E.reap(settings, runtime=rt, dry_run=True)
    assert [r.run_id for r in dry] == [stale.plan.run_id] and len(rt.list_resources(L.selector())) == 16
    reaped = E.reap(settings, runtime=rt)
    assert [(r.run_id, r.reason) for r in reaped] == [(stale.plan.run_id, "owner gone")]
    assert rt.list_resources(L.selector(stale.plan.run_id)) == []
    assert E.reap(settings, runtime=rt) == []
    assert E.reap(settings, runtime=rt, older_than_s=3600) == []  # all younger than an hour
    assert [r.run_id for r in E.reap(settings, runtime=rt, run_id=kept.plan.run_id)] == [kept.plan.run_id]
    # Owned by this (live) process: kept, and said so, unless forced.
    held = E.reap(settings, runtime=rt, all_runs=True)
    assert {r.run_id for r in held} == {mine.plan.run_id, later.plan.run_id}
    assert all(r.removed == [] and f"pid {os.getpid()}" in r.kept and "--force" in r.kept for r in held)
    assert len(E.list_runs(rt)) == 2
    forced = E.reap(settings, runtime=rt, all_runs=True, force=True)
    assert {r.run_id for r in forced} == {mine.plan.run_id, later.plan.run_id}
    assert all(r.removed and not r.kept for r in forced)
    assert rt.containers == {} and rt.networks == {}


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert E.parse_duration(text) == seconds


def test_parse_duration_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--older-than"):
        E.parse_duration("soon")


def test_env_file_quotes_values() -> None:
    assert E.render_env({"A": "x y", "B": "1"}) == "export A='x y'\nexport B=1\n"


def test_run_command_passes_the_env_and_the_exit_code_and_cleans_up(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    rt, workers = fake
    out = tmp_path / "seen"
    script = f'echo "$PROVISION_RUN_ID $PROVISION_BRIDGE_ADDRS" > {out}; exit 3'
    code = E.run_command(
        ["sh", "-c", script],
        settings,
        layer="integration",
        lm_mode="mock",
        workers=2,
        runtime=rt,
        image=FAKE_IMAGE,
        probe=workers.probe,
        watchdog=False,
    )
    assert code == 3
    run_id, addresses = out.read_text().split()
    assert len(addresses.split(",")) == 2 and run_id
    assert rt.containers == {} and rt.networks == {}  # aggressive (default): removed even on failure


def test_run_command_keeps_a_failed_run_when_the_policy_says_so(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    keep = settings.model_copy(update={"cleanup_policy": "on_success", "retain_on_failure": True})
    messages: list[str] = []
    code = E.run_command(
        ["false"],
        keep,
        layer="integration",
        lm_mode="mock",
        workers=1,
        runtime=rt,
        image=FAKE_IMAGE,
        probe=workers.probe,
        watchdog=False,
        progress=messages.append,
    )
    assert code == 1
    kept = E.list_runs(rt)
    assert len(kept) == 1 and any("kept run" in m for m in messages)
    assert (E.run_dir_of(keep, kept[0].run_id) / "retain").exists()  # the watchdog leaves it too
    assert (
        E.run_command(
            ["true"],
            keep,
            layer="integration",
            lm_mode="mock",
            workers=1,
            runtime=rt,
            image=FAKE_IMAGE,
            probe=workers.probe,
            watchdog=False,
        )
        == 0
    )
    assert [r.run_id for r in E.list_runs(rt)] == [kept[0].run_id]  # the successful run was removed


def test_doctor_reports_the_engine_key_and_disk(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    checks = {c.name: c for c in E.doctor(settings, runtime=rt)}
    assert checks["docker engine"].status == "ok"
    assert checks["Gemini API key"].status == "warn" and "stand-in" in checks["Gemini API key"].detail
    assert (
        checks["disk (state dir)"].status in ("ok", "fail") and "GB free" in checks["disk (state dir)"].detail
    )
    assert checks["provisioner installation"].status == "ok"
    assert "dspy-provisioner" in checks["provisioner installation"].detail
    rt.available = False
    without_engine = {c.name: c.status for c in E.doctor(settings, runtime=rt)}
    assert without_engine["docker engine"] == "fail" and "stale runs" not in without_engine
    assert without_engine["Gemini API key"] == "warn"  # the checks that need no engine still run


def test_doctor_turns_an_unexpected_error_into_a_failed_check(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], monkeypatch: pytest.MonkeyPatch
) -> None:
    from provisioner.errors import ImageError
    from provisioner.runtime import images

    def broken(*_a: object, **_k: object) -> None:
        raise ImageError("the worker image is built from provisioner's source tree, which was not found")

    monkeypatch.setattr(images, "installed_package", broken)
    monkeypatch.setattr(E, "list_runs", lambda *_a, **_k: 1 / 0)
    checks = {c.name: c for c in E.doctor(settings, runtime=fake[0])}
    assert checks["provisioner installation"].status == "fail"
    assert "ImageError" in checks["provisioner installation"].detail
    assert checks["stale runs"].status == "fail" and "ZeroDivisionError" in checks["stale runs"].detail
    assert checks["Gemini API key"].status == "warn"  # the other checks still ran


def _project_settings(tmp_path: Path, name: str) -> Settings:
    from provisioner.settings import load_settings

    root = tmp_path / name
    root.mkdir()
    (root / "pyproject.toml").write_text(f"[project]\nname = '{name}'\n[tool.provisioner]\n")
    return load_settings(project_dir=root)


def test_up_twice_refuses_with_the_run_id_and_the_two_ways_out(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt = fake[0]
    first = _up(settings, fake, layer="integration", lm_mode="mock", workers=1, owner_pid=_dead_pid())
    before = len(rt.list_resources(L.selector()))
    with pytest.raises(RuntimeProblem) as err:
        _up(settings, fake, layer="integration", lm_mode="mock", workers=1)
    message = str(err.value)
    assert first.plan.run_id in message and "provision down" in message and "--new" in message
    assert len(rt.list_resources(L.selector())) == before  # nothing started, nothing orphaned
    assert E.current_run_id(settings) == first.plan.run_id
    other_layer = _up(settings, fake, layer="e2e", lm_mode="mock", workers=1, owner_pid=_dead_pid())
    assert other_layer.state is not None  # another layer of the project is not "the same run"
    assert E.down(settings, run_id=other_layer.plan.run_id, runtime=rt).removed

    second = _up(settings, fake, layer="integration", lm_mode="mock", workers=1, new=True)
    with pytest.raises(E.AmbiguousRunError) as many:
        E.down(settings, runtime=rt)
    assert set(many.value.candidates) == {first.plan.run_id, second.plan.run_id}
    assert first.plan.run_id in str(many.value) and "--run" in str(many.value)
    with pytest.raises(E.AmbiguousRunError):
        E.status(settings, runtime=rt, probe=fake[1].probe)
    assert E.down(settings, run_id=first.plan.run_id, runtime=rt).removed
    # One left: down without --run finds it.
    assert E.down(settings, runtime=rt).run_id == second.plan.run_id
    assert rt.containers == {} and rt.networks == {}


def test_down_and_status_find_the_projects_run_without_a_current_file(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    env = _up(settings, fake, layer="integration", lm_mode="mock", workers=1)
    (Path(settings.state_dir) / E.CURRENT_RUN).unlink()  # e.g. the state dir was cleaned
    assert E.status(settings, runtime=rt, probe=workers.probe).run_id == env.plan.run_id
    assert E.down(settings, runtime=rt).run_id == env.plan.run_id
    assert rt.containers == {}


def test_runs_carry_the_project_and_reap_stays_in_its_project(
    tmp_path: Path, fake: tuple[FakeRuntime, FakeWorkers], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rt = fake[0]
    mine, theirs = _project_settings(tmp_path, "mine"), _project_settings(tmp_path, "theirs")
    assert E.project_of(mine) != E.project_of(theirs)
    a = _up(mine, fake, layer="integration", lm_mode="mock", workers=1, persistent=False,
            owner_pid=_dead_pid())
    b = _up(theirs, fake, layer="integration", lm_mode="mock", workers=1, persistent=False,
            owner_pid=_dead_pid())
    for ref in rt.list_resources(L.selector(a.plan.run_id)):
        assert ref.labels[L.PROJECT] == E.project_of(mine)
    assert [r.run_id for r in E.list_runs(rt, E.project_of(mine))] == [a.plan.run_id]
    assert [r.run_id for r in E.reap(mine, runtime=rt, older_than_s=0, dry_run=True)] == [a.plan.run_id]
    assert [r.run_id for r in E.reap(mine, runtime=rt)] == [a.plan.run_id]
    assert rt.list_resources(L.selector(b.plan.run_id))  # the other project's run is untouched
    overview = E.run_overview(mine, runtime=rt)
    assert [(r["run_id"], r["this_project"]) for r in overview] == [(b.plan.run_id, False)]
    assert [r.run_id for r in E.reap(mine, runtime=rt, all_projects=True)] == [b.plan.run_id]
    assert rt.containers == {} and rt.networks == {}


def test_reap_finds_runs_labelled_by_an_older_version(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    from provisioner.runtime.recipes import NetworkRecipe

    rt = fake[0]
    # Exactly the label set of the version before the project label (no provisioner.project).
    old = L.run_labels("oldrun1", "integration", "s", owner_pid=_dead_pid())
    assert L.PROJECT not in old
    rt.create_network(NetworkRecipe("prov-oldrun1", internal=True, labels={**old, L.ROLE: L.ROLE_NETWORK}))
    E.run_dir_of(settings, "oldrun1").mkdir(parents=True)  # this project's state dir has the run
    found = E.reap(settings, runtime=rt, dry_run=True)
    assert [(r.run_id, r.reason, r.project) for r in found] == [("oldrun1", "owner gone", None)]
    assert [c.detail for c in E._check_stale(settings, rt)] == ["oldrun1: `provision reap` removes them"]
    assert [r.run_id for r in E.reap(settings, runtime=rt)] == ["oldrun1"]
    assert rt.networks == {}


def test_an_unlabelled_run_of_another_project_is_not_offered_to_reap(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """The reported case: doctor and up said `provision reap removes` r20261130-062506-4d0b96, a run
    without a project label that this project never made; following the hint removed another
    team's containers. Only --all-projects finds such a run."""
    from provisioner.runtime.recipes import NetworkRecipe

    rt = fake[0]
    run_id = "r20261130-062506-4d0b96"
    old = L.run_labels(run_id, "integration", "s", owner_pid=_dead_pid())
    rt.create_network(NetworkRecipe(f"prov-{run_id}", internal=True, labels={**old, L.ROLE: L.ROLE_NETWORK}))
    assert not E.run_dir_of(settings, run_id).exists()
    assert E._check_stale(settings, rt) == []
    assert E.list_runs(rt, E.project_of(settings), settings.state_dir) == []
    assert E.reap(settings, runtime=rt, dry_run=True) == []
    assert E.reap(settings, runtime=rt, older_than_s=0) == [] and rt.networks
    env = _up(settings, fake, layer="integration", lm_mode="mock", workers=1, persistent=False)
    assert not any(run_id in w for w in env.warnings)
    E.down(settings, run_id=env.plan.run_id, runtime=rt)
    found = E.reap(settings, runtime=rt, all_projects=True, dry_run=True)
    assert [(r.run_id, r.project) for r in found] == [(run_id, None)]  # older runs are still found by reap
    assert [r.run_id for r in E.reap(settings, runtime=rt, all_projects=True)] == [run_id]
    assert rt.networks == {}


def test_reap_keeps_a_run_with_a_live_registered_owner(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    from provisioner.runtime import watchdog as wd

    rt = fake[0]
    # The labelled owner is gone, but an xdist worker (a registered owner) is still running.
    env = _up(settings, fake, layer="integration", lm_mode="mock", workers=1, persistent=False,
              owner_pid=_dead_pid())
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wd.register_owner(E.run_dir_of(settings, env.plan.run_id), helper.pid)
        [result] = E.reap(settings, runtime=rt)
        assert result.removed == [] and f"pid {helper.pid}" in result.kept
        assert rt.list_resources(L.selector(env.plan.run_id))
    finally:
        helper.kill()
        helper.wait()
    [result] = E.reap(settings, runtime=rt)
    assert result.removed and rt.containers == {}


def test_up_refuses_a_run_id_in_use_and_leaves_that_run_alone(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt = fake[0]
    first = _up(settings, fake, layer="integration", lm_mode="mock", workers=1, run_id="taken")
    before = rt.list_resources(L.selector("taken"))
    with pytest.raises(RuntimeProblem, match="'taken' is already in use"):
        _up(settings, fake, layer="integration", lm_mode="mock", workers=1, run_id="taken", new=True)
    assert rt.list_resources(L.selector("taken")) == before
    first.stop()


def test_a_stale_current_file_does_not_hide_the_projects_run(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt = fake[0]
    env = _up(settings, fake, layer="integration", lm_mode="mock", workers=1)
    (Path(settings.state_dir) / E.CURRENT_RUN).write_text("gone1234\n")  # points at a removed run
    assert E.down(settings, runtime=rt).run_id == env.plan.run_id
    assert rt.containers == {}


def _truncated(text: str) -> str:
    return text[: len(text) // 2]  # a writer killed mid-write (before atomic writes, or a hand copy)


@pytest.mark.parametrize(
    "corrupt",
    [
        _truncated,
        lambda text: "{}",  # the reported input: RunState(**data) raised TypeError
        lambda text: "[]",
        lambda text: "",
        lambda text: json.dumps({**json.loads(text), "workers": "w0"}),
        lambda text: json.dumps({**json.loads(text), "workers": [{"slot": 0}]}),
        lambda text: "\x00\xff\xfe garbage",
    ],
    ids=["truncated", "empty-object", "list", "empty-file", "workers-not-a-list", "worker-without-address",
         "binary"],
)
def test_an_unreadable_state_file_is_reported_and_down_still_removes_the_run_by_label(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], corrupt: Any
) -> None:
    rt, workers = fake
    env = _up(settings, fake, layer="integration", lm_mode="mock", workers=1, persistent=False,
              owner_pid=_dead_pid())
    run_id = env.plan.run_id
    state_file = E.state_file_of(settings, run_id)
    state_file.write_bytes(corrupt(state_file.read_text()).encode("utf-8", "surrogateescape"))
    with pytest.raises(E.StateUnreadableError) as err:
        E.read_state(settings, run_id)
    assert err.value.path == state_file

    report = E.status(settings, run_id=run_id, runtime=rt, probe=workers.probe)
    assert not report.healthy and str(state_file) in report.state_problem
    dry = E.reap(settings, runtime=rt, dry_run=True)
    assert [(r.run_id, str(state_file) in r.state_problem) for r in dry] == [(run_id, True)]

    result = E.down(settings, run_id=run_id, runtime=rt)
    assert len(result.removed) == 4 and rt.containers == {} and rt.networks == {}  # relay, w0, 2 networks
    assert "unreadable" in result.state_problem and str(state_file) in result.state_problem
    assert E.down(settings, run_id=run_id, runtime=rt).removed == []  # still idempotent


def test_a_torn_current_file_means_no_current_run(settings: Settings) -> None:
    current = Path(settings.state_dir) / E.CURRENT_RUN
    current.parent.mkdir(parents=True, exist_ok=True)
    for text in (b"", b"\xff\xfe", b"../../etc\n", b"ab12"):
        current.write_bytes(text)
        assert E.current_run_id(settings) == ("ab12" if text == b"ab12" else None)
