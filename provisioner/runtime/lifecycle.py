"""A layer's environment, up and down: :func:`up`, :func:`down`, :func:`status` (with repair),
:func:`reap` and :func:`run_overview` — the plain API behind ``provision up/down/status/reap``.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from provisioner.errors import (
    ConfigError,
    RuntimeProblem,
    StateUnreadableError,
)
from provisioner.layers import Layer, get_layer
from provisioner.lmconfig import LMConfig, LMMode
from provisioner.run import check_run_id, new_run_id
from provisioner.runtime import labels as L
from provisioner.runtime import launch
from provisioner.runtime import watchdog as wd
from provisioner.runtime.deployment import (
    Deployment,
    Probe,
    Progress,
    bridge_probe,
    death_reason,
    repair_times,
)
from provisioner.runtime.egress import block_host_access
from provisioner.runtime.engine import ContainerRuntime, ResourceRef, remove_by_selector
from provisioner.runtime.health import PublishedWorker, check_paths, rebind_relay
from provisioner.runtime.polling import poll_until
from provisioner.runtime.recipes import ContainerRecipe, Owner, PlanOptions, bridge_token_for, plan_run
from provisioner.runtime.runs import default_run, list_runs, opened_runtime, project_of, settings_or_load
from provisioner.runtime.state import (
    RunState,
    _clear_current,
    bridge_token_of,
    read_state,
    run_dir_of,
    write_state,
)
from provisioner.settings import Settings

STANDIN_NOTE = ("GEMINI_TEST_API_KEY is not set: workers that call Gemini (real mode, or cached mode "
                "recording cassette misses) talk to the local Gemini stand-in (use --require-key to insist "
                "on the real API).")
"""What `provision up` and `provision run` say when a run's Gemini calls go to the stand-in."""


@dataclass(frozen=True)
class UpOptions:
    """What ``provision up`` / ``provision run`` start (None: the settings' choice).

    ``layer``: the layer (default ``settings.layer``); ``workers``: how many (default the layer's);
    ``lm_mode``: override the layer's LM mode; ``require_key``: real mode must use the real API (no
    stand-in). ``persistent`` (``provision up``): the run outlives this process until :func:`down`;
    otherwise (``provision run``, a pool) the watchdog removes it when ``owner_pid`` (default: this
    process) is gone. ``run_id``: choose the id (default: a new one); ``image``: the worker image
    (default: built/checked); ``watchdog``: start the run's watchdog; ``new``: start a persistent
    run alongside a live one of the same project and layer.
    """

    layer: str | None = None
    workers: int | None = None
    lm_mode: LMMode | None = None
    require_key: bool = False
    persistent: bool = True
    run_id: str | None = None
    image: str | None = None
    watchdog: bool = True
    owner_pid: int | None = None
    new: bool = False


def up(
    settings: Settings | None = None,
    options: UpOptions = UpOptions(),
    *,
    runtime: ContainerRuntime | None = None,
    probe: Probe = bridge_probe,
    progress: Progress | None = None,
) -> Deployment:
    """Start a layer's deployment and write its state and env files; return the live deployment.

    The launch steps of :mod:`provisioner.runtime.launch`, plus what only ``up`` checks. A
    persistent run refuses to start over a live persistent run of the same project and layer (it
    would orphan it: ``down`` only knows the current run) unless ``options.new``. Every resource is
    labelled with the project (:func:`project_of`). The watchdog also covers a persistent run until
    it is fully up, so Ctrl-C or a kill during ``up`` leaves nothing.

    ``runtime``: the engine to use (the caller's, never closed here). Without it, ``up`` opens the
    engine's runtime, closes it when it fails, and otherwise hands it to the returned deployment,
    whose :meth:`~Deployment.stop` closes it (``owns_runtime``).

    Raises:
        ConfigError: the layer has no containers, or ``require_key`` without a key.
        RuntimeProblem: a live run of this project and layer exists (see ``new``), or ``run_id``
            is taken.
        ImageError: the worker image cannot be built or found, or holds another provisioner.
    """
    settings = settings_or_load(settings)
    say = progress or (lambda _m: None)
    project = project_of(settings)
    layer = get_layer(settings, options.layer or settings.layer)
    if not layer.needs_docker:
        raise ConfigError(
            f"layer {layer.name!r} runs {layer.runs_in_words} and has no "
            "containers; choose a bridge layer such as 'integration' or 'e2e'"
        )
    lm = layer.lm_config(settings.lm, options.lm_mode)
    if options.require_key and lm.calls_gemini and lm.api_key is None:
        raise ConfigError(
            f"--require-key: lm.api_key is not set; export GEMINI_TEST_API_KEY to use the real Gemini API "
            f"({lm.gemini_use})"
        )
    rt = launch.open_runtime(runtime, settings)
    try:
        deployment = _up(settings, options, rt, layer, lm, project, probe, say)
    except BaseException:
        if runtime is None:  # opened here, and no deployment holds it: closed here
            rt.close()
        raise
    deployment.owns_runtime = runtime is None
    return deployment


