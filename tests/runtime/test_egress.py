"""Running the egress guard from the host (FakeRuntime; the real engine in test_docker_isolation)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import RuntimeProblem
from provisioner.layers import get_layer
from provisioner.runtime.egress import WAIT_SLICE_S, block_host_access
from provisioner.runtime.engine import FakeContainer, FakeRuntime
from provisioner.runtime.recipes import ContainerRecipe, Owner, PlanOptions, RunTarget, plan_run
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE


def _started_worker(settings: Settings, rt: FakeRuntime) -> tuple[ContainerRecipe, str, str]:
    plan = plan_run(
        settings,
        get_layer(settings, "integration"),
        get_layer(settings, "integration").lm_config(settings.lm, "mock"),
        RunTarget("eg1", Owner.this_process()),
        FAKE_IMAGE,
        PlanOptions(workers=1),
    )
    for net in plan.networks:
        rt.create_network(net)
    worker = plan.workers[0]
    cid = rt.create_container(worker)
    rt.start_container(cid)
    return worker, cid, plan.run_network


def test_the_guard_runs_in_the_workers_namespace_with_its_gateway_and_is_removed(
    settings: Settings, tmp_path: Path
) -> None:
    seen: list[FakeContainer] = []
    rt = FakeRuntime(images=(FAKE_IMAGE,), on_start=seen.append)
    worker, cid, network = _started_worker(settings, rt)
    block_host_access(rt, worker, cid, network=network)
    guard = seen[-1].recipe
    gateway = rt.container_gateway(cid, network)
    assert guard.role == "guard" and guard.network_mode == f"container:{cid}"
    assert guard.command[-2:] == ("--gateway", gateway)
    assert ("remove_container", guard.name) in rt.calls
    assert [c.recipe.name for c in rt.containers.values()] == [worker.name]


def test_a_failing_guard_raises_with_its_exit_code_and_log_and_is_removed(settings: Settings) -> None:
    def fail_guard(c: FakeContainer) -> None:
        if c.recipe.role == "guard":
            c.exit_code = 2
            c.log_lines.append("netguard block: found no gateway to block")

    rt = FakeRuntime(images=(FAKE_IMAGE,), on_start=fail_guard)
    worker, cid, network = _started_worker(settings, rt)
    with pytest.raises(RuntimeProblem, match=r"guard of prov-eg1-w0 failed \(exit code 2\)") as info:
        block_host_access(rt, worker, cid, network=network)
    assert "found no gateway" in str(info.value)
    assert not any(c.recipe.role == "guard" for c in rt.containers.values())


class _WaitingRuntime(FakeRuntime):
    """A FakeRuntime that can wait for a container's exit (as DockerRuntime does, with the engine's
    wait): the guard's wait must use it instead of polling the state."""

    def __init__(self, *, exits_after_waits: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exits_after_waits = exits_after_waits
        self.waits: list[float] = []
        self.states = 0

    def wait_exit(self, container_id: str, timeout_s: float) -> bool:
        self.waits.append(timeout_s)
        if self.exits_after_waits is not None and len(self.waits) >= self.exits_after_waits:
            c = self._find(container_id)
            assert c is not None
            c.status, c.exit_code = "exited", 0
            return True
        return False

    def container_state(self, container_id: str) -> Any:
        self.states += 1
        return super().container_state(container_id)


def _hang(c: FakeContainer) -> None:
    if c.recipe.role == "guard":
        c.status, c.exit_code = "running", None


def test_a_runtime_that_waits_for_the_exit_is_not_polled(settings: Settings) -> None:
    rt = _WaitingRuntime(exits_after_waits=3, images=(FAKE_IMAGE,), on_start=_hang)
    worker, cid, network = _started_worker(settings, rt)
    block_host_access(rt, worker, cid, network=network, timeout_s=60)
    # Three engine waits (each a slice of WAIT_SLICE_S, so a stop is seen), then one state read.
    assert len(rt.waits) == 3 and all(0 < w <= WAIT_SLICE_S for w in rt.waits) and rt.states == 1
    assert not any(c.recipe.role == "guard" for c in rt.containers.values())


@pytest.mark.parametrize("waits", [False, True], ids=["polling-the-state", "the-engine-s-wait"])
def test_a_guard_that_hangs_times_out_and_a_stop_ends_the_wait(settings: Settings, waits: bool) -> None:
    """Whether the runtime reads the guard's state or waits for its exit (DockerRuntime.wait_exit)."""
    rt = (_WaitingRuntime(exits_after_waits=None, images=(FAKE_IMAGE,), on_start=_hang) if waits
          else FakeRuntime(images=(FAKE_IMAGE,), on_start=_hang))
    worker, cid, network = _started_worker(settings, rt)
    with pytest.raises(RuntimeProblem, match="did not finish within"):
        block_host_access(rt, worker, cid, network=network, timeout_s=0.1)
    stop = threading.Event()
    stop.set()
    with pytest.raises(RuntimeProblem, match="being stopped"):
        block_host_access(rt, worker, cid, network=network, timeout_s=60, stop=stop)
    assert not any(c.recipe.role == "guard" for c in rt.containers.values())


def test_an_engine_that_cannot_wait_hands_over_to_reading_the_state() -> None:
    # DockerRuntime.wait_exit on an engine error other than a timeout: True, so block_host_access
    # reads the state (polling) rather than spinning on a wait that fails at once.
    import docker.errors
    import requests.exceptions

    from provisioner.runtime.engine import DockerRuntime

    class _API:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def wait(self, container_id: str, **kwargs: Any) -> dict[str, int]:
            raise self.error

    class _Client:
        def __init__(self, error: Exception) -> None:
            self.api = _API(error)

    def runtime(error: Exception) -> DockerRuntime:
        return DockerRuntime(_Client(error), owns_client=False)

    assert runtime(docker.errors.APIError("500 Server Error: cannot wait")).wait_exit("c", 1) is True
    assert runtime(docker.errors.NotFound("no such container")).wait_exit("c", 1) is True
    assert runtime(requests.exceptions.ConnectionError("Read timed out.")).wait_exit("c", 1) is False
