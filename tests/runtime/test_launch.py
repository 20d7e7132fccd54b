"""The launch steps, one at a time and chained, on the in-memory engine."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from provisioner.layers import get_layer
from provisioner.runtime import labels as L
from provisioner.runtime import launch
from provisioner.runtime.deployment import Deployment
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.recipes import Owner, PlanOptions, RunTarget, plan_run
from provisioner.runtime.state import RunDir, read_state
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE, FakeWorkers


def _target(settings: Settings, mode: str, run_id: str = "r1", **kw: object) -> RunTarget:
    lm = get_layer(settings, "integration").lm_config(settings.lm, mode)  # type: ignore[arg-type]
    return launch.prepare_run_dir(
        settings, lm, RunDir.of(settings.state_dir, run_id), Owner.this_process(), **kw  # type: ignore[arg-type]
    )


def test_open_runtime_and_ensure_image_pass_given_values_through(settings: Settings) -> None:
    rt = FakeRuntime(images=(FAKE_IMAGE,))
    assert launch.open_runtime(rt, settings) is rt
    assert launch.ensure_image(rt, settings, image="mine:1") == "mine:1"


def test_prepare_run_dir_makes_the_folders_the_lm_mode_needs(settings: Settings) -> None:
    mock = _target(settings, "mock", "m1")
    assert mock.run_dir is not None and mock.run_dir.path.is_dir() and mock.lm_dir is None
    assert mock.run_id == "m1" and mock.instance is None
    assert mock.project == L.project_id(settings.project_dir)
    cached = _target(settings, "cached", "c1", instance="gw0-7")
    assert cached.run_dir is not None and cached.lm_dir == cached.run_dir.lm_dir and cached.lm_dir.is_dir()
    assert cached.instance == "gw0-7" and Path(settings.lm.cache_dir).is_dir()  # recorded into: created


def test_prepare_run_dir_leaves_a_replay_only_cassette_folder_alone_and_honours_the_lm_run_dir(
    settings: Settings, tmp_path: Path
) -> None:
    lm = get_layer(settings, "integration").lm_config(settings.lm, "cached").model_copy(
        update={"record_mode": "none", "run_dir": tmp_path / "shared-lm"}
    )
    target = launch.prepare_run_dir(settings, lm, RunDir.of(settings.state_dir, "r2"), Owner.this_process())
    assert target.lm_dir == (tmp_path / "shared-lm").resolve() and target.lm_dir.is_dir()
    assert not Path(lm.cache_dir).exists()  # mounted read-only; nothing made on its behalf


def test_start_watchdog_needs_a_prepared_target(settings: Settings) -> None:
    with pytest.raises(ValueError, match="prepare_run_dir"):
        launch.start_watchdog(settings, RunTarget("r1", Owner.this_process()))


def test_the_steps_chain_from_a_layer_to_a_recorded_deployment(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    target = _target(settings, "cached", "chain1")
    layer = get_layer(settings, "integration")
    # Cassettes recorded from the mock: no Gemini stand-in container (the fake runtime runs none).
    lm = layer.lm_config(settings.lm.model_copy(update={"cached_inner": "mock"}), "cached")
    plan = plan_run(settings, layer, lm, target, FAKE_IMAGE, PlanOptions(workers=2))
    deployment = launch.deploy(plan, rt, settings, probe=workers.probe)
    try:
        assert deployment.started and len(deployment.workers) == 2
        state = launch.record_state(settings, deployment, target, current=False)
        assert deployment.state is state and read_state(settings, "chain1") == state
        assert state.instance == "chain1" and state.lm_run_dir == str(target.lm_dir)
        assert state.image == FAKE_IMAGE and [w["name"] for w in state.workers] == [
            "prov-chain1-w0", "prov-chain1-w1"
        ]
        assert not (Path(settings.state_dir) / "current").exists()  # current=False: not the current run
    finally:
        deployment.stop()
    assert rt.containers == {} and rt.networks == {}


def _deploy(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], instance: str, name: str | None = None
) -> Deployment:
    rt, workers = fake
    target = RunTarget("shared", Owner.this_process(), instance=instance, name=name)
    layer = get_layer(settings, "integration")
    plan = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"), target, FAKE_IMAGE,
                    PlanOptions(workers=1))
    return launch.deploy(plan, rt, settings, probe=workers.probe)


def test_a_deployment_stops_only_its_own_resources(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    gw0 = _deploy(settings, fake, "gw0-1")
    gw1 = _deploy(settings, fake, "gw1-2")  # another xdist process of the same run
    dedicated = _deploy(settings, fake, "gw0-1", name="gw0-1-d1")  # same process, own deployment
    # A container of gw0 whose create call was in flight when it was stopped (never tracked).
    stray = rt.create_container(dataclasses.replace(gw0.plan.workers[0], name="prov-shared-gw0-1-w0-1"))
    assert stray in rt.containers
    gw0.stop()
    left = {c.recipe.name for c in rt.containers.values()} | {n.recipe.name for n in rt.networks.values()}
    assert not {name for name in left if name.startswith("prov-shared-gw0-1-") and "-d1" not in name}
    assert "prov-shared-gw0-1" not in left
    assert {"prov-shared-gw1-2-w0", "prov-shared-gw1-2", "prov-shared-gw0-1-d1-w0"} <= left
    assert all(c.recipe.labels[L.RUN] == "shared" for c in rt.containers.values())
    dedicated.stop()
    gw1.stop()
    assert rt.containers == {} and rt.networks == {}


def test_a_state_file_of_an_older_version_still_reads(settings: Settings) -> None:
    path = RunDir.of(settings.state_dir, "old1").state_file
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "run_id": "old1", "layer": "integration", "lm_mode": "mock", "session": "old1", "image": "i",
        "created": 1.0, "owner_pid": 1, "owner_host": "h", "persistent": True, "uses_standin": False,
        "egress": False, "networks": [], "relay": "r", "standin": None, "workers": [],
    }))
    state = read_state(settings, "old1")
    assert state is not None and state.instance == "old1"
