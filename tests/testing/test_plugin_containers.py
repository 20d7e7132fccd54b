"""The plugin's container fixtures against the real Docker engine, through pytester.

Docker runs are slow on two cores, so there are two, each doing several checks: a custom suite with
two xdist workers (dedicated workers, a leak, a failing test's cleanups, one watchdog), and the
example project's integration layer replaying its cassettes on two xdist workers. Both reuse the one
content-hashed worker image.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "qa_project"


pytestmark = pytest.mark.usefixtures("no_settings_env")


def _run_resources(client: Any, run_id: str) -> list[str]:
    labels = {"label": [f"provisioner.run={run_id}"]}
    return [f"container {c.name}" for c in client.containers.list(all=True, filters=labels)] + [
        f"network {n.name}" for n in client.networks.list(filters=labels)
    ]


SUITE = '''
import json
import os

import docker
import pytest

from provisioner.factories import ProgramFactory

OUT = {out!r}


def _write(name, data):
    with open(os.path.join(OUT, name), "w") as fh:
        json.dump(data, fh)


@pytest.mark.integration
@pytest.mark.parametrize("n", range(2))
def test_dedicated_worker(bridge_worker, n):
    container = docker.from_env().containers.get(bridge_worker.container_id)
    assert container.status == "running"
    assert container.attrs["Config"]["User"] not in ("", "0", "root")
    session = bridge_worker.session("only-me")
    session.create_program(**ProgramFactory.build(id="p").create_args())
    assert session.list_programs()["total_count"] == 1  # a fresh worker: nothing from other tests
    _write(f"dedicated-{{n}}.json", {{"id": bridge_worker.container_id, "name": bridge_worker.name}})


@pytest.mark.integration
def test_leaves_a_network_behind(resource_manager):
    name = "prov-leaky-" + os.environ.get("PYTEST_XDIST_WORKER", "main")
    docker.from_env().networks.create(name, labels=dict(resource_manager.selector), internal=True)


@pytest.mark.integration
def test_failing_dedicated_worker_is_retained(bridge_worker):
    _write("retained.json", {{"id": bridge_worker.container_id}})
    assert False, "kept for debugging (cleanup_policy on_success, retain_on_failure)"


@pytest.mark.integration
def test_failing_test_still_cleans_up(isolated):
    isolated.adapter.create_program(**ProgramFactory.build(id="p").create_args())
    isolated.add_cleanup(_write, "cleanup-ran.json", {{"session": isolated.session_id}})
    isolated.adapter.execute_program("not-made", {{}})  # fails on purpose: the worker's ProgramNotFound
'''


@pytest.mark.slow
@pytest.mark.docker
def test_container_fixtures_under_xdist(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    out = pytester.path / "out"
    out.mkdir()
    pytester.makepyfile(test_suite=SUITE.format(out=str(out)))
    monkeypatch.setenv("PROVISION_CLEANUP_POLICY", "on_success")  # failed tests' workers are retained
    try:
        result = pytester.runpytest_subprocess(
            "--layer", "integration", "-n", "2", "--provision-report", "report.json",
            "-p", "no:cacheprovider", timeout=280,
        )
        result.assert_outcomes(passed=3, failed=2, errors=1)
        # The leak names the resource, and fails the test that left it.
        result.stdout.fnmatch_lines(["*1 resource(s) leaked: network prov-leaky-gw* — the test must remove*"])
        # A worker container's error names the session as its log does: the test's node id, then the id.
        result.stdout.fnmatch_lines(
            ["*ProgramNotFound: *'test_suite.py::test_failing_test_still_cleans_up (session_*)'*"]
        )

        report = json.loads((pytester.path / "report.json").read_text())
        run_id = report["run_id"]
        section = report["layers"]["integration"]
        assert section["leaks_found"] == 1
        assert section["leaks"][0]["test"].endswith("test_leaves_a_network_behind")
        assert section["leaks"][0]["leaks"][0][0] == "network"
        # three dedicated workers and the pool worker of the process that ran the `isolated` test
        assert section["workers_started"] == 4
        assert report["processes"] == 3

        # The failing test's cleanups ran.
        assert json.loads((out / "cleanup-ran.json").read_text())["session"].startswith("session_")

        # Each bridge_worker test had its own fresh container, gone after the run.
        import docker

        client = docker.from_env()
        dedicated = [json.loads((out / f"dedicated-{n}.json").read_text()) for n in range(2)]
        assert dedicated[0]["id"] != dedicated[1]["id"]
        for worker in dedicated:
            with pytest.raises(docker.errors.NotFound):
                client.containers.get(worker["id"])
        # The failed test's worker was retained (and reported); nothing else of the run is left: not the
        # pool, not the relay, not even the leaked network.
        retained = json.loads((out / "retained.json").read_text())["id"]
        assert client.containers.get(retained).status == "running"
        assert len(section["retained"]) == 1 and section["retained"][0].startswith("container prov-")
        left = _run_resources(client, run_id)
        # the retained dedicated worker's container, its relay, its two networks, and the Gemini stand-in
        # its misses are recorded from (no key): prov-<run>-gwN-<pid>-dM...
        assert len(left) == 5 and all(re.search(r"-gw\d+-\d+-d\d+", name) for name in left), left
        assert sum(name.endswith("-standin") for name in left) == 1, left
        run_dir = pytester.path / ".provision" / "runs" / run_id
        assert (run_dir / "retain").exists()  # so the run's watchdog leaves it to `provision reap`
        from provisioner.runtime.engine import DockerRuntime, remove_by_selector
        from provisioner.runtime.labels import selector

        remove_by_selector(DockerRuntime(), selector(run_id))
        assert _run_resources(client, run_id) == []

        # One watchdog for the whole run, though two processes owned containers.
        log = (run_dir / "watchdog.log").read_text()
        assert log.count(f"watching run {run_id}") == 1, log
        assert len(list((run_dir / "owners").iterdir())) == 2
    finally:
        # A failed run of this test keeps its retained worker (cleanup policy on_success) and, if it
        # failed early, anything else: remove every run this project started, whatever happened.
        from provisioner.runtime.engine import open_runtime, remove_by_selector
        from provisioner.runtime.labels import selector

        runs = pytester.path / ".provision" / "runs"
        rt = open_runtime()
        for run in runs.iterdir() if runs.is_dir() else ():
            remove_by_selector(rt, selector(run.name))
        rt.close()


@pytest.mark.slow
@pytest.mark.docker
def test_example_project_integration_layer_replays_on_two_xdist_workers(pytester: pytest.Pytester) -> None:
    shutil.copytree(EXAMPLE, pytester.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".provision"))
    result = pytester.runpytest_subprocess(
        "--layer", "integration", "-n", "2", "--record-mode", "none", "--provision-report", "report.json",
        timeout=280,
    )
    result.assert_outcomes(passed=6)  # xdist deselects on its workers: no "deselected" count here
    report = json.loads((pytester.path / "report.json").read_text())
    section = report["layers"]["integration"]
    # LM calls happened inside the worker containers of two processes (and one in-process, the quick
    # start's `lm` call); the run's ledger saw them all.
    assert section["lm_calls"] == {"mock": 0, "replayed": 6, "recorded": 0, "real": 0, "standin": 0}
    assert section["cache_misses"] == 0
    assert section["leaks_found"] == 0
    assert 1 <= section["workers_started"] <= 2
    import docker

    assert _run_resources(docker.from_env(), report["run_id"]) == []


WORKER_MISS_TEST = """
import pytest


