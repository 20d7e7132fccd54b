"""Killed parts against the real engine (issue 14, items 6 and 9): a SIGKILLed pytest controller under
xdist, and a worker container killed in the middle of a pooled run.

Deadlines are generous (the machine is shared); the seconds themselves are measured by
benchmarks/bench_controller_kill.py, never asserted here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]


def _scratch_env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PROVISION_") and k not in ("GEMINI_TEST_API_KEY", "TEST_MODE", "LM_CACHE_DIR")
    }
    env["PROVISION_LM__CACHE_DIR"] = str(tmp_path / "cassettes")
    return env


def _resources(client: Any, run_id: str) -> list[str]:
    labels = {"label": [f"provisioner.run={run_id}"]}
    return [f"container {c['Names'][0]}" for c in client.api.containers(all=True, filters=labels)] + [
        f"network {n['Name']}" for n in client.api.networks(filters=labels)
    ]


def _run_processes(run_id: str) -> list[Any]:
    """Live processes of the run: the watchdog names the run on its command line, pytest's processes
    carry it in their environment once they joined it."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            if run_id in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
    return found


def _poll(check: Callable[[], bool], deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {deadline_s:.0f}s")
        time.sleep(0.1)


def _lives(proc: Any) -> bool:
    import psutil

    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


HOLD = '''
import os
import time

import pytest


@pytest.mark.integration
@pytest.mark.parametrize("n", range(2))
def test_hold(isolated, n):
    isolated.adapter.ping()
    open(os.path.join({out!r}, "started-" + os.environ.get("PYTEST_XDIST_WORKER", "main")), "w").close()
    time.sleep(600)
'''


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sigint", ["ignored", "default"])
def test_sigkill_of_the_xdist_controller_removes_the_run_and_its_workers(
    docker_engine: Any, tmp_path: Path, sigint: str
) -> None:
    """`pytest -n 2` (a container layer, one pool per xdist worker), the controller SIGKILLed while
    both workers run a test: every container and network of the run goes, and no process of it is
    left — also when SIGINT is ignored, as in a script's background job (xdist's workers then never
    see execnet's interrupt)."""
    import psutil

    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'killed-controller'\n")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "test_hold.py").write_text(HOLD.format(out=str(out)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--layer", "integration", "--lm", "mock",
         "-p", "no:cacheprovider", "test_hold.py"],
        cwd=tmp_path, env=_scratch_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, preexec_fn=_ignore_sigint if sigint == "ignored" else None,
    )
    run_id = ""
    try:
        _poll(lambda: len(list(out.iterdir())) == 2 or proc.poll() is not None, 300, "both tests starting")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        run_id = next((tmp_path / ".provision" / "runs").iterdir()).name
        assert len([r for r in _resources(docker_engine, run_id) if r.startswith("container")]) >= 4
        workers = psutil.Process(proc.pid).children()
        watchdogs = [p for p in _run_processes(run_id) if "runtime.watchdog" in " ".join(p.cmdline())]
        assert len(workers) == 2 and len(watchdogs) == 1, (workers, watchdogs)
        run_dir = tmp_path / ".provision" / "runs" / run_id
        entries = sorted(p.read_text() for p in (run_dir / "owners").iterdir())
        # The xdist workers registered as the controller's dependants.
        controller = f"{proc.pid}-{psutil.Process(proc.pid).create_time():.3f}"
        assert entries == [f"dependant of {controller}\n"] * 2, entries

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _poll(lambda: not _resources(docker_engine, run_id), 30, "removal of every container and network")
        _poll(lambda: not any(_lives(p) for p in [*workers, *watchdogs]), 30, "the end of its processes")
        log = (run_dir / "watchdog.log").read_text()
        assert "2 orphaned dependant(s)" in log, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
        if run_id:
            from provisioner.runtime.engine import DockerRuntime, remove_by_selector
            from provisioner.runtime.labels import selector

            for p in _run_processes(run_id):
                with contextlib.suppress(Exception):
                    p.kill()
            remove_by_selector(DockerRuntime(docker_engine), selector(run_id))
