"""One path from a layer to a running deployment, as a short sequence of plain steps.

Every way of starting containers — ``provision up``, ``provision run``, the pytest plugin's pool and
its dedicated workers (:mod:`provisioner.runtime.workers`), and :func:`provisioner.environment` —
goes through the same steps, each a plain function handed what the previous ones returned (the
shape of nox's ``workflow``/``tasks``), so each can be tested alone on the in-memory engine:

    open_runtime → ensure_image → prepare_run_dir → start_watchdog → plan_run → deploy → record_state

* :func:`open_runtime` — the engine (a given runtime, or Docker);
* :func:`ensure_image` — the worker image tag (given, or checked / built once per content hash);
* :func:`prepare_run_dir` — the run's folder and the LM folders its workers share → a
  :class:`~provisioner.runtime.recipes.RunTarget` (run id, process instance, owner, shared LM folder);
* :func:`start_watchdog` — register the owner with the run's detached reaper (started if needed);
* :func:`~provisioner.runtime.recipes.plan_run` — the :class:`RunPlan`, named for the instance;
* :func:`deploy` — create and start it, wait until every worker is ready → a :class:`Deployment`;
* :func:`record_state` — the state and env files (only runs that others attach to: ``up``, ``run``).

What differs between the callers is data (the instance, the owner, persistence, how many
workers), not code.
"""

from __future__ import annotations

from provisioner.lmconfig import LMConfig
from provisioner.runtime import watchdog as wd
from provisioner.runtime.deployment import Deployment, Probe, Progress, bridge_probe
from provisioner.runtime.engine import ContainerRuntime
from provisioner.runtime.recipes import Owner, RunPlan, RunTarget, prepare_shared_dir
from provisioner.runtime.resources import ResourceManager
from provisioner.runtime.runs import project_of, runtime_or_docker
from provisioner.runtime.state import RunDir, RunState, write_state
from provisioner.settings import Settings


def open_runtime(
    runtime: ContainerRuntime | None = None, settings: Settings | None = None
) -> ContainerRuntime:
    """``runtime`` when given (the in-memory engine in tests), else the engine's runtime for
    ``settings`` (:func:`provisioner.runtime.engine.open_runtime`, checked with a ping).

    Raises:
        DockerUnavailableError: no ``runtime`` and the engine does not answer.
    """
    return runtime_or_docker(runtime, settings)


def ensure_image(
    runtime: ContainerRuntime,
    settings: Settings,
    *,
    image: str | None = None,
    progress: Progress | None = None,
) -> str:
    """The worker image tag: ``image`` when given, else ``container.image`` checked, or this
    installation's content-hashed image (built under a machine-wide lock when missing, so concurrent
    processes build it once) — through the runtime's image store.

    Raises:
        ImageError: the image cannot be built or found, or holds another provisioner.
    """
    if image is not None:
        return image
    from provisioner.runtime.images import ensure_worker_image

    return ensure_worker_image(
        runtime,
        image=settings.container.image,
        base=settings.container.base,
        project=project_of(settings),
        progress=progress,
    )


def prepare_run_dir(
    settings: Settings,
    lm: LMConfig,
    run_dir: RunDir,
    owner: Owner,
    *,
    instance: str | None = None,
) -> RunTarget:
    """Create the run's folder and the LM folders its workers share; return where to deploy.

    The shared LM folder (rate window, cost budget, ledger; cached and real mode) is ``lm.run_dir``
    when the run's LM configuration names one (the pytest plugin's), else ``<run dir>/lm``. A
    cassette folder that will be recorded into is created too; a replay-only one
    (``record_mode="none"``) is mounted read-only and left untouched. Both are made writable for the
    workers' group when provisioner runs as root (:func:`prepare_shared_dir`).
    """
    run_dir.path.mkdir(parents=True, exist_ok=True)
    lm_dir = None
    if lm.mode != "mock":
        lm_dir = prepare_shared_dir(lm.run_dir if lm.run_dir is not None else run_dir.lm_dir)
        if lm.mode == "cached" and lm.record_mode != "none":
            prepare_shared_dir(lm.cache_dir)
    return RunTarget(
        run_id=run_dir.run_id,
        owner=owner,
        instance=instance,
        lm_dir=lm_dir,
        project=project_of(settings),
        run_dir=run_dir,
    )