@pytest.mark.integration
def test_a_worker_misses(bridge):
    bridge.create_program("ticket -> category", "never_recorded")
    bridge.execute_program("never_recorded", {"ticket": "a ticket nobody recorded"})
"""


@pytest.mark.slow
@pytest.mark.docker
def test_a_cassette_miss_in_a_worker_names_the_host_folder(pytester: pytest.Pytester) -> None:
    """The reported case: the miss said `lm.cache_dir=/provision/cassettes` (the container's mount
    point); the user's folder is test/fixtures/lm_responses, relative to the project root."""
    shutil.copytree(EXAMPLE, pytester.path, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".provision", "tests"))
    pytester.makepyfile(test_worker_miss=WORKER_MISS_TEST)
    result = pytester.runpytest_subprocess("--layer", "integration", "--record-mode", "none",
                                           "test_worker_miss.py", timeout=280)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "lm.cache_dir=test/fixtures/lm_responses;" in out, out[-3000:]
    assert "/provision/cassettes" not in out


@pytest.mark.docker
def test_environment_api_runs_bridge_sessions_and_tears_down(tmp_path: Path) -> None:
    """``provisioner.environment("integration")`` without pytest's fixtures: sessions on a worker
    container, in-process LM active, everything removed on exit. Through the container too: a
    request the worker stops at its deadline raises the worker's Timeout reply (the client waits
    process_timeout + REPLY_GRACE_S), and a session's errors name it by its label."""
    import docker
    import dspy

    import provisioner.api as api
    from provisioner.bridge import SessionClient
    from provisioner.factories import ProgramFactory
    from provisioner.settings import REPLY_GRACE_S

    # process_timeout holds for every execution here, the ordinary "why?" (a worker process's first
    # DSPy call, recorded to a cassette) too: 5 s, not 1 s, which a loaded machine could exceed.
    (tmp_path / "pyproject.toml").write_text(
        '[tool.provisioner]\nprocess_timeout = 5.0\n[tool.provisioner.lm]\ncached_inner = "mock"\n'
    )
    with api.environment("integration", project_dir=tmp_path) as env:
        run_id = env.run_id
        assert dspy.settings.lm is env.lm and env.lm_config.mode == "cached"
        with env.session() as one, env.session() as two:
            assert isinstance(one.adapter, SessionClient)
            for session in (one, two):  # the same program id in both sessions: no clash
                session.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
            outputs = one.adapter.execute_program("qa", {"question": "why?"})["outputs"]
            assert set(outputs) == {"answer"}
            assert two.adapter.list_programs()["total_count"] == 1
            # A test's adapter is a session client on a shared pool worker: no worker-wide
            # commands, so one test cannot wipe or stop the worker under the other's session.
            from provisioner.errors import BridgeError

            for command in ("reset_state", "shutdown"):
                with pytest.raises(BridgeError) as info:
                    one.adapter.request(command)
                assert info.value.error_type == "Unauthorized"
            with pytest.raises(BridgeError, match="Unauthorized"):
                one.adapter.bridge.list_programs(all_sessions=True)
            assert two.adapter.list_programs()["total_count"] == 1  # untouched
            assert env.containers.pool.check() == []  # the pool's health check still works
            assert one.adapter.ping()["status"] == "ok"
        with env.session("slow-one") as slow:
            assert slow.adapter.bridge.request_timeout == env.settings.request_timeout == 5.0 + REPLY_GRACE_S
            slow.adapter.configure_lm(mode="mock", mock_rules=[
                {"match": {"question": "slow"}, "outputs": {"answer": "x"}, "latency_ms": 7000}])
            slow.adapter.create_program("question -> answer", "qa")
            with pytest.raises(BridgeError) as late:
                slow.adapter.execute_program("qa", {"question": "slow"})
            assert type(late.value) is BridgeError and late.value.error_type == "Timeout", late.value
            assert late.value.lm_usage is not None, late.value
            with pytest.raises(BridgeError, match=rf"session 'slow-one \({slow.session_id}\)'"):
                slow.adapter.get_program_info("not-made")
        assert _run_resources(docker.from_env(), run_id) != []  # the worker stays for the next session
    assert _run_resources(docker.from_env(), run_id) == []
    assert env.report.workers_started == 1
    assert (env.run_dir / "stopped").exists()
