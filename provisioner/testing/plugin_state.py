"""The state behind the pytest plugin's hooks, as a plain class (no pytest import).

One :class:`ProvisionRun` per pytest process: it resolves the options, knows the run's identity
(shared with xdist workers), selects tests by layer, owns the process's :class:`~provisioner.api.
Environment`, and assembles the run report. The hooks in :mod:`provisioner.pytest_plugin` only call it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from provisioner.layers import Layer, resolve_layers
from provisioner.lm.callstats import LMUsage
from provisioner.lm.ledger import combine, ledger_usage
from provisioner.lmconfig import LMMode, RecordMode
from provisioner.run import (
    LeakRecord,
    ProcessReport,
    RunIdentity,
    RunOptions,
    resolve_run,
    state_dir,
)
from provisioner.runtime.workers import check_leaks, snapshot
from provisioner.testing import docker_check
from provisioner.testing.completeness import Completeness
from provisioner.testing.progress import Phases
from provisioner.testing.report import OUTCOMES, RunReport
from provisioner.testing.selection import layer_marks, marker_description, split_by_layer

if TYPE_CHECKING:
    from provisioner.runtime.engine import ContainerRuntime

Item = TypeVar("Item")

WORKEROUTPUT_KEY = "provisioner_report"
REPORT_KEY = "provisioner_run"
_INTERRUPTED = 2  # pytest.ExitCode.INTERRUPTED (this module does not import pytest)
_WORKERINPUT_RUN_ID = "provision_run_id"
_WORKERINPUT_RUN_DIR = "provision_run_dir"
_WORKERINPUT_IMAGE = "provision_image"
_WORKERINPUT_IMAGE_ERROR = "provision_image_error"
_WORKERINPUT_CONTROLLER = "provision_controller"
_WORKERINPUT_UP_RUN = "provision_up_run"
_WORKERINPUT_LEDGER_START = "provision_ledger_start"
# Fixtures whose tests need this process's warm pool (isolated sessions live on pool workers).
POOL_FIXTURES = frozenset({"isolated", "bridge", "bridge_pool"})


_USAGE_FIELDS = ("mock", "replayed", "recorded", "real", "errors", "cache_misses", "input_tokens",
                 "output_tokens", "standin", "rate_limit_waits")


@dataclass
class LMCost:
    """LM calls and dollars of the current test so far (read it at the end of the test).

    Mock calls come from this process's counters; replayed, recorded and real calls from the run's
    ledger, attributed to the test's node id (in-process calls) or its isolated sessions' ids (calls
    a bridge worker makes for the test).
    """

    _environment: Any
    _baseline: LMUsage = field(default_factory=LMUsage)
    test_id: str | None = None

    def usage(self) -> LMUsage:
        now = self._environment.lm_usage()
        delta = LMUsage()
        for name in _USAGE_FIELDS:
            setattr(delta, name, getattr(now, name) - getattr(self._baseline, name))
        delta.cost_usd = now.cost_usd - self._baseline.cost_usd
        delta.list_cost_usd = now.list_cost_usd - self._baseline.list_cost_usd
        delta.rate_limit_wait_s = now.rate_limit_wait_s - self._baseline.rate_limit_wait_s
        if self.test_id is None:
            return delta
        owners = {self.test_id, *self._environment.sessions_of(self.test_id)}
        return combine(delta, ledger_usage(self._environment.lm_config.run_dir, owners,
                                           since=self._environment.ledger_start,
                                           test_run=self._environment.ledger_test_run))

    @property
    def calls(self) -> int:
        return self.usage().calls

    @property
    def cost_usd(self) -> float:
        """Billed dollars (calls answered by the Gemini stand-in cost $0)."""
        return self.usage().cost_usd

    @property
    def rate_limit_wait_s(self) -> float:
        """Seconds the test's LM calls waited for a slot of the run's rate limit (lm.rate_limit_rpm)."""
        return self.usage().rate_limit_wait_s

    @property
    def list_cost_usd(self) -> float:
        """Every call at list prices (stand-in calls included): what the run's cost limit counts."""
        return self.usage().list_cost_usd

    def __getattr__(self, name: str) -> Any:
        if name in _USAGE_FIELDS:
            return getattr(self.usage(), name)
        raise AttributeError(name)

    def as_dict(self) -> dict[str, Any]:
        return self.usage().as_dict()


