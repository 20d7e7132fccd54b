"""pytest plugin entry point (registered via the ``pytest11`` entry point).

Thin hooks only: the logic lives in plain classes (:mod:`provisioner.testing`, :mod:`provisioner.api`)
that scripts can use without pytest.

Harmless in suites that do not use it: tests without a layer marker are never deselected, nothing
touches Docker unless a provisioner fixture or a layer marker of a container layer asks for it, and the
terminal summary appears only when the run used provisioner.

Fixtures: ``provision_settings``, ``layer``, ``lm``, ``lm_cost``, ``isolated``, ``bridge``,
``bridge_worker``, ``bridge_pool``, ``resource_manager``. Options: ``--layer``, ``--lm``,
``--record-mode``, ``--require-key``, ``--provision-report PATH``. See docs/pytest.md.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from provisioner.errors import LeakError, ProvisionerError
from provisioner.lmconfig import LM_MODES, RECORD_MODES
from provisioner.testing.plugin_state import POOL_FIXTURES, WORKEROUTPUT_KEY, LMCost, ProvisionRun
from provisioner.testing.progress import Phases

RUN_KEY = pytest.StashKey[ProvisionRun]()
PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
_NODES_KEY = pytest.StashKey[list[Any]]()  # xdist controller: its workers (WorkerController)
_MERGED_KEY = pytest.StashKey[set[int]]()  # ... whose process report joined the run's
_PROGRESS_KEY = pytest.StashKey[bool]()  # xdist controller: it has shown a test's outcome
_COLLECTED_KEY = pytest.StashKey[list[pytest.Item]]()  # every item collected (before any deselection)
_DESELECTED_KEY = pytest.StashKey[set[str]]()  # ... and the ids passed to pytest_deselected
_DROPPED_OUTPUT = "provisioner_dropped"  # an xdist worker's workeroutput: what its collection left out


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("provisioner", "provisioner: container test environments for DSPy")
    group.addoption(
        "--layer", dest="provision_layer", default=None, metavar="NAME",
        help="the test layer: unit, integration, e2e or one of yours (default: TEST_MODE, then settings)",
    )
    group.addoption(
        "--lm", dest="provision_lm", default=None, choices=LM_MODES,
        help="override the layer's LM mode",
    )
    group.addoption(
        "--record-mode", dest="provision_record_mode", default=None, choices=RECORD_MODES,
        help="cassette record mode of the cached LM",
    )
    group.addoption(
        "--require-key", dest="provision_require_key", action="store_true", default=False,
        help="real-mode layers must call the real Gemini API: a missing GEMINI_TEST_API_KEY is a usage "
             "error (default: the Gemini stand-in answers, and the header says so)",
    )
    group.addoption(
        "--provision-report", dest="provision_report", default=None, metavar="PATH",
        help="write the run report (per layer: tests, workers, LM calls, cost, leaks) as JSON to PATH",
    )
    group.addoption(
        "--provision-costs", dest="provision_costs", default=None, type=int, metavar="N",
        help="show the N most expensive tests (LM dollars and calls; N=0 for all), like --durations",
    )


def _split_label(config: pytest.Config) -> str | None:
    """"GROUP/SPLITS" when pytest-split runs one group of the suite (its --group and --splits)."""
    splits, group = config.getoption("splits", None), config.getoption("group", None)
    return f"{group}/{splits}" if splits is not None and group is not None else None


@pytest.hookimpl(tryfirst=True)  # before xdist reads --maxfail
def pytest_configure(config: pytest.Config) -> None:
    try:
        run = ProvisionRun.from_pytest(
            layer=config.getoption("provision_layer"),
            lm_mode=config.getoption("provision_lm"),
            record_mode=config.getoption("provision_record_mode"),
            report_path=config.getoption("provision_report"),
            require_key=config.getoption("provision_require_key"),
            shards=config.getoption("splits", None),  # pytest-split's, when installed: lm.shards
            shard=_split_label(config),
            project_dir=config.rootpath,
            invocation_dir=config.invocation_params.dir,
            workerinput=getattr(config, "workerinput", None),
        )
    except ProvisionerError as exc:
        raise pytest.UsageError(f"provisioner: {exc}") from None
    config.stash[RUN_KEY] = run
    # No test body runs (--setup-only sets fixtures up, so it still gets its image and pool).
    run.runs_no_body = _runs_nothing(config) or bool(getattr(config.option, "setuponly", False))
    config.stash[_NODES_KEY] = []
    config.stash[_MERGED_KEY] = set()
    config.stash[_COLLECTED_KEY] = []
    config.stash[_DESELECTED_KEY] = set()
    # Our SpendingBlockedError says it all; pytest-socket's own warning for the same block is noise.
    config.addinivalue_line("filterwarnings", "ignore:A test tried to use socket.socket.connect:UserWarning")
    config.pluginmanager.register(_CompletenessHooks(run, config), "provisioner-completeness")
    if hasattr(config, "workerinput"):
        config.pluginmanager.register(_WorkerEnd(run), "provisioner-end")
    else:
        config.pluginmanager.register(_ControllerEnd(run, config.stash[_NODES_KEY]), "provisioner-end")
    for line in run.marker_lines():
        config.addinivalue_line("markers", line)
    config.addinivalue_line(
        "markers",
        "lm_rules(*rules): this test's own mock LM rules (provisioner.lmconfig.MockRule or a dict of its "
        "fields: `python -m pydoc provisioner.lmconfig.MockRule`), layered over the layer's LM for the test "
        "and the threads it starts",
    )
    if run.layer.max_failures and not config.getoption("maxfail"):
        config.option.maxfail = run.layer.max_failures  # --maxfail / -x given by the user win


@contextlib.contextmanager
def _phases(config: pytest.Config) -> Iterator[Phases]:
    """How start-up phases are shown: a rich spinner on a terminal (output capture lifted meanwhile),
    plain lines otherwise; in an xdist worker one whole line per phase on its stderr, which xdist
    leaves on the terminal (the worker's stdout is not shown), so ``-n 2`` says what each process
    waits for instead of sitting silent while the pool warms."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        def write(text: str) -> None:
            sys.stderr.write(text)
            sys.stderr.flush()

        marker = _progress_marker(config)
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            yield Phases(write, process=str(workerinput.get("workerid", "xdist")), midline=marker.exists)
        return
    if reporter is None:
        yield Phases(lambda text: None)
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        if reporter.isatty and sys.stdout.isatty():
            from rich.console import Console

            reporter.ensure_newline()
            yield Phases(reporter.write, console=Console(highlight=False))
            return
    reporter.ensure_newline()
    yield Phases(lambda text: reporter.write(text, flush=True))


def _progress_marker(config: pytest.Config) -> Path:
    """A file in the run's folder that the xdist controller creates when it first shows a test's
    outcome: from then on its progress line may be mid-line, so an xdist worker's phase line starts
    with a newline (before, that newline was a blank line under "2 workers [N items]")."""
    return config.stash[RUN_KEY].identity.run_dir / "progress-shown"


def _shows_outcome(config: pytest.Config, report: pytest.TestReport) -> bool:
    """Whether the terminal prints something for ``report``: its status letter (". s F"), or under
    ``-v`` its word. A passed set-up or teardown prints nothing: the terminal is still at the start of
    a line (marking then gave the next worker's phase line a blank line above it, under "2 workers [4
    items]", whenever one process reached a test's set-up before another started its pool)."""
    _category, letter, word = config.hook.pytest_report_teststatus(report=report, config=config)
    return bool(word) if config.get_verbosity() > 0 else bool(letter)


def _progress_shown(config: pytest.Config) -> None:
    """xdist controller: a test's outcome is about to be shown (see :func:`_progress_marker`)."""
    if config.stash.get(_PROGRESS_KEY, False) or config.stash[RUN_KEY].runs_no_body:
        return  # a session that runs nothing leaves no run folder (and its workers start nothing)
    config.stash[_PROGRESS_KEY] = True
    marker = _progress_marker(config)
    with contextlib.suppress(OSError):  # a worker's line then keeps its leading newline: never joined
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def _runs_nothing(config: pytest.Config) -> bool:
    """pytest collects (and may list fixtures) but runs no test and no fixture: ``--collect-only``,
    ``--setup-plan``, ``--fixtures``, ``--fixtures-per-test``. No image build, no pool for those."""
    option = config.option
    return any(getattr(option, name, False)
               for name in ("collectonly", "setupplan", "showfixtures", "show_fixtures_per_test"))


@pytest.hookimpl(tryfirst=True)  # before xdist starts its workers: they get the image's tag
def pytest_sessionstart(session: pytest.Session) -> None:
    """Check or build the worker image once, in the controller, before any test (and its timeout)."""
    config = session.config
    if hasattr(config, "workerinput") or _runs_nothing(config):
        return
    with _phases(config) as phases:
        config.stash[RUN_KEY].prepare_image(phases)


def pytest_itemcollected(item: pytest.Item) -> None:
    item.config.stash[_COLLECTED_KEY].append(item)


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        items[0].config.stash[_DESELECTED_KEY].update(item.nodeid for item in items)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Load what the spending guard wraps (DSPy's call path) and what the layer's LM needs before the
    first test, outside its timeout. Note which collected tests of the layer the selection left out
    (pytest-split's shard, a plugin dropping items): such a run cannot vouch for unused cassettes."""
    from provisioner.testing import network
    from provisioner.testing.selection import split_by_layer

    run = session.config.stash[RUN_KEY]
    collected = session.config.stash[_COLLECTED_KEY]
    layer_tests, _ = split_by_layer([(item, [m.name for m in item.iter_markers()]) for item in collected],
                                    run.layer.name, run.layer_names)
    told: set[str] = session.config.stash[_DESELECTED_KEY]
    run.completeness.collection(layer_tests=[item.nodeid for item in layer_tests],
                                selected=[item.nodeid for item in session.items], deselected=sorted(told),
                                shard=_split_label(session.config))
    force = bool(session.config.getoption("force_enable_socket", False))
    if any(network.applies(run, [m.name for m in item.iter_markers()], getattr(item, "fixturenames", ()),
                           force_enabled=force) for item in session.items):
        network.prepare()
    if any(run.is_layer_test([m.name for m in item.iter_markers()])
           or network.PROVISIONER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
           for item in session.items):
        from provisioner.lm import preload

        preload(run.environment.lm_config)  # e.g. google-genai: not inside the first test's timeout


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """A single process: warm the pool before the first test (xdist workers: see below)."""
    config = session.config
    xdist = hasattr(config, "workerinput") or config.pluginmanager.has_plugin("dsession")
    if _runs_nothing(config) or xdist:
        return
    with _phases(config) as phases:
        config.stash[RUN_KEY].warm_pool(phases, [getattr(item, "fixturenames", ()) for item in session.items])


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outside pytest-timeout's wrapper: not timed
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
    """An xdist worker warms its pool before the first of its tests that needs one (it collects every
    test but runs only some: warming at its start would start pools that are never used)."""
    run = item.config.stash[RUN_KEY]
    names = getattr(item, "fixturenames", ())
    if not run.pool_warmed and POOL_FIXTURES.intersection(names) and not _runs_nothing(item.config):
        with _phases(item.config) as phases:
            run.warm_pool(phases, [names])
    run.test_started(item.nodeid)
    return (yield)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return config.stash[RUN_KEY].header_lines()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: hand the run's identity to each worker (one run, many processes)."""
    node.workerinput.update(node.config.stash[RUN_KEY].workerinput())
    node.config.stash[_NODES_KEY].append(node)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run = config.stash[RUN_KEY]
    kept, deselected = run.select([(item, [m.name for m in item.iter_markers()]) for item in items])
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
    explicit_timeout = config.getoption("timeout", None) is not None
    if config.pluginmanager.hasplugin("timeout") and not explicit_timeout:
        for item in items:
            marked = run.is_layer_test([m.name for m in item.iter_markers()])
            if marked and not item.get_closest_marker("timeout"):
                item.add_marker(pytest.mark.timeout(run.layer.timeout_s))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A test failing with a DSPy error over a cassette error of the same text (a miss, with its diff)
    shows that text once, not once per link of the chain (provisioner.lm.cut_repeated_chain)."""
    try:
        return (yield)
    except Exception as exc:
        if "provisioner.lm" in sys.modules:
            from provisioner.lm import cut_repeated_chain

            cut_repeated_chain(exc)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    gone = _process_gone(item, call)
    report = yield
    if gone is not None:  # counted by the controller's summary (a report attribute travels with xdist)
        report.provisioner_process_gone = gone.worker or "?"
    phases = item.stash.setdefault(PHASE_REPORTS, {})
    phases[report.when] = report
    run = item.config.stash[RUN_KEY]
    pool = getattr(item, "funcargs", {}).get("bridge_pool") if report.when == "setup" else None
    if pool is not None and report.passed:  # the test may use any of the pool's workers
        run.worker_logs.used_pool(item.nodeid, pool)
    if report.failed:  # the log lines of the workers the test used, from its window
        since = phases.get("setup", report).start
        report.sections.extend(run.worker_log_sections(item.nodeid, since, report.stop))
    if report.when == "teardown":  # LM usage, leaks, saved logs: JUnit XML properties, history rows
        report.user_properties.extend(run.test_properties(item.nodeid))
    return report


_PACKAGE_DIR = Path(__file__).resolve().parent


def _process_gone(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """The :class:`~provisioner.errors.ProcessGoneError` a test failed with (its own fork-mode
    process ended), or None. Its failure then shows the test's own frames and the message, not
    the client's and pool's frames it passed through (about six of them) nor the socket error it
    was raised from; ``--fulltrace`` shows everything as usual."""
    from provisioner.errors import ProcessGoneError

    excinfo = call.excinfo
    if excinfo is None or not excinfo.errisinstance(ProcessGoneError):
        return None
    if not item.config.getoption("fulltrace", False):
        # The raw chain, not ExceptionInfo.traceback: pytest's own filter re-walks it from the test's
        # frame (Traceback.cut), so only an end cut off the chain stays off.
        chain: list[TracebackType] = []
        tb: TracebackType | None = excinfo.tb
        while tb is not None:
            chain.append(tb)
            tb = tb.tb_next
        inside = [_PACKAGE_DIR in Path(t.tb_frame.f_code.co_filename).resolve().parents for t in chain]
        last_outside = max((i for i, internal in enumerate(inside) if not internal), default=None)
        if last_outside is not None and last_outside < len(chain) - 1:
            chain[last_outside].tb_next = None  # the test's line that called into provisioner is last
            excinfo.traceback = type(excinfo.traceback)(excinfo.tb)  # rebuilt from the shortened chain
        excinfo.value.__cause__ = None  # the socket error under it says nothing the message does not
        excinfo.value.__suppress_context__ = True
    return excinfo.value


class _CompletenessHooks:
    """Hooks that see whether the run reaches its end: a timed-out test (also on an xdist worker —
    the controller gets its report) or a crashed xdist worker makes the run partial."""

    def __init__(self, run: ProvisionRun, config: pytest.Config) -> None:
        self.run = run
        self.config = config
        self.xdist_controller = (not hasattr(config, "workerinput")
                                 and config.pluginmanager.has_plugin("xdist")
                                 and bool(getattr(config.option, "numprocesses", None)))

    @pytest.hookimpl(tryfirst=True)  # before the terminal reporter prints the outcome
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.xdist_controller and _shows_outcome(self.config, report):
            _progress_shown(self.config)
        self.run.rows.logreport(report)
        self.run.completeness.phase(report.nodeid, report.when)
        if report.failed:
            self.run.completeness.test_report(report.nodeid, True, report.longreprtext)

    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        if self.xdist_controller and self.config.get_verbosity() > 0:
            _progress_shown(self.config)  # -v: the test's id is printed now, its line left open

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str, report: Any, sched: Any) -> None:
        self.run.completeness.worker_crash(crashitem)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    _merge_worker_output(node)


def _merge_worker_output(node: Any) -> None:
    """Once per xdist worker: its process report (sent with its ``workerfinished``) joins the run's."""
    merged = node.config.stash[_MERGED_KEY]
    output = getattr(node, "workeroutput", {}).get(WORKEROUTPUT_KEY)
    if output and id(node) not in merged:
        merged.add(id(node))
        run = node.config.stash[RUN_KEY]
        run.merge_worker(output)
        dropped = node.workeroutput.get(_DROPPED_OUTPUT)
        if dropped and run.completeness.dropped is None:  # every worker collects the same suite
            run.completeness.dropped = (dropped[0], list(dropped[1]))


class _ControllerEnd:
    """xdist's controller: its environment (and with it the run's shared pool) goes as soon as every
    xdist worker has reported, while xdist still waits for their processes to exit
    (``ProvisionRun.close_once_reported``). Outermost, so the thread starts before xdist's own
    session end begins that wait; the innermost wrapper below then closes as before (waiting for
    the thread, if it is still closing)."""

    def __init__(self, run: ProvisionRun, nodes: list[Any]) -> None:
        self.run = run
        self.nodes = nodes

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Generator[None, None, None]:
        if self.nodes:
            self.run.close_once_reported(list(self.nodes))
        return (yield)


class _WorkerEnd:
    """An xdist worker: after its report went to the controller, its exit is quick
    (``ProvisionRun.worker_reported``); before pytest's own unconfigure, hence ``tryfirst``."""

    def __init__(self, run: ProvisionRun) -> None:
        self.run = run

    @pytest.hookimpl(tryfirst=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.run.worker_reported()


# Innermost wrapper, so its body runs after every plain implementation: after pytest's own (the
# fixtures an interrupted test still holds are torn down while the environment is up) and, in the
# xdist controller, after xdist's (its workers have ended, so removing the run's shared pool cannot
# pull it from under their teardown: on a Ctrl-C they would wait to heal it, and re-create what it
# removes); inside xdist's own wrapper, which sends a worker's ``workeroutput`` after it.
@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> Generator[None, None, None]:
    try:
        yield
    finally:
        _session_finished(session)


def _session_finished(session: pytest.Session) -> None:
    run = session.config.stash[RUN_KEY]
    # An interrupted controller's loop no longer ran pytest_testnodedown: the workers that still
    # finished sent their reports all the same (xdist keeps them on the node).
    for node in session.config.stash.get(_NODES_KEY, []):
        _merge_worker_output(node)
    run.close()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[WORKEROUTPUT_KEY] = run.process_report_json()
        if run.completeness.dropped is not None:
            workeroutput[_DROPPED_OUTPUT] = list(run.completeness.dropped)
        return
    config = session.config
    run.completeness.selection(args=config.args, invocation_dir=config.invocation_params.dir,
                               rootdir=config.rootpath, testpaths=config.getini("testpaths") or [],
                               options=vars(config.option))
    dsession = config.pluginmanager.getplugin("dsession")  # xdist's controller, if any
    stopped = session.shouldfail or session.shouldstop or getattr(dsession, "shouldstop", None)
    run.completeness.ending(exitstatus=int(session.exitstatus), stopped=str(stopped) if stopped else None,
                            selected=session.testscollected)
    run.exit_status = int(session.exitstatus)
    run.stopped = str(stopped) if stopped else None
    run.close_ledger()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = config.stash[RUN_KEY]
    if hasattr(config, "workerinput") or _runs_nothing(config):
        return  # --setup-plan, --collect-only, --fixtures: nothing was started, nothing to sum up
    report = run.finish(terminalreporter.stats)
    if report is None:
        return
    terminalreporter.write_sep("=", "provisioner")
    for line in run.summary_lines(report):
        terminalreporter.write_line(line)
    if run.report_path is not None:
        terminalreporter.write_line(f"report written to {run.report_path}")
    costs = config.getoption("provision_costs")
    if costs is not None:
        from provisioner.history.rows import costliest_lines

        count = "" if costs == 0 else f"{costs} "
        terminalreporter.write_sep("=", f"{count}most expensive tests (billed $, LM calls)")
        for line in costliest_lines(run.rows.test_rows(), costs) or ["no test made LM calls"]:
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(RUN_KEY, None)
    if run is not None and not hasattr(config, "workerinput"):
        run.finish(None)  # writes the JSON report if the terminal summary did not run (-p no:terminal)


# -- fixtures -----------------------------------------------------------------------------------------


USES_PROVISIONER = pytest.StashKey[bool]()


def _run(request: pytest.FixtureRequest) -> ProvisionRun:
    """The run, marked as used: a provisioner fixture was asked for (the test is then leak-checked)."""
    run = request.config.stash[RUN_KEY]
    run.mark_used()
    if isinstance(request.node, pytest.Item):
        request.node.stash[USES_PROVISIONER] = True
    return run


def _need_docker(run: ProvisionRun, what: str) -> None:
    problem = run.docker_problem()
    if problem is not None:
        message = run.docker_message(what, problem)
        if run.docker_is_required():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def provision_settings(request: pytest.FixtureRequest) -> Any:
    """The effective :class:`provisioner.Settings` of this run."""
    return _run(request).environment.settings


@pytest.fixture(scope="session")
def layer(request: pytest.FixtureRequest) -> Any:
    """The active :class:`provisioner.Layer`."""
    return _run(request).environment.layer


@pytest.fixture
def lm(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh ``dspy.LM`` for the layer (mock / cached / real), active for the test: in the test's
    thread and in every thread, ``dspy.Parallel`` worker and asyncio task it starts (see
    :func:`provisioner.lm.activation.activate`).

    Real mode without ``GEMINI_TEST_API_KEY`` talks to a Gemini stand-in, as the workers do (the
    header says so); ``--require-key`` makes a missing key a usage error instead.
    """
    from provisioner.lm.activation import activate
    from provisioner.lm.mock import describe_rule

    run = _run(request)
    rules = _test_rules(request)
    try:
        model = run.environment.build_lm(rules=rules)
    except ProvisionerError as exc:
        pytest.fail(f"provisioner: lm fixture: {exc}", pytrace=False)
    with activate(model, what=f"the lm fixture of {request.node.nodeid}"):
        yield model
    rules.warn_misfits()  # once per rule of this test, not per request
    run.note_unmatched_lm_rules(request.node.nodeid, [describe_rule(r) for r in rules.unmatched()])


TEST_RULES = pytest.StashKey[Any]()


def _test_rules(request: pytest.FixtureRequest) -> Any:
    """This test's own LM rules (:class:`provisioner.lm.mock.TestRules`), from its ``lm_rules`` markers
    (closest first: function, class, module)."""
    from pydantic import ValidationError

    from provisioner.lm.mock import TestRules

    node = request.node
    rules = node.stash.get(TEST_RULES, None)
    if rules is None:
        rules = TestRules(default=_run(request).environment.lm_config.mock_default)
        for marker in node.iter_markers("lm_rules"):
            try:
                rules.extend(marker.args)
            except (ValidationError, TypeError) as exc:
                pytest.fail(f"provisioner: @pytest.mark.lm_rules of {node.nodeid}: {exc}", pytrace=False)
        node.stash[TEST_RULES] = rules
    return rules


@pytest.fixture
def lm_rules(request: pytest.FixtureRequest, lm: Any) -> Any:
    """This test's own mock LM rules over the layer's LM (the ``lm`` fixture is active with them):
    ``lm_rules.add(match={"question": "*"}, outputs={"answer": "42"})`` adds one while the test runs;
    ``@pytest.mark.lm_rules(...)`` gives them before it starts. Requests they match are answered by the
    mock in every mode — never recorded into cassettes, never sent to Gemini."""
    return _test_rules(request)


@pytest.fixture
def lm_cost(request: pytest.FixtureRequest) -> LMCost:
    """Cost and call counts of LM calls made during the current test (live: read it at the end)."""
    return _run(request).lm_cost(request.node.nodeid)


@pytest.fixture
def isolated(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An isolated session: ``namespace``, ``program_prefix``, ``session_id``, ``adapter``, ``add_cleanup``.

    Cleanups run in reverse order after the test, also when it failed.
    """
    run = _run(request)
    if run.layer.needs_docker:
        _need_docker(run, f"isolated ({run.layer.name} layer)")
    test = run.environment.isolated(label=request.node.nodeid)
    if run.layer.needs_docker:  # its failure report shows the log of the worker the session is on
        run.worker_logs.used_session(request.node.nodeid, test.session_id, run.environment.containers.pool)
    try:
        yield test
    finally:
        test.close()  # cleanups run in reverse order, also when the test failed


@pytest.fixture
def bridge(isolated: Any) -> Any:
    """The isolated session's adapter (``isolated.adapter``)."""
    return isolated.adapter


@pytest.fixture
def bridge_worker(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A dedicated worker container for this test only (testcontainers ``DockerContainer`` from the
    layer's recipe): ``.client`` (a BridgeClient), ``.session(id)``, ``.address``, ``.container``.

    Removed after the test, unless the test failed and the cleanup policy retains failures.
    """
    run = _run(request)
    _need_docker(run, "bridge_worker")
    node = request.node
    with run.environment.dedicated_worker(node.nodeid, retain=lambda: run.retain(_failed(node))) as worker:
        run.worker_logs.used(node.nodeid, worker.name, worker.container_id)
        yield worker
    if worker.retained:
        run.worker_logs.retained(node.nodeid, worker.name)


@pytest.fixture(scope="session")
def bridge_pool(request: pytest.FixtureRequest) -> Any:
    """The run's warm pool of workers (this process's share of it) for pooled layers such as e2e."""
    run = _run(request)
    _need_docker(run, "bridge_pool")
    return run.environment.pool


@pytest.fixture(scope="session")
def resource_manager(request: pytest.FixtureRequest) -> Any:
    """This process's :class:`~provisioner.runtime.resources.ResourceManager` (track your own temp
    files, ports or processes with ``owner=f"test:{request.node.nodeid}"`` to have them leak-checked)."""
    run = _run(request)
    _need_docker(run, "resource_manager")
    return run.environment.containers.resources


SOCKET_RESOLUTION_CACHE = pytest.StashKey[dict[str, set[str]]]()
SOCKET_GUARDS = pytest.StashKey[dict[tuple[str, ...], Any]]()
ENGINE_HOSTS = pytest.StashKey[tuple[str, ...]]()


@pytest.fixture(autouse=True)
def _provisioner_test_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Everything provisioner does around every test, in one fixture (each autouse fixture costs
    pytest a fixture definition, a ``request`` object and a finalizer per test):

    * the Docker check for layer-marked tests of container layers (skip locally, fail under CI);
    * the per-test leak check for tests that use provisioner;
    * the spending guard: in layers whose LM is mock or cached, the test cannot reach the network
      outside this machine or call an LM provisioner did not build (:mod:`provisioner.testing.network`);
    * a test marked ``lm_rules`` gets the ``lm`` fixture (its LM, with the rules) without asking.

    Set up first, so torn down last: the leak check sees the state after every other fixture of the
    test has cleaned up (those tear down inside the spending guard, as the test ran)."""
    run = request.config.stash[RUN_KEY]
    node = request.node
    markers = [m.name for m in node.iter_markers()]
    layer_test = run.is_layer_test(markers)
    if run.layer.needs_docker and layer_test:
        run.mark_used()
        _need_docker(run, f"{node.nodeid} (marked for the {run.layer.name} layer)")
    # Taken for every test (no machine-wide scan: this process's children, tracked ports and files,
    # the engine through its event stream); checked only for tests that used provisioner, so other
    # suites' tests are never judged.
    before = run.leak_snapshot()
    with _spending_guard(request, run, markers):
        if "lm_rules" in markers:
            request.getfixturevalue("lm")
        yield
    uses = layer_test or node.stash.get(USES_PROVISIONER, False)
    if not uses and run.environment.containers_started is None:
        return
    found = run.leaks_since(before, node.nodeid)
    if found:
        pytest.fail(str(LeakError(found)) + " — the test must remove what it creates", pytrace=False)


def _spending_guard(request: pytest.FixtureRequest, run: ProvisionRun, markers: list[str]
                    ) -> contextlib.AbstractContextManager[None]:
    """No accidental spending (:mod:`provisioner.testing.network`), or nothing when it does not apply."""
    from provisioner.testing import network

    force = bool(request.config.getoption("force_enable_socket", False))
    if not network.applies(run, markers, request.fixturenames, force_enabled=force):
        return contextlib.nullcontext()
    hosts_mark = request.node.get_closest_marker("allow_hosts")
    hosts = hosts_mark.args[0] if hosts_mark and hosts_mark.args else ()
    stash = request.config.stash
    engine = stash.get(ENGINE_HOSTS, None)
    if engine is None:  # a remote engine's API and workers stay reachable (issue 13)
        engine = stash[ENGINE_HOSTS] = network.engine_hosts(run.environment.settings)
    return network.block_network(run.layer.name, run.environment.lm_config.mode,
                                 allow_hosts=[*([hosts] if isinstance(hosts, str) else hosts), *engine],
                                 resolution_cache=stash.setdefault(SOCKET_RESOLUTION_CACHE, {}),
                                 guards=stash.setdefault(SOCKET_GUARDS, {}))


def _failed(item: pytest.Item) -> bool:
    reports = item.stash.get(PHASE_REPORTS, {})
    return any(r.failed for r in reports.values())