def _up(settings: Settings, options: UpOptions, rt: ContainerRuntime, layer: Layer, lm: LMConfig,
        project: str, probe: Probe, say: Progress) -> Deployment:
    runs = list_runs(rt, project, settings.state_dir)
    if options.persistent and not options.new:
        live = [
            r for r in runs
            if r.persistent and r.project == project and r.layer == layer.name and r.running(rt)
        ]
        if live:
            ids = ", ".join(r.run_id for r in live)
            raise RuntimeProblem(
                f"layer {layer.name!r} of this project is already up (run {ids}); "
                f"remove it first with `provision down --run {live[-1].run_id}`, "
                "or start another one alongside with `provision up --new`"
            )
    warnings = [
        f"stale run {r.run_id} (layer {r.layer}, owner pid {r.owner_pid} gone) still has "
        f"{len(r.resources)} resource(s); `provision reap` removes them"
        for r in runs
        if r.stale
    ]
    for w in warnings:
        say("warning: " + w)
    image = launch.ensure_image(rt, settings, image=options.image, progress=say)
    if options.run_id is not None:
        check_run_id(options.run_id)  # ConfigError: it becomes part of container and network names
    if options.run_id is not None and rt.list_resources(L.selector(options.run_id)):
        raise RuntimeProblem(
            f"run id {options.run_id!r} is already in use on this engine; choose another, or remove it "
            f"first with `provision down --run {options.run_id}`"
        )
    run_dir = run_dir_of(settings, options.run_id or new_run_id())
    owner = Owner.this_process(pid=options.owner_pid, persistent=options.persistent)
    target = launch.prepare_run_dir(settings, lm, run_dir, owner)
    if options.watchdog:
        launch.start_watchdog(settings, target)
    plan = plan_run(settings, layer, lm, target, image,
                    PlanOptions(workers=options.workers, bridge_token=bridge_token_for(rt.publish_host)))
    deployment: Deployment | None = None
    try:
        deployment = launch.deploy(plan, rt, settings, probe=probe, progress=say)
        if options.watchdog:
            wd.wait_watching(run_dir.path)
    except BaseException:
        if deployment is not None:
            deployment.stop()
        # Whatever a create call still in flight made: the run is all ours, sweep it by its label.
        # The watchdog stays on duty too: when this process ends it sweeps the run once more.
        remove_by_selector(rt, L.selector(plan.run_id))
        raise
    # Only a persistent run becomes the "current" one that shells source: a test session's or
    # `provision run`'s private run must not replace what `provision up` left for the user.
    launch.record_state(settings, deployment, target, current=options.persistent)
    if options.persistent and options.watchdog:
        wd.mark(run_dir.path, wd.PERSIST_MARKER)  # up is done: the watchdog stands down, the run stays
        wd.unregister_owner(run_dir.path, owner.pid)
    deployment.warnings = warnings
    return deployment


@dataclass
class DownResult:
    """``removed``: ``"<kind> <name>"`` of what went; ``state_problem``: why the run's state file
    could not be read (empty: it could, or there is none) — its resources went by label anyway."""

    run_id: str | None
    removed: list[str]
    state_problem: str = ""


def down(
    settings: Settings | None = None,
    *,
    run_id: str | None = None,
    runtime: ContainerRuntime | None = None,
) -> DownResult:
    """Remove a run (default: :func:`default_run`) — idempotent: a second call removes nothing.

    Raises:
        AmbiguousRunError: no ``run_id`` and the project has several runs up.
    """
    settings = settings_or_load(settings)
    with opened_runtime(runtime, settings) as rt:
        return _down(settings, rt, run_id)


