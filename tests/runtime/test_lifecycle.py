"""up/down/status/reap on the in-memory engine: state and env files, projects, stale and unreadable runs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import AmbiguousRunError, ConfigError, RuntimeProblem, StateUnreadableError
from provisioner.layers import get_layer
from provisioner.lm.limits import read_run_limits
from provisioner.run import check_run_id
from provisioner.runtime import labels as L
from provisioner.runtime.deployment import Deployment
from provisioner.runtime.doctor import _check_stale
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.lifecycle import UpOptions, down, parse_duration, reap, run_overview, status, up
from provisioner.runtime.runs import list_runs, project_of
from provisioner.runtime.state import CURRENT_RUN, current_run_id, read_state, run_dir_of
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE, FakeWorkers


def test_up_writes_state_and_a_sourceable_env_file_and_down_is_idempotent(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    env = _up(settings, fake, layer="integration", lm_mode="mock", workers=2)
    assert env.state is not None
    run_id = env.state.run_id
    state_file = run_dir_of(settings, run_id).state_file
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
    report = status(settings, runtime=rt, probe=workers.probe)
    assert report.healthy and [w.healthy for w in report.workers] == [True, True]
    rt.crash(env.workers[0].container_id)
    assert not status(settings, runtime=rt, probe=workers.probe).healthy

    first = down(settings, runtime=rt)
    assert first.run_id == run_id and len(first.removed) == 5  # relay, 2 workers, 2 networks
    assert rt.containers == {} and rt.networks == {}
    assert down(settings, runtime=rt).removed == []
    assert down(settings, run_id=run_id, runtime=rt).removed == []
    assert json.loads(state_file.read_text())["status"] == "down" and not current.exists()


def test_up_refuses_the_in_process_layer_and_a_missing_key_when_required(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    with pytest.raises(ConfigError, match="in-process"):
        up(settings, UpOptions(layer="unit", image=FAKE_IMAGE, watchdog=False), runtime=rt)
    with pytest.raises(ConfigError, match="require-key"):
        up(settings, UpOptions(layer="e2e", require_key=True, image=FAKE_IMAGE, watchdog=False), runtime=rt)
    assert rt.calls == []


def _up(settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], **options: Any) -> Deployment:
    """``lifecycle.up`` on the fake runtime, its fake workers' probe, and no watchdog process."""
    runtime, workers = fake
    options.setdefault("image", FAKE_IMAGE)
    options.setdefault("watchdog", False)
    return up(settings, UpOptions(**options), runtime=runtime, probe=workers.probe)