def _started_by(state: Any) -> str:
    """The command that started a run (a ``RunState``) this session attaches to."""
    return "provision up" if state.persistent else "provision run"


class ProvisionRun:
    """Everything the plugin knows about this pytest process's run."""

    def __init__(
        self,
        options: RunOptions,
        project_dir: Path,
        identity: RunIdentity,
        up_run: str | None = None,
        *,
        runtime: ContainerRuntime | None = None,
    ) -> None:
        """``up_run``: the ``provision up`` run to consider attaching to (an xdist worker gets its
        controller's choice; "": none); default ``PROVISION_RUN_ID`` (``provision run``), else the
        project's current run. ``runtime``: the container runtime of the run's containers (default:
        the engine :func:`~provisioner.runtime.engine.open_runtime` finds); see
        :func:`provisioner.open_environment`."""
        from provisioner.api import Environment

        self.options = options
        self.identity = identity
        resolved = resolve_run(options, project_dir, run_id=identity.run_id, run_dir=identity.run_dir)
        self.project_dir = resolved.project_dir  # the project root, as every CLI command finds it
        from provisioner.runtime.shared_pool import choose_up_run

        self.up_match, resolved = choose_up_run(resolved, up_run, runtime=runtime)
        self.environment = Environment(resolved, identity, runtime=runtime)
        self.environment.up_run = self.up_match.state
        self.environment.up_run_reason = self.up_match.why_not
        if self.up_match.attached:
            from provisioner.lm.ledger import ledger_position

            # The attached run's ledger holds earlier sessions' calls: this session counts from here
            # (an xdist worker gets its controller's position, from_pytest).
            self.environment.ledger_start = ledger_position(resolved.lm_config.run_dir)
        self.layer: Layer = resolved.layer
        self.layer_names: list[str] = list(resolve_layers(resolved.settings))
        self.report_path = options.report_path
        self.shard = options.shard
        self._used = options.report_path is not None
        self._closed = False
        self._close_lock = threading.Lock()
        self._close_error: BaseException | None = None  # a close in close_once_reported's thread
        self._worker_reports: list[ProcessReport] = []
        self._finished: RunReport | None = None
        # Tests whose report says no engine answered, by pytest outcome (summed at finish).
        self.no_engine: dict[str, int] = {}
        # Tests whose own fork-mode process ended under them (ProcessGoneError), by worker.
        self.processes_gone: dict[str, int] = {}
        self._warm_attempted = False
        # Why this run is partial (cannot vouch for unused cassettes); filled by the plugin's hooks.
        self.completeness = Completeness()
        # The session runs no test body (--co, --setup-plan, --setup-only, --fixtures, ...): set by
        # the plugin at configure; such a session leaves no run folder.
        self.runs_no_body = False
        from provisioner.history.rows import TestRowCollector
        from provisioner.lm.cassettes import now_iso

        # Per-test rows for the run history and the JSON report (filled from the controller's reports).
        self.rows = TestRowCollector(identity.run_id, self.layer.name)
        self._test_costs: dict[str, LMCost] = {}
        self.exit_status = 0  # pytest's, set at session end
        self.stopped: str | None = None  # why pytest stopped early (-x, --maxfail), set at session end
        from provisioner.testing.worker_logs import LOGS_DIR, WorkerLogs

        # The worker containers each test used: their log lines go into its failure report.
        self.worker_logs = WorkerLogs(self._started_runtime, identity.run_dir / LOGS_DIR,
                                      session_labels=self.environment.session_labels)

        self.started_at = now_iso()

    @classmethod
    def from_pytest(
        cls,
        *,
        layer: str | None,
        lm_mode: LMMode | None,
        record_mode: RecordMode | None,
        report_path: str | None,
        project_dir: Path,
        require_key: bool = False,
        shards: int | None = None,
        shard: str | None = None,
        invocation_dir: Path,
        workerinput: Mapping[str, Any] | None,
    ) -> ProvisionRun:
        # abspath, not Path.absolute: "../s2/unit.json" is said and written as /…/s2/unit.json.
        path = None if report_path is None else Path(os.path.abspath(invocation_dir / report_path))
        options = RunOptions(layer=layer, lm_mode=lm_mode, record_mode=record_mode, report_path=path,
                             require_key=require_key, shards=shards, shard=shard)
        project = project_dir.absolute()
        up_run = None
        if workerinput is not None and _WORKERINPUT_RUN_ID in workerinput:
            identity = RunIdentity.joined(workerinput[_WORKERINPUT_RUN_ID], workerinput[_WORKERINPUT_RUN_DIR],
                                          workerinput.get(_WORKERINPUT_CONTROLLER))
            up_run = workerinput.get(_WORKERINPUT_UP_RUN, "")
        else:
            resolved = resolve_run(options, project)
            identity = RunIdentity.create(state_dir(resolved.settings, resolved.project_dir))
        run = cls(options, project, identity, up_run)
        if workerinput is not None:
            if run.up_match.attached and _WORKERINPUT_LEDGER_START in workerinput:
                run.environment.ledger_start = int(workerinput[_WORKERINPUT_LEDGER_START])
            run.environment.prepared_image = workerinput.get(_WORKERINPUT_IMAGE)
            run.environment.image_problem = workerinput.get(_WORKERINPUT_IMAGE_ERROR)
        return run

    # -- configuration -----------------------------------------------------------------------------

    def marker_lines(self) -> list[str]:
        layers = resolve_layers(self.environment.settings)
        layers[self.layer.name] = self.layer  # the active one as it runs (--lm: its mode)
        return [marker_description(layer) for layer in layers.values()]

    def header_lines(self) -> list[str]:
        """The pytest header: the layer and what answers its LM calls; whether the session uses a
        running ``provision up`` environment, or why not when there is one."""
        lines = [f"provisioner: layer {self.layer.name}, LM {self.environment.lm_endpoint}"]
        state = self.up_match.state
        if state is not None:
            lines.append(f"provisioner: attached to run {state.run_id} ({len(state.workers)} worker(s), "
                         f"started by `{_started_by(state)}`); this session leaves it running")
        elif self.up_match.reason:
            lines.append(f"provisioner: own run for this session, not attaching: {self.up_match.reason}")
        if self.layer.needs_docker and state is None and self._engine_problem() is not None:
            what = "fail (CI=true)" if docker_check.running_in_ci() else "skip (they fail under CI=true)"
            lines.append(f"provisioner: Docker engine unreachable at {self._engine_where()}: the "
                         f"{self.layer.name} layer's tests that need it will {what}")
        return lines

    def summary_lines(self, report: RunReport) -> list[str]:
        """The terminal summary (shown under ``-q`` too, unlike the header): what answered the LM
        calls, whether the session attached to a running ``provision up`` run or why it started its
        own, then the report's lines."""
        lines = [f"LM: {self.environment.lm_endpoint}"]
        ctrl_c = self.stopped is None or "keyboard-interrupt" in self.stopped  # xdist says a Ctrl-C so
        if self.exit_status == _INTERRUPTED and not ctrl_c:  # -x, --maxfail, a layer's max_failures
            lines.append(f"stopped early ({self.stopped}): the counts below are what ran before it")
        elif self.exit_status == _INTERRUPTED:
            lines.append("interrupted (Ctrl-C): the counts below are what finished before it; under "
                         "xdist, tests and workers of processes that did not report are missing")
        state = self.up_match.state
        if state is not None:
            lines.append(f"attached to run {state.run_id}; this session left it running")
        elif self.up_match.reason:
            lines.append(f"own run for this session, not attaching: {self.up_match.reason}")
        if self.no_engine:
            lines += docker_check.unreachable_summary(self.no_engine, self._engine_where())
        if self.processes_gone:
            count = sum(self.processes_gone.values())
            where = ", ".join(f"{worker} ({n})" if n > 1 else worker
                              for worker, n in sorted(self.processes_gone.items()))
            lines.append(f"{count} process(es) ended during a test (crashed or killed; each such test failed "
                         f"with ProcessGoneError, its report has the worker's log line saying how): {where}")
        return lines + report.lines()

    def workerinput(self) -> dict[str, str]:
        from provisioner.runtime.watchdog import process_entry

        out = {_WORKERINPUT_RUN_ID: self.identity.run_id, _WORKERINPUT_RUN_DIR: str(self.identity.run_dir),
               _WORKERINPUT_CONTROLLER: process_entry()}  # workers are its dependants (watchdog)
        if self.environment.prepared_image is not None:
            out[_WORKERINPUT_IMAGE] = self.environment.prepared_image
        if self.environment.image_problem is not None:
            out[_WORKERINPUT_IMAGE_ERROR] = self.environment.image_problem
        state = self.up_match.state
        out[_WORKERINPUT_UP_RUN] = state.run_id if state is not None else ""  # "": do not attach
        out[_WORKERINPUT_LEDGER_START] = str(self.environment.ledger_start)
        return out

    # -- start-up: outside every test, so per-test timeouts never include it -----------------------

    def prepare_image(self, phases: Phases) -> None:
        """Controller, at session start: check or build the worker image once for the whole run
        (xdist workers receive its tag). Nothing happens for in-process layers or without an engine
        (the tests then skip, or fail under CI, as usual); a failure is reported on the phase's line
        and again by every test that needs the image."""
        from provisioner.errors import ProvisionerError

        if not self.layer.needs_docker or self._engine_problem() is not None:
            return
        self._used = True
        if self.up_match.attached:
            return  # the `provision up` run's workers are up already (dedicated workers build on demand)
        containers_ = self.environment.containers
        try:
            with phases.phase("worker image") as update:
                self.environment.prepared_image = containers_.prepare_image(update)
        except ProvisionerError as exc:
            # xdist workers get the failure too: they report it instead of building themselves.
            self.environment.image_problem = str(exc)

    @property
    def pool_warmed(self) -> bool:
        """The warm-up was done (or tried) in this process."""
        return self._warm_attempted

    def warm_pool(self, phases: Phases, fixturenames: Iterable[Iterable[str]]) -> None:
        """Start this process's warm pool (once) when one of the given tests needs it: before the
        first test (a single process) or before the first test that needs it (an xdist worker), in
        either case outside the test's timeout. A failure is reported once; tests then get the error."""
        from provisioner.errors import ProvisionerError

        if self._warm_attempted or not self.layer.needs_docker:
            return
        if not any(POOL_FIXTURES.intersection(names) for names in fixturenames):
            return
        self._warm_attempted = True
        if self._engine_problem() is not None:
            return
        layer = self.layer
        from provisioner.runtime.workers import worker_starts

        starts = worker_starts(layer)
        assert starts is not None  # needs_docker
        count = starts.pytest_up_to
        # One worker now; the others start when more sessions are open at once than workers run
        # (this process's threads, or the run's other xdist processes): runtime/shared_pool.py.
        title = f"warm pool of layer {layer.name}: 1 worker"
        if count > 1 and layer.isolation == "process":
            # Both start at once; the first test runs on the first ready (runtime/workers.py).
            title = (f"warm pool of layer {layer.name}: {starts.pytest_first} fork-mode workers,"
                     " tests start on the first ready")
        elif count > 1:
            title += f", up to {count} on demand"
        up = self.up_match.state
        if up is not None:
            # The header saying so is hidden under -q; this line is not.
            title = (f"attach to run {up.run_id}'s {len(up.workers)} worker(s), started by "
                     f"`{_started_by(up)}`; this session leaves it running")
        with contextlib.suppress(ProvisionerError), phases.phase(title):
            self.environment.containers.pool  # noqa: B018 - starts it

    # -- selection ---------------------------------------------------------------------------------

    def select(self, items: Sequence[tuple[Item, Iterable[str]]]) -> tuple[list[Item], list[Item]]:
        kept, deselected = split_by_layer(items, self.layer.name, self.layer_names)
        if any(self.is_layer_test(markers) for _, markers in items):
            self._used = True
        return kept, deselected

    def is_layer_test(self, markers: Iterable[str]) -> bool:
        return bool(layer_marks(markers, self.layer_names))

    @functools.cached_property
    def project_opted_in(self) -> bool:
        """The project opted in to provisioner (:func:`provisioner.testing.network.
        project_uses_provisioner`): looked up once, not per test (it looks for the project's files)."""
        from provisioner.testing.network import project_uses_provisioner

        return project_uses_provisioner(self)

    def mark_used(self) -> None:
        self._used = True

    # -- docker ------------------------------------------------------------------------------------

    def docker_problem(self) -> str | None:
        """Why the run's engine cannot be used (one line), or None."""
        self._used = True
        return self._engine_problem()

    def _engine_problem(self) -> str | None:
        given = self.environment.runtime
        if given is None:
            return docker_check.docker_problem()
        try:
            given.ping()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _engine_where(self) -> str:
        if self.environment.runtime is not None:  # given through the Python API
            return f"the run's engine ({type(self.environment.runtime).__name__})"
        return docker_check.engine_where()

    def docker_message(self, what: str, why: str) -> str:
        return docker_check.unreachable_message(what, why)

    def docker_is_required(self) -> bool:
        return docker_check.running_in_ci()

    def retain(self, failed: bool) -> bool:
        """Keep a failed test's dedicated worker? (``cleanup_policy`` and ``retain_on_failure``)."""
        from provisioner.runtime.resources import should_remove

        settings = self.environment.settings
        return not should_remove(settings.cleanup_policy, settings.retain_on_failure, failed)

    # -- leak checks -------------------------------------------------------------------------------

    def leak_snapshot(self) -> frozenset[tuple[str, str]]:
        """The baseline before a test: no engine round trip (the check after it synchronises)."""
        return snapshot(self.environment.containers_started, sync=False)

    def leaks_since(self, before: frozenset[tuple[str, str]], test_id: str) -> list[tuple[str, str]]:
        """What the test left behind (also recorded for the report)."""
        found = check_leaks(before, self.environment.containers_started, test_id)
        if found:
            self._used = True
            self.environment.report.leaks.append(LeakRecord(test_id, found))
        return found

    # -- LM cost -----------------------------------------------------------------------------------

    def note_unmatched_lm_rules(self, test_id: str, rules: Iterable[str]) -> None:
        """Per-test LM rules (as one-line JSON) that answered no request: listed at the end of the run."""
        for rule in rules:
            self.environment.report.unmatched_lm_rules.append([test_id, rule])

    def test_started(self, test_id: str) -> None:
        """Note the LM counters at a test's start (its usage goes into its teardown report)."""
        self._test_costs[test_id] = LMCost(self.environment, self.environment.lm_usage(), test_id)

    def test_properties(self, test_id: str) -> list[tuple[str, Any]]:
        """The test's LM usage, leaks, retained worker and saved worker logs as ``user_properties``
        (JUnit XML test properties; the controller's history rows read them from the teardown report)."""
        from provisioner.history.rows import usage_properties, worker_properties

        logs, retained = self.worker_logs.finish(test_id)
        cost = self._test_costs.pop(test_id, None)
        if cost is None:
            return worker_properties(retained, logs)
        leaks = [leak for record in self.environment.report.leaks if record.test == test_id
                 for leak in record.leaks]
        usage = cost.usage()
        exact = {**usage.as_dict(), "cost_usd": usage.cost_usd}  # as_dict rounds to 6 places
        return usage_properties(exact, leaks) + worker_properties(retained, logs)

    def worker_log_sections(self, test_id: str, since: float, until: float) -> list[tuple[str, str]]:
        """``(title, text)`` report sections of a failed test: the log lines of each worker it used,
        written from ``since`` to ``until`` (Unix seconds), and where each worker's full log is."""
        return [(e.title, e.text()) for e in self.worker_logs.excerpts(test_id, since, until)]

    def _started_runtime(self) -> Any:
        started = self.environment.containers_started
        return None if started is None else started.runtime

    def _record_history(self, report: RunReport, ledger: LMUsage | None) -> None:
        """Controller, at the end of the run: the run row into the JSON report, and the run with its
        test rows into ``<state_dir>/history.sqlite`` (a run that used provisioner and ran tests, or
        was interrupted before any finished). A history that cannot be written is a warning, not a
        failed run."""
        import warnings

        from provisioner.errors import HistoryError
        from provisioner.history.merge import split_of_label
        from provisioner.history.rows import apply_ledger, run_row
        from provisioner.history.store import HISTORY_FILE, History
        from provisioner.lm.ledger import usage_by_test

        tests = self.rows.test_rows()
        # Every worker is stopped by now; an attached session's rows count only its own calls.
        by_test = usage_by_test(self.environment.lm_config.run_dir, since=self.environment.ledger_start,
                                test_run=self.environment.ledger_test_run)
        if by_test is not None:
            apply_ledger(tests, by_test)
        report.tests = [dict(row) for row in tests]
        retained = [r for section in report.layers.values() for r in section.retained]
        run = run_row(run_id=self.identity.run_id, started_at=self.started_at, project_dir=self.project_dir,
                      layers=[self.layer.name], exit_status=self.exit_status, tests=tests, retained=retained,
                      cost_usd=None if ledger is None else ledger.cost_usd,
                      list_cost_usd=None if ledger is None else ledger.list_cost_usd, shard=self.shard,
                      lm_refused=sum(section.lm.refused for section in report.layers.values()),
                      lm_rate_limit_wait_s=sum(section.lm.rate_limit_wait_s
                                               for section in report.layers.values()),
                      lm_errors=sum(section.lm.errors for section in report.layers.values()))
        report.history_run = dict(run)
        report.split = split_of_label(self.shard)
        # A run is recorded when it ran tests, and when Ctrl-C stopped it before any finished (0 tests,
        # ended "interrupted": it was a run all the same); a session that runs no test body (--co,
        # --setup-plan) is never recorded (docs/reporting.md).
        interrupted = self.exit_status == _INTERRUPTED and not self.runs_no_body
        if not self._used or not (tests or interrupted):
            return
        try:
            with History(state_dir(self.environment.settings, self.project_dir) / HISTORY_FILE) as history:
                history.record(run, tests)
        except (HistoryError, OSError) as exc:
            warnings.warn(f"provisioner: run history not written: {exc}", stacklevel=1)

    def lm_cost(self, test_id: str) -> LMCost:
        self._used = True
        return LMCost(self.environment, self.environment.lm_usage(), test_id)

    # -- end of the run ----------------------------------------------------------------------------

    def close(self) -> None:
        """Tear down this process's environment (session end). A close already under way in
        :meth:`close_once_reported`'s thread is waited for, and what it raised is raised here.

        Raises:
            CleanupError: a part of the environment could not be released (see ``Environment.close``).
        """
        with self._close_lock:
            if self._closed:
                error, self._close_error = self._close_error, None
                if error is not None:
                    raise error
                return
            self._closed = True
            self.environment.close()

    @staticmethod
    def worker_reported() -> None:
        """An xdist worker whose report has gone to its controller (its ``pytest_unconfigure``):
        move every object it holds to the garbage collector's permanent generation (``gc.freeze``),
        so the full collections still ahead of this process — pytest's unraisable-exception check at
        unconfigure and cleanup, then the interpreter's at exit — skip them. A worker that imported
        DSPy holds ≈ 110 000 objects; those passes kept it alive 1.5 s (quiet) to 6 s (load 20) after
        its last report, and xdist's controller waits for that exit (its end, and a Ctrl-C, took
        that much longer; docs/benchmarks.md, "Killed parts"). Nothing observable is lost: what
        pytest finds after the worker's ``workerfinished`` never reaches the controller anyway, and
        atexit handlers still run."""
        import gc

        gc.freeze()

    def close_once_reported(self, nodes: Sequence[Any], deadline_s: float = 60.0) -> threading.Thread:
        """xdist controller, at its session's end: close this process's environment — which removes
        the run's shared pool — in a thread as soon as every xdist worker has reported its end (its
        ``workerfinished`` arrived, or its channel closed), instead of after xdist has waited for
        their processes to exit. A worker reports after its own teardown, so no worker uses the pool
        any more; what it still does (pytest's end, garbage collection, interpreter exit: seconds
        under load, up to xdist's 10 s before it kills the process) now overlaps the removal. On
        Ctrl-C the controller's loop no longer reads the workers' events, but xdist's receiver threads
        still set ``node.workeroutput``. ``nodes``: xdist's ``WorkerController`` objects. Polled every
        50 ms until ``deadline_s``; after it the session's end closes as before. Returns the
        (started) thread; :meth:`close` waits for it."""

        def reported(node: Any) -> bool:
            channel = getattr(node, "channel", None)
            return getattr(node, "workeroutput", None) is not None or channel is None or channel.isclosed()

        def run() -> None:
            deadline = time.monotonic() + deadline_s
            while not all(reported(node) for node in nodes):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            with self._close_lock:
                if self._closed:
                    return
                self._closed = True
                try:
                    self.environment.close()
                except BaseException as exc:  # raised by the session end's close()
                    self._close_error = exc

        thread = threading.Thread(target=run, name="provision-close-once-reported", daemon=True)
        thread.start()
        return thread

    def close_ledger(self) -> None:
        """Write the run's end (complete or partial, and why) to its LM ledger and archive it by month
        (controller only). ``provision cassettes prune`` trusts only a complete run's record of which
        cassettes under its ``cache_dir`` were used. Done for every cached run that ran a test body,
        also one without calls; a session that ran none (``--co``, ``--setup-plan``, ``--setup-only``,
        ``--fixtures``, an empty selection) writes nothing unless the ledger exists already (then
        its end, partial): it created no run folder and vouches for nothing.
        """
        from provisioner.lm.ledger import LEDGER_FILE, Ledger, archive_run_ledger

        lm = self.environment.lm_config
        run_dir = lm.run_dir
        if self.up_match.attached:
            return  # the ledger belongs to the `provision up` run: `provision down` ends it
        if run_dir is None or (lm.mode != "cached" and not (run_dir / LEDGER_FILE).exists()):
            return
        if not self.completeness.bodies and not (run_dir / LEDGER_FILE).exists():
            # No test body ran (--co, --setup-plan, --setup-only, an empty selection): no run
            # folder. --setup-only's fixtures may have made it, empty (rmdir leaves a full one).
            for folder in (run_dir, self.identity.run_dir):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            return
        ledger = Ledger(run_dir, run_id=self.identity.run_id, layer=self.layer.name)
        ledger.mark_run_complete(complete=self.completeness.complete, partial=self.completeness.reasons,
                                 cache_dir=lm.cache_dir if lm.mode == "cached" else None,
                                 started_at=self.started_at)
        ledger.close()
        archive_run_ledger(run_dir, state_dir(self.environment.settings, self.project_dir))

    def process_report(self) -> ProcessReport:
        # LM calls alone do not count as use: a suite may call DSPy without provisioner's fixtures.
        report = self.environment.report
        if report.workers_started or report.leaks:
            self._used = True
        return report

    def process_report_json(self) -> str:
        report = self.process_report()
        payload = report.to_json()
        return payload if not self._used else payload[:-1] + ', "used": true}'

    def merge_worker(self, payload: str) -> None:
        import json

        if json.loads(payload).get("used"):
            self._used = True
        self._worker_reports.append(ProcessReport.from_json(payload))

    def finish(self, terminal_stats: Mapping[str, Sequence[Any]] | None) -> RunReport | None:
        """The run report (None when provisioner was not used); writes the JSON report once."""
        if self._finished is None:
            self.close()
            report = RunReport(run_id=self.identity.run_id)
            lm = self.environment.lm_config
            report.layer(self.layer.name, lm_mode=lm.mode, cost_limit_usd=lm.cost_limit_usd,
                         rate_limit_rpm=lm.rate_limit_rpm, limits_share_of=lm.limits_share_of)
            own = self.process_report()
            report.merge(own)
            for worker in self._worker_reports:
                report.merge(worker)
            section = report.layers[self.layer.name]
            ledger = ledger_usage(self.environment.lm_config.run_dir, since=self.environment.ledger_start,
                                  test_run=self.environment.ledger_test_run)
            section.lm = combine(section.lm, ledger)
            if ledger is not None:
                report.run_cost_usd = ledger.cost_usd
            if terminal_stats is not None:
                for outcome in OUTCOMES:
                    for entry in terminal_stats.get(outcome, ()):
                        if getattr(entry, "when", None) in ("setup", "call", "teardown"):
                            report.add_outcome(self.layer.name, outcome)
                            if docker_check.UNREACHABLE in _longrepr_text(entry):
                                self.no_engine[outcome] = self.no_engine.get(outcome, 0) + 1
                            gone_on = getattr(entry, "provisioner_process_gone", None)
                            if gone_on is not None:
                                gone = self.processes_gone
                                gone[str(gone_on)] = gone.get(str(gone_on), 0) + 1
            self.rows.add_leaks((r.test, r.leaks) for s in report.layers.values() for r in s.leaks)
            self._record_history(report, ledger)
            self._finished = report
            if self.report_path is not None:
                report.write_json(self.report_path)
        return self._finished if self._used else None


def _longrepr_text(report: Any) -> str:
    """A report's failure or skip text: a skip's ``longrepr`` is ``(path, lineno, message)``."""
    longrepr = getattr(report, "longrepr", None)
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return "" if longrepr is None else str(longrepr)
