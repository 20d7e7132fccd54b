"""The pytest plugin, exercised on small example suites through pytester.

Runs that must not share state with this session (docker probe cache, xdist) use
``runpytest_subprocess``; the rest run in-process for speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

PROJECT = """
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[tool.provisioner.layers.fast]
adapter = "mock"
python = false
lm_mode = "mock"
isolation = "full"
timeout_s = 7
max_failures = 1
"""

QA_TEST = """
import dspy
import pytest

class QA(dspy.Signature):
    question: str = dspy.InputField()
    answer: int = dspy.OutputField()

@pytest.mark.{mark}
def test_{mark}_qa(lm):
    result = dspy.Predict(QA)(question="how many?")
    assert isinstance(result.answer, int)
"""


pytestmark = pytest.mark.usefixtures("no_settings_env")


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".toml", pyproject=PROJECT)
    return pytester


def _layered_suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_layers="""
        import pytest

        @pytest.mark.unit
        def test_unit(): pass

        @pytest.mark.integration
        def test_integration(): pass

        @pytest.mark.e2e
        def test_e2e(): pass

        @pytest.mark.fast
        def test_fast(): pass

        @pytest.mark.unit
        @pytest.mark.fast
        def test_unit_and_fast(): pass

        def test_unmarked(): pass
        """
    )


def test_markers_registered_including_custom_layers(project: pytest.Pytester) -> None:
    result = project.runpytest("--markers")
    for name in ("unit", "integration", "e2e", "fast"):
        result.stdout.fnmatch_lines([f"@pytest.mark.{name}: run only in the '{name}' layer*"])


def test_layer_run_deselects_other_layers_but_never_unmarked(project: pytest.Pytester) -> None:
    _layered_suite(project)
    result = project.runpytest("--layer", "unit", "-v")
    result.assert_outcomes(passed=3, deselected=3)
    result.stdout.fnmatch_lines(
        ["*test_unit PASSED*", "*test_unit_and_fast PASSED*", "*test_unmarked PASSED*"]
    )

    result = project.runpytest("--layer", "fast", "-v")
    result.assert_outcomes(passed=3, deselected=3)
    result.stdout.fnmatch_lines(
        ["*test_fast PASSED*", "*test_unit_and_fast PASSED*", "*test_unmarked PASSED*"]
    )


def test_layer_defaults_to_test_mode_and_flag_wins(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _layered_suite(project)
    monkeypatch.setenv("TEST_MODE", "fast")
    project.runpytest().assert_outcomes(passed=3, deselected=3)
    result = project.runpytest("--layer", "unit", "-v")
    result.assert_outcomes(passed=3, deselected=3)
    result.stdout.fnmatch_lines(["*test_unit PASSED*"])


def test_unknown_layer_is_a_usage_error_naming_the_known_ones(project: pytest.Pytester) -> None:
    result = project.runpytest("--layer", "nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown layer 'nope'; known layers: unit, integration, e2e, fast*"])


def test_a_mistyped_layer_gets_a_did_you_mean(project: pytest.Pytester) -> None:
    result = project.runpytest("--layer", "integraton")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown layer 'integraton' (did you mean 'integration'?)*"])


def test_unmarked_suite_is_untouched_and_quiet(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_a(): pass\ndef test_b(): pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=2)
    assert "= provisioner =" not in result.stdout.str()
    assert not (pytester.path / ".provision").exists()


def test_lm_fixture_makes_the_layer_lm_active(project: pytest.Pytester) -> None:
    project.makepyfile(test_qa=QA_TEST.format(mark="unit"))
    project.makepyfile(
        test_active="""
        import dspy

        def test_active(lm):
            assert dspy.settings.lm is lm
            assert lm.model.startswith("mock/")

        def test_no_lm_outside():
            assert dspy.settings.lm is None
        """
    )
    project.runpytest("--layer", "unit").assert_outcomes(passed=3)


def test_lm_flag_overrides_the_layer_mode(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_mode="""
        def test_mode(lm, provision_settings, layer):
            assert layer.name == "unit"
            assert lm.model.startswith("mock/")
        """
    )
    project.runpytest("--layer", "unit", "--lm", "mock").assert_outcomes(passed=1)
    result = project.runpytest("--layer", "unit", "--lm", "bogus")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_layer_max_failures_applies_and_maxfail_wins(project: pytest.Pytester) -> None:
    project.makepyfile("def test_1(): assert 0\ndef test_2(): assert 0\ndef test_3(): assert 0\n")
    project.runpytest("--layer", "fast").assert_outcomes(failed=1)
    project.runpytest("--layer", "fast", "--maxfail", "2").assert_outcomes(failed=2)
    project.runpytest("--layer", "unit").assert_outcomes(failed=3)


def test_layer_timeout_is_applied_to_layer_tests_only(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import pytest

        @pytest.mark.fast
        def test_marked(request):
            assert request.node.get_closest_marker("timeout").args == (7,)

        @pytest.mark.fast
        @pytest.mark.timeout(99)
        def test_own_timeout(request):
            assert request.node.get_closest_marker("timeout").args == (99,)

        def test_unmarked(request):
            assert request.node.get_closest_marker("timeout") is None
        """
    )
    project.runpytest("--layer", "fast").assert_outcomes(passed=3)
    # An explicit --timeout on the command line wins over the layer's.
    project.makepyfile(
        test_cli="""
        import pytest

        @pytest.mark.fast
        def test_cli(request):
            assert request.node.get_closest_marker("timeout") is None
        """
    )
    project.runpytest("--layer", "fast", "--timeout", "50", "test_cli.py").assert_outcomes(passed=1)