def _down(settings: Settings, rt: ContainerRuntime, run_id: str | None) -> DownResult:
    run_id = run_id or default_run(settings, rt)
    if run_id is None:
        return DownResult(None, [])
    run_dir = run_dir_of(settings, run_id)
    removed: list[str] = []
    if run_dir.path.is_dir():
        wd.mark(run_dir.path, wd.STOPPED_MARKER)  # the watchdog, if any, stands down
        from provisioner.runtime.resources import terminate_process

        for pid, start in wd._entries(run_dir.processes_dir):
            if terminate_process(pid, grace_s=2.0, create_time=start or None):
                removed.append(f"process {pid}")
    removed += [f"{ref.kind} {ref.name}" for ref in _remove_run(rt, run_id)]
    problem = ""
    try:
        state = read_state(settings, run_id)
    except StateUnreadableError as exc:  # the labels found everything; the file is left as it is
        state, problem = None, str(exc)
    if state is not None and state.status != "down":
        state.status = "down"
        write_state(settings, state, current=False)
    _clear_current(settings, run_id)
    return DownResult(run_id, removed, problem)


def _remove_run(runtime: ContainerRuntime, run_id: str) -> list[ResourceRef]:
    return remove_by_selector(runtime, L.selector(run_id))


@dataclass
class WorkerHealth:
    """One worker of a run. ``container``: the engine's status (running | exited | missing ...);
    ``reason``: how a worker that is not running ended (:func:`death_reason`), else empty;
    ``repaired``: what ``status(repair=True)`` did for it (empty: nothing needed or possible)."""

    slot: int
    name: str
    address: str
    container: str  # running | exited | missing ...
    ping_ok: bool
    lm_configured: bool
    latency_ms: float | None
    detail: str = ""
    reason: str = ""
    repaired: str = ""

    @property
    def healthy(self) -> bool:
        return self.container == "running" and self.ping_ok and self.lm_configured


@dataclass
class StatusReport:
    run_id: str | None
    state: RunState | None
    workers: list[WorkerHealth]
    others: dict[str, str]  # relay / stand-in: name -> container status
    state_problem: str = ""  # the state file is unreadable (StateUnreadableError's message)

    @property
    def healthy(self) -> bool:
        return (
            bool(self.workers)
            and all(w.healthy for w in self.workers)
            and all(s == "running" for s in self.others.values())
        )


def status(
    settings: Settings | None = None,
    *,
    run_id: str | None = None,
    runtime: ContainerRuntime | None = None,
    probe: Probe = bridge_probe,
    repair: bool = False,
) -> StatusReport:
    """The health of every worker of a run (default: :func:`default_run`): container state and a ping.

    A worker whose container runs but whose published address refuses connections, or whose relay
    stopped, has a dead path (:mod:`provisioner.runtime.health`): its ``reason`` says so.

    ``repair``: first re-create the relay when a path is dead (same host ports; workers, sessions
    and programs untouched), then restart every worker whose container exited (killed, OOM-killed,
    crashed) — the same container, so the same network alias and published address — re-apply its
    egress guard and wait until it answers ``ping`` (``container.ready_timeout_s``). What was done
    is in each worker's ``repaired``; a worker whose container is gone cannot be restarted (``down``
    then ``up``). A restarted worker has lost its sessions and programs.

    Raises:
        AmbiguousRunError: no ``run_id`` and the project has several runs up.
    """
    settings = settings_or_load(settings)
    with opened_runtime(runtime, settings) as rt:
        return _status(settings, rt, run_id, probe, repair)


def _status(
    settings: Settings, rt: ContainerRuntime, run_id: str | None, probe: Probe, repair: bool
) -> StatusReport:
    run_id = run_id or default_run(settings, rt)
    try:
        state = read_state(settings, run_id) if run_id else None
    except StateUnreadableError as exc:
        return StatusReport(run_id, None, [], {}, state_problem=str(exc))
    if state is None:
        return StatusReport(run_id, None, [], {})
    repaired: dict[str, str] = {}
    if repair:
        repaired = _repair_path(settings, rt, state, probe)
        for worker, done in _repair_workers(settings, rt, state, probe).items():
            repaired[worker] = "; ".join(x for x in (repaired.get(worker, ""), done) if x)
    token = bridge_token_of(settings, state.run_id)
    if probe is bridge_probe and token:  # published off loopback: every connection says hello
        probe = functools.partial(bridge_probe, token=token)
    dead_paths = check_paths(rt, state.relay, _published(state), probe) if state.relay else {}

    def check(w: dict[str, Any]) -> WorkerHealth:
        cstate = rt.container_state(str(w["container_id"]))
        host, port = str(w["address"]).rsplit(":", 1)
        done = repaired.get(str(w["name"]), "")
        if cstate is None or not cstate.running:
            return WorkerHealth(
                int(w["slot"]),
                str(w["name"]),
                str(w["address"]),
                "missing" if cstate is None else cstate.status,
                False,
                False,
                None,
                reason=death_reason(cstate),
                repaired=done,
            )
        result = probe(host, int(port), 2.0)
        dead = dead_paths.get(int(w["slot"]), "")
        return WorkerHealth(
            int(w["slot"]),
            str(w["name"]),
            str(w["address"]),
            cstate.status,
            result.ok,
            result.lm_configured,
            round(result.latency_s * 1000, 2),
            "" if result.ok else result.detail,
            reason=f"dead path: {dead}; `provision status --repair` re-creates the relay" if dead else "",
            repaired=done,
        )

    with ThreadPoolExecutor(max_workers=max(1, len(state.workers))) as pool:
        workers = list(pool.map(check, state.workers))
    others = {}
    for name in (state.relay, state.standin):
        if name:
            cs = rt.container_state(name)
            others[name] = "missing" if cs is None else cs.status
    return StatusReport(run_id, state, workers, others)


