"""``provisioner.environment()`` and the ``isolated`` path end to end on the fake runtime: real
bridge workers (in this process) behind a real relay, no Docker. The docker-marked tests in
tests/testing/test_plugin_containers.py prove the same path on the engine."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import dspy
import pytest

import provisioner
import provisioner.api as api
from provisioner.bridge import LocalBridge, SessionClient
from provisioner.errors import (
    BridgeError,
    CleanupError,
    ClosedError,
    ConfigError,
    ProvisionerError,
    WorkerLostError,
)
from provisioner.factories import ProgramFactory
from provisioner.run import RunIdentity, RunOptions
from provisioner.runtime import labels as L
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.polling import poll_until
from provisioner.runtime.recipes import NetworkRecipe
from provisioner.testing.plugin_state import ProvisionRun
from provisioner.testing.progress import Phases

from ._helpers import clear_settings

IMAGE = "provisioner-worker:served"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose worker image is ``IMAGE`` and whose cassettes record the mock's answers."""
    clear_settings(monkeypatch)
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.provisioner]\nlm.cached_inner = "mock"\ncontainer.image = "{IMAGE}"\n'
    )
    return tmp_path


def _of_run(runtime: FakeRuntime, run_id: str) -> list[str]:
    return sorted(f"{r.kind} {r.name}" for r in runtime.list_resources(L.selector(run_id)))


def test_environment_runs_isolated_bridge_sessions_on_the_fake_runtime_and_tears_down(
    project: Path, served: FakeRuntime
) -> None:
    with api.environment("integration", project_dir=project, runtime=served) as env:
        run_id = env.run_id
        assert dspy.settings.lm is env.lm and env.lm_config.mode == "cached"
        with env.session("one") as one, env.session("two") as two:
            assert isinstance(one.adapter, SessionClient)
            for session in (one, two):  # the same program id in both sessions: no clash
                session.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
            assert set(one.adapter.execute_program("qa", {"question": "why?"})["outputs"]) == {"answer"}
            assert two.adapter.list_programs()["total_count"] == 1
            for command in ("reset_state", "shutdown"):  # a session client has no worker-wide commands
                with pytest.raises(BridgeError) as info:
                    one.adapter.request(command)
                assert info.value.error_type == "Unauthorized"
            assert env.containers.pool.check() == []
        assert any(name.startswith("container prov-") for name in _of_run(served, run_id))
        assert list(env.lm_config.cache_dir.rglob("*.json"))  # the worker recorded on the host
    assert _of_run(served, run_id) == []  # everything the environment started is gone
    assert env.report.workers_started == 1
    assert not (env.run_dir / "watchdog.lock").exists()  # a handed-in runtime gets no watchdog process
    assert served.available  # ... and stays open: the caller closes it


def test_the_isolated_path_of_a_pooled_layer_on_the_fake_runtime(project: Path, served: FakeRuntime) -> None:
    """What the plugin's hooks do for ``isolated`` tests of a pooled layer: warm the pool before the
    first test, a session per test spread over the pool's workers, a leak check around each test."""
    identity = RunIdentity.create(project / ".provision")
    run = ProvisionRun(RunOptions(layer="e2e", lm_mode="mock"), project, identity, runtime=served)
    try:
        assert run.docker_problem() is None  # the handed-in runtime answers: no Docker needed
        phases = Phases(lambda _line: None)
        run.prepare_image(phases)
        assert run.environment.prepared_image == IMAGE
        run.warm_pool(phases, [["isolated"]])
        pool = run.environment.containers.pool
        assert run.layer.workers == 2 and len(pool.environment.workers) == 1  # one now, one on demand
        workers_used = set()
        for n in range(2 * run.layer.workers):  # one test at a time: one worker is enough
            test_id = f"tests/test_x.py::test_{n}"
            run.test_started(test_id)
            before = run.leak_snapshot()
            test = run.environment.isolated(label=test_id)
            test.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
            test.adapter.execute_program("qa", {"question": str(n)})
            workers_used.add(test.adapter.ping()["worker_id"])
            test.close()
            assert run.leaks_since(before, test_id) == []
        assert pool.wait_replacements(30) and len(pool.environment.workers) == 1 and len(workers_used) == 1
        # Two sessions open at once (a test's threads): the pool grows to its size, and the
        # sessions spread over both workers.
        first = run.environment.isolated(label="tests/test_x.py::test_threads")
        second = run.environment.isolated(label="tests/test_x.py::test_threads")
        assert pool.wait_replacements(60) and len(pool.environment.workers) == run.layer.workers
        third = run.environment.isolated(label="tests/test_x.py::test_threads")
        workers_used = {t.adapter.ping()["worker_id"] for t in (first, second, third)}
        assert len(workers_used) == run.layer.workers
        for test in (first, second, third):
            test.close()
        assert pool.stats()["added"] == 1
        # A test that leaves a network behind is named.
        before = run.leak_snapshot()
        containers = run.environment.containers
        served.create_network(NetworkRecipe("left-behind", True, dict(containers.resources.selector)))
        assert run.leaks_since(before, "tests/test_x.py::test_leaky") == [("network", "left-behind")]
        served.remove_network("left-behind")
    finally:
        run.close()
    assert _of_run(served, identity.run_id) == []