def test_report_json_and_terminal_summary(project: pytest.Pytester) -> None:
    project.makepyfile(test_qa=QA_TEST.format(mark="unit"))
    project.makepyfile(
        test_more="""
        import dspy
        import pytest

        @pytest.mark.unit
        def test_two_calls(lm, lm_cost):
            predict = dspy.Predict("question -> answer")
            predict(question="a")
            predict(question="b")
            assert lm_cost.mock == 2 and lm_cost.calls == 2 and lm_cost.cost_usd == 0

        @pytest.mark.unit
        def test_fails():
            assert False

        @pytest.mark.e2e
        def test_other_layer(): pass
        """
    )
    result = project.runpytest("--layer", "unit", "--provision-report", "out/report.json")
    result.assert_outcomes(passed=2, failed=1, deselected=1)
    result.stdout.fnmatch_lines(
        [
            "*= provisioner =*",
            "run r*",
            "layer unit: 3 tests (2 passed, 1 failed)",
            "  workers started: 0",
            "  LM calls: 3 — 3 mock, 0 replayed, 0 recorded, 0 real, 0 standin",
            "  cache misses: 0",
            "  cost: $0.0000 of the run's $1.00 limit",
            "  leaks found: 0",
        ]
    )
    data = json.loads((project.path / "out" / "report.json").read_text())
    unit = data["layers"]["unit"]
    assert unit["tests"] == 3
    assert unit["outcomes"]["passed"] == 2 and unit["outcomes"]["failed"] == 1
    assert unit["lm_calls"] == {"mock": 3, "replayed": 0, "recorded": 0, "real": 0, "standin": 0}
    assert unit["cost_usd"] == 0 and unit["cost_limit_usd"] == 1.0
    assert unit["leaks_found"] == 0
    assert re.match(r"^r\d{8}-\d{6}-[0-9a-f]{6}$", data["run_id"])


