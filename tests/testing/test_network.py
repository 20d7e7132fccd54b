"""No accidental spending (issue 9): tests of layers without real LM calls cannot reach the network
outside this machine or call an LM the code under test built itself; loopback, unix sockets and
provisioner's own LM keep working; pytest-socket's switches opt in."""

from __future__ import annotations

import socket

import pytest

from provisioner.errors import SpendingBlockedError
from provisioner.lm import gemini
from provisioner.testing.network import block_network

pytest_plugins = ["pytester"]

REMOTE = ("198.51.100.7", 80)  # TEST-NET-2: an address outside this machine, no DNS involved


pytestmark = pytest.mark.usefixtures("no_settings_env")


def _connect(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=0.5):
        pass


def test_block_names_the_layer_and_the_host_and_how_to_opt_in() -> None:
    with block_network("unit", "mock"), pytest.raises(SpendingBlockedError) as caught:
        _connect(REMOTE)
    message = str(caught.value)
    assert "the unit layer (LM mode mock) blocks network connections" in message
    assert "198.51.100.7" in message and "@pytest.mark.enable_socket" in message
    assert "--force-enable-socket" in message and "--layer e2e" in message
    assert caught.value.layer == "unit" and caught.value.target == "198.51.100.7"
    assert not isinstance(caught.value, OSError)  # `except OSError` retry loops do not swallow it


def test_loopback_and_unix_sockets_keep_working(tmp_path: pytest.TempPathFactory) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    path = str(tmp_path) + "/s.sock"  # type: ignore[operator]
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(path)
    unix.listen(1)
    try:
        with block_network("integration", "cached"):
            _connect(server.getsockname())
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(path)
    finally:
        server.close()
        unix.close()


def _attempt(address: tuple[str, int]) -> str:
    """``blocked`` or ``attempted`` (connected, or refused/unreachable by the network itself)."""
    try:
        _connect(address)
    except SpendingBlockedError:
        return "blocked"
    except OSError:
        pass
    return "attempted"


def test_provisioners_own_gemini_requests_pass() -> None:
    with block_network("integration", "cached"):
        assert _attempt(REMOTE) == "blocked"
        token = gemini._managed_request.set(True)
        try:
            assert _attempt(REMOTE) == "attempted"
        finally:
            gemini._managed_request.reset(token)


def test_the_block_is_lifted_after_the_block() -> None:
    before = socket.socket.connect
    with block_network("unit", "mock"):
        assert socket.socket.connect is not before
    assert socket.socket.connect is before


PROJECT = """
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[tool.provisioner]
layer = "unit"
"""

SUITE = """
import socket
import threading

import dspy
import pytest

from provisioner.errors import SpendingBlockedError

# The code under test builds its own LM at import time.
dspy.configure(lm=dspy.LM("openai/gpt-4o-mini"))
REMOTE = ("198.51.100.7", 80)


def test_own_lm_at_import_time_is_blocked():
    dspy.Predict("question -> answer")(question="a?")


def test_own_lm_async_is_blocked():
    import asyncio
    with pytest.raises(SpendingBlockedError, match="blocks calls to LMs provisioner did not build"):
        asyncio.run(dspy.Predict("question -> answer").acall(question="a?"))


def test_network_is_blocked_in_threads_too():
    errors = []
    def run():
        try:
            socket.create_connection(REMOTE, timeout=0.5).close()
        except Exception as exc:
            errors.append(exc)
    t = threading.Thread(target=run); t.start(); t.join()
    assert isinstance(errors[0], SpendingBlockedError)


def test_the_lm_fixture_is_provisioners_and_passes(lm):
    assert dspy.Predict("question -> answer")(question="a?").answer == "mock_response"


def test_dummy_lm_is_not_blocked():
    from dspy.utils import DummyLM
    with dspy.context(lm=DummyLM([{"answer": "dummy"}])):
        assert dspy.Predict("question -> answer")(question="a?").answer == "dummy"


@pytest.mark.enable_socket
def test_opt_in_with_enable_socket():
    try:
        socket.create_connection(REMOTE, timeout=0.5).close()
    except OSError:
        pass  # attempted: the network itself answered
"""