def test_a_worker_killed_between_tests_is_replaced_on_the_fake_runtime(
    project: Path, served: FakeRuntime
) -> None:
    with api.environment("integration", project_dir=project, runtime=served) as env:
        with env.session("first") as first:
            first.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
        pool = env.containers.pool
        victim = pool.environment.workers[0]
        served.crash(victim.container_id)
        with env.session("second") as second:  # served by the worker that replaced it
            second.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
            assert second.adapter.ping()["worker_id"] != victim.name
        assert pool.replaced >= 1


def test_an_unreachable_handed_in_runtime_is_the_runs_engine_problem(project: Path) -> None:
    runtime = FakeRuntime(images=(IMAGE,))
    runtime.available = False
    run = ProvisionRun(RunOptions(layer="integration"), project, RunIdentity.create(project / ".provision"),
                       runtime=runtime)
    try:
        problem = run.docker_problem()
        assert problem is not None and "fake engine switched off" in problem
    finally:
        run.close()


def test_a_dedicated_worker_on_a_handed_in_runtime_is_made_by_that_runtime(
    project: Path, served: FakeRuntime
) -> None:
    with api.environment("integration", project_dir=project, runtime=served) as env:
        with env.dedicated_worker("tests/test_x.py::test_own") as worker:
            assert worker.container is None and worker.container_id in served.containers
            session = worker.session("s1")
            session.create_program(**ProgramFactory.build(id="qa").create_args())
            assert worker.client.ping()["worker_id"] == worker.name
            made = set(_of_run(served, env.run_id))
            assert f"container {worker.name}" in made
        assert f"container {worker.name}" not in _of_run(served, env.run_id)  # removed on exit
    assert _of_run(served, env.run_id) == []


# -- typed errors (no runtime needed: the unit layer) ------------------------------------------------


def test_a_closed_environment_says_so(project: Path) -> None:
    env = api.open_environment("unit", project_dir=project)
    env.close()
    with pytest.raises(ClosedError, match=f"environment of run {env.run_id} is closed") as caught:
        _ = env.containers
    assert isinstance(caught.value, ProvisionerError) and isinstance(caught.value, RuntimeError)


def test_a_part_that_cannot_be_released_is_named_and_the_rest_still_closes(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: LocalBridge) -> None:
        raise OSError("socket stuck")

    monkeypatch.setattr(LocalBridge, "close", refuse)
    env = api.open_environment("unit", project_dir=project)
    with env.session() as isolated:
        assert isolated.adapter is not None
    with pytest.raises(CleanupError, match="in-process bridge: OSError: socket stuck") as caught:
        env.close()
    assert [name for name, _ in caught.value.failures] == ["in-process bridge"]
    env.close()  # closed once: a second close is a no-op, not a second error