def test_xdist_workers_share_one_run_and_report(project: pytest.Pytester) -> None:
    """Two xdist workers: one run id, ids that never collide, LM calls of both in one report."""
    out = project.path / "ids"
    out.mkdir()
    tests = {}
    for n in range(6):
        tests[f"test_ids_{n}"] = f"""
            import os
            import dspy
            import pytest
            from provisioner.factories import ProgramFactory, SessionFactory

            @pytest.mark.unit
            @pytest.mark.parametrize("i", range(4))
            def test_make(i, lm):
                ids = [p.id for p in ProgramFactory.build_batch(25)] + [SessionFactory.build().session_id]
                dspy.Predict("question -> answer")(question=str(i))
                worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
                path = {str(out)!r} + f"/{n}-{{i}}-{{worker}}.txt"
                with open(path, "w") as fh:
                    fh.write("\\n".join(ids))
            """
    project.makepyfile(**tests)
    # Each process says, as it exits, whether its heap was frozen for the garbage collector: an xdist
    # worker's is once its report went to the controller, so it exits quickly (the controller waits
    # for that exit); the controller's is not.
    project.makeconftest(f"""
        import atexit, gc, os

        def _said():
            name = os.environ.get("PYTEST_XDIST_WORKER", "controller")
            with open({str(project.path)!r} + "/frozen-" + name, "w") as fh:
                fh.write(str(gc.get_freeze_count()))

        atexit.register(_said)
        """)
    result = project.runpytest_subprocess("--layer", "unit", "-n", "2", "--provision-report", "report.json")
    result.assert_outcomes(passed=24)
    frozen = {p.name: int(p.read_text()) for p in project.path.glob("frozen-*")}
    assert frozen.keys() == {"frozen-gw0", "frozen-gw1", "frozen-controller"}, frozen
    assert frozen["frozen-gw0"] > 0 and frozen["frozen-gw1"] > 0 and frozen["frozen-controller"] == 0, frozen
    files = sorted(out.iterdir())
    assert len(files) == 24
    assert {f.stem.rsplit("-", 1)[1] for f in files} == {"gw0", "gw1"}
    ids = [line for f in files for line in f.read_text().splitlines()]
    assert len(ids) == 24 * 26 == len(set(ids))
    runs = {i.split("_")[1] for i in ids}
    assert len(runs) == 1, runs  # one run id across both workers
    assert {i.split("_")[2] for i in ids} == {"gw0", "gw1"}
    data = json.loads((project.path / "report.json").read_text())
    assert data["processes"] == 3  # the controller and two workers
    assert data["layers"]["unit"]["tests"] == 24
    assert data["layers"]["unit"]["lm_calls"]["mock"] == 24
    assert data["run_id"].replace("-", "").endswith(runs.pop())