def start_watchdog(
    settings: Settings, target: RunTarget, *, principal: str | None = None, wait: bool = False
) -> None:
    """Register ``target.owner`` with the run's watchdog (started unless one is watching).

    When every owner is gone — even by SIGKILL — the watchdog removes the run. ``principal``: the
    owner is an xdist worker, a dependant of its controller (see :mod:`provisioner.runtime.watchdog`).
    ``wait``: return only once the watchdog is watching.
    """
    if target.run_dir is None:
        raise ValueError("start_watchdog needs a target from prepare_run_dir (it has no run folder)")
    wd.ensure_watchdog(
        target.run_id,
        target.run_dir.path,
        owner_pid=target.owner.pid,
        principal=principal,
        interval_s=settings.container.watchdog_interval_s,
        wait=wait,
    )


def deploy(
    plan: RunPlan,
    runtime: ContainerRuntime,
    settings: Settings,
    *,
    resources: ResourceManager | None = None,
    probe: Probe = bridge_probe,
    progress: Progress | None = None,
    start_slots: int | None = None,
    ready_slots: int | None = None,
) -> Deployment:
    """Create and start every network and container of ``plan``; wait until each worker answers
    ``ping`` with its LM configured (``container.ready_timeout_s``).

    ``resources``: the manager that tracks what is made (default: one on the plan's instance).
    ``start_slots``: start only that many workers now; the rest wait for
    :meth:`Deployment.add_worker` (the run's shared pool grows so: runtime/shared_pool.py).
    ``ready_slots``: return once that many started workers are ready; the others go on starting
    (:meth:`Deployment.add_worker` waits for one).

    Raises:
        WorkerNotReadyError: a worker exited or was not ready in time (with its log).
        RuntimeProblem: the engine refused a resource. Everything made so far is removed first.
    """
    deployment = Deployment(
        plan,
        runtime,
        resources=resources,
        probe=probe,
        ready_timeout_s=settings.container.ready_timeout_s,
        progress=progress,
        start_slots=start_slots,
        ready_slots=ready_slots,
    )
    return deployment.start()


def record_state(
    settings: Settings,
    deployment: Deployment,
    target: RunTarget,
    *,
    current: bool,
) -> RunState:
    """Write the run's state file and env file (:func:`~provisioner.runtime.state.write_state`) for
    the started ``deployment``; ``current``: also make it the project's current run (``current.env``).
    No secrets in the state file; the control token goes to the 0600 env files only."""
    plan = deployment.plan
    image = plan.workers[0].image if plan.workers else plan.relay.image
    state = RunState(
        run_id=plan.run_id,
        layer=plan.layer,
        lm_mode=plan.lm_mode,
        instance=plan.instance,
        image=image,
        created=target.owner.created,
        owner_pid=target.owner.pid,
        owner_host=target.owner.host,
        persistent=target.owner.persistent,
        uses_standin=plan.uses_standin,
        egress=plan.egress,
        networks=[n.name for n in plan.networks],
        relay=plan.relay.name,
        standin=plan.standin.name if plan.standin else None,
        workers=[
            {"slot": w.slot, "name": w.name, "container_id": w.container_id, "address": w.address}
            for w in deployment.workers
        ],
        lm_run_dir=plan.lm_run_dir,
        record_mode=plan.record_mode,
    )
    write_state(settings, state, current=current, control_token=plan.control_token,
                bridge_token=plan.bridge_token)
    deployment.state = state
    return state
