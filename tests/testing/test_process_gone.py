"""A test whose own process (isolation "process") ends under it fails with the ProcessGoneError
message on the test's own line, not after ~six frames of provisioner internals (client.py, pool.py)
and the socket error it came from; the provisioner summary counts such processes, naming the
worker — in one process and under xdist (the count travels on the report).

A new-user trial's crashed test showed those frames and the summary said only "1 failed"."""

from __future__ import annotations

from typing import Any

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("no_settings_env")

PROJECT = """
[project]
name = "gone"

[tool.provisioner.layers.procs]
adapter = "bridge"
python = true
pooling_enabled = false
lm_mode = "mock"
isolation = "process"
"""

# The test kills its own forked process (same uid as the worker inside its container), as a
# segfault or an OOM kill of a program under test would end it, then uses its session again.
SUITE = """
import docker
import pytest

@pytest.mark.procs
def test_crashes_its_process(bridge):
    process = bridge.bridge.process
    bridge.create_program("question -> answer", "qa")
    engine = docker.from_env()
    try:
        container = engine.containers.get(process["worker_id"])
        code, out = container.exec_run(
            ["python3", "-I", "-c", f"import os, signal; os.kill({process['pid']}, signal.SIGKILL)"])
        assert code == 0, out
    finally:
        engine.close()
    bridge.execute_program("qa", {"question": "hi"})

@pytest.mark.procs
def test_fine(bridge):
    assert bridge.ping()["status"] == "ok"
"""


def test_a_plain_process_gone_failure_shows_only_the_tests_frames(pytester: pytest.Pytester) -> None:
    """No engine needed: the client's own refusal after its process is gone goes the same way."""
    pytester.makepyfile(test_gone="""
        from provisioner.bridge.client import BridgeClient

        def test_gone():
            client = BridgeClient("127.0.0.1", 9)
            client._gone = "process 10 (forked from 1) of fork-mode worker w1 ended"
            client.ping()
        """)
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert ">       client.ping()" in out and "E       provisioner.errors.ProcessGoneError: process 10" in out
    assert "provisioner/bridge/client.py" not in out, out
    full = pytester.runpytest_subprocess("-p", "no:randomly", "--fulltrace")  # everything, on request
    assert "provisioner/bridge/client.py" in full.stdout.str()


@pytest.mark.docker
@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["one-process", "xdist"])
def test_a_test_whose_process_ended_fails_plainly_and_is_counted(
    pytester: pytest.Pytester, docker_engine: Any, xdist: tuple[str, ...]
) -> None:
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_procs=SUITE)
    result = pytester.runpytest_subprocess("--layer", "procs", "-p", "no:cacheprovider", "-p", "no:randomly",
                                           *xdist, timeout=400)
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert '>       bridge.execute_program("qa", {"question": "hi"})' in out, out
    assert "E       provisioner.errors.ProcessGoneError: process " in out, out
    for internal in ("provisioner/bridge/client.py", "provisioner/runtime/pool.py", "ConnectionResetError",
                     "The above exception was the direct cause"):
        assert internal not in out, (internal, out)
    assert "ended by signal SIGKILL" in out  # the worker's log line, in the test's report
    result.stdout.fnmatch_lines(["*= provisioner =*",
                                 "1 process(es) ended during a test (crashed or killed; *): prov-*-w0"])