def test_docker_layer_test_fails_under_ci_and_skips_locally(project: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable engine is said in the header and the summary (shown under -q too): where it was
    looked for, how many tests needed it, and advice a wheel install can follow (no repo file named);
    in one process and under xdist, with and without CI=true."""
    project.makepyfile(
        """
        import pytest

        @pytest.mark.integration
        def test_needs_engine(): pass

        @pytest.mark.integration
        def test_needs_engine_too(): pass

        def test_unmarked(): pass
        """
    )
    bogus = f"unix://{project.path}/no-such-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", bogus)  # subprocesses inherit it
    advice = "*Start the Docker engine*check that DOCKER_HOST*names a running engine*may use its socket*"
    for xdist in ([], ["-n", "2"]):
        monkeypatch.setenv("CI", "true")
        result = project.runpytest_subprocess("--layer", "integration", "-rA", *xdist)
        result.assert_outcomes(passed=1, errors=2)
        result.stdout.fnmatch_lines(
            ["*needs a reachable Docker engine*CI=true, so this is a failure, not a skip*"]
        )
        result.stdout.fnmatch_lines([
            "*= provisioner =*",
            f"Docker engine unreachable at {bogus} (from DOCKER_HOST): 2 test(s) needed it (2 error)",
            "  CI=true, so they fail rather than skip.*" + advice])
        monkeypatch.setenv("CI", "false")
        result = project.runpytest_subprocess("--layer", "integration", *xdist)
        result.assert_outcomes(passed=1, skipped=2)
        result.stdout.fnmatch_lines([f"provisioner: Docker engine unreachable at {bogus} (from DOCKER_HOST): "
                                     "the integration layer's tests that need it will skip*"])
        result.stdout.fnmatch_lines([
            "*= provisioner =*",
            f"Docker engine unreachable at {bogus} (from DOCKER_HOST): 2 test(s) needed it (2 skipped)",
            "  skipped here (under CI=true they fail).*" + advice + "`-rs` lists them."])
        assert ".ci/" not in result.stdout.str()
    result = project.runpytest_subprocess("--layer", "integration", "-rs", "-q")
    result.stdout.fnmatch_lines(["Docker engine unreachable at*2 test(s) needed it (2 skipped)",
                                 "SKIPPED*needs a reachable Docker engine*skipped here*"])


def test_no_user_facing_message_names_a_file_of_the_checkout() -> None:
    """Messages reach users of a wheel install, which has no .ci/ (nor tests/, benchmarks/, docs/ or
    examples/): string literals of the package (not comments or docstrings) must not send them there."""
    import ast

    package = Path(__file__).resolve().parents[1] / "provisioner"
    found = []
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and re.search(r"\.ci/|\bbenchmarks/|\btests/\w+\.py|\bdocs/\w+\.md|\bexamples/",
                                  node.value)):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}: {node.value[:80]!r}")
    assert not found, found


def test_environment_report_path_is_relative_to_invocation_dir(project: pytest.Pytester) -> None:
    project.makepyfile("def test_a(): pass\n")
    sub = project.mkdir("sub")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(sub)
        result = project.runpytest(str(project.path), "--provision-report", "r.json")
    result.assert_outcomes(passed=1)
    assert Path(sub, "r.json").is_file()


def test_isolated_unit_sessions_and_cleanups_run_on_failure(project: pytest.Pytester) -> None:
    log = project.path / "cleanups.log"
    project.makepyfile(
        test_iso=f"""
        import pytest
        from provisioner.bridge import LocalBridge
        from provisioner.errors import BridgeError
        from provisioner.factories import ProgramFactory

        LOG = {str(log)!r}
        SEEN = []

        def note(text):
            with open(LOG, "a") as fh:
                fh.write(text + "\\n")

        @pytest.mark.unit
        @pytest.mark.parametrize("n", range(3))
        def test_session(isolated, bridge, n):
            assert bridge is isolated.adapter
            assert isolated.adapter.session_id == isolated.session_id
            assert isinstance(isolated.adapter.bridge, LocalBridge)
            SEEN.append((isolated.session_id, isolated.namespace, isolated.program_prefix))
            # The same program id in every test: sessions never clash.
            isolated.adapter.create_program(**ProgramFactory.build(id="shared_name").create_args())
            out = isolated.adapter.execute_program("shared_name", {{"question": "q"}})
            assert "answer" in out["outputs"]
            isolated.add_cleanup(note, f"first {{n}}")
            isolated.add_cleanup(note, f"second {{n}}")
            if n == 1:
                raise AssertionError("boom")

        def test_sessions_were_distinct():
            assert len(SEEN) == 3 and len(set(SEEN)) == 3
            assert len({{s[1] for s in SEEN}}) == 3

        def test_session_is_gone_after_the_test(isolated):
            isolated.adapter.create_program(**ProgramFactory.build(id="p").create_args())
            bridge = isolated.adapter.bridge
            session = isolated.session_id
            isolated.close()
            with pytest.raises(BridgeError, match="ProgramNotFound"):
                bridge.get_program_info("p", session)
        """
    )
    result = project.runpytest("--layer", "unit")
    result.assert_outcomes(passed=4, failed=1)
    assert log.read_text().splitlines() == [
        "second 0", "first 0", "second 1", "first 1", "second 2", "first 2"
    ]


def test_failing_cleanup_is_reported_as_a_teardown_error(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        def test_bad_cleanup(isolated):
            def explode():
                raise OSError("cannot remove scratch dir")
            isolated.add_cleanup(explode)
        """
    )
    result = project.runpytest("--layer", "unit")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*CleanupError: 1 cleanup(s) failed: *explode: OSError: cannot remove scratch dir*"]
    )


