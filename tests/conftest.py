"""Shared test switches.

Docker: a test that needs the engine asks for the ``docker_engine`` fixture or carries the ``docker``
marker. Without an engine it is skipped on a developer's machine but FAILS under ``CI=true``, so a CI
machine that lost its engine can never go green by skipping everything that matters.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

# importlib_metadata (the backport, which litellm and pygal import) deletes the stdlib PathFinder's
# find_distributions when it is first imported and puts its own finder on sys.meta_path instead
# (importlib_metadata._compat.disable_stdlib_finder; lektor/lektor#1140 met the same). Imported for the
# first time inside a `pytester` test (tests/lm/test_refused_calls.py renders the report page: pygal),
# its finder left again when pytester put back the sys.meta_path it saved, and from then on nothing in
# that process found an installed distribution: the flaky kind of 3 of 7 full runs and a CI run.
# Imported here, before any test, it is in every snapshot.
with contextlib.suppress(ImportError):
    import importlib_metadata  # noqa: F401


# Per engine request of the tests' client: the product's own default (DockerRuntime), not a short
# one — on a loaded machine (both cores busy with builds and other suites) a plain image list took
# over 10 s, and the test failed on the timeout, not on what it checks. The probe's ping stays short.
ENGINE_REQUEST_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 10.0


def _probe_docker() -> tuple[Any | None, str]:
    try:
        import docker

        probe = docker.from_env(timeout=PROBE_TIMEOUT_S)
        try:
            probe.ping()
        finally:
            probe.close()
        return docker.from_env(timeout=ENGINE_REQUEST_TIMEOUT_S), ""
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def missing_prerequisite(message: str) -> NoReturn:
    """A test's prerequisite (engine, root, a tool) is missing: skipped on a developer's machine,
    a failure under ``CI=true`` — CI must run every test it claims to."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " — CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def prerequisite() -> Callable[[str], NoReturn]:
    """:func:`missing_prerequisite` for tests in other folders (they cannot import this conftest)."""
    return missing_prerequisite


@pytest.fixture
def watched_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """``watched_run(run_id)``: put a run the test makes on the engine itself (``plan_run`` +
    ``Deployment``, or resources labelled by hand) under the product's watchdog before it creates
    anything (tests/_helpers.py, :func:`watched_run`). A test process killed before its ``finally``
    (SIGKILL of an xdist worker, SIGTERM) leaves nothing: the watchdog removes what carries the run's
    label. The test still removes its run itself; this fixture's teardown, after the test's own,
    tells the watchdogs to stand down. Returns the run's folder."""
    from ._helpers import watched_run as watch

    folder = tmp_path_factory.mktemp("watched")
    with contextlib.ExitStack() as stack:
        yield lambda run_id: stack.enter_context(watch(run_id, folder))