def test_issue_input_an_lm_the_code_builds_itself_is_blocked_with_the_layer_and_the_opt_in(
        pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_spend=SUITE)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines([
        "*SpendingBlockedError: provisioner: the unit layer (LM mode mock) blocks calls to LMs provisioner "
        "did not build: dspy.LM('openai/gpt-4o-mini') would call its provider*opt in with "
        "@pytest.mark.enable_socket*",
    ])
    assert "A test tried to use socket" not in result.stdout.str()


def test_force_enable_socket_opts_the_run_in(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_forced="""
import socket, pytest
def test_not_blocked():
    try:
        socket.create_connection(("198.51.100.7", 80), timeout=0.5).close()
    except OSError:
        pass  # attempted: the network itself answered
""")
    pytester.runpytest_subprocess("--force-enable-socket").assert_outcomes(passed=1)


LAYER_SUITE = """
import socket, pytest
from provisioner.errors import SpendingBlockedError

def test_connect():
    try:
        socket.create_connection(("198.51.100.7", 80), timeout=0.5).close()
    except SpendingBlockedError as exc:
        print("BLOCKED", exc.layer)
        return
    except OSError:
        pass
    print("ATTEMPTED")
"""


@pytest.mark.parametrize(("layer", "expected"), [
    ("unit", "BLOCKED unit"), ("integration", "BLOCKED integration"), ("e2e", "ATTEMPTED"),
])
def test_layers_without_real_lm_calls_block_and_e2e_does_not(pytester: pytest.Pytester, layer: str,
                                                            expected: str) -> None:
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\naddopts = '-p no:cacheprovider'\n")
    pytester.makepyfile(test_layer=LAYER_SUITE)
    result = pytester.runpytest_subprocess("--layer", layer, "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*{expected}*"])


def test_suites_that_do_not_use_provisioner_are_untouched(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\naddopts = '-p no:cacheprovider'\n")
    pytester.makepyfile(test_plain=LAYER_SUITE + """

def test_with_lm_fixture(lm):
    test_connect()


@pytest.mark.lm_rules({"match": {"question": "*"}})
def test_with_lm_rules():
    test_connect()
""")
    result = pytester.runpytest_subprocess("-s", "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*test_connect ATTEMPTED*", "*test_with_lm_fixture BLOCKED unit*",
                                 "*test_with_lm_rules BLOCKED unit*"])


ENGINE_SUITE = """
import socket, pytest
from provisioner.errors import SpendingBlockedError

@pytest.mark.parametrize("address", [("198.51.100.8", 9), ("198.51.100.9", 2376), ("198.51.100.7", 80)])
def test_connect(address):
    try:
        socket.create_connection(address, timeout=0.5).close()
    except SpendingBlockedError:
        print("BLOCKED", address[0])
        return
    except OSError:
        pass
    print("ATTEMPTED", address[0])
"""


def test_a_remote_engines_api_and_workers_stay_reachable(pytester: pytest.Pytester,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With DOCKER_HOST=tcp://HOST (a remote engine) the bridge fixtures connect to workers published
    on HOST (or PROVISION_PUBLISH_HOST) and the engine's API is there: a blocked layer lets both
    through, and only them (found by a trial: `bridge` on a remote `provision up` was refused)."""
    monkeypatch.setenv("DOCKER_HOST", "tcp://198.51.100.9:2376")
    monkeypatch.setenv("PROVISION_PUBLISH_HOST", "198.51.100.8")
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\naddopts = '-p no:cacheprovider'\n")
    pytester.makepyfile(test_engine=ENGINE_SUITE)
    result = pytester.runpytest_subprocess("--layer", "unit", "-s")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*ATTEMPTED 198.51.100.8*", "*ATTEMPTED 198.51.100.9*",
                                 "*BLOCKED 198.51.100.7*"])