def test_environment_api_without_pytest(tmp_path: Path) -> None:
    import dspy

    import provisioner.api as api
    from provisioner.factories import ProgramFactory

    with api.environment("unit", project_dir=tmp_path) as env:
        assert env.layer.name == "unit" and env.lm_config.mode == "mock"
        assert dspy.settings.lm is env.lm
        dspy.Predict("question -> answer")(question="hello")
        with env.session() as session:
            session.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
            assert session.adapter.list_programs()["total_count"] == 1
            bridge = session.adapter.bridge
            # The in-process bridge is shared by every session of the process: no worker-wide commands.
            for command in ("reset_state", "shutdown"):
                with pytest.raises(Exception, match="Unauthorized"):
                    session.adapter.request(command)
            assert session.adapter.list_programs()["total_count"] == 1
        with pytest.raises(Exception, match="ProgramNotFound"):
            bridge.get_program_info("qa", session.session_id)
        assert env.lm_usage().mock == 1
    assert dspy.settings.lm is None
    with pytest.raises(Exception, match="ShuttingDown"):  # the in-process bridge closed with the environment
        bridge.create_program(**ProgramFactory.build().create_args())


CACHED_PROJECT = PROJECT + """
[tool.provisioner.lm]
cached_inner = "mock"
"""


def test_cached_lm_records_then_replays_and_reports_it(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=CACHED_PROJECT)
    pytester.makepyfile(
        test_cached="""
        import os
        import dspy
        import pytest

        @pytest.mark.parametrize("q", ["one", "two"])
        def test_ask(q, lm, lm_cost):
            dspy.Predict("question -> answer")(question=q)
            expected = os.environ["EXPECT"]
            assert getattr(lm_cost, expected) == 1 and lm_cost.calls == 1
        """
    )
    os.environ["EXPECT"] = "recorded"
    try:
        first = pytester.runpytest("--lm", "cached", "--provision-report", "first.json")
        first.assert_outcomes(passed=2)
        cassettes = list((pytester.path / "test" / "fixtures" / "lm_responses").rglob("*.json"))
        assert len(cassettes) == 2
        os.environ["EXPECT"] = "replayed"
        again = pytester.runpytest(
            "--lm", "cached", "--record-mode", "none", "--provision-report", "again.json"
        )
        again.assert_outcomes(passed=2)
    finally:
        os.environ.pop("EXPECT", None)
    first_lm = json.loads((pytester.path / "first.json").read_text())["layers"]["unit"]
    again_lm = json.loads((pytester.path / "again.json").read_text())["layers"]["unit"]
    assert first_lm["lm_calls"] == {"mock": 0, "replayed": 0, "recorded": 2, "real": 0, "standin": 0}
    assert first_lm["cache_misses"] == 2
    assert again_lm["lm_calls"] == {"mock": 0, "replayed": 2, "recorded": 0, "real": 0, "standin": 0}
    assert again_lm["cache_misses"] == 0 and again_lm["lm_mode"] == "cached"

    pytester.makepyfile(
        test_new="import dspy\n\ndef test_new(lm):\n    dspy.Predict('q -> a')(q='never seen')\n"
    )
    miss = pytester.runpytest("--lm", "cached", "--record-mode", "none", "test_new.py")
    miss.assert_outcomes(failed=1)
    # In-process, DSPy shows the CassetteMissError as its own LMConfigurationError with the same text
    # (provisioner.lm.cut_repeated_chain drops the chain that only repeated it).
    miss.stdout.fnmatch_lines(["*LMConfigurationError*no cassette for gemini-2.5-flash-lite `q -> a`*"])


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "qa_project"


def test_example_project_unit_layer(pytester: pytest.Pytester) -> None:
    import shutil

    shutil.copytree(EXAMPLE, pytester.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".provision"))
    result = pytester.runpytest_subprocess("--layer", "unit", "-v")
    result.assert_outcomes(passed=5, deselected=7)  # test_unit.py's four and the quick start's test
    result.stdout.fnmatch_lines(
        ["*test_triage PASSED*", "*test_refund_tickets_are_billing PASSED*", "layer unit: 5 tests (5 passed)"]
    )
    assert "LMRuleWarning" not in result.stdout.str()  # its layer rules are for one program: no noise


