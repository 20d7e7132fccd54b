"""Pure parts of provisioner.runtime.workers (no Docker): names per process, leak arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.errors import ConfigError
from provisioner.layers import get_layer
from provisioner.runtime import labels as L
from provisioner.runtime.recipes import plan_run
from provisioner.runtime.workers import check_leaks, namespaced, process_instance, snapshot
from provisioner.settings import load_settings


def test_process_instance_names_the_xdist_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    assert process_instance() == f"gw3-{os.getpid()}"
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert process_instance().startswith("main-")


def test_namespaced_plan_renames_everything_but_keeps_run_labels(tmp_path: Path) -> None:
    settings = load_settings(project_dir=tmp_path)
    layer = get_layer(settings, "e2e")
    lm = get_layer(settings, "e2e").lm_config(settings.lm)
    plan = plan_run(
        settings, layer, lm, run_id="r1", image="img:1", workers=2, session="gw0-1", run_dir=tmp_path
    )
    renamed = namespaced(plan, "gw0-1")
    names = [n.name for n in renamed.networks] + [c.name for c in renamed.containers()]
    assert all(name.startswith("prov-r1-gw0-1") for name in names), names
    assert {w.name for w in renamed.workers} == {"prov-r1-gw0-1-w0", "prov-r1-gw0-1-w1"}
    network_names = {n.name for n in renamed.networks}
    for container in renamed.containers():
        assert {a.network for a in container.networks} <= network_names
        assert container.labels[L.RUN] == "r1" and container.labels[L.SESSION] == "gw0-1"
    for worker in renamed.workers:
        assert worker.environment["PROVISION_WORKER_ID"] == worker.name
        assert worker.networks[0].aliases == plan.workers[worker.slot or 0].networks[0].aliases
    # Two processes of one run never share a name.
    other = namespaced(plan, "gw1-2")
    assert not {c.name for c in other.containers()} & {c.name for c in renamed.containers()}


def test_leak_arithmetic_without_containers() -> None:
    before = snapshot(None)
    assert check_leaks(before, None, "t") == []
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        found = check_leaks(before, None, "t")
        assert any(kind == "process" and name.startswith(f"{child.pid} ") for kind, name in found), found
    finally:
        child.kill()
        child.wait()
    assert check_leaks(before, None, "t") == []


def test_pool_belongs_to_pooled_layers(tmp_path: Path) -> None:
    from provisioner.api import open_environment

    env = open_environment("integration", project_dir=tmp_path)
    try:
        with pytest.raises(ConfigError, match="pooling_enabled = false"):
            _ = env.pool
    finally:
        env.close()
    unit = open_environment("unit", project_dir=tmp_path)
    try:
        with pytest.raises(ConfigError, match="needs a container layer"), unit.dedicated_worker("x"):
            pass
    finally:
        unit.close()
