"""Killed parts against the real engine (issue 14, items 6 and 9): a SIGKILLed pytest controller under
xdist, and a worker container killed in the middle of a pooled run.

Deadlines are generous (the machine is shared); the seconds themselves are measured by
benchmarks/bench_controller_kill.py, never asserted here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .._helpers import end_run, lives, run_processes, run_resources, scratch_env, start_held_run

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]


def _poll(check: Callable[[], bool], deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {deadline_s:.0f}s")
        time.sleep(0.1)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
@pytest.mark.parametrize("sigint", ["ignored", "default"])
def test_sigkill_of_the_xdist_controller_removes_the_run_and_its_workers(
    docker_engine: Any, tmp_path: Path, sigint: str, request: pytest.FixtureRequest
) -> None:
    """`pytest -n 2` (a container layer, one pool shared by both xdist workers), the controller SIGKILLed
    while both workers run a test: every container and network of the run goes, and no process of it is
    left — also when SIGINT is ignored, as in a script's background job (xdist's workers then never
    see execnet's interrupt)."""
    import psutil

    if sigint == "default":  # also when this pytest inherited SIGINT ignored (a background job)
        request.getfixturevalue("sigint_default")
    proc, out = start_held_run(tmp_path, "killed-controller",
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=_ignore_sigint if sigint == "ignored" else None)
    run_id = ""
    try:
        _poll(lambda: len(list(out.iterdir())) == 2 or proc.poll() is not None, 300, "both tests starting")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        run_id = next((tmp_path / ".provision" / "runs").iterdir()).name
        # One pool per run (6e51c80): the relay and the pool's worker, shared by both xdist processes.
        assert len([r for r in run_resources(docker_engine, run_id) if r.startswith("container")]) >= 2
        workers = psutil.Process(proc.pid).children()
        watchdogs = [p for p in run_processes(run_id) if "runtime.watchdog" in " ".join(p.cmdline())]
        assert len(workers) == 2 and len(watchdogs) == 1, (workers, watchdogs)
        run_dir = tmp_path / ".provision" / "runs" / run_id
        entries = sorted(p.read_text() for p in (run_dir / "owners").iterdir())
        # The xdist workers registered as the controller's dependants.
        controller = f"{proc.pid}-{psutil.Process(proc.pid).create_time():.3f}"
        assert entries == [f"dependant of {controller}\n"] * 2, entries

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _poll(lambda: not run_resources(docker_engine, run_id), 30, "removal of every container and network")
        _poll(lambda: not any(lives(p) for p in [*workers, *watchdogs]), 30, "the end of its processes")
        log = (run_dir / "watchdog.log").read_text()
        assert "2 orphaned dependant(s)" in log, log
    finally:
        from provisioner.runtime.engine import DockerRuntime

        end_run(proc, run_id, DockerRuntime(docker_engine))



@pytest.mark.slow
@pytest.mark.usefixtures("sigint_default")  # the pytest it starts has SIGINT at its default, as in a terminal
def test_ctrl_c_of_an_xdist_run_ends_it_says_so_and_leaves_nothing(
    docker_engine: Any, tmp_path: Path
) -> None:
    """Ctrl-C in a terminal (SIGINT to the process group of `pytest -n 2`: the controller and both
    xdist workers) while both workers hold a session of the run's one pool: pytest ends with status 2
    and says it was interrupted; the controller removes the shared pool only after its workers ended,
    so no worker is repaired or replaced while the run goes and their reports are counted (the pool's
    worker is in "workers started"); nothing of the run is left. (It used to remove the pool under
    the workers' teardown: they waited to heal it, re-created a relay on a network being removed, and
    the summary said 0 workers.) The seconds are measured by benchmarks/bench_controller_kill.py."""
    proc, out = start_held_run(tmp_path, "interrupted", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_id = ""
    try:
        _poll(lambda: len(list(out.iterdir())) == 2 or proc.poll() is not None, 300, "both tests starting")
        assert proc.poll() is None, proc.communicate()[0].decode()
        run_id = next((tmp_path / ".provision" / "runs").iterdir()).name
        processes = [*_children(proc.pid), *run_processes(run_id)]
        os.killpg(proc.pid, signal.SIGINT)
        try:
            output = proc.communicate(timeout=120)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"pytest -n 2 did not end within 120 s of Ctrl-C:\n{proc.communicate()[0].decode()}")
        assert proc.returncode == 2, output  # pytest's "interrupted"
        assert "interrupted (Ctrl-C)" in output and "workers started: 1" in output, output
        for sign in ("replacing it", "repairing the published path", "CleanupError", "active endpoints"):
            assert sign not in output, output
        _poll(lambda: not run_resources(docker_engine, run_id), 30, "removal of every container and network")
        _poll(lambda: not any(lives(p) for p in processes), 30, "the end of the run's processes")
    finally:
        from provisioner.runtime.engine import DockerRuntime

        end_run(proc, run_id, DockerRuntime(docker_engine))