def test_a_leaked_process_fails_the_test_and_is_named(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import subprocess
        import sys

        import pytest

        @pytest.mark.unit
        def test_leaks_a_child():
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

        @pytest.mark.unit
        def test_reaps_its_child():
            child = subprocess.Popen([sys.executable, "-c", "pass"])
            child.wait()

        def test_not_provisioner_so_not_checked():
            pass
        """
    )
    result = project.runpytest_subprocess("--layer", "unit", "--provision-report", "r.json")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_leaks_a_child*", "*1 resource(s) leaked: process *"]
    )
    leaks = json.loads((project.path / "r.json").read_text())["layers"]["unit"]["leaks"]
    assert [record["test"].split("::")[-1] for record in leaks] == ["test_leaks_a_child"]
    kind, name = leaks[0]["leaks"][0]
    assert kind == "process"
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(int(name.split()[0])).kill()


@pytest.mark.slow
def test_cost_limit_is_per_run_not_per_xdist_worker(pytester: pytest.Pytester) -> None:
    """Real mode against the local Gemini stand-in: two xdist workers share one budget."""
    from provisioner.lm.standin import GeminiStandin

    with GeminiStandin(api_key="stand-in-key") as standin:
        pytester.makefile(
            ".toml",
            pyproject=PROJECT
            + f"""
[tool.provisioner.lm]
base_url = "{standin.url}"
max_tokens = 64
rate_limit_rpm = 1000
max_retries = 0
cost_limit_usd = 0.0002
""",
        )
        pytester.makepyfile(
            test_spend="""
            import dspy
            import pytest

            @pytest.mark.parametrize("i", range(8))
            def test_call(i, lm):
                dspy.Predict("question -> answer")(question=f"question number {i}")
            """
        )
        os.environ["GEMINI_TEST_API_KEY"] = "stand-in-key"
        try:
            shared = pytester.runpytest_subprocess(
                "--lm", "real", "-n", "2", "--provision-report", "xdist.json"
            )
            alone = pytester.runpytest_subprocess("--lm", "real", "--provision-report", "alone.json")
        finally:
            os.environ.pop("GEMINI_TEST_API_KEY", None)
    sequential = alone.parseoutcomes().get("passed", 0)
    parallel = shared.parseoutcomes().get("passed", 0)
    assert 1 <= sequential < 8, alone.stdout.str()  # the limit bites
    # Both workers drew on one budget: together they got no more calls than one process alone
    # (a per-worker budget would have let each worker spend it: up to twice as many).
    assert 1 <= parallel <= sequential, shared.stdout.str()
    print(f"calls within the limit: {sequential} alone, {parallel} with two xdist workers")
    shared.stdout.fnmatch_lines(["*CostLimitExceeded*"])
    for name, passed in (("xdist.json", parallel), ("alone.json", sequential)):
        section = json.loads((pytester.path / name).read_text())["layers"]["unit"]
        assert section["lm_calls"]["real"] == passed
        assert 0 < section["cost_usd"] <= 0.0002


def test_run_end_marks_the_ledger_complete_and_archives_it(project: pytest.Pytester) -> None:
    project.makepyfile(test_qa=QA_TEST.format(mark="unit"))
    env = {"PROVISION_LM__CACHED_INNER": "mock", "LM_CACHE_DIR": str(project.path / "cassettes")}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        project.runpytest("--layer", "unit", "--lm", "cached").assert_outcomes(passed=1)
        project.runpytest("--layer", "unit", "--lm", "cached", "-k", "qa").assert_outcomes(passed=1)
    runs = sorted((project.path / ".provision" / "runs").glob("**/ledger.jsonl"))
    assert len(runs) == 2
    completions = [
        [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == "run_complete"]
        for path in runs
    ]
    assert sorted((c[0]["complete"], c[0]["partial"]) for c in completions) == [
        (False, ["-k 'qa'"]), (True, [])]
    assert {c[0]["cache_dir"] for c in completions} == {str(project.path / "cassettes")}
    archived = list((project.path / ".provision" / "ledger").glob("*.jsonl"))
    assert archived, "the run's ledger was archived by month"
    kinds = [json.loads(line).get("kind") for f in archived for line in f.read_text().splitlines()]
    assert "recorded" in kinds and "replayed" in kinds


# --- the LM endpoint in the header and summary; e2e without a key (issue 8, item 3) ----------------

STANDIN_TEST = """
import dspy

def test_answers(lm):
    assert dspy.Predict("question -> answer")(question="2 + 2?").answer
"""


def test_e2e_without_key_lm_fixture_uses_the_standin_and_says_so(project: pytest.Pytester) -> None:
    project.makepyfile(test_standin=STANDIN_TEST)
    result = project.runpytest_subprocess("--layer", "e2e")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "provisioner: layer e2e, LM Gemini stand-in (GEMINI_TEST_API_KEY not set)" in out
    assert "LM: Gemini stand-in (GEMINI_TEST_API_KEY not set)" in out  # the summary says it again
    assert "Traceback" not in out and "AttributeError" not in out


def test_require_key_without_a_key_is_a_one_line_usage_error(project: pytest.Pytester) -> None:
    project.makepyfile(test_standin=STANDIN_TEST)
    result = project.runpytest_subprocess("--layer", "e2e", "--require-key")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert errors == ["ERROR: provisioner: --require-key: layer 'e2e' calls real Gemini but "
                      "GEMINI_TEST_API_KEY is not set (set it, or drop --require-key to use the Gemini "
                      "stand-in)"]


def test_require_key_with_a_key_and_other_layers_is_fine(project: pytest.Pytester,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    project.makepyfile("def test_a(): pass\n")
    project.runpytest("--layer", "unit", "--require-key").assert_outcomes(passed=1)
    monkeypatch.setenv("GEMINI_TEST_API_KEY", "k-not-used")
    result = project.runpytest("--layer", "e2e", "--require-key")
    result.assert_outcomes(passed=1)
    assert "provisioner: layer e2e, LM real Gemini" in result.stdout.str()


def test_header_names_the_lm_endpoint_of_each_mode(project: pytest.Pytester) -> None:
    project.makepyfile("def test_a(): pass\n")
    unit = project.runpytest("--layer", "unit")
    assert "provisioner: layer unit, LM mock" in unit.stdout.str()
    cached = project.runpytest("--layer", "integration", "--record-mode", "none")
    cassettes = project.path / "test" / "fixtures" / "lm_responses"
    expected = f"provisioner: layer integration, LM cassettes {cassettes} (record mode none; the folder"
    assert expected + " does not exist yet)" in cached.stdout.str()
    cassettes.mkdir(parents=True)
    again = project.runpytest("--layer", "integration", "--record-mode", "none")
    assert f"LM cassettes {cassettes} (record mode none)\n" in again.stdout.str()


def test_a_base_url_without_a_key_is_a_one_line_usage_error_at_start(project: pytest.Pytester,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A base_url of the user's own (a proxy) without a key: no stand-in, and no key to send. The run
    # stops before any test (it went on into failing tests), naming the setting.
    monkeypatch.setenv("PROVISION_LM__BASE_URL", "http://127.0.0.1:9/")
    project.makepyfile(test_standin=STANDIN_TEST)
    result = project.runpytest_subprocess("--layer", "e2e")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (error,) = [line for line in result.stderr.lines if line.strip()]
    assert error.startswith("ERROR: provisioner: lm.base_url=http://127.0.0.1:9/ is set but "
                            "GEMINI_TEST_API_KEY is not: layer 'e2e' calls Gemini there "
                            "(real mode (lm.mode='real'))")
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_an_interrupted_session_says_so_in_the_summary(project: pytest.Pytester) -> None:
    """A user's Ctrl-C of `pytest -n 2` got "layer integration: 0 tests (none run)" and "workers
    started: 0" with no word that the counts stop at the interrupt."""
    project.makepyfile(test_stop="def test_done(lm):\n    pass\n\n"
                                 "def test_ctrl_c():\n    raise KeyboardInterrupt\n")
    result = project.runpytest_subprocess("--layer", "unit", "-p", "no:randomly")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["interrupted (Ctrl-C): the counts below are what finished before it*",
                                 "*layer unit: 1 test (1 passed)*"])