def test_up_builds_the_worker_image_through_the_runtimes_image_store(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from provisioner.runtime import images

    rt, _ = fake
    rt.add_image(images.PYTHON_BASE)
    monkeypatch.setenv("PROVISION_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "wheelhouse").mkdir()
    monkeypatch.setattr(images, "ensure_wheelhouse", lambda *_a, **_k: tmp_path / "wheelhouse")
    env = _up(settings, fake, layer="integration", lm_mode="mock", workers=1, image=None)
    tag = images.worker_tag(rt)
    assert tag is not None and rt.builds == [tag]  # no `image=` needed on a runtime other than Docker's
    assert {c.recipe.image for c in rt.containers.values()} == {tag}
    built = rt.image(tag)
    assert built is not None and images.project_tag(project_of(settings)) in built.tags
    env.stop()


def test_the_control_token_goes_to_the_env_files_only_and_the_limits_file_to_the_run_dir(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    # Cassettes recorded from the mock: no Gemini stand-in container (the fake runtime runs none).
    settings = settings.model_copy(update={"lm": settings.lm.model_copy(update={"cached_inner": "mock"})})
    env = _up(settings, fake, layer="integration", lm_mode="cached", workers=1, persistent=True)
    assert env.state is not None and env.control_token
    token = env.control_token
    run_dir = run_dir_of(settings, env.state.run_id)
    assert token not in run_dir.state_file.read_text()
    for env_file in (run_dir.env_file, Path(settings.state_dir) / "current.env"):
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
    lm = get_layer(settings, "integration").lm_config(settings.lm, "cached")
    assert limits == {"rate_limit_rpm": lm.rate_limit_rpm, "cost_limit_usd": lm.cost_limit_usd,
                      "rate_limit_wait_s": lm.rate_limit_wait_s}
    down(settings, runtime=rt)
    assert token not in run_dir.env_file.read_text()  # a run that is down has no token


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
    runs = {r.run_id: r for r in list_runs(rt)}
    assert set(runs) == ids and runs[stale.plan.run_id].stale and not runs[mine.plan.run_id].stale

    later = _up(settings, fake, layer="integration", lm_mode="mock", workers=1, new=True)
    assert any(stale.plan.run_id in w for w in later.warnings)  # up warns about stale runs

    dry = reap(settings, runtime=rt, dry_run=True)
    assert [r.run_id for r in dry] == [stale.plan.run_id] and len(rt.list_resources(L.selector())) == 16
    reaped = reap(settings, runtime=rt)
    assert [(r.run_id, r.reason) for r in reaped] == [(stale.plan.run_id, "owner gone")]
    assert rt.list_resources(L.selector(stale.plan.run_id)) == []
    assert reap(settings, runtime=rt) == []
    assert reap(settings, runtime=rt, older_than_s=3600) == []  # all younger than an hour
    assert [r.run_id for r in reap(settings, runtime=rt, run_id=kept.plan.run_id)] == [kept.plan.run_id]
    # Owned by this (live) process: kept, and said so, unless forced.
    held = reap(settings, runtime=rt, all_runs=True)
    assert {r.run_id for r in held} == {mine.plan.run_id, later.plan.run_id}
    assert all(r.removed == [] and f"pid {os.getpid()}" in r.kept and "--force" in r.kept for r in held)
    assert len(list_runs(rt)) == 2
    forced = reap(settings, runtime=rt, all_runs=True, force=True)
    assert {r.run_id for r in forced} == {mine.plan.run_id, later.plan.run_id}
    assert all(r.removed and not r.kept for r in forced)
    assert rt.containers == {} and rt.networks == {}


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--older-than"):
        parse_duration("soon")


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
    assert current_run_id(settings) == first.plan.run_id
    other_layer = _up(settings, fake, layer="e2e", lm_mode="mock", workers=1, owner_pid=_dead_pid())
    assert other_layer.state is not None  # another layer of the project is not "the same run"
    assert down(settings, run_id=other_layer.plan.run_id, runtime=rt).removed

    second = _up(settings, fake, layer="integration", lm_mode="mock", workers=1, new=True)
    with pytest.raises(AmbiguousRunError) as many:
        down(settings, runtime=rt)
    assert set(many.value.candidates) == {first.plan.run_id, second.plan.run_id}
    assert first.plan.run_id in str(many.value) and "--run" in str(many.value)
    # When each started, in UTC like every time the CLI shows (it said the host's local time, unmarked).
    started = r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
    assert re.search(rf"{first.plan.run_id} \(layer integration, {started}\)", str(many.value)), many.value
    with pytest.raises(AmbiguousRunError):
        status(settings, runtime=rt, probe=fake[1].probe)
    assert down(settings, run_id=first.plan.run_id, runtime=rt).removed
    # One left: down without --run finds it.
    assert down(settings, runtime=rt).run_id == second.plan.run_id
    assert rt.containers == {} and rt.networks == {}


def test_down_and_status_find_the_projects_run_without_a_current_file(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    env = _up(settings, fake, layer="integration", lm_mode="mock", workers=1)
    (Path(settings.state_dir) / CURRENT_RUN).unlink()  # e.g. the state dir was cleaned
    assert status(settings, runtime=rt, probe=workers.probe).run_id == env.plan.run_id
    assert down(settings, runtime=rt).run_id == env.plan.run_id
    assert rt.containers == {}


def test_runs_carry_the_project_and_reap_stays_in_its_project(
    tmp_path: Path, fake: tuple[FakeRuntime, FakeWorkers], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rt = fake[0]
    mine, theirs = _project_settings(tmp_path, "mine"), _project_settings(tmp_path, "theirs")
    assert project_of(mine) != project_of(theirs)
    a = _up(mine, fake, layer="integration", lm_mode="mock", workers=1, persistent=False,
            owner_pid=_dead_pid())
    b = _up(theirs, fake, layer="integration", lm_mode="mock", workers=1, persistent=False,
            owner_pid=_dead_pid())
    for ref in rt.list_resources(L.selector(a.plan.run_id)):
        assert ref.labels[L.PROJECT] == project_of(mine)
    assert [r.run_id for r in list_runs(rt, project_of(mine))] == [a.plan.run_id]
    assert [r.run_id for r in reap(mine, runtime=rt, older_than_s=0, dry_run=True)] == [a.plan.run_id]
    assert [r.run_id for r in reap(mine, runtime=rt)] == [a.plan.run_id]
    assert rt.list_resources(L.selector(b.plan.run_id))  # the other project's run is untouched
    overview = run_overview(mine, runtime=rt)
    assert [(r["run_id"], r["this_project"]) for r in overview] == [(b.plan.run_id, False)]
    assert [r.run_id for r in reap(mine, runtime=rt, all_projects=True)] == [b.plan.run_id]
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
    run_dir_of(settings, "oldrun1").path.mkdir(parents=True)  # this project's state dir has the run
    found = reap(settings, runtime=rt, dry_run=True)
    assert [(r.run_id, r.reason, r.project) for r in found] == [("oldrun1", "owner gone", None)]
    assert [c.detail for c in _check_stale(settings, rt)] == ["oldrun1: `provision reap` removes them"]
    assert [r.run_id for r in reap(settings, runtime=rt)] == ["oldrun1"]
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
    assert not run_dir_of(settings, run_id).path.exists()
    assert _check_stale(settings, rt) == []
    assert list_runs(rt, project_of(settings), settings.state_dir) == []
    assert reap(settings, runtime=rt, dry_run=True) == []
    assert reap(settings, runtime=rt, older_than_s=0) == [] and rt.networks
    env = _up(settings, fake, layer="integration", lm_mode="mock", workers=1, persistent=False)
    assert not any(run_id in w for w in env.warnings)
    down(settings, run_id=env.plan.run_id, runtime=rt)
    found = reap(settings, runtime=rt, all_projects=True, dry_run=True)
    assert [(r.run_id, r.project) for r in found] == [(run_id, None)]  # older runs are still found by reap
    assert [r.run_id for r in reap(settings, runtime=rt, all_projects=True)] == [run_id]
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
        wd.register_owner(run_dir_of(settings, env.plan.run_id).path, helper.pid)
        [result] = reap(settings, runtime=rt)
        assert result.removed == [] and f"pid {helper.pid}" in result.kept
        assert rt.list_resources(L.selector(env.plan.run_id))
    finally:
        helper.kill()
        helper.wait()
    [result] = reap(settings, runtime=rt)
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


def test_up_names_runs_like_pytest_and_refuses_an_id_unfit_for_container_names(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt = fake[0]
    with pytest.raises(ConfigError, match="'Bad Run!' must be 3-41 characters"):
        _up(settings, fake, layer="integration", lm_mode="mock", workers=1, run_id="Bad Run!")
    assert rt.containers == {}
    deployment = _up(settings, fake, layer="integration", lm_mode="mock", workers=1)
    try:
        # One run id format for `provision up`, pytest and provisioner.environment().
        assert re.fullmatch(r"r\d{8}-\d{6}-[0-9a-f]{6}", deployment.state.run_id)
        assert check_run_id(deployment.state.run_id) == deployment.state.run_id
    finally:
        deployment.stop()


def test_a_stale_current_file_does_not_hide_the_projects_run(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt = fake[0]
    env = _up(settings, fake, layer="integration", lm_mode="mock", workers=1)
    (Path(settings.state_dir) / CURRENT_RUN).write_text("gone1234\n")  # points at a removed run
    assert down(settings, runtime=rt).run_id == env.plan.run_id
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
    state_file = run_dir_of(settings, run_id).state_file
    state_file.write_bytes(corrupt(state_file.read_text()).encode("utf-8", "surrogateescape"))
    with pytest.raises(StateUnreadableError) as err:
        read_state(settings, run_id)
    assert err.value.path == state_file

    report = status(settings, run_id=run_id, runtime=rt, probe=workers.probe)
    assert not report.healthy and str(state_file) in report.state_problem
    dry = reap(settings, runtime=rt, dry_run=True)
    assert [(r.run_id, str(state_file) in r.state_problem) for r in dry] == [(run_id, True)]

    result = down(settings, run_id=run_id, runtime=rt)
    assert len(result.removed) == 4 and rt.containers == {} and rt.networks == {}  # relay, w0, 2 networks
    assert "unreadable" in result.state_problem and str(state_file) in result.state_problem
    assert down(settings, run_id=run_id, runtime=rt).removed == []  # still idempotent


# --- a runtime opened here is closed here, on every path ------------------------------------------


class _Counting(FakeRuntime):
    def __init__(self, *, broken: bool = False) -> None:
        super().__init__(images=(FAKE_IMAGE,))
        self.broken = broken
        self.closed = 0

    def list_resources(self, selector: Any) -> Any:
        if self.broken:
            raise RuntimeProblem("the engine answered 500")
        return super().list_resources(selector)

    def close(self) -> None:
        self.closed += 1
        super().close()


@pytest.mark.parametrize("broken", [False, True], ids=["ok", "engine error"])
def test_lifecycle_functions_close_the_runtime_they_open(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, broken: bool
) -> None:
    """down/status/reap/run_overview/doctor/up without ``runtime=`` open the engine's runtime (a
    docker-py client with its connection pool) and close it — also when the engine fails mid-way."""
    from provisioner.runtime.doctor import doctor

    made: list[_Counting] = []

    def open_runtime(_settings: Any = None, **_kw: Any) -> _Counting:
        made.append(_Counting(broken=broken))
        return made[-1]

    monkeypatch.setattr("provisioner.runtime.engine.open_runtime", open_runtime)
    calls = {
        "down": lambda: down(settings),
        "status": lambda: status(settings),
        "reap": lambda: reap(settings),
        "run_overview": lambda: run_overview(settings),
        "doctor": lambda: doctor(settings),
        "up": lambda: up(settings, UpOptions(layer="integration", lm_mode="mock", image=FAKE_IMAGE,
                                             run_id="Not Valid", watchdog=False)),
    }
    for name, call in calls.items():
        before = len(made)
        with contextlib.suppress(RuntimeProblem, ConfigError):
            call()
        assert len(made) == before + 1, name
        assert made[-1].closed == 1, name


def test_a_deployment_up_opened_the_runtime_for_closes_it_when_stopped(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _Counting()
    monkeypatch.setattr("provisioner.runtime.engine.open_runtime", lambda *_a, **_kw: engine)
    env = up(settings, UpOptions(layer="integration", lm_mode="mock", image=FAKE_IMAGE, watchdog=False),
             probe=FakeWorkers(engine).probe)
    assert env.owns_runtime and engine.closed == 0  # the deployment still uses it
    env.stop()
    assert engine.closed == 1 and engine.containers == {}
    given = up(settings, UpOptions(layer="integration", lm_mode="mock", image=FAKE_IMAGE, watchdog=False),
               runtime=engine, probe=FakeWorkers(engine).probe)
    given.stop()
    assert not given.owns_runtime and engine.closed == 1  # a runtime handed in stays the caller's


def test_a_shards_up_writes_its_share_of_the_limits_for_its_workers(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """`provision up` in one of 4 CI shards (PROVISION_LM__SHARDS=4): the limits file the worker
    containers enforce holds the shard's share, and the workers' LM configuration says it is one."""
    rt, _ = fake
    # cached_inner = mock: no Gemini stand-in container, which the fake runtime does not run.
    sharded = settings.model_copy(
        update={"lm": settings.lm.model_copy(update={"shards": 4, "cached_inner": "mock"})})
    env = _up(sharded, fake, layer="integration", lm_mode="cached", workers=1, persistent=True)
    try:
        assert env.state is not None and env.state.lm_run_dir is not None
        limits = read_run_limits(Path(env.state.lm_run_dir))
        assert limits is not None
        assert limits["cost_limit_usd"] == pytest.approx(settings.lm.cost_limit_usd / 4)
        assert limits["rate_limit_rpm"] == settings.lm.rate_limit_rpm // 4
        worker = next(c for c in rt.containers.values() if c.recipe.role == "worker")
        handed = json.loads(worker.recipe.environment["PROVISION_LM_CONFIG"])
        assert (handed["shards"], handed["limits_share_of"]) == (1, 4)
        assert handed["cost_limit_usd"] == pytest.approx(settings.lm.cost_limit_usd / 4)
    finally:
        down(sharded, runtime=rt)