def test_an_environment_attaches_to_a_running_provision_up_and_leaves_it(
    project: Path, served: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python API follows the plugin's rule (runtime/shared_pool.choose_up_run): a matching
    `provision up` run of the project serves the block's sessions and stays up after it."""
    from provisioner.runtime.lifecycle import UpOptions, down, up
    from provisioner.settings import load_settings

    monkeypatch.chdir(project)
    settings = load_settings(project_dir=project)
    deployment = up(settings, UpOptions(layer="integration", image=IMAGE, watchdog=False), runtime=served)
    assert deployment.state is not None
    up_id = deployment.state.run_id
    ups = _of_run(served, up_id)
    try:
        with api.environment("integration", project_dir=project, runtime=served) as env:
            assert env.up_run is not None and env.up_run.run_id == up_id and env.up_run_reason is None
            with env.session("one") as one:
                one.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
                assert one.adapter.execute_program("qa", {"question": "?"})["outputs"]
                ports = {int(a.rsplit(":", 1)[1]) for a in deployment.state.addresses}
                assert one.adapter.bridge.port in ports
            assert _of_run(served, env.run_id) == []  # not one container of its own
            assert env.lm_config.run_dir == Path(deployment.state.lm_run_dir or "")  # the up run's budget
        assert env.report.workers_started == 0
        assert _of_run(served, up_id) == ups  # the up run is left running
        with api.environment("integration", project_dir=project, runtime=served, attach=False) as own:
            assert own.up_run is None and own.up_run_reason is not None
            assert own.up_run_reason.startswith("attach=False")
            with own.session("two"):
                assert [n for n in _of_run(served, own.run_id) if n.startswith("container")]
    finally:
        down(settings, run_id=up_id, runtime=served)
    assert _of_run(served, up_id) == []


def test_an_environment_says_why_it_did_not_attach_to_provision_up(
    project: Path, served: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new user's trial: ``env.up_run`` was None with no reason. ``env.up_run_reason`` says why, in
    the plugin's words (one decision, runtime/shared_pool.choose_up_run), for every case."""
    from provisioner.runtime.lifecycle import UpOptions, down, up
    from provisioner.settings import load_settings

    monkeypatch.chdir(project)
    monkeypatch.delenv("PROVISION_RUN_ID", raising=False)
    with api.environment("integration", project_dir=project, runtime=served) as none_up:
        assert none_up.up_run is None and none_up.up_run_reason is not None
        assert none_up.up_run_reason.startswith("no `provision up` run of this project is current")
        assert "`provision up --layer integration` starts one" in none_up.up_run_reason
    with api.environment("unit", project_dir=project) as unit:
        assert unit.up_run_reason == "layer unit runs in-process: it has no workers to share"
    settings = load_settings(project_dir=project)
    deployment = up(settings, UpOptions(layer="integration", image=IMAGE, watchdog=False), runtime=served)
    assert deployment.state is not None
    up_id = deployment.state.run_id
    try:
        with api.environment("integration", lm="mock", project_dir=project, runtime=served) as other:
            assert other.up_run is None
            differs = f"`provision up` run {up_id} differs: LM mode cached (this session: mock)"
            assert other.up_run_reason == differs
    finally:
        down(settings, run_id=up_id, runtime=served)
    with api.environment("integration", project_dir=project, runtime=served) as after_down:
        assert after_down.up_run is None and after_down.up_run_reason is not None
        assert "is current" in after_down.up_run_reason or "is not running" in after_down.up_run_reason


def test_an_environment_and_a_provision_up_run_whose_worker_died_say_the_same_true_thing(
    project: Path, served: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plugin's rule through the Python API (a user's trial found it through pytest): a worker of
    the up run dead before the block: the block does not attach (its own workers serve); one that
    dies while attached: its session fails saying the run is not replaced and how to repair it, not
    "Open a new session", and nothing is replaced."""
    from provisioner.errors import WorkerLostError
    from provisioner.runtime.lifecycle import UpOptions, down, up
    from provisioner.settings import load_settings

    monkeypatch.chdir(project)
    settings = load_settings(project_dir=project)
    deployment = up(settings, UpOptions(layer="integration", image=IMAGE, watchdog=False), runtime=served)
    assert deployment.state is not None
    up_id = deployment.state.run_id
    names = [w["container_id"] for w in deployment.state.workers]
    try:
        with api.environment("integration", project_dir=project, runtime=served) as early:
            assert early.up_run is not None  # chosen at the start: its workers ran then
            served.crash(names[0])
            with pytest.raises(WorkerLostError, match=r"no longer serves it: .*provision status --repair"):
                early.session("first").__enter__()
            served.start_container(names[0])  # what `provision status --repair` does
        assert early.report.workers_started == 0  # no own workers halfway
        with api.environment("integration", project_dir=project, runtime=served) as env:
            assert env.up_run is not None
            with env.session("mid") as mid:
                mid.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
                for name in names:
                    served.crash(name)
                with pytest.raises(WorkerLostError) as lost:
                    mid.adapter.execute_program("qa", {"question": "?"})
            assert "provision status --repair" in str(lost.value), lost.value
            assert "Open a new session" not in str(lost.value), lost.value
        assert env.report.workers_started == 0  # nothing replaced, nothing of its own
        with api.environment("integration", project_dir=project, runtime=served) as own:
            assert own.up_run is None  # a dead worker: not attached, and it says why and what to do
            assert own.up_run_reason == (f"`provision up` run {up_id} has a worker that no longer runs"
                                         " (repair it: `provision status --repair`, or `provision down`"
                                         " and `provision up`)")
            with own.session("two") as two:
                two.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
                assert [n for n in _of_run(served, own.run_id) if n.startswith("container")]
    finally:
        down(settings, run_id=up_id, runtime=served)


def test_sessions_attached_to_one_provision_up_count_only_their_own_lm_calls(
    project: Path, served: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions attached one after another to a `provision up` run share its ledger: each session's
    summary, test rows and per-test cost count the calls made during it (a new-user trial saw
    `LM calls (cached): 2`, then 4, then 6 for the same suite); so does the Python API's."""
    from types import SimpleNamespace

    from provisioner.lm.callstats import LMUsage
    from provisioner.lm.ledger import ledger_usage
    from provisioner.runtime.lifecycle import UpOptions, down, up
    from provisioner.settings import load_settings

    monkeypatch.chdir(project)
    settings = load_settings(project_dir=project)
    deployment = up(settings, UpOptions(layer="integration", image=IMAGE, watchdog=False), runtime=served)
    assert deployment.state is not None
    test_id = "tests/test_x.py::test_qa"
    try:
        seen = []
        for n in range(3):
            identity = RunIdentity.create(project / ".provision")
            run = ProvisionRun(RunOptions(layer="integration"), project, identity, runtime=served)
            try:
                assert run.up_match.attached
                # xdist workers of the session count from the controller's position.
                assert int(run.workerinput()["provision_ledger_start"]) == run.environment.ledger_start
                assert (run.environment.ledger_start > 0) == (n > 0)
                run.mark_used()
                run.test_started(test_id)
                with run.environment.session(test_id) as test:
                    test.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
                    test.adapter.execute_program("qa", {"question": "same question"})
                properties = run.test_properties(test_id)
                # pytest's reports of a test that ran: its call, then its teardown with the properties
                run.rows.logreport(SimpleNamespace(nodeid=test_id, when="call", outcome="passed"))
                run.rows.logreport(SimpleNamespace(nodeid=test_id, when="teardown", outcome="passed",
                                                   user_properties=properties))
            finally:
                run.close()
            report = run.finish(None)
            assert report is not None
            lm = report.layers["integration"].lm
            seen.append((n, lm.calls, lm.replayed + lm.recorded, dict(properties)["provision_lm_calls"],
                         [row["lm_replayed"] + row["lm_recorded"] for row in report.tests]))
        run_dir = Path(deployment.state.lm_run_dir or "")
        whole = ledger_usage(run_dir)
        assert whole is not None and whole.calls == 3  # the ledger has every session's call
        assert [s[1:] for s in seen] == [(1, 1, 1, [1])] * 3, seen
        with api.environment("integration", project_dir=project, runtime=served) as env:
            assert env.up_run is not None
            assert env.ledger_start == (run_dir / "ledger.jsonl").stat().st_size  # counts from here
            assert ledger_usage(run_dir, since=env.ledger_start) == LMUsage()
    finally:
        down(settings, run_id=deployment.state.run_id, runtime=served)


def test_sessions_attached_to_one_provision_up_at_the_same_time_count_only_their_own_lm_calls(
    project: Path, served: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pytest sessions attached to one `provision up` run at the same time (issue 10): their
    calls interleave in its ledger, the same test node id in both. Each session's summary, test
    rows and per-test cost count its own: an in-process call (lines marked with its test run) and
    a worker's call for its isolated session (noted in sessions.jsonl with its test run)."""
    from types import SimpleNamespace

    from provisioner.lm.ledger import ledger_usage
    from provisioner.runtime.lifecycle import UpOptions, down, up
    from provisioner.settings import load_settings

    monkeypatch.chdir(project)
    settings = load_settings(project_dir=project)
    deployment = up(settings, UpOptions(layer="integration", image=IMAGE, watchdog=False), runtime=served)
    assert deployment.state is not None
    test_id = "tests/test_x.py::test_qa"
    runs = [ProvisionRun(RunOptions(layer="integration"), project, RunIdentity.create(project / ".provision"),
                         runtime=served) for _ in range(2)]
    try:
        properties = {}
        for run in runs:  # both started, neither finished
            assert run.up_match.attached
            run.mark_used()
            run.test_started(test_id)
        for n, run in enumerate(runs):
            from provisioner.lm.ledger import set_test_run

            set_test_run(run.identity.run_id)  # each session's own process
            monkeypatch.setenv("PYTEST_CURRENT_TEST", f"{test_id} (call)")
            run.environment.build_lm()(f"in-process question {n}")
            with run.environment.session(test_id) as test:
                test.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
                test.adapter.execute_program("qa", {"question": f"worker question {n}"})
            monkeypatch.delenv("PYTEST_CURRENT_TEST")
        for run in runs:
            properties[run.identity.run_id] = dict(run.test_properties(test_id))
            run.rows.logreport(SimpleNamespace(nodeid=test_id, when="call", outcome="passed"))
            run.rows.logreport(SimpleNamespace(nodeid=test_id, when="teardown", outcome="passed",
                                               user_properties=list(properties[run.identity.run_id].items())))
        reports = []
        for run in runs:
            run.close()
            reports.append(run.finish(None))
        run_dir = Path(deployment.state.lm_run_dir or "")
        whole = ledger_usage(run_dir)
        assert whole is not None and whole.calls == 4  # the ledger has both sessions' calls
        for run, report in zip(runs, reports, strict=True):
            assert report is not None
            lm = report.layers["integration"].lm
            assert lm.replayed + lm.recorded == 2, (run.identity.run_id, lm)
            assert properties[run.identity.run_id]["provision_lm_calls"] == 2
            assert [row["lm_replayed"] + row["lm_recorded"] for row in report.tests] == [2]
    finally:
        for run in runs:
            run.close()
        down(settings, run_id=deployment.state.run_id, runtime=served)


def test_the_summary_says_why_a_session_did_not_attach_and_that_an_attached_run_stays(
    project: Path, served: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header is hidden under ``pytest -q``: the terminal summary (shown under -q) says why the
    session started its own workers instead of attaching, or that it left the attached run running."""
    from provisioner.runtime.lifecycle import UpOptions, down, up
    from provisioner.settings import load_settings
    from provisioner.testing.report import RunReport

    monkeypatch.chdir(project)
    settings = load_settings(project_dir=project)
    deployment = up(settings, UpOptions(layer="integration", image=IMAGE, watchdog=False), runtime=served)
    assert deployment.state is not None
    up_id = deployment.state.run_id
    try:
        for record_mode, expected in (
            ("none", f"own run for this session, not attaching: `provision up` run {up_id} differs: "
                     "record mode new_episodes (this session: none)"),
            (None, f"attached to run {up_id}; this session left it running"),
        ):
            run = ProvisionRun(RunOptions(layer="integration", record_mode=record_mode), project,
                               RunIdentity.create(project / ".provision"), runtime=served)
            try:
                assert expected in run.summary_lines(RunReport(run_id=run.identity.run_id))
                shown: list[str] = []
                run.warm_pool(Phases(shown.append), [["isolated"]])
                if record_mode is None:  # the phase line pytest -q shows (the header is hidden)
                    assert shown[0] == (f"provisioner: attach to run {up_id}'s 2 worker(s), started by "
                                        "`provision up`; this session leaves it running … ")
            finally:
                run.close()
    finally:
        down(settings, run_id=up_id, runtime=served)


def test_workers_started_counts_every_worker_of_a_pooled_layers_pool(
    project: Path, served: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pytest --layer e2e` (pool of 2) reported `workers started: 1` while both workers started (a
    new-user trial, with the pool that started one worker and grew): the summary counts every worker
    the run started, once — an xdist process that attaches to the run's pool adds none. The pool
    grows on demand: a session open in each of two processes at once starts its second worker."""
    identity = RunIdentity.create(project / ".provision")
    run = ProvisionRun(RunOptions(layer="e2e", lm_mode="mock"), project, identity, runtime=served)
    other = None
    try:
        phases = Phases(lambda _line: None)
        run.prepare_image(phases)
        run.warm_pool(phases, [["isolated"]])
        assert run.layer.workers == 2
        # A second process of the same run (an xdist worker) uses the same pool.
        with monkeypatch.context() as patch:
            patch.setenv("PYTEST_XDIST_WORKER", "gw1")  # its instance name in the run
            other = ProvisionRun(RunOptions(layer="e2e", lm_mode="mock"), project,
                                 RunIdentity.joined(identity.run_id, identity.run_dir), "", runtime=served)
            other.warm_pool(phases, [["isolated"]])
        pool = run.environment.containers.pool
        assert len(pool.stats()["workers"]) == 1  # no session yet: no demand
        theirs = other.environment.isolated(label="tests/test_x.py::test_gw1")
        mine = run.environment.isolated(label="tests/test_x.py::test_main")
        pool.grow_on_demand()  # the deploying process's monitor tick: its session + the other's
        assert pool.wait_replacements(60) and len(pool.stats()["workers"]) == 2
        mine.close()
        theirs.close()
        other.close()
        run.merge_worker(other.process_report_json())
    finally:
        if other is not None:
            other.close()
        run.close()
    report = run.finish(None)
    assert report is not None and report.layers["e2e"].workers_started == 2
    assert _of_run(served, identity.run_id) == []


# --- a worker's log window through the Python API ----------------------------------------------


def test_worker_log_refuses_what_it_cannot_answer_with_the_input_named(
    project: Path, served: FakeRuntime
) -> None:
    with api.environment("unit", project_dir=project) as unit, unit.session("u") as test, \
            pytest.raises(ConfigError, match=r"runs in-process.*no worker containers"):
        unit.worker_log(test, 0.0)
    with api.environment("integration", project_dir=project, runtime=served, attach=False) as env, \
            env.session("a") as test:
        pinned = env.worker_log(test, 0.0).worker
        assert pinned in env.worker_names()
        with pytest.raises(ConfigError, match=r"unknown worker 'prov-nope'.*" + re.escape(pinned)):
            env.worker_log("prov-nope", 0.0)
        with pytest.raises(ConfigError, match=r"since=5\.0 is after until=1\.0"):
            env.worker_log(test, 5.0, 1.0)
        with pytest.raises(ConfigError, match=r"tail=-1 must be 0 or more"):
            env.worker_log(test, 0.0, tail=-1)
        with pytest.raises(ConfigError, match=r"since=nan is not a time"):
            env.worker_log(test, float("nan"))
        # A worker names sessions by id; the window shows the label the session was opened with.
        (container,) = [c for c in served.containers.values() if c.recipe.name == pinned]
        with env.session("smoke") as other:
            container.write_log(f"execute_program refused (session {other.session_id}): ProgramNotFound "
                                f"in session '{other.session_id}' (not {test.session_id}x)")
            line = env.worker_log(other, 0.0).lines[-1]
        assert line == (f"execute_program refused (session smoke ({other.session_id})): ProgramNotFound "
                        f"in session 'smoke ({other.session_id})' (not {test.session_id}x)")
        assert env.session_labels()[test.session_id] == "a"
        served.crash(pinned)
        served.remove_container(pinned)
        with pytest.raises(WorkerLostError, match=f"worker {re.escape(pinned)} is gone"):
            env.worker_log(test, 0.0)


@pytest.mark.docker
def test_worker_log_gives_the_lines_a_real_worker_wrote_in_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The public accessor on a real worker container: a session's worker, by name, and a dedicated
    worker; lines before ``since`` and after ``until`` are not in the window (the engine's stamps)."""
    import time

    clear_settings(monkeypatch)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'logwindow'\n")

    def refused(session: Any, program_id: str) -> None:  # the worker logs a refused request (INFO)
        with pytest.raises(BridgeError, match=program_id):
            session.execute_program(program_id, {"question": "?"})

    with api.environment("integration", lm="mock", project_dir=tmp_path, attach=False) as env:
        with env.session("logs") as test:

            # Each boundary is taken right after a reply: the engine stamps a line when it reads it
            # from the container, a moment after the worker wrote it, so by the engine's stamps the
            # line before a boundary may land after it (a 1 ms window missed its line in a quiet
            # full run); the window goes by the worker's own write times.
            refused(test.adapter, "before-window")
            since = time.time()
            refused(test.adapter, "inside-window")
            until = time.time()
            refused(test.adapter, "after-window")
            window = env.worker_log(test, since, until)
            assert window.worker in env.worker_names() and window.worker.startswith("prov-")
            assert "inside-window" in window.text, window
            assert f"(session logs ({test.session_id})):" in window.text, window  # the label and id
            assert "before-window" not in window.text and "after-window" not in window.text, window
            assert (window.since, window.until, window.omitted) == (since, until, 0)
            by_name = env.worker_log(window.worker, since, until)
            assert by_name.lines == window.lines
            assert "after-window" in env.worker_log(test, until).text  # until: now
            newest = env.worker_log(test, 0.0, tail=1)
            assert len(newest.lines) == 1 and newest.omitted > 0
        with env.dedicated_worker("logs") as worker:
            refused(worker.session("mine"), "dedicated-window")
            # The engine stores a container's output as it reads it: the refusal's line may land a
            # moment after the reply (it was missing once under a full suite's load).
            poll_until(lambda: "dedicated-window" in env.worker_log(worker, 0.0).text, 30, 0.05)
            own = env.worker_log(worker, 0.0)
            assert own.worker == worker.name and "dedicated-window" in own.text
            assert "bridge worker listening" in own.text and "inside-window" not in own.text


@pytest.mark.docker
def test_lm_usage_counts_the_calls_worker_containers_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached layer's worker container records (then replays) in its own process; ``env.lm_usage()``
    counts those calls (each ``execute_program`` reply carries them) as ``provision cost report``
    does — a user's trial of a wheel without that hand-over saw ``recorded=0`` here."""
    clear_settings(monkeypatch)
    (tmp_path / "pyproject.toml").write_text(
        "[project]\nname = 'usage'\n[tool.provisioner]\nlm.cached_inner = \"mock\"\n"
    )
    with api.environment("integration", project_dir=tmp_path, attach=False) as env:
        assert env.lm_config.mode == "cached" and env.lm_usage().calls == 0
        for label in ("first", "second"):  # the second asks the same: replayed from the cassette
            with env.session(label) as test:
                test.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
                test.adapter.execute_program("qa", {"question": "what is counted?"})
        usage = env.lm_usage()
        assert (usage.recorded, usage.replayed, usage.mock) == (1, 1, 0), usage
    from provisioner.lm.ledger import ledger_usage

    booked = ledger_usage(env.lm_config.run_dir)  # the run's ledger: the cost report's source
    assert booked is not None and (booked.recorded, booked.replayed) == (1, 1), booked


def test_a_project_dir_given_as_a_string_is_a_path(project: Path, tmp_path_factory: pytest.TempPathFactory,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``project_dir`` takes what ``open()`` takes (str or os.PathLike), as users write it from a
    shell variable; a str once failed with ``AttributeError: 'str' object has no attribute 'absolute'``."""
    (project / "provision.toml").write_text('[layers.unit]\ndescription = "from the project file"\n')
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    with api.environment("unit", project_dir=str(project)) as env:
        assert env.project_dir == project.absolute()
        assert env.layer.description == "from the project file"
    settings = provisioner.load_settings(project_dir=str(project))
    assert settings.layers["unit"].description == "from the project file"


def test_a_slow_request_of_an_isolated_session_gets_the_worker_s_timeout_reply(
    project: Path, served: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The isolated session's client waits Settings.request_timeout (process_timeout + the grace), not
    process_timeout itself: a request the worker stops at its deadline raises the worker's Timeout
    reply (its lm_usage booked), never the client's own timeout that dropped it."""
    import threading

    from provisioner.lm.mock import MockEngine
    from provisioner.settings import REPLY_GRACE_S

    config = project / "pyproject.toml"
    config.write_text(config.read_text() + "process_timeout = 1.0\n")
    release = threading.Event()
    respond = MockEngine.respond

    def held(self: MockEngine, *args: Any, **kwargs: Any) -> Any:
        if "slow" in str(args) + str(kwargs):  # the served worker's call for this request only
            release.wait(60)
        return respond(self, *args, **kwargs)

    monkeypatch.setattr(MockEngine, "respond", held)
    try:
        with api.environment("integration", lm="mock", project_dir=project, runtime=served) as env:
            assert env.settings.request_timeout == 1.0 + REPLY_GRACE_S
            with env.session("slow-one") as test:
                assert test.adapter.bridge.request_timeout == env.settings.request_timeout
                test.adapter.create_program("question -> answer", "qa")
                with pytest.raises(BridgeError) as info:
                    test.adapter.execute_program("qa", {"question": "slow"})
                release.set()
    finally:
        release.set()
    assert type(info.value) is BridgeError and info.value.error_type == "Timeout", info.value
    assert info.value.lm_usage is not None, info.value


# -- errors name a session the way the worker log windows do: "<label> (<session id>)" ---------------


def _missing_program_error(test: Any) -> BridgeError:
    with pytest.raises(BridgeError) as info:
        test.adapter.execute_program("not-made", {"question": "?"})
    assert info.value.error_type == "ProgramNotFound", info.value
    return info.value


def test_an_isolated_session_s_errors_name_it_by_its_label_in_process(project: Path) -> None:
    """A request's error named the raw session id (``session_…``) while the worker log says
    ``smoke (session_…)``; now both say the latter (the unit layer's in-process bridge)."""
    with api.environment("unit", project_dir=project) as env, env.session("smoke") as test:
        error = _missing_program_error(test)
        assert f"smoke ({test.session_id})" in str(error) and error.message.count(test.session_id) == 1
        assert test.name == test.adapter.name == f"smoke ({test.session_id})"
    closed = re.escape(f"isolated session smoke ({test.session_id}) is already closed")
    with pytest.raises(ClosedError, match=closed):
        test.add_cleanup(lambda: None)
    with api.environment("unit", project_dir=project) as env, env.session() as unnamed:
        error = _missing_program_error(unnamed)  # no label: the id alone, as before
        assert unnamed.session_id in str(error) and f"({unnamed.session_id})" not in str(error)


def test_an_isolated_session_s_errors_name_it_by_its_label_on_a_worker(project: Path,
                                                                       served: FakeRuntime) -> None:
    """The same through a pooled worker (real bridge servers behind a relay): the worker's error
    reply, and the environment's own errors about the session."""
    with api.environment("integration", project_dir=project, runtime=served) as env:
        with env.session("tests/test_x.py::test_a") as test:
            error = _missing_program_error(test)
            assert f"tests/test_x.py::test_a ({test.session_id})" in str(error), error
        with api.environment("integration", project_dir=project, runtime=served) as other:
            foreign = other.isolated("theirs")
            try:
                named = re.escape(f"isolated session theirs ({foreign.session_id})")
                with pytest.raises(ConfigError, match=named):
                    env.worker_log(foreign, 0.0)
            finally:
                foreign.close()


def test_a_session_that_cannot_be_opened_is_named_by_its_label(
    project: Path, served: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening fails with the pool's words (``no live worker for session 'session_…'``): named too."""
    from provisioner.runtime.workers import ProcessContainers

    def no_worker(self: ProcessContainers, session_id: str) -> tuple[Any, Any]:
        raise WorkerLostError(f"no live worker for session {session_id!r}: every worker died")

    with api.environment("integration", project_dir=project, runtime=served) as env:
        monkeypatch.setattr(ProcessContainers, "open_session", no_worker)
        with pytest.raises(WorkerLostError, match=r"no live worker for session 'smoke \(session_\w+\)'"):
            env.isolated("smoke")