@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["one-process", "xdist"])
def test_a_run_interrupted_before_any_test_finished_is_in_the_history(
    project: pytest.Pytester, xdist: tuple[str, ...]
) -> None:
    """A user's Ctrl-C of `pytest -n 2` during the first tests: the summary said "interrupted", but
    `provision history show <run>` said "unknown run" (0 tests: not recorded). An interrupted run is a
    run: recorded, ended "interrupted". A session that runs no test body (--co) stays unrecorded."""
    import json

    from click.testing import CliRunner

    from provisioner.cli import main

    project.makepyfile(test_stop="def test_ctrl_c(lm):\n    raise KeyboardInterrupt\n")
    result = project.runpytest_subprocess("--layer", "unit", "-p", "no:randomly", *xdist,
                                          "--provision-report", "report.json")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["interrupted (Ctrl-C): the counts below are what finished before it*"])
    run_id = json.loads((project.path / "report.json").read_text())["run_id"]
    shown = CliRunner().invoke(main, ["history", "show", run_id, "--json"])
    assert shown.exit_code == 0, shown.output
    run = json.loads(shown.output)["run"]
    assert run["exit_status"] == 2 and run["passed"] == 0, run
    listed = CliRunner().invoke(main, ["history", "list"])
    (line,) = [row for row in listed.output.splitlines() if row.startswith(run_id)]
    assert line.split()[-2] == "interrupted", listed.output

    project.runpytest_subprocess("--layer", "unit", "--co", "-q", *xdist)
    ids = json.loads(CliRunner().invoke(main, ["history", "list", "--json"]).output)
    assert [r["run_id"] for r in ids] == [run_id]  # --co: not a run of the history