def _published(state: RunState) -> list[PublishedWorker]:
    workers = []
    for w in state.workers:
        host, port = str(w["address"]).rsplit(":", 1)
        workers.append(
            PublishedWorker(int(w["slot"]), str(w["name"]), str(w["container_id"]), host, int(port))
        )
    return workers


def _repair_path(settings: Settings, rt: ContainerRuntime, state: RunState, probe: Probe) -> dict[str, str]:
    """Re-create the run's relay on the same host ports when a published path is dead (see
    :func:`status`); worker name -> what was done, for the workers whose path was dead."""
    workers = _published(state)
    dead = check_paths(rt, state.relay, workers, probe) if state.relay else {}
    if not dead:
        return {}
    names = {w.slot: w.name for w in workers}
    try:
        rebind_relay(rt, state.relay, workers, probe, timeout_s=settings.container.ready_timeout_s)
    except RuntimeProblem as exc:
        return {
            names[slot]: f"re-creating the relay failed: {exc} (the path was dead: {why}); "
            "`provision status --repair` tries again (e.g. once a port taken meanwhile is free), "
            "or `provision down` and `provision up` start the run afresh"
            for slot, why in dead.items()
        }
    return {
        names[slot]: f"re-created the relay {state.relay} on the same ports: {why}"
        for slot, why in dead.items()
    }


def _repair_workers(
    settings: Settings, rt: ContainerRuntime, state: RunState, probe: Probe
) -> dict[str, str]:
    """Restart the run's exited workers in place (see :func:`status`); worker name -> what was done."""
    found = rt.list_resources(L.selector(state.run_id))
    labels = {ref.name: ref.labels for ref in found if ref.kind == "container"}
    run_network = state.networks[0] if state.networks else ""

    def repair_one(w: dict[str, Any]) -> tuple[str, str]:
        name, cid = str(w["name"]), str(w["container_id"])
        cstate = rt.container_state(cid)
        if cstate is not None and cstate.running:
            return name, ""
        why = death_reason(cstate)
        if cstate is None:
            return name, (f"not repaired: the worker {why}; `provision down` and `provision up` "
                          "start the run afresh")
        started = time.time()
        try:
            rt.start_container(cid)
            if not state.egress:  # guarded: its command waits until the guard has cut it off again
                target = ContainerRecipe(
                    name=name, role="worker", image=state.image, command=(), environment={},
                    labels=labels.get(name, L.selector(state.run_id)), networks=(), guarded=True,
                )
                block_host_access(rt, target, cid, network=run_network,
                                  timeout_s=settings.container.ready_timeout_s)
            host, port = str(w["address"]).rsplit(":", 1)

            def answers() -> bool:
                if probe(host, int(port), 2.0).ready:
                    return True
                now_state = rt.container_state(cid)
                if now_state is None or not now_state.running:
                    raise RuntimeProblem(f"it {death_reason(now_state)} again; its log:\n{rt.logs(cid)}")
                return False

            timeout_s = settings.container.ready_timeout_s
            if not poll_until(answers, timeout_s, 0.05):
                raise RuntimeProblem(f"it did not answer ping within {timeout_s:.0f}s")
        except RuntimeProblem as exc:
            return name, f"restart failed after {time.time() - started:.1f} s: {exc} (the worker {why})"
        back = repair_times(cstate, started, time.time(), "the restart")
        return name, f"restarted: the worker {why}; {back}"

    with ThreadPoolExecutor(max_workers=max(1, len(state.workers))) as pool:
        return dict(pool.map(repair_one, state.workers))


