"""Against the real engine: each container layer up, healthy, used and down — through the CLI, as a
user would — plus the crash paths (SIGKILL of `provision run`, Ctrl-C during `up`) and compose.

Every test removes what it started in a fixture (:func:`sweep`), also when it fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioner.bridge.client import BridgeClient
from provisioner.lm.ledger import read_ledger
from provisioner.runtime import labels as L
from provisioner.runtime import netguard
from provisioner.runtime.engine import DockerRuntime, remove_by_selector

from .._helpers import scratch_env
from .conftest import leftovers

# The first session on a fresh machine builds the image (debootstrap base, wheelhouse): allow for it.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]
PROVISION = [sys.executable, "-m", "provisioner.cli"]
ROOT = Path(__file__).resolve().parents[2]


def _project(tmp_path: Path) -> dict[str, str]:
    """A scratch project folder; the environment for `provision` run inside it (no key, no overrides)."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'scratch'\n")
    env = scratch_env(tmp_path)
    return env


def _provision(
    tmp_path: Path, env: dict[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*PROVISION, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    if check and done.returncode != 0:
        pytest.fail(f"provision {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


Sweep = Callable[[dict[str, str]], None]


@pytest.fixture
def sweep(docker_engine: Any) -> Iterator[Sweep]:
    """``sweep(selector)``: whatever carries these labels is removed when the test ends, pass or fail."""
    selectors: list[dict[str, str]] = []
    yield selectors.append
    rt = DockerRuntime(docker_engine)
    for selector in selectors:
        remove_by_selector(rt, selector)


def _health(docker_engine: Any, name: str) -> str:
    state = docker_engine.api.inspect_container(name)["State"]
    return str((state.get("Health") or {}).get("Status", "none"))


@pytest.mark.parametrize("layer", ["integration", "e2e"])
def test_layer_up_status_use_down(
    docker_engine: Any, worker_image: str, tmp_path: Path, layer: str, sweep: Sweep
) -> None:
    env = _project(tmp_path)
    run_id = f"{layer[:5]}{os.getpid()}"
    sweep(L.selector(run_id))
    up = json.loads(
        _provision(
            tmp_path, env, "up", "--layer", layer, "--workers", "2", "--run-id", run_id, "--json"
        ).stdout
    )
    assert up["run_id"] == run_id
    try:
        # The content-hashed image (the same as worker_image unless the source changed meanwhile).
        assert (
            up["layer"] == layer and up["image"].startswith("provisioner-worker:") and len(up["workers"]) == 2
        )
        status = json.loads(_provision(tmp_path, env, "status", "--json").stdout)
        assert status["healthy"] and all(w["lm_configured"] for w in status["workers"])
        address = up["workers"][0]["address"]
        host, port = address.rsplit(":", 1)
        rt = DockerRuntime(docker_engine)
        # Cached and stand-in runs never need the internet: their workers' network is internal.
        assert docker_engine.api.inspect_network(f"prov-{run_id}")["Internal"] is True
        if layer == "integration":
            # No key: its misses are recorded from the run's Gemini stand-in (cached_inner "real"),
            # as real mode's calls are; never a route out.
            assert up["lm_mode"] == "cached" and up["uses_standin"]
            assert up["standin"] and not up["egress"]
            # The run's shared LM directory is writable from inside the (non-root) worker.
            code, out = rt.exec(up["workers"][0]["name"], ["sh", "-c", "id -u && touch /provision/run/probe"])
            assert code == 0 and out.split()[0] != "0", out
            assert (Path(up["lm_run_dir"]) / "probe").exists()
        else:
            assert up["lm_mode"] == "real" and up["uses_standin"]  # no key: the stand-in container
            assert up["standin"] and not up["egress"]
            with BridgeClient(host, int(port), request_timeout=60) as client:
                session = client.session("e2e-check")
                session.create_program({"inputs": ["question"], "outputs": ["answer"]}, "qa")
                result = session.execute_program("qa", {"question": "What is 2+2?"})
            assert "answer" in result["outputs"]
            # The real-mode engine spoke to the stand-in and wrote the run's shared ledger on the host.
            assert any(Path(up["lm_run_dir"]).iterdir())
            # Stand-in calls are not money (issue 9): marked, $0 billed, list price kept for the limit.
            calls = [e for e in read_ledger(Path(up["lm_run_dir"]) / "ledger.jsonl") if e["event"] == "call"]
            assert calls and all(e["endpoint"] == "standin" and e["cost_usd"] == 0 for e in calls)
            assert all(e["list_cost_usd"] > 0 for e in calls)
            report = json.loads(_provision(tmp_path, env, "cost", "report", "--run", run_id, "--json").stdout)
            assert report["total"]["cost_usd"] == 0 and report["total"]["standin_calls"] == len(calls)
            # The stand-in sits behind the egress guard too, and reports healthy on its own check.
            _, routes = rt.exec(up["standin"], ["cat", "/proc/net/route"])
            assert netguard.guard_in_place(routes), routes
            # Healthy within the deadline; a probe that timed out on a loaded machine may have said
            # "unhealthy" on the way (Docker's status follows the last probes).
            standin = up["standin"]
            _wait(lambda: _health(docker_engine, standin) == "healthy", 180, "the stand-in's own check", 0.5)
        # Every worker is cut off from the host (its routes), whatever the LM mode of the layer.
        for worker in up["workers"]:
            _, routes = rt.exec(worker["name"], ["cat", "/proc/net/route"])
            assert netguard.guard_in_place(routes), routes
    finally:
        first = json.loads(_provision(tmp_path, env, "down", "--json").stdout)
        again = _provision(tmp_path, env, "down", "--run", run_id, "--json")
    assert first["run_id"] == run_id and first["removed"]
    assert json.loads(again.stdout)["removed"] == []  # down twice is fine
    assert leftovers(docker_engine, run_id) == []
    assert _provision(tmp_path, env, "status", check=False).returncode == 1  # nothing up any more


def _run_of(docker_engine: Any, owner_pid: int) -> str:
    """The run id of the run owned by ``owner_pid`` (found by its labels)."""
    found = {
        r.run_id
        for r in DockerRuntime(docker_engine).list_resources({"provisioner.owner.pid": str(owner_pid)})
    }
    assert len(found) == 1, found
    return str(found.pop())


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(interval)
    return time.monotonic() - start


def _start_provision_run_of_a_long_command(tmp_path: Path) -> subprocess.Popen[str]:
    """`provision run` (integration, mock LM, 1 worker) of a command that says it started, then idles."""
    script = "import time; print('command started', flush=True); time.sleep(300)"
    run = ["run", "--layer", "integration", "--lm", "mock", "--workers", "1"]
    return subprocess.Popen(
        [*PROVISION, *run, "--", sys.executable, "-c", script],
        cwd=tmp_path,
        env=_project(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_of_provision_run_leaves_nothing(
    docker_engine: Any, worker_image: str, tmp_path: Path, sweep: Sweep
) -> None:
    """Nothing of the run is left after SIGKILL of its controller. How fast (the issue: within 10 s;
    0.5 s quiet) is measured by benchmarks/bench_runtime.py, not asserted here: this deadline failed
    once at load 25."""
    import psutil

    proc = _start_provision_run_of_a_long_command(tmp_path)
    sweep({L.OWNER_PID: str(proc.pid)})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "command started", proc.stderr.read() if proc.stderr else ""
        run_id = _run_of(docker_engine, proc.pid)
        assert not (tmp_path / ".provision" / "current.env").exists()  # a private run is not "current"
        command = [p for p in psutil.Process(proc.pid).children() if "time.sleep" in " ".join(p.cmdline())]
        assert leftovers(docker_engine, run_id) and len(command) == 1
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _wait(lambda: not leftovers(docker_engine, run_id), 60, "removal of every resource of the killed run")
    _wait(lambda: not command[0].is_running(), 30, "termination of the run's command")


def test_sigterm_of_provision_run_stops_the_command_and_cleans_up(
    docker_engine: Any, worker_image: str, tmp_path: Path, sweep: Sweep
) -> None:
    proc = _start_provision_run_of_a_long_command(tmp_path)
    sweep({L.OWNER_PID: str(proc.pid)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "command started"
        run_id = _run_of(docker_engine, proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM  # the command's fate, passed on
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert leftovers(docker_engine, run_id) == []  # removed by provision itself, before exiting


# An entrypoint for a copy of the worker image whose workers never get ready: the worker's command
# (`... provision worker ...`) sleeps; anything else (relay, egress guard) runs as usual.
STALL_WORKERS = (
    "import os, signal, sys; a = sys.argv[1:]; signal.pause() if 'worker' in a else os.execvp(a[0], a)"
)


@pytest.fixture
def stalling_image(docker_engine: Any, worker_image: str) -> Iterator[str]:
    """The worker image with workers that never answer `ping` (removed again at the end)."""
    import io

    tag = f"provtest-stall:{os.getpid()}"
    # The tag as a label in the first step: another run's build of this fixture (same content, the
    # engine is shared) would share its image id and cached step, and that run's removal could take
    # them from under this one's build or removal.
    dockerfile = (f"FROM {worker_image}\nLABEL test.tag={tag}\n"
                  f"ENTRYPOINT {json.dumps(['python3', '-I', '-c', STALL_WORKERS])}\n")
    docker_engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, pull=False)
    try:
        yield tag
    finally:
        docker_engine.images.remove(tag, force=True)


@pytest.mark.usefixtures("sigint_default")  # `up` starts with SIGINT at its default, as in a terminal
def test_ctrl_c_during_up_leaves_nothing(
    docker_engine: Any, stalling_image: str, tmp_path: Path, sweep: Sweep
) -> None:
    # Deterministic: the workers can never become ready, so `up` is still waiting for them when
    # SIGINT arrives — sent once `up` says its containers are started (not after some time).
    env = {
        **_project(tmp_path),
        "PROVISION_CONTAINER__IMAGE": stalling_image,
        "PROVISION_CONTAINER__READY_TIMEOUT_S": "600",
    }
    run_id = f"ctrlc{os.getpid()}"
    sweep(L.selector(run_id))
    proc = subprocess.Popen(
        [*PROVISION, "up", "--layer", "integration", "--lm", "mock", "--workers", "2", "--run-id", run_id],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    said: list[str] = []
    try:
        assert proc.stderr is not None
        while "waiting for readiness" not in (line := proc.stderr.readline()):
            said.append(line)
            assert line, f"`provision up` ended before starting its containers:\n{''.join(said)}"
        # The known point: every container was started (and the workers passed their guards).
        names = {r.name for r in DockerRuntime(docker_engine).list_resources(L.selector(run_id))}
        assert {f"prov-{run_id}-relay", f"prov-{run_id}-w0", f"prov-{run_id}-w1"} <= names, names
        assert proc.poll() is None  # still waiting for readiness: it cannot finish
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            # It ignored the Ctrl-C (seen once under load): never leave it waiting out its 600 s.
            proc.kill()
            _out, err = proc.communicate()
            pytest.fail(f"`provision up` did not stop within 120 s of SIGINT; its stderr:\n{err}")
    assert proc.returncode != 0 and "interrupted" in err, err
    assert leftovers(docker_engine, run_id) == []


@pytest.mark.slow
def test_the_compose_file_runs_with_docker_compose(
    docker_engine: Any, worker_image: str, tmp_path: Path, sweep: Sweep
) -> None:
    project = f"provtest{os.getpid()}"
    sweep({"com.docker.compose.project": project})
    env = {**os.environ, "PROVISION_WORKER_IMAGE": worker_image, "LM_CACHE_DIR": str(tmp_path)}
    compose = ["docker-compose", "-f", str(ROOT / "compose" / "integration.yml"), "-p", project]
    try:
        subprocess.run([*compose, "up", "-d"], env=env, check=True, capture_output=True, timeout=300)
        port_line = subprocess.run(
            [*compose, "port", "relay", "9000"], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        host, port = port_line.rsplit(":", 1)
        assert host == "127.0.0.1"

        def ready() -> bool:
            try:
                with BridgeClient(host, int(port), connect_timeout=1, request_timeout=2) as client:
                    return bool(client.ping()["lm_configured"])
            except Exception:
                return False

        # w0 serves only once its `w0-guard` service cut it off from the host.
        _wait(ready, 120, "the compose worker w0 answering ping")
        rt = DockerRuntime(docker_engine)
        [w0] = docker_engine.containers.list(
            filters={"label": [f"com.docker.compose.project={project}", "com.docker.compose.service=w0"]}
        )
        _, routes = rt.exec(w0.id, ["cat", "/proc/net/route"])
        assert netguard.guard_in_place(routes), routes
    finally:
        subprocess.run([*compose, "down", "-v"], env=env, check=True, capture_output=True, timeout=300)
    left = docker_engine.containers.list(all=True, filters={"label": f"com.docker.compose.project={project}"})
    assert left == []


def test_doctor_and_reap_of_a_crashed_owners_leftover(
    docker_engine: Any, worker_image: str, tmp_path: Path, watched_run: Any
) -> None:
    from provisioner.runtime.labels import run_labels

    env = _project(tmp_path)
    checks = {c["name"]: c for c in json.loads(_provision(tmp_path, env, "doctor", "--json").stdout)}
    assert checks["docker engine"]["status"] == "ok" and checks["base image"]["status"] == "ok"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run_id = f"stale{os.getpid()}"
    watched_run(run_id)  # its label names a dead owner; this process still owns it for the watchdog
    docker_engine.networks.create(
        f"prov-{run_id}", internal=True, labels=run_labels(run_id, "integration", "s", owner_pid=gone.pid)
    )
    try:
        # Labelled like runs of the version before the project label, and with no run folder in this
        # project: not offered to this project's reap (it may be another team's), still found with
        # --all-projects.
        mine = json.loads(_provision(tmp_path, env, "reap", "--dry-run", "--json").stdout)
        assert run_id not in [r["run_id"] for r in mine]
        dry = json.loads(_provision(tmp_path, env, "reap", "--dry-run", "--all-projects", "--json").stdout)
        found = next(r for r in dry if r["run_id"] == run_id)
        assert {"run_id": run_id, "reason": "owner gone", "removed": [f"network prov-{run_id}"],
                "project": None}.items() <= found.items(), found
        assert leftovers(docker_engine, run_id)  # a dry run removes nothing
        every = json.loads(_provision(tmp_path, env, "status", "--all-projects", "--json").stdout)
        assert {"run_id": run_id, "project": None, "this_project": False}.items() <= next(
            r for r in every if r["run_id"] == run_id
        ).items()
        reaped = json.loads(_provision(tmp_path, env, "reap", "--run", run_id, "--json").stdout)
        assert [r["run_id"] for r in reaped] == [run_id]
    finally:
        for net in docker_engine.networks.list(filters={"label": f"provisioner.run={run_id}"}):
            net.remove()
    assert leftovers(docker_engine, run_id) == []


@pytest.mark.slow
def test_up_twice_refuses_and_down_finds_the_run(
    docker_engine: Any, worker_image: str, tmp_path: Path
) -> None:
    """Before: the second `up` silently replaced the current run and orphaned the first."""
    env = _project(tmp_path)
    args = ("up", "--layer", "integration", "--lm", "mock", "--workers", "1", "--json")
    first = json.loads(_provision(tmp_path, env, *args).stdout)["run_id"]
    second = None
    try:
        again = _provision(tmp_path, env, *args, check=False)
        assert again.returncode == 1 and "Traceback" not in again.stderr
        assert first in again.stderr and "provision down" in again.stderr and "--new" in again.stderr
        second = json.loads(_provision(tmp_path, env, *args, "--new").stdout)["run_id"]
        ambiguous = _provision(tmp_path, env, "down", check=False)
        assert ambiguous.returncode == 2 and first in ambiguous.stderr and second in ambiguous.stderr
        _provision(tmp_path, env, "down", "--run", first)
        assert leftovers(docker_engine, first) == []
        done = json.loads(_provision(tmp_path, env, "down", "--json").stdout)  # the one left
        assert done["run_id"] == second and done["removed"]
    finally:
        for run_id in (first, second):
            if run_id:
                _provision(tmp_path, env, "down", "--run", run_id, check=False)
        # A second `up` that failed its check (or timed out under load) left `second` unknown: every run
        # of this test's project goes (once one was left running for an hour).
        _provision(tmp_path, env, "reap", "--all", "--force", check=False)
    assert leftovers(docker_engine, first) == [] and leftovers(docker_engine, second or first) == []