def _children(pid: int) -> list[Any]:
    import psutil

    return list(psutil.Process(pid).children(recursive=True))


POOLED = '''
import json
import os
import threading
import time

import docker
import pytest

from provisioner.errors import WorkerLostError

OUT = {out!r}


def _state(name):
    try:
        return docker.from_env().api.inspect_container(name)["State"]["Status"]
    except docker.errors.NotFound:
        return "missing"


def _use(bridge):
    bridge.create_program("question -> answer", "p")
    assert "answer" in bridge.execute_program("p", {{"question": "q"}})["outputs"]


@pytest.mark.e2e
@pytest.mark.parametrize("n", range(1, 3))
def test_before(bridge, bridge_pool, n):
    _use(bridge)
    if n == 1:  # two sessions at once: the pool grows to its two workers (it starts one)
        extra = bridge_pool.open_session("second-session-at-once")
        bridge_pool.close_session(extra.session_id)
        deadline = time.monotonic() + 240
        while len(bridge_pool.stats()["workers"]) < 2:
            assert time.monotonic() < deadline, bridge_pool.stats()
            time.sleep(0.2)


@pytest.mark.e2e
def test_kills_its_worker_mid_execution(bridge, bridge_pool):
    pinned = bridge_pool.session(bridge.session_id)
    container = bridge_pool.environment.worker(pinned.slot).container_id
    bridge.create_program("question -> answer", "p")
    bridge.execute_program("p", {{"question": "warm"}})
    killer = threading.Timer(0.2, docker.from_env().api.kill, [container])
    killer.start()
    deadline = time.monotonic() + 60
    with pytest.raises(WorkerLostError) as lost:
        while time.monotonic() < deadline:
            bridge.execute_program("p", {{"question": "q"}})
    killer.join()
    with open(os.path.join(OUT, "lost.txt"), "w") as fh:
        fh.write(str(lost.value))


@pytest.mark.e2e
@pytest.mark.parametrize("n", range(4, 9))
def test_after(bridge, bridge_pool, n):
    _use(bridge)
    if n == 8:  # the last test: the pool is back to its full size
        deadline = time.monotonic() + 120
        while True:
            stats = bridge_pool.stats()
            states = [_state(w["name"]) for w in stats["workers"]]
            if stats["replacing"] == 0 and states == ["running"] * len(states):
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)
        with open(os.path.join(OUT, "stats.json"), "w") as fh:
            json.dump({{**stats, "states": states}}, fh)
'''


def test_a_killed_pool_worker_is_replaced_and_the_other_tests_pass(
    docker_engine: Any, tmp_path: Path
) -> None:
    """Eight tests on a pool of two (grown on demand by the first); the third `docker kill`s its
    worker while executing: it gets
    WorkerLostError saying how the worker ended, its teardown does not error, the other seven pass
    (none pinned to the dead worker) and the pool ends at its full size, the dead slot replaced behind
    the same address (issue 14, item 6)."""
    import json

    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'killed-worker'\n")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "test_pooled.py").write_text(POOLED.format(out=str(out)))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "--layer", "e2e", "--lm", "mock",
         "-p", "no:cacheprovider", "-o", "log_level=WARNING", "test_pooled.py"],
        cwd=tmp_path, env=scratch_env(tmp_path), capture_output=True, text=True, timeout=500,
    )
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0 and "8 passed" in summary, done.stdout + done.stderr
    assert "error" not in summary, done.stdout  # no teardown errors
    lost = (out / "lost.txt").read_text()
    assert "exited with code 137 (SIGKILL)" in lost and "Open a new session" in lost, lost
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["workers"]) == 2 and stats["states"] == ["running", "running"]
    assert stats["replaced"] == 1 and sorted(w["generation"] for w in stats["workers"]) == [0, 1], stats
    assert any("cleanup of session" in note and "skipped" in note for note in stats["notes"]), stats["notes"]
    run_id = next((tmp_path / ".provision" / "runs").iterdir()).name
    assert run_resources(docker_engine, run_id) == []  # the replacement was removed with the rest