@pytest.fixture
def no_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No provisioner setting in the environment for the test (``PROVISION_*``, ``TEST_MODE``,
    ``LM_CACHE_DIR``, ``GEMINI_TEST_API_KEY``: tests/_helpers.py, :func:`clear_settings`), so what
    the test (and the processes it starts) sees is what it sets, not the shell's or the CI job's.
    A whole file asks with ``pytestmark = pytest.mark.usefixtures("no_settings_env")``."""
    from ._helpers import clear_settings

    clear_settings(monkeypatch)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Any]:
    client, why = _probe_docker()
    if client is None:
        missing_prerequisite(f"this test needs a reachable Docker engine ({why})")
    yield client
    client.close()


XDIST_ENV = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")


@pytest.fixture(scope="session", autouse=True)
def _no_outer_xdist_identity() -> Iterator[None]:
    """Under ``pytest -n 2`` this process is an xdist worker, and xdist put its identity in the
    environment. The pytest runs, ``provision`` commands and workers the tests start must not inherit
    it: a nested plain pytest would call itself ``gw0`` (the run's process names, factory ids, rows
    the tests compare), and the provisioner code in this process must see what it sees without
    ``-n``. xdist itself reads these only when the worker starts (its own state is
    ``config.workerinput``), so they go for the session and come back at its end."""
    saved = {name: os.environ.pop(name) for name in XDIST_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """A test (or the code it runs in-process) that leaves its own SIGINT/SIGTERM handler in place
    changes every later test of the process: a Ctrl-C test then waits forever instead of getting
    its KeyboardInterrupt (tests/runtime/test_deployment.py hung once that way under xdist, where the
    tests before it in the process differ from a plain run). The leaker fails here, and the handler
    is put back."""
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    now = {sig: signal.getsignal(sig) for sig in before}
    leaked = {sig: handler for sig, handler in now.items() if handler is not before[sig]}
    for sig in leaked:
        signal.signal(sig, before[sig])
    if leaked:
        names = ", ".join(f"{signal.Signals(sig).name} ({handler!r})" for sig, handler in leaked.items())
        pytest.fail(f"the test left its own handler of {names} in place", pytrace=False)


def _distributions_visible() -> bool:
    import importlib.metadata as md

    return next(iter(md.distributions(name="pytest")), None) is not None  # a site-packages one


@pytest.fixture(autouse=True)
def _installed_distributions_stay_visible() -> Iterator[None]:
    """After each test, ``importlib.metadata`` still finds the installed distributions.

    Two ways to lose them for the rest of a process: the finder of distributions removed from
    ``sys.meta_path`` while the stdlib one is disabled (see the ``importlib_metadata`` import at the
    top: it made unrelated tests fail later in one xdist process, "the distribution
    'dspy-provisioner' is not installed", "No package metadata was found for testcontainers"), and a
    failed listing of site-packages kept as an empty one (``EMFILE``: the error is swallowed and the
    listing cached by the folder's mtime; tests/runtime/test_images.py). The test during which it
    happens fails here, by name, and the state is repaired so the tests after it see the truth."""
    yield
    if _distributions_visible():
        return
    import sys

    try:
        fds: object = len(os.listdir("/proc/self/fd"))
    except OSError as exc:
        fds = exc
    finders = [repr(f) for f in sys.meta_path if getattr(f, "find_distributions", None)]
    site = [p for p in sys.path if p.endswith("site-packages")]
    from provisioner.runtime.images import forget_metadata_listings

    if not finders:  # put the backport's finder back: a fresh import installs it again
        sys.modules.pop("importlib_metadata", None)
        with contextlib.suppress(ImportError):
            import importlib_metadata  # noqa: F401
    forget_metadata_listings()
    pytest.fail(
        f"after this test importlib.metadata found no installed distribution (finders of distributions "
        f"on sys.meta_path: {finders or 'none'}; site-packages on sys.path: {site}; open descriptors: "
        f"{fds}; found again once repaired: {_distributions_visible()})",
        pytrace=False,
    )


@pytest.fixture
def sigint_default() -> Iterator[None]:
    """Python's own SIGINT handler for the test, whatever this process inherited, for tests of
    Ctrl-C. pytest started as a background job of a script (`pytest ... &`, a benchmark script, a CI
    step run with `&`) has SIGINT ignored, and so have its xdist workers and every process they start
    (an ignored signal stays ignored across fork and exec; Python then installs no handler): a SIGINT
    then becomes no KeyboardInterrupt in this process, and a `provision up` child ignores it — both
    Ctrl-C tests failed that way in every `-n 2` run of the suite that a script started in the
    background. A caught signal is back at its default in a child after exec, so children started
    during the test get SIGINT at its default too. SIGINT is also unblocked in this thread (a blocked
    signal stays pending, here and in children, which inherit the mask). Both put back at the end."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def _docker_marker(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("docker") is not None:
        request.getfixturevalue("docker_engine")


# The fast tier's heaviest files, heaviest first (seconds of setup + call + teardown summed over the
# file's tests; mean of the five `-n 2 --dist loadfile` runs of the README's command on a quiet
# machine, commit 78c9e35, 2026-11-30 17:27-18:01 UTC, docs/benchmarks.md "Test suite time";
# benchmarks/bench_test_suite.py prints the current figures). The README's command runs the suite
# on two xdist workers with `--dist loadfile` (a file's tests in one process, so its module
# fixtures start once), and the scheduler below hands out files in collection order (xdist's
# `--no-loadscope-reorder`) instead of by test count: with the heaviest first, the last files to
# start are small ones and the two workers finish close together (longest-processing-time-first
# scheduling). A stale list costs balance, never correctness; files not listed keep their
# collection order after these.
HEAVY_FIRST = (
    "tests/runtime/test_docker_layers.py",  # 45 s
    "tests/history/test_plugin_history.py",  # 34 s (+ test_report_page.py: one unit, SAME_WORKER)
    "tests/test_pytest_plugin.py",  # 34 s
    "tests/testing/test_completeness.py",  # 25 s
    "tests/runtime/test_docker_isolation.py",  # 24 s
    "tests/testing/test_one_run.py",  # 24 s
    "tests/testing/test_network.py",  # 19 s
    "tests/bridge/test_access.py",  # 18 s
    "tests/lm/test_cached.py",  # 15 s
    "tests/bridge/test_forking.py",  # 15 s
    "tests/bridge/test_fairness.py",  # 14 s
    "tests/testing/test_killed_parts.py",  # 12 s
    "tests/runtime/test_docker_run_command.py",  # 12 s
    "tests/history/test_shards.py",  # 12 s
    "tests/test_api.py",  # 11 s
    "tests/bridge/test_worker_tcp.py",  # 11 s
    "tests/runtime/test_docker_repair.py",  # 10 s
    "tests/bridge/test_server_limits.py",  # 10 s
    "tests/testing/test_worker_logs.py",  # 10 s
    "tests/lm/test_cassette_runs.py",  # 10 s
    "tests/lm/test_activation.py",  # 9 s
    "tests/bridge/test_server_paths.py",  # 8 s
    "tests/runtime/test_docker_fork.py",  # 8 s
)


def heavy_rank(nodeid: str) -> int:
    """Where a test's file comes in :data:`HEAVY_FIRST` (files not listed: after all of them)."""
    path = nodeid.split("::", 1)[0]
    return HEAVY_FIRST.index(path) if path in HEAVY_FIRST else len(HEAVY_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Heaviest files first (see :data:`HEAVY_FIRST`); a stable sort, so every xdist worker orders
    alike (xdist checks that their collections are equal) and a file's tests keep their order."""
    items.sort(key=lambda item: heavy_rank(item.nodeid))


# Files whose tests share a costly session fixture: under `--dist loadfile` each file may land on
# another xdist worker, and each worker then builds the fixture itself. tests/history's
# `three_runs` (three pytest runs of a suite, one under xdist: ≈ 18 s) was built twice that way
# (tests/history/test_report_page.py took 25 s under -n 2 against 0.2 s serial).
SAME_WORKER = {
    "tests/history/test_plugin_history.py": "tests/history (three_runs, standin_run)",
    "tests/history/test_report_page.py": "tests/history (three_runs, standin_run)",
}


def file_scope(nodeid: str) -> str:
    """The xdist work unit of a test: its file, or its group of :data:`SAME_WORKER`."""
    path = nodeid.split("::", 1)[0]
    return SAME_WORKER.get(path, path)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: `-p no:xdist` runs without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile` with :data:`SAME_WORKER`'s files as one unit (xdist's own scheduler, its
    scope function replaced), handed out in collection order, i.e. :data:`HEAVY_FIRST` first (as
    `--no-loadscope-reorder`: set here, not in addopts, where `-p no:xdist` would reject it); any
    other `--dist` mode is xdist's own."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False

    class SharedFixtureFiles(LoadFileScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return file_scope(nodeid)

    return SharedFixtureFiles(config, log)


SERVED_IMAGE = "provisioner-worker:served"  # the image tag tests' served in-memory engines know


@pytest.fixture
def served() -> Iterator[Any]:
    """An in-memory engine that runs real bridge servers and relays in-process
    (``FakeRuntime(serve=True)``), knowing the image ``SERVED_IMAGE``; closed after the test."""
    from provisioner.runtime.engine.fake import FakeRuntime

    runtime = FakeRuntime(images=(SERVED_IMAGE,), serve=True)
    try:
        yield runtime
    finally:
        runtime.close()