NAMED_SESSION_TEST = """
import pytest

@pytest.mark.unit
def test_missing_program(bridge, isolated):
    assert isolated.name == f"test_named.py::test_missing_program ({isolated.session_id})"
    bridge.execute_program("not-made", {"question": "?"})
"""


@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["one-process", "xdist"])
def test_the_isolated_fixture_s_errors_name_the_session_by_its_test(project: pytest.Pytester,
                                                                     xdist: tuple[str, ...]) -> None:
    """A user's trial: the failure named ``session_…`` only, while the worker log section says
    ``<test node id> (session_…)``; the request's error now names the session that way too."""
    project.makepyfile(test_named=NAMED_SESSION_TEST)
    result = project.runpytest_subprocess("--layer", "unit", *xdist)
    result.assert_outcomes(failed=1)
    named = r"'test_named\.py::test_missing_program \(session_\w+\)'"
    result.stdout.re_match_lines([rf".*ProgramNotFound: .*{named}.*"])


BAD_SIGNATURE_TEST = """
import pytest

@pytest.mark.unit
def test_bad_sig(isolated):
    isolated.adapter.create_program("this is -> not -> a signature", "qa")
"""


@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["one-process", "xdist"])
def test_an_error_whose_worker_message_has_no_session_id_names_the_session(
    project: pytest.Pytester, xdist: tuple[str, ...]
) -> None:
    """A new user's trial: ``BridgeError: InvalidSignature: …`` through ``isolated`` showed no session
    (the worker's message has no id) while the worker log section named ``<node id> (session_…)``:
    the error now ends with ``(session <node id> (session_…))``."""
    project.makepyfile(test_sig=BAD_SIGNATURE_TEST)
    result = project.runpytest_subprocess("--layer", "unit", *xdist)
    result.assert_outcomes(failed=1)
    result.stdout.re_match_lines([r"E +provisioner\.errors\.BridgeError: InvalidSignature: .*"
                                  r" \(session test_sig\.py::test_bad_sig \(session_\w+\)\)$"])


def test_a_session_stopped_by_maxfail_is_not_called_a_ctrl_c(project: pytest.Pytester) -> None:
    """xdist ends a session that reached --maxfail (or a layer's max_failures) as interrupted: the
    summary said "interrupted (Ctrl-C)" though nobody pressed it."""
    project.makepyfile(test_fail="import pytest\n\n@pytest.mark.parametrize('n', range(4))\n"
                                 "def test_fails(lm, n):\n    assert False\n")
    result = project.runpytest_subprocess("--layer", "unit", "-n", "2", "--maxfail", "1")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["stopped early (stopping after * failures): the counts below are what ran*"])
    assert "Ctrl-C" not in result.stdout.str()