def run_overview(
    settings: Settings | None = None, *, runtime: ContainerRuntime | None = None
) -> list[dict[str, Any]]:
    """Every run on the engine, all projects, oldest first (``provision status --all-projects``).

    Each row: ``run_id``, ``project`` (None: made by an older version), ``this_project`` (bool),
    ``layer``, ``persistent``, ``owner_host``, ``owner_pid``, ``created`` (unix time), ``resources``
    (count).
    """
    settings = settings_or_load(settings)
    ours = project_of(settings)
    with opened_runtime(runtime, settings) as rt:
        runs = list_runs(rt)
    return [
        {
            "run_id": r.run_id,
            "project": r.project,
            "this_project": r.project == ours,
            "layer": r.layer,
            "persistent": r.persistent,
            "owner_host": r.owner_host,
            "owner_pid": r.owner_pid,
            "created": r.created,
            "resources": len(r.resources),
        }
        for r in runs
    ]


# --- reap ------------------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1d`` or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip().lower()
    try:
        if value and value[-1] in units:
            return float(value[:-1]) * units[value[-1]]
        return float(value)
    except ValueError:
        raise ConfigError(f"--older-than: {text!r} is not a duration (e.g. 30m, 2h, 1d)") from None


@dataclass
class ReapResult:
    """One run ``reap`` looked at: ``removed`` what went (or would go, with ``dry_run``); ``kept``
    why it stayed although selected (its owners are alive), empty when it was removed."""

    run_id: str
    reason: str
    removed: list[str]
    project: str | None = None
    kept: str = ""
    state_problem: str = ""  # its state file is unreadable (it is removed by label all the same)


def reap(
    settings: Settings | None = None,
    *,
    run_id: str | None = None,
    older_than_s: float | None = None,
    all_runs: bool = False,
    all_projects: bool = False,
    force: bool = False,
    runtime: ContainerRuntime | None = None,
    dry_run: bool = False,
) -> list[ReapResult]:
    """Remove leftovers of earlier runs of this project (``all_projects``: of every project).

    Default: runs whose owner process on this host is gone and that were not started as persistent
    (``provision up``) — what a watchdog would have removed had it run. ``run_id``: that run.
    ``older_than_s``: every run created longer ago than that (persistent ones too). ``all_runs``:
    every run in scope. A run labelled by an older provisioner (no project label) is in this
    project's scope when this project's state dir has it (``<state_dir>/runs/<run_id>``), and in
    ``all_projects``' always. A selected run whose owner processes are alive (a test session, ``provision
    run``) is kept — reported with ``kept`` — unless ``force``.
    """
    settings = settings_or_load(settings)
    with opened_runtime(runtime, settings) as rt:
        return _reap(settings, rt, run_id, older_than_s, all_runs, all_projects, force, dry_run)


def _reap(settings: Settings, rt: ContainerRuntime, run_id: str | None, older_than_s: float | None,
          all_runs: bool, all_projects: bool, force: bool, dry_run: bool) -> list[ReapResult]:
    project = None if all_projects or run_id is not None else project_of(settings)
    now = time.time()
    out = []
    for summary in list_runs(rt, project, settings.state_dir):
        if run_id is not None:
            reason = "requested" if summary.run_id == run_id else ""
        elif all_runs:
            reason = "--all"
        elif older_than_s is not None:
            age = now - summary.created
            reason = f"{age / 60:.0f} min old" if summary.created and age > older_than_s else ""
        else:
            reason = "owner gone" if summary.stale else ""
        if not reason:
            continue
        listed = [f"{r.kind} {r.name}" for r in summary.resources]
        problem = ""
        try:
            read_state(settings, summary.run_id)
        except StateUnreadableError as exc:
            problem = str(exc)
        owners = summary.live_owners(run_dir_of(settings, summary.run_id))
        if owners and not force:
            kept = f"owner {', '.join(owners)} alive; --force removes it anyway"
            out.append(ReapResult(summary.run_id, reason, [], summary.project, kept, problem))
            continue
        if dry_run:
            out.append(ReapResult(summary.run_id, reason, listed, summary.project, "", problem))
            continue
        result = down(settings, run_id=summary.run_id, runtime=rt)
        out.append(ReapResult(summary.run_id, reason, result.removed, summary.project, "",
                              result.state_problem or problem))
    return out


