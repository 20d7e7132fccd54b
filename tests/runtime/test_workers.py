"""Pure parts of provisioner.runtime.workers (no Docker): names per process, leak arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.errors import ConfigError
from provisioner.layers import get_layer
from provisioner.runtime import labels as L
from provisioner.runtime.recipes import Owner, PlanOptions, RunPlan, RunTarget, plan_run
from provisioner.runtime.workers import check_leaks, process_instance, snapshot
from provisioner.settings import load_settings


def test_process_instance_names_the_xdist_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    assert process_instance() == f"gw3-{os.getpid()}"
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert process_instance().startswith("main-")


def test_a_process_plans_its_containers_under_its_instance_from_the_start(tmp_path: Path) -> None:
    settings = load_settings(project_dir=tmp_path)
    layer = get_layer(settings, "e2e")
    lm = layer.lm_config(settings.lm)

    def plan(instance: str, name: str | None = None) -> RunPlan:
        target = RunTarget("r1", Owner.this_process(), instance=instance, name=name, lm_dir=tmp_path)
        return plan_run(settings, layer, lm, target, "img:1", PlanOptions(workers=2))

    mine = plan("gw0-1")
    names = [n.name for n in mine.networks] + [c.name for c in mine.containers()]
    assert all(name.startswith("prov-r1-gw0-1-") or name == "prov-r1-gw0-1" for name in names), names
    assert {w.name for w in mine.workers} == {"prov-r1-gw0-1-w0", "prov-r1-gw0-1-w1"}
    network_names = {n.name for n in mine.networks}
    for container in mine.containers():
        assert {a.network for a in container.networks} <= network_names
        assert container.labels[L.RUN] == "r1" and container.labels[L.INSTANCE] == "gw0-1"
    for worker in mine.workers:
        assert worker.environment["PROVISION_WORKER_ID"] == worker.name
        assert worker.networks[0].aliases == (f"w{worker.slot}",)
    # Two processes of one run never share a name; a dedicated worker's deployment has its own
    # names but its process's label (the process's leak checks and close() find it).
    other, dedicated = plan("gw1-2"), plan("gw0-1", name="gw0-1-d1")
    assert not {c.name for c in other.containers()} & {c.name for c in mine.containers()}
    assert not {c.name for c in dedicated.containers()} & {c.name for c in mine.containers()}
    assert {c.labels[L.INSTANCE] for c in dedicated.containers()} == {"gw0-1"}


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


def test_ryuk_is_switched_off_at_start_up_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess
    import sys

    from provisioner.runtime.workers import RYUK_DISABLED_ENV, switch_off_ryuk

    env = {k: v for k, v in os.environ.items() if k != RYUK_DISABLED_ENV}
    code = f"import os, provisioner.runtime.workers; print(os.environ[{RYUK_DISABLED_ENV!r}])"
    loaded = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "true"  # loading the module (plugin, environment()) is enough
    monkeypatch.setenv(RYUK_DISABLED_ENV, "false")
    switch_off_ryuk()
    assert os.environ[RYUK_DISABLED_ENV] == "false"  # a user's own choice stands


def test_waiting_for_the_watchdog_ends_when_it_left_on_purpose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool no longer waits for the watchdog before deploying, but after: by then another xdist
    process may have retained a failed worker, and the watchdog left the run on purpose (its retain
    marker). That is not a watchdog that never started."""
    from types import SimpleNamespace

    from provisioner.errors import RuntimeProblem
    from provisioner.runtime import watchdog as wd
    from provisioner.runtime import workers as W

    containers = W.ProcessContainers.__new__(W.ProcessContainers)
    containers._runtime_given = False
    target = SimpleNamespace(run_dir=SimpleNamespace(path=tmp_path))
    monkeypatch.setattr(containers, "_target", lambda: target)
    monkeypatch.setattr(W, "WATCHDOG_START_TIMEOUT_S", 0.2)
    (tmp_path / wd.LOG_FILE).write_text("watchdog[1] could not open the engine\n")
    with pytest.raises(RuntimeProblem, match=r"did not start within 0s; its log:\nwatchdog\[1\] could not"):
        containers._wait_watchdog()
    (tmp_path / wd.RETAIN_MARKER).touch()
    containers._wait_watchdog()  # kept for debugging by another process: nothing to wait for
