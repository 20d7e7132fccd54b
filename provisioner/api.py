"""``provisioner.environment(layer)``: a layer's test environment for any Python code.

The pytest plugin is built on the same :class:`Environment`, so a script, a notebook or another test
runner gets exactly what pytest tests get::

    import provisioner

    with provisioner.environment("integration") as env:
        with env.session() as session:             # an isolated session (namespace, prefix, adapter)
            session.adapter.create_program(**ProgramFactory.build().create_args())
        answer = qa_program(question="...")        # in-process DSPy code: env.lm is active in the block

Everything the environment started (containers, networks, sessions) is torn down on exit.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provisioner.errors import CleanupError, ClosedError, ConfigError, ProvisionerError
from provisioner.isolated import IsolatedTest
from provisioner.layers import Layer
from provisioner.lm.callstats import LMUsage
from provisioner.lmconfig import LMConfig, LMMode, RecordMode
from provisioner.run import ProcessReport, ResolvedRun, RunIdentity, RunOptions, resolve_run, state_dir
from provisioner.runtime.logs import WorkerLogWindow
from provisioner.runtime.watchdog import finish_run
from provisioner.runtime.workers import DedicatedWorker, ProcessContainers
from provisioner.settings import Settings
from provisioner.specs import new_session, set_run_id

if TYPE_CHECKING:
    import dspy

    from provisioner.lm.mock import TestRules
    from provisioner.runtime.engine import ContainerRuntime
    from provisioner.runtime.pool import WorkerPool
    from provisioner.runtime.state import RunState


class Environment:
    """One process's view of a layer's test environment: settings, LM, isolated sessions, workers.

    Objects are created on first use (an Environment that is never asked for a worker never talks to
    Docker), and :meth:`close` releases all of them in reverse order.
    """

    def __init__(
        self, resolved: ResolvedRun, identity: RunIdentity, *, runtime: ContainerRuntime | None = None
    ) -> None:
        self._resolved = resolved
        self.identity = identity
        # The engine the containers run on: None for the one open_runtime() finds (on first use).
        self.runtime = runtime
        self._lock = threading.RLock()
        self._lm: Any = None
        self._local_bridge: Any = None
        self._closers: list[tuple[str, Any]] = []
        self._sessions_by_label: dict[str, list[str]] = {}
        self._session_workers: dict[str, str] = {}  # isolated session id -> its worker's name
        self._containers: ProcessContainers | None = None
        self._standin: Any = None
        # The worker image tag the run's controller prepared (xdist workers get it and never build).
        self.prepared_image: str | None = None
        # Why the controller could not prepare the image (xdist workers report it, never rebuild).
        self.image_problem: str | None = None
        # The `provision up` run whose workers this environment uses instead of starting its own
        # (runtime.shared_pool.find_up_run; the pytest plugin decides). Never removed from here.
        self.up_run: RunState | None = None
        # Why up_run is None (None: attached), as decided with it (UpRunMatch.why_not).
        self.up_run_reason: str | None = "not decided: this Environment was made without open_environment"
        # Where the run's ledger ended when this session joined it (bytes; 0: the session's own
        # run): an attached session counts only the ledger lines after it (lm.ledger.ledger_position).
        self.ledger_start = 0
        self._closed = False
        self.report = ProcessReport(layer=resolved.layer.name)
        from provisioner.lm import stats

        self._stats_baseline = stats()
        set_run_id(identity.run_id)
        from provisioner.lm.ledger import set_test_run

        set_test_run(identity.run_id)  # this process's ledger lines and sessions are this run's

    # -- what it is ------------------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._resolved.settings

    @property
    def layer(self) -> Layer:
        return self._resolved.layer

    @property
    def lm_config(self) -> LMConfig:
        """The layer's LM configuration, with the run's id and shared directory filled in."""
        return self._resolved.lm_config

    @property
    def project_dir(self) -> Path:
        return self._resolved.project_dir

    @property
    def run_id(self) -> str:
        return self.identity.run_id

    @property
    def run_dir(self) -> Path:
        return self.identity.run_dir

    @property
    def ledger_test_run(self) -> str | None:
        """The test run whose ledger lines are this environment's: its own run id when it is attached
        to a ``provision up`` run (whose ledger other attached sessions write too), else None (the
        run's ledger is all its own). Pass it as ``test_run`` to the ledger's readers."""
        return self.identity.run_id if self.up_run is not None else None

    # -- LM ----------------------------------------------------------------------------------------

    @property
    def uses_standin(self) -> bool:
        """Real mode, or cached mode recording from Gemini, without ``GEMINI_TEST_API_KEY`` (and no
        ``lm.base_url``): the run's Gemini calls go to the Gemini stand-in — the rule the worker
        containers follow too (``LMConfig.wants_standin``, runtime.recipes.plan_run)."""
        return self.lm_config.wants_standin

    @property
    def lm_endpoint(self) -> str:
        """What answers this layer's LM calls, in words: ``mock``, ``real Gemini``, ``Gemini stand-in
        (GEMINI_TEST_API_KEY not set)``, ``Gemini at <base_url>``, or ``cassettes <dir> (record mode
        <mode>)``. The pytest header and summary print it."""
        from provisioner.lmconfig import API_KEY_ENV

        lm = self.lm_config
        if lm.mode == "mock":
            return "mock"
        if lm.mode == "cached":
            missing = "" if lm.cache_dir.is_dir() else "; the folder does not exist yet"
            source = ""
            if lm.calls_gemini:
                if self.uses_standin:
                    source = f"; misses recorded from the Gemini stand-in ({API_KEY_ENV} not set)"
                elif lm.base_url is not None:
                    source = f"; misses recorded from Gemini at {lm.base_url}"
                else:
                    source = "; misses recorded from real Gemini"
            return f"cassettes {lm.cache_dir} (record mode {lm.record_mode}{missing}){source}"
        if self.uses_standin:
            return f"Gemini stand-in ({API_KEY_ENV} not set)"
        if lm.base_url is not None:
            return f"Gemini at {lm.base_url}"
        return "real Gemini"

    def in_process_lm_config(self) -> LMConfig:
        """The LM configuration for in-process DSPy code (the ``lm`` fixture, :attr:`lm`): the layer's,
        pointed at a Gemini stand-in on 127.0.0.1 when :attr:`uses_standin` (the workers' stand-in
        container sits on the run's internal network, out of the host's reach, so this process runs its
        own; it stops with the environment)."""
        if not self.uses_standin:
            return self.lm_config
        from pydantic import SecretStr

        from provisioner.lm.standin import GeminiStandin
        from provisioner.lmconfig import STANDIN_KEY

        with self._lock:
            if self._standin is None:
                self._standin = GeminiStandin().start()
                self._closers.append(("Gemini stand-in", _Stopper(self._standin)))
            url = self._standin.url
        return self.lm_config.model_copy(
            update={"base_url": url, "endpoint_kind": "standin", "api_key": SecretStr(STANDIN_KEY)}
        )

    def build_lm(self, rules: TestRules | None = None) -> dspy.LM:
        """A new ``dspy.LM`` for this layer (mock / cached / real, with the run's shared limits).

        ``rules``: a test's own mock rules, layered over the layer's LM
        (:class:`provisioner.lm.mock.TestRules`; requests they match never reach a cassette or Gemini).

        Raises:
            ConfigError: the LM configuration cannot make an LM (e.g. ``lm.base_url`` without a key).
        """
        from provisioner.lm import build_lm

        if self.lm_config.mode != "mock":
            self.run_dir.mkdir(parents=True, exist_ok=True)
        return build_lm(self.in_process_lm_config(), rules=rules)

    @property
    def lm(self) -> dspy.LM:
        """The environment's LM (built once). :func:`environment` makes it active in its block."""
        with self._lock:
            if self._lm is None:
                self._lm = self.build_lm()
            return self._lm

    def lm_usage(self) -> LMUsage:
        """LM calls made in this process since the environment started."""
        from provisioner.lm import stats

        return LMUsage.from_stats(stats() - self._stats_baseline)

    # -- isolated sessions ---------------------------------------------------------------------------

    def isolated(self, label: str | None = None) -> IsolatedTest:
        """A new isolated session (close it, or use :meth:`session` for a ``with`` block)."""
        spec = new_session({"label": label} if label else None)
        if label:
            with self._lock:
                self._sessions_by_label.setdefault(label, []).append(spec.session_id)
            if self.lm_config.mode != "mock" and self.lm_config.run_dir is not None:
                from provisioner.lm.ledger import note_session_test

                # Ledger lines (cached and real calls) and cassettes a bridge writes for this session
                # name the test: `provision cost report` and the history count them as the test's.
                note_session_test(self.lm_config.run_dir, spec.session_id, label, self.identity.run_id)
        from provisioner.bridge.client import SessionClient, name_session_in

        if self.layer.adapter == "mock":
            adapter = self._in_process_bridge().session(spec.session_id)
            close_session: Any = adapter.close
        else:
            try:
                adapter, close_session = self.containers.open_session(spec.session_id)
            except ProvisionerError as exc:  # e.g. no live worker: named as the caller named it
                name_session_in(exc, spec.session_id, label)
                raise
        if isinstance(adapter, SessionClient):  # its errors name the session by the label too
            adapter.label = label
            with contextlib.suppress(Exception):  # the pool's memory; for worker_log after the session
                worker = self.containers.pool.session(spec.session_id).worker
                with self._lock:
                    self._session_workers[spec.session_id] = str(worker)
        test = IsolatedTest(spec=spec, adapter=adapter, layer=self.layer.name)
        # Registered first, so it runs last: the test's own cleanups may still use the session.
        test.add_cleanup(close_session)
        return test

    def sessions_of(self, label: str) -> list[str]:
        """The ids of the isolated sessions opened with ``label`` (the plugin uses test node ids)."""
        with self._lock:
            return list(self._sessions_by_label.get(label, ()))

    @contextlib.contextmanager
    def session(self, label: str | None = None) -> Iterator[IsolatedTest]:
        """An isolated session for the ``with`` block; its cleanups run on exit, also on errors."""
        test = self.isolated(label)
        try:
            yield test
        finally:
            test.close()

    # -- containers ----------------------------------------------------------------------------------

    @property
    def containers(self) -> ProcessContainers:
        """This process's containers (created on first use; nothing touches Docker before).

        Raises:
            ClosedError: the environment is closed.
        """
        with self._lock:
            if self._containers is None:
                if self._closed:
                    raise ClosedError(f"the environment of run {self.run_id} is closed; open a new one")
                self._containers = ProcessContainers(self, runtime=self.runtime)
            return self._containers

    @property
    def containers_started(self) -> ProcessContainers | None:
        return self._containers

    @property
    def pool(self) -> WorkerPool:
        """The warm worker pool of a pooled layer (started on first use)."""
        if not self.layer.pooling_enabled:
            raise ConfigError(
                f"layer {self.layer.name!r} has pooling_enabled = false; the warm pool belongs to pooled "
                "layers such as 'e2e' (use `isolated`/`bridge` or `bridge_worker` here)"
            )
        return self.containers.pool

    @contextlib.contextmanager
    def dedicated_worker(self, label: str = "dedicated", *, retain: Callable[[], bool] | None = None
                         ) -> Iterator[DedicatedWorker]:
        """A worker container for the ``with`` block only; removed on exit unless ``retain()`` says keep."""
        worker = self.containers.start_dedicated_worker(label)
        try:
            yield worker
        finally:
            self.containers.stop_dedicated_worker(worker, retain=bool(retain and retain()))

    # -- worker logs -----------------------------------------------------------------------------------

    def worker_log(
        self,
        worker: str | IsolatedTest | DedicatedWorker,
        since: float,
        until: float | None = None,
        *,
        tail: int | None = None,
    ) -> WorkerLogWindow:
        """The log lines one of this environment's bridge worker containers wrote between ``since``
        and ``until`` — e.g. what the worker said while a block of your code ran::

            t0 = time.time()
            with env.session("smoke") as test:
                test.adapter.execute_program("qa", {"question": "?"})
                window = env.worker_log(test, t0)   # until now
            print(window.text)

        ``worker``: an isolated session of this environment (:meth:`session` / :meth:`isolated`: the
        worker it is pinned to), a :meth:`dedicated_worker`, or a worker container's name (e.g.
        ``prov-<run>-pool-w0``; :meth:`worker_names` lists them). ``since``/``until``: Unix time in
        seconds (``time.time()``; fractions kept), both ends included, compared by the engine with
        each line's own timestamp; ``until`` None: now. ``tail``: only the newest ``tail`` lines of
        the window (None: all).

        The engine stamps a line when it reads it from the container, usually a few milliseconds
        after the worker wrote it — sometimes after the reply to the request that caused it reached
        you. A line written just before ``until`` can therefore carry a stamp just after it, and a
        window ending "now" can miss a line still in flight: to catch everything a block of your
        code caused, read the window again a moment later, or poll until a line you expect is there.

        Returns a :class:`~provisioner.runtime.logs.WorkerLogWindow`: ``worker`` (container name),
        ``since``, ``until`` (seconds), ``lines`` (tuple of str, oldest first, no line ends),
        ``omitted`` (lines ``tail`` left out), ``text`` (the lines joined). A line naming a session
        this environment opened with a label shows the label next to the id: ``smoke
        (session_…)`` (:meth:`session_labels`).

        Raises:
            ConfigError: the layer runs in-process (no worker containers: the unit layer); ``worker``
                is a name that is not one of this environment's workers (the message lists them); a
                bad window (not a number, ``since`` after ``until``, negative ``tail``).
            WorkerLostError: the worker is gone (replaced after it died, or removed), and its log
                with it.
            DockerUnavailableError: the engine does not answer.
        """
        import time

        from provisioner.runtime.logs import check_window, read_window

        end = time.time() if until is None else until
        check_window(since, end, tail)
        self._require_containers("worker_log")
        if isinstance(worker, DedicatedWorker):
            name, container = worker.name, worker.container_id
        elif isinstance(worker, IsolatedTest):
            with self._lock:
                pinned = self._session_workers.get(worker.session_id)
            if pinned is None:
                raise ConfigError(f"isolated session {worker.name} is not one of this environment's "
                                  "sessions on a worker container (open it with this environment's "
                                  "session() or isolated())")
            name = container = pinned
        else:
            known = self.worker_names()
            if worker not in known:
                from provisioner.errors import UnknownNameError

                raise UnknownNameError("worker", str(worker), known,
                                       hint=f"worker containers of run {self.run_id}")
            name = container = worker
        return read_window(self.containers.runtime, container, since, end, tail=tail, name=name,
                           sessions=self.session_labels())

    def session_labels(self) -> dict[str, str]:
        """Session id -> the label it was opened with (:meth:`session`/:meth:`isolated`; the pytest
        plugin's labels are test node ids), for this environment's labelled sessions: a worker's log
        names sessions by id only, :meth:`worker_log` shows the label next to it."""
        with self._lock:
            return {sid: label for label, ids in self._sessions_by_label.items() for sid in ids}

    def worker_names(self) -> list[str]:
        """The names of this environment's worker containers now: its pool's (or the ``provision up``
        run's it is attached to) and its dedicated workers'. Empty before any was started, and for an
        in-process layer."""
        if not self.layer.needs_docker or self._containers is None:
            return []
        from provisioner.runtime import labels as L

        names: list[str] = []
        pool = self._containers.pool_started
        if pool is not None:  # the workers of the run's shared pool, or of an attached `provision up` run
            names += [str(w["name"]) for w in pool.stats().get("workers", ())]
        for ref in self._containers.runtime.list_resources(L.selector(self.run_id)):
            if ref.kind == "container" and ref.labels.get(L.ROLE) == L.ROLE_WORKER and ref.name not in names:
                names.append(ref.name)
        return names

    def _require_containers(self, what: str) -> None:
        if not self.layer.needs_docker:
            raise ConfigError(
                f"{what}: layer {self.layer.name!r} runs in-process (adapter {self.layer.adapter!r}) and "
                "has no worker containers; use a container layer such as 'integration' or 'e2e'"
            )

    def _in_process_bridge(self) -> Any:
        with self._lock:
            if self._local_bridge is None:
                from provisioner.bridge import LocalBridge

                # Shared by every isolated session of this process: session access only, so
                # one test cannot reset or shut down the others' bridge (the owner closes it).
                self._local_bridge = LocalBridge(self.in_process_lm_config(), control=False)
                self._closers.append(("in-process bridge", self._local_bridge))
            return self._local_bridge

    # -- teardown ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Release everything in reverse order of creation; report every failure, stop at none.

        Raises:
            CleanupError: something could not be released (every part was still tried); its
                ``failures`` name each part and what went wrong.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            failures: list[tuple[str, BaseException | str]] = []
            while self._closers:
                what, obj = self._closers.pop()
                try:
                    obj.close()
                except Exception as exc:
                    failures.append((what, exc))
            if self._containers is not None:
                failures += [("containers", problem) for problem in self._containers.close()]
                self.report.workers_started = self._containers.workers_started
                self.report.retained = list(self._containers.retained)
            if self.identity.controller and self.up_run is None:
                from provisioner.runtime.shared_pool import finish_shared_pool

                # Every process of the run is done: the run's shared pool goes (runtime/shared_pool.py).
                # (ProcessContainers.close did it when this process had containers; else, e.g. xdist's
                # controller, here.)
                left = finish_shared_pool(self.run_dir, self.run_id, self.runtime)
                failures += [("shared pool", problem) for problem in left]
                finish_run(self.run_dir)
            self.report.lm = self.lm_usage()
        if failures:
            raise CleanupError(failures, what="part(s) of the environment")

    def __enter__(self) -> Environment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Stopper:
    """``close()`` for things that ``stop()``."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def close(self) -> None:
        self.target.stop()


def open_environment(
    layer: str | None = None,
    *,
    lm: LMMode | None = None,
    record_mode: RecordMode | None = None,
    project_dir: str | os.PathLike[str] | None = None,
    identity: RunIdentity | None = None,
    require_key: bool = False,
    runtime: ContainerRuntime | None = None,
    attach: bool = True,
) -> Environment:
    """An :class:`Environment` you close yourself (the pytest plugin uses this).

    ``attach`` (default): a container layer uses a running ``provision up`` environment of the
    project (``PROVISION_RUN_ID`` under ``provision run``, else the project's current run) when its
    layer, LM mode and record mode match and its workers run, as the pytest plugin does, and never
    removes it (:func:`provisioner.runtime.shared_pool.choose_up_run`); ``False``: always start its
    own. ``env.up_run`` is that run's state (None: not attached) and ``env.up_run_reason`` why it is
    None (None when attached): the same decision and words as the plugin's header line.

    ``runtime``: the container runtime to use instead of the engine :func:`~provisioner.runtime.
    engine.open_runtime` finds — e.g. ``FakeRuntime(serve=True)``, which runs the workers in this
    process. A runtime handed in is the caller's: no watchdog process guards what it creates (the
    environment still removes everything on close) and the caller closes it.

    Raises:
        ConfigError: invalid settings, an unknown layer, or ``require_key`` with real mode and no key.
    """
    project = (Path(project_dir) if project_dir is not None else Path.cwd()).absolute()
    options = RunOptions(layer=layer, lm_mode=lm, record_mode=record_mode, require_key=require_key)
    if identity is None:
        probe = resolve_run(options, project)
        identity = RunIdentity.create(state_dir(probe.settings, probe.project_dir))
    resolved = resolve_run(options, project, run_id=identity.run_id, run_dir=identity.run_dir)
    match = None
    if attach:
        from provisioner.runtime.shared_pool import choose_up_run

        match, resolved = choose_up_run(resolved, runtime=runtime)
    env = Environment(resolved, identity, runtime=runtime)
    env.up_run = match.state if match is not None else None
    env.up_run_reason = (match.why_not if match is not None
                         else "attach=False: this environment starts its own workers")
    if env.up_run is not None:
        from provisioner.lm.ledger import ledger_position

        env.ledger_start = ledger_position(env.lm_config.run_dir)
    return env


@contextlib.contextmanager
def environment(
    layer: str | None = None,
    *,
    lm: LMMode | None = None,
    record_mode: RecordMode | None = None,
    project_dir: str | os.PathLike[str] | None = None,
    require_key: bool = False,
    runtime: ContainerRuntime | None = None,
    attach: bool = True,
) -> Iterator[Environment]:
    """A layer's environment for the ``with`` block; everything it started is torn down on exit.

    ``layer`` defaults like the plugin's ``--layer`` (``TEST_MODE``, then settings); ``lm`` overrides
    the layer's LM mode and ``record_mode`` the cassette record mode. The environment's LM is active
    inside the block — in this thread (``dspy.context``) and, through DSPy's process-global
    configuration, in every thread, ``dspy.Parallel`` worker and asyncio task the block starts
    (:func:`provisioner.lm.activation.activate`; the previous global LM is restored on exit) — so
    in-process DSPy code never sees "No LM is loaded". Real mode without ``GEMINI_TEST_API_KEY``
    talks to a Gemini stand-in (:attr:`Environment.uses_standin`) unless ``require_key`` makes that
    an error. ``runtime`` and ``attach`` (use a matching running ``provision up`` environment):
    as for :func:`open_environment`.

    Raises:
        ConfigError: invalid settings, an unknown layer, or ``require_key`` with real mode and no key.
    """
    env = open_environment(layer, lm=lm, record_mode=record_mode, project_dir=project_dir,
                           require_key=require_key, runtime=runtime, attach=attach)
    try:
        from provisioner.lm.activation import activate

        with activate(env.lm, what=f"the {env.layer.name} layer's LM"):
            yield env
    finally:
        env.close()
