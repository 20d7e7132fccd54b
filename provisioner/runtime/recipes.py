"""Layer + Settings + LMConfig -> the recipes of one run's containers and networks.

A run is planned as data (:class:`RunPlan`) before anything is created, so the same plan drives the
Docker engine, the in-memory fake, testcontainers (:meth:`ContainerRecipe.to_testcontainer`) and the
checked-in compose files (:mod:`provisioner.runtime.compose`).

Network design (see docs/containers.md):

* every run gets its own **run network** ``prov-<run>``. It is ``internal`` (no default route, no
  way out of the host) unless the layer really talks to the internet (real LM mode against the real
  API). Workers and the Gemini stand-in live only on it, reachable by their aliases (``w0``, ``w1``,
  ``gemini-standin``);
* a small **relay** container joins the run network and an ordinary **edge network**
  ``prov-<run>-edge``; it publishes one port per worker slot on ``127.0.0.1`` (host port chosen by
  Docker) and forwards each to the slot's alias. The relay is the only container with a route out,
  and it runs a fixed stdlib TCP forwarder (:mod:`provisioner.runtime.relay`): no LM, no key.

So ``PROVISION_BRIDGE_ADDRS`` are ``127.0.0.1:<port>`` everywhere (also on Docker Desktop), a
replaced worker keeps its slot's address, and mock/cached workers cannot reach a paid API.

An ``internal`` network still gives its containers a default route to the host (the network's
gateway), so on an internal run network every container is **guarded** (:attr:`ContainerRecipe.guarded`):
its command waits behind ``netguard.py wait`` until a short-lived guard container
(:func:`guard_recipe`, run by :func:`provisioner.runtime.egress.block_host_access`) has removed that
route inside the container's own network namespace — see :mod:`provisioner.runtime.netguard`.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from provisioner.bridge.protocol import BRIDGE_TOKEN_ENV, CONTROL_TOKEN_ENV
from provisioner.errors import ConfigError, NoContainersError
from provisioner.layers import Layer
from provisioner.lmconfig import GeminiEndpoint, LMConfig, endpoint_problem, worker_secrets
from provisioner.runtime import labels as L
from provisioner.settings import Settings

if TYPE_CHECKING:  # state -> watchdog -> engine -> engine.base -> recipes: a type only, no import cycle
    from provisioner.runtime.state import RunDir

WORKER_PORT = 8765
RELAY_BASE_PORT = 9000
STANDIN_PORT = 8080
STANDIN_ALIAS = "gemini-standin"
RELAY_SCRIPT = "/opt/provisioner/relay.py"  # provisioner/runtime/relay.py, copied by the image build
NETGUARD_SCRIPT = "/opt/provisioner/netguard.py"  # provisioner/runtime/netguard.py, copied likewise
# Paths inside worker containers. Fixed, so no host path leaks into the container or the compose files.
CASSETTE_MOUNT = "/provision/cassettes"
RUN_DIR_MOUNT = "/provision/run"
# A fixed unprivileged uid for workers when provisioner itself runs as root (see worker_user()).
WORKER_UID = 10001
TMPFS = {"/tmp": "rw,nosuid,nodev,size=256m"}

Role = Literal["worker", "relay", "standin", "guard"]
# The stand-in's health check: it answers HTTP (any path; GET gets its own JSON 404) as GeminiStandin.
STANDIN_HEALTH_PROBE = (
    "import sys, urllib.request as r, urllib.error as e\n"
    "try:\n    h = r.urlopen(f'http://127.0.0.1:{sys.argv[1]}/', timeout=2).headers\n"
    "except e.HTTPError as x:\n    h = x.headers\n"
    "except OSError as x:\n    sys.exit(f'unhealthy: {x}')\n"
    "sys.exit(0 if (h.get('Server') or '').startswith('GeminiStandin') else 'unhealthy: not the stand-in')"
)


#: Seconds one HEALTHCHECK probe of a container may take before the engine counts it as failed: the
#: relay's and the stand-in's (:class:`HealthCheck`) and the worker image's (its Dockerfile's
#: ``HEALTHCHECK --timeout``; tests/runtime/test_images.py checks they agree). Each probe starts a
#: Python interpreter: 3 s (Docker's usual) was not enough on a machine at load 20+, and the engine
#: then marked a serving container unhealthy.
HEALTHCHECK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HealthCheck:
    """A Docker HEALTHCHECK (``docker ps`` shows ``(healthy)``). ``test`` is the command (exec form);
    ``("NONE",)`` disables the image's check. Durations in seconds."""

    test: tuple[str, ...]
    interval_s: float = 5.0
    timeout_s: float = HEALTHCHECK_TIMEOUT_S
    retries: int = 3
    start_period_s: float = 10.0

    def docker_dict(self) -> dict[str, Any]:
        """docker-py's ``healthcheck=`` (durations in nanoseconds)."""
        if self.test == ("NONE",):
            return {"test": ["NONE"]}
        return {
            "test": ["CMD", *self.test],
            "interval": int(self.interval_s * 1e9),
            "timeout": int(self.timeout_s * 1e9),
            "retries": self.retries,
            "start_period": int(self.start_period_s * 1e9),
        }

    def compose_dict(self) -> dict[str, Any]:
        """The same for a compose file (durations as ``5s``)."""
        if self.test == ("NONE",):
            return {"disable": True}
        return {
            "test": ["CMD", *self.test],
            "interval": f"{self.interval_s:g}s",
            "timeout": f"{self.timeout_s:g}s",
            "retries": self.retries,
            "start_period": f"{self.start_period_s:g}s",
        }


NO_HEALTHCHECK = HealthCheck(("NONE",))


@dataclass(frozen=True)
class Mount:
    """A bind mount of a host directory."""

    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class NetworkAttachment:
    network: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class NetworkRecipe:
    name: str
    internal: bool
    labels: dict[str, str]


@dataclass(frozen=True)
class ContainerRecipe:
    """Everything needed to create one container. ``secret_environment`` never leaves the engine call.

    ``networks[0]`` is the network the container is created on; the others are connected before it
    starts. ``ports`` are container ports published on ``127.0.0.1`` with the host port left to Docker.
    ``network_mode`` (``container:<id>``, the guard only) joins another container's network namespace
    instead of any network. ``healthcheck`` None keeps the image's HEALTHCHECK (the worker's).
    ``guarded``: the command waits for the egress guard (see :mod:`provisioner.runtime.netguard`);
    whoever starts the container must run :func:`guard_recipe` for it.
    """

    name: str
    role: Role
    image: str
    command: tuple[str, ...]
    environment: dict[str, str]
    labels: dict[str, str]
    networks: tuple[NetworkAttachment, ...]
    ports: tuple[int, ...] = ()
    mounts: tuple[Mount, ...] = ()
    user: str | None = None
    read_only: bool = True
    tmpfs: dict[str, str] = field(default_factory=lambda: dict(TMPFS))
    memory: str = "1g"
    cpus: float = 1.0
    pids_limit: int = 256
    cap_drop: tuple[str, ...] = ("ALL",)
    security_opt: tuple[str, ...] = ("no-new-privileges:true",)
    init: bool = True
    slot: int | None = None
    cap_add: tuple[str, ...] = ()
    network_mode: str | None = None
    healthcheck: HealthCheck | None = None
    guarded: bool = False
    secret_environment: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def public_dict(self) -> dict[str, Any]:
        """The recipe as plain data, without secrets (for state files, ``--json`` and logs)."""
        return {
            "name": self.name,
            "role": self.role,
            "image": self.image,
            "command": list(self.command),
            "environment": dict(self.environment),
            "secret_environment": sorted(self.secret_environment),  # names only
            "labels": dict(self.labels),
            "networks": [{"network": a.network, "aliases": list(a.aliases)} for a in self.networks],
            "ports": list(self.ports),
            "mounts": [
                {"source": m.source, "target": m.target, "read_only": m.read_only} for m in self.mounts
            ],
            "user": self.user,
            "read_only": self.read_only,
            "memory": self.memory,
            "cpus": self.cpus,
            "pids_limit": self.pids_limit,
            "cap_add": list(self.cap_add),
            "network_mode": self.network_mode,
            "healthcheck": self.healthcheck.docker_dict() if self.healthcheck else None,
            "guarded": self.guarded,
        }

    def to_run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for docker-py ``client.containers.create(**kwargs)``.

        Contains the secret environment (the engine needs it): never log the result. Only
        ``networks[0]`` is included (as ``network``); connect the others, with their aliases, before
        starting the container (:class:`~provisioner.runtime.engine.DockerRuntime` does this).
        """
        kwargs: dict[str, Any] = {
            "image": self.image,
            "command": list(self.command),
            "name": self.name,
            "environment": {**self.environment, **self.secret_environment},
            "labels": dict(self.labels),
            "ports": {f"{port}/tcp": ("127.0.0.1", None) for port in self.ports},
            "volumes": {
                m.source: {"bind": m.target, "mode": "ro" if m.read_only else "rw"} for m in self.mounts
            },
            "read_only": self.read_only,
            "tmpfs": dict(self.tmpfs),
            "mem_limit": self.memory,
            "nano_cpus": int(self.cpus * 1e9),
            "pids_limit": self.pids_limit,
            "cap_drop": list(self.cap_drop),
            "security_opt": list(self.security_opt),
            "init": self.init,
            "detach": True,
        }
        if self.user is not None:
            kwargs["user"] = self.user
        if self.cap_add:
            kwargs["cap_add"] = list(self.cap_add)
        if self.healthcheck is not None:
            kwargs["healthcheck"] = self.healthcheck.docker_dict()
        if self.network_mode is not None:
            kwargs["network_mode"] = self.network_mode
        elif self.networks:
            kwargs["network"] = self.networks[0].network
        return kwargs

    def to_testcontainer(self) -> Any:
        """This recipe as a testcontainers ``DockerContainer`` (not started), built with its public
        builder API only: command, name, environment (secrets included: the engine needs them),
        labels, mounts, tmpfs, limits, hardening, and the first network with its aliases (the network
        must exist already: create it from the plan's :class:`NetworkRecipe`).

        testcontainers' Ryuk reaper must be off (``TESTCONTAINERS_RYUK_DISABLED``; the pytest plugin
        and :func:`provisioner.environment` switch it off at start-up): it needs an image pull, and
        the run's watchdog does its job.

        Raises:
            ValueError: the recipe publishes ports (the builder binds them on every interface;
                workers are reached through the relay, which the runtime starts) or joins another
                container's network namespace.
        """
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.network import Network

        if self.ports:
            raise ValueError(
                f"{self.name} publishes ports {list(self.ports)}: testcontainers' builder would bind them "
                "on every interface, not 127.0.0.1 only; start it with the container runtime instead"
            )
        if self.network_mode is not None:
            raise ValueError(f"{self.name} joins {self.network_mode}: start it with the container runtime")
        kwargs = self.to_run_kwargs()
        for handled in ("image", "command", "name", "environment", "ports", "volumes", "tmpfs", "network"):
            kwargs.pop(handled, None)
        container = (
            DockerContainer(self.image)
            .with_command(list(self.command))
            .with_name(self.name)
            .with_envs(**self.environment, **self.secret_environment)
        )
        for m in self.mounts:
            container = container.with_volume_mapping(m.source, m.target, "ro" if m.read_only else "rw")
        for path, options in self.tmpfs.items():
            container = container.with_tmpfs_mount(path, options)  # Docker's tmpfs options, size included
        if self.networks:
            network = Network()
            network.name = self.networks[0].network  # made by the runtime; testcontainers only joins it
            container = container.with_network(network)
            if self.networks[0].aliases:
                container = container.with_network_aliases(*self.networks[0].aliases)
        return container.with_kwargs(**kwargs)


@dataclass(frozen=True)
class RunPlan:
    """Every resource of one run, in creation order (networks first)."""

    run_id: str
    layer: str
    instance: str  # the provisioner.instance label: RunTarget.instance, or the run id
    lm_mode: str
    networks: tuple[NetworkRecipe, ...]
    relay: ContainerRecipe
    workers: tuple[ContainerRecipe, ...]
    standin: ContainerRecipe | None = None
    uses_standin: bool = False
    egress: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    # The run's limits (provisioner.lm.limits.write_run_limits keywords) and the host directory the
    # workers share; Deployment writes the limits file there before any worker starts.
    lm_run_dir: str | None = None
    run_limits: dict[str, Any] | None = None
    # The cassette record mode of a cached run (None otherwise): an attaching pytest compares it.
    record_mode: str | None = None
    # The workers' control token (a secret: workers get it in secret_environment, the run's env
    # file holds it for controllers; never in public_dict, labels or state files).
    control_token: str | None = field(default=None, repr=False, compare=False)
    # The run's bridge token when it is published off loopback (every connection's first frame is a
    # hello carrying it; docs/protocol.md); None on loopback. A secret like the control token.
    bridge_token: str | None = field(default=None, repr=False, compare=False)

    @property
    def run_network(self) -> str:
        return self.networks[0].name

    def containers(self) -> tuple[ContainerRecipe, ...]:
        extra = (self.standin,) if self.standin is not None else ()
        return (*extra, self.relay, *self.workers)

    def relay_port_for(self, slot: int) -> int:
        return RELAY_BASE_PORT + slot

    def public_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "layer": self.layer,
            "instance": self.instance,
            "lm_mode": self.lm_mode,
            "egress": self.egress,
            "uses_standin": self.uses_standin,
            "networks": [{"name": n.name, "internal": n.internal, "labels": n.labels} for n in self.networks],
            "containers": [c.public_dict() for c in self.containers()],
        }


def worker_user(euid: int | None = None, egid: int | None = None) -> str:
    """The uid:gid workers run as.

    Not root: the invoking user's own uid:gid, so cassettes and ledgers written through bind mounts
    belong to you. Root: a fixed unprivileged uid (10001) with group 0, and the few directories we
    mount are made group-writable (:func:`prepare_shared_dir`) — no chmod 777, no chown of your files.
    Group 0 grants nothing else inside the container: its root filesystem is read-only and every
    capability is dropped.
    """
    uid = os.geteuid() if euid is None else euid
    gid = os.getegid() if egid is None else egid
    if uid == 0:
        return f"{WORKER_UID}:0"
    return f"{uid}:{gid}"


def prepare_shared_dir(path: Path, *, euid: int | None = None) -> Path:
    """Create ``path`` (absolute) and, when running as root, make it writable for group 0 workers.

    Something its owner made read-only (no owner write bit, e.g. a cassette directory frozen with
    ``chmod -R a-w``) stays read-only: workers then fail to record, saying so.
    """
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    if (os.geteuid() if euid is None else euid) == 0:
        _group_writable(path)
        for child in path.rglob("*"):
            if not child.is_symlink():
                _group_writable(child)
    return path


def _group_writable(path: Path) -> None:
    mode = path.stat().st_mode
    if not mode & stat.S_IWUSR:
        return  # read-only by intent: never widened
    wanted = mode | stat.S_IRGRP | stat.S_IWGRP
    if stat.S_ISDIR(mode):
        wanted |= stat.S_IXGRP | stat.S_ISGID  # setgid: new files keep the directory's group
    if wanted != mode:
        path.chmod(stat.S_IMODE(wanted))


def shown_path(path: Path, project_dir: Path | None) -> str:
    """``path`` as the user knows it: relative to the project root when inside it, else absolute."""
    resolved = path.resolve()
    if project_dir is not None:
        try:
            return str(resolved.relative_to(project_dir.resolve()))
        except ValueError:
            pass
    return str(resolved)


def worker_lm_config(
    lm: LMConfig,
    *,
    run_id: str,
    layer: str,
    base_url: str | None,
    project_dir: Path | None = None,
) -> LMConfig:
    """The LM configuration as a worker container sees it (in-container paths, stand-in URL).

    Messages of the worker name the cassettes by the host folder (``cache_dir_shown``: relative to
    ``project_dir`` when inside it), not by the container's mount point."""
    update: dict[str, Any] = {"run_id": run_id, "layer": layer}
    if lm.mode == "cached":
        update["cache_dir"] = Path(CASSETTE_MOUNT)
        update["cache_dir_shown"] = lm.cache_dir_shown or shown_path(lm.cache_dir, project_dir)
    else:  # no cassettes mounted: the host's (absolute, project-anchored) path means nothing inside
        update["cache_dir"] = LMConfig.model_fields["cache_dir"].default
    if lm.mode != "mock":
        # The run's rate window, cost budget and ledger are files shared (with fcntl locks) by every
        # worker of the run: one directory, bind-mounted into all of them.
        update["run_dir"] = Path(RUN_DIR_MOUNT)
    else:
        update["run_dir"] = None
    if base_url is not None:
        update["base_url"] = base_url
        update["endpoint_kind"] = "standin"  # the only base_url this controller wires in
    return lm.with_run_endpoint().model_copy(update=update)


@dataclass(frozen=True)
class Owner:
    """The process a run's resources are labelled with (``provisioner.owner.*``): the watchdog and
    ``provision reap`` judge a run stale by it. ``created``: unix time; ``persistent``: the run
    outlives its owner (``provision up``)."""

    pid: int
    host: str
    created: float
    persistent: bool = False

    @classmethod
    def this_process(cls, *, pid: int | None = None, persistent: bool = False) -> Owner:
        """This host, now, and ``pid`` (default: this process)."""
        return cls(pid or os.getpid(), socket.gethostname(), time.time(), persistent)


@dataclass(frozen=True)
class RunTarget:
    """Where a plan's resources go: the run (``run_id``: labels, watchdog, shared LM state), the
    process instance inside it, and its owner.

    ``instance``: which process of the run deploys (``main-77``, ``gw0-1234``): the
    ``provisioner.instance`` label holds it, so each process finds (and removes) only its own
    resources. ``name``: this deployment's name inside the run (default: the instance; a dedicated
    worker's is ``<instance>-d<n>``): container and network names are ``prov-<run>-<name>-…``, so two
    deployments of one run never clash. Both None: the run has one deployment (``provision up``,
    ``provision run``, compose): names are ``prov-<run>-…`` and the label holds the run id.
    ``lm_dir``: the host folder the run's workers share (LM rate window, cost budget, ledger;
    needed in cached and real mode). ``project``: the :func:`~provisioner.runtime.labels.project_id`
    every resource is labelled with. ``run_dir``: the run's folder on this host (None for a plan that
    is never started, e.g. a compose export).
    """

    run_id: str
    owner: Owner
    instance: str | None = None
    name: str | None = None
    lm_dir: Path | None = None
    project: str | None = None
    run_dir: RunDir | None = None

    @property
    def prefix(self) -> str:
        """The start of every container and network name of this deployment."""
        name = self.name or self.instance
        return f"prov-{self.run_id}-{name}" if name else f"prov-{self.run_id}"

    def labels(self, layer: str) -> dict[str, str]:
        """The labels every resource of the deployment carries (:func:`labels.run_labels`)."""
        return L.run_labels(
            self.run_id,
            layer,
            self.instance or self.run_id,
            owner_pid=self.owner.pid,
            owner_host=self.owner.host,
            created=self.owner.created,
            persistent=self.owner.persistent,
            project=self.project,
        )


@dataclass(frozen=True)
class PlanOptions:
    """The knobs of :func:`plan_run` beyond the layer's own (None: the layer's or the default).

    ``workers``: how many (default ``layer.workers``). ``use_standin``: None = the stand-in exactly
    when the layer calls Gemini (real mode, or cached mode recording from it) and no API key or
    ``base_url`` is configured (:attr:`~provisioner.lmconfig.LMConfig.wants_standin`). ``user``:
    ``uid:gid`` (default :func:`worker_user`). ``worker_args``: extra ``provision worker`` arguments.
    ``control_token``: the workers' control token (default: a new ``secrets.token_urlsafe(32)``).
    ``bridge_token``: set for a run published off loopback (see :func:`bridge_token_for`): every
    connection to its workers must start with a ``hello`` carrying it.
    """

    workers: int | None = None
    use_standin: bool | None = None
    user: str | None = None
    worker_args: tuple[str, ...] = ()
    control_token: str | None = field(default=None, repr=False)
    bridge_token: str | None = field(default=None, repr=False)


def bridge_token_for(publish_host: str) -> str | None:
    """A new bridge token (``secrets.token_urlsafe(32)``) for workers published on ``publish_host``
    when that is not loopback; None on loopback (DSPex-compatible: no hello needed)."""
    from provisioner.runtime.engine.address import is_loopback

    return None if is_loopback(publish_host) else secrets.token_urlsafe(32)


def plan_run(
    settings: Settings,
    layer: Layer,
    lm: LMConfig,
    target: RunTarget,
    image: str,
    options: PlanOptions = PlanOptions(),
) -> RunPlan:
    """Plan one deployment of ``layer``: its networks, relay, optional Gemini stand-in and workers.

    ``lm`` is the host-side LM configuration (``layer.lm_config(settings.lm)``); ``target`` names the run,
    the process instance and the owner (names are right from the start: nothing is renamed later).

    Raises:
        NoContainersError: ``layer`` runs in-process (a :class:`~provisioner.errors.ConfigError`).
        ConfigError: fewer than one worker (``options.workers``, or the layer's ``workers`` setting),
            or an ``lm.base_url`` the workers cannot use (:func:`~provisioner.lmconfig.endpoint_problem`).
        ValueError: arguments that contradict each other (the stand-in for a layer that is not
            real; a cached or real layer without ``target.lm_dir``).
    """
    if not layer.needs_docker:
        raise NoContainersError(
            f"layer {layer.name!r} runs {layer.runs_in_words}; it has no containers"
        )
    count = options.workers if options.workers is not None else layer.workers
    if count < 1:
        raise ConfigError(f"layer {layer.name!r}: workers must be at least 1, got {count}")
    use_standin = options.use_standin
    if use_standin is None:
        use_standin = lm.wants_standin
    if use_standin and not lm.calls_gemini:
        raise ValueError(f"the Gemini stand-in serves workers that call Gemini (real mode, or cached mode "
                         f"recording from it); layer {layer.name!r} is {lm.mode!r} and does not")
    problem = endpoint_problem(lm, layer=layer.name, in_containers=True) if not use_standin else None
    if problem is not None:
        raise ConfigError(problem)
    if lm.mode != "mock" and target.lm_dir is None:
        raise ValueError(f"layer {layer.name!r} ({lm.mode} LM) needs a folder shared by its workers "
                         "(RunTarget.lm_dir)")
    # Only workers that call the real API (real mode, or cached mode recording from it) need a route
    # out; everything else stays internal.
    egress = lm.calls_gemini and not use_standin
    labels = target.labels(layer.name)
    networks = run_networks(target, labels, egress=egress)
    user = options.user or worker_user()
    limits = container_limits(settings, layer, user)
    control_token = options.control_token or secrets.token_urlsafe(32)
    env, secret = worker_env(settings, layer, lm, target, use_standin=use_standin, egress=egress,
                             control_token=control_token)
    if options.bridge_token:
        secret[BRIDGE_TOKEN_ENV] = options.bridge_token
    mounts = worker_mounts(lm, target.lm_dir)
    worker_args = options.worker_args
    if layer.isolation == "process":  # one forked process per connection (provisioner.bridge.forking)
        worker_args = ("--fork", *worker_args)
    workers = tuple(
        worker_recipe(
            target.prefix,
            slot,
            image=image,
            environment=env,
            secret_environment=secret,
            labels=labels,
            network=networks[0].name,
            mounts=mounts,
            limits=limits,
            worker_args=worker_args,
            guarded=not egress,
        )
        for slot in range(count)
    )
    relay = relay_recipe(target.prefix, count, image=image, labels=labels, networks=networks, limits=limits)
    standin = (
        standin_recipe(target.prefix, image=image, labels=labels, network=networks[0].name, limits=limits,
                       guarded=not egress)
        if use_standin
        else None
    )
    shared = target.lm_dir is not None and lm.mode != "mock"
    return RunPlan(
        run_id=target.run_id,
        layer=layer.name,
        instance=target.instance or target.run_id,
        lm_mode=lm.mode,
        networks=networks,
        relay=relay,
        workers=workers,
        standin=standin,
        uses_standin=use_standin,
        egress=egress,
        labels=labels,
        lm_run_dir=str(target.lm_dir.resolve()) if shared and target.lm_dir is not None else None,
        record_mode=lm.record_mode if lm.mode == "cached" else None,
        run_limits=(
            {
                "rate_limit_rpm": lm.rate_limit_rpm,
                "cost_limit_usd": lm.cost_limit_usd,
                "rate_limit_wait_s": lm.rate_limit_wait_s,
            }
            if shared
            else None
        ),
        control_token=control_token,
        bridge_token=options.bridge_token or None,
    )


def run_networks(
    target: RunTarget, labels: Mapping[str, str], *, egress: bool
) -> tuple[NetworkRecipe, NetworkRecipe]:
    """The run network ``<prefix>`` (``internal`` unless ``egress``) and the edge network
    ``<prefix>-edge`` (the relay's way to the host's loopback ports)."""
    network_labels = {**labels, L.ROLE: L.ROLE_NETWORK}
    return (
        NetworkRecipe(target.prefix, internal=not egress, labels=dict(network_labels)),
        NetworkRecipe(f"{target.prefix}-edge", internal=False, labels=dict(network_labels)),
    )


def container_limits(settings: Settings, layer: Layer, user: str) -> dict[str, Any]:
    """A worker's resource limits and user (the layer's ``memory``/``cpus`` beat the settings')."""
    return {
        "memory": layer.memory or settings.container.memory,
        "cpus": layer.cpus or settings.container.cpus,
        "pids_limit": settings.container.pids_limit,
        "read_only": settings.container.read_only,
        "user": user,
    }


def worker_env(
    settings: Settings,
    layer: Layer,
    lm: LMConfig,
    target: RunTarget,
    *,
    use_standin: bool,
    egress: bool,
    control_token: str,
) -> tuple[dict[str, str], dict[str, str]]:
    """(public, secret) environment of the run's workers.

    Public: the worker's LM configuration (:func:`worker_lm_config`, in-container paths), the run's
    id and layer, and the worker limits of ``settings.worker``. Secret (never in labels, logs or
    :meth:`ContainerRecipe.public_dict`): what :func:`~provisioner.lmconfig.worker_secrets` decides
    for the Gemini endpoint these workers reach, and the run's control token.
    """
    base_url = f"http://{STANDIN_ALIAS}:{STANDIN_PORT}/" if use_standin else None
    in_container = worker_lm_config(lm, run_id=target.run_id, layer=layer.name, base_url=base_url,
                                    project_dir=settings.project_dir)
    endpoint: GeminiEndpoint = "standin" if use_standin else "api" if egress else "none"
    secret = {**worker_secrets(in_container, endpoint=endpoint), CONTROL_TOKEN_ENV: control_token}
    worker = settings.worker
    env = {
        **_common_env(),
        **in_container.to_worker_env(),
        "PROVISION_RUN_ID": target.run_id,
        "PROVISION_LAYER": layer.name,
        "PROVISION_WORKER__MAX_FRAME_BYTES": str(worker.max_frame_bytes),
        "PROVISION_WORKER__MAX_INFLIGHT": str(worker.max_inflight),
        "PROVISION_WORKER__MAX_CONNECTIONS": str(worker.max_connections),
        "PROVISION_WORKER__MAX_INFLIGHT_BYTES": str(worker.max_inflight_bytes),
        "PROVISION_WORKER__FRAME_TIMEOUT_S": str(worker.frame_timeout_s),
        "PROVISION_WORKER__MAX_PROGRAMS": str(worker.max_programs),
        "PROVISION_WORKER__MAX_SESSIONS": str(worker.max_sessions),
        "PROVISION_PROCESS_TIMEOUT": str(settings.process_timeout),
    }
    if worker.max_inflight_per_session is not None:  # else the worker's default
        env["PROVISION_WORKER__MAX_INFLIGHT_PER_SESSION"] = str(worker.max_inflight_per_session)
    return env, secret


def worker_mounts(lm: LMConfig, lm_dir: Path | None) -> tuple[Mount, ...]:
    """The cassettes (cached mode; read-only when replaying only) and the run's shared LM folder
    (cached and real mode). Mock workers mount nothing."""
    mounts: list[Mount] = []
    if lm.mode == "cached":
        mounts.append(Mount(str(lm.cache_dir.resolve()), CASSETTE_MOUNT, read_only=lm.record_mode == "none"))
    if lm.mode != "mock" and lm_dir is not None:
        mounts.append(Mount(str(lm_dir.resolve()), RUN_DIR_MOUNT))
    return tuple(mounts)


def _sidecar_limits(limits: Mapping[str, Any], *, memory: str, pids_limit: int) -> dict[str, Any]:
    """The limits of a sidecar, a container beside the workers (the relay, the stand-in): its own ``memory``
    and ``pids_limit``, the layer's CPUs but one at most, the layer's read-only root and user
    (``limits``: the layer's, as :func:`plan_run` resolves them)."""
    return {"memory": memory, "pids_limit": pids_limit, "cpus": min(float(limits["cpus"]), 1.0),
            "read_only": bool(limits["read_only"]), "user": str(limits["user"])}


def relay_recipe(
    prefix: str,
    count: int,
    *,
    image: str,
    labels: Mapping[str, str],
    networks: tuple[NetworkRecipe, NetworkRecipe],
    limits: Mapping[str, Any],
) -> ContainerRecipe:
    """The relay: publishes worker slot ``s`` on ``127.0.0.1:<port of RELAY_BASE_PORT + s>``."""
    run_net, edge_net = networks
    return ContainerRecipe(
        name=f"{prefix}-relay",
        role="relay",
        image=image,
        # The relay is a stdlib script copied into the image: `python3 -I` starts it in ~20 ms
        # without importing provisioner (and pydantic) at all.
        command=(
            "python3",
            "-I",
            RELAY_SCRIPT,
            *(f"{RELAY_BASE_PORT + slot}=w{slot}:{WORKER_PORT}" for slot in range(count)),
        ),
        environment=_common_env(),
        labels={**labels, L.ROLE: L.ROLE_RELAY},
        networks=(NetworkAttachment(run_net.name), NetworkAttachment(edge_net.name)),
        ports=tuple(RELAY_BASE_PORT + slot for slot in range(count)),
        # Its own check: every listening port accepts (the image's HEALTHCHECK pings a worker port).
        healthcheck=HealthCheck(
            ("python3", "-I", RELAY_SCRIPT, "--check", *(str(RELAY_BASE_PORT + s) for s in range(count)))
        ),
        **_sidecar_limits(limits, memory="128m", pids_limit=64),
    )


def standin_recipe(
    prefix: str,
    *,
    image: str,
    labels: Mapping[str, str],
    network: str,
    limits: Mapping[str, Any],
    guarded: bool,
) -> ContainerRecipe:
    """The Gemini stand-in, on the run network under the alias ``gemini-standin``."""
    return ContainerRecipe(
        name=f"{prefix}-standin",
        role="standin",
        image=image,
        command=guarded_command(
            ("provision", "standin", "gemini", "--host", "0.0.0.0", "--port", str(STANDIN_PORT)),  # noqa: S104
            guarded=guarded,
        ),
        environment=_common_env(),
        labels={**labels, L.ROLE: L.ROLE_STANDIN},
        networks=(NetworkAttachment(network, (STANDIN_ALIAS,)),),
        healthcheck=HealthCheck(("python3", "-I", "-c", STANDIN_HEALTH_PROBE, str(STANDIN_PORT))),
        guarded=guarded,
        **_sidecar_limits(limits, memory="256m", pids_limit=128),
    )


def worker_recipe(
    prefix: str,
    slot: int,
    *,
    image: str,
    environment: Mapping[str, str],
    secret_environment: Mapping[str, str],
    labels: Mapping[str, str],
    network: str,
    mounts: tuple[Mount, ...],
    limits: Mapping[str, Any],
    generation: int = 0,
    worker_args: tuple[str, ...] = (),
    guarded: bool = False,
) -> ContainerRecipe:
    """The recipe of the worker in ``slot``, named ``<prefix>-w<slot>``; ``generation`` > 0 for
    replacements (a new name, same alias).

    ``guarded``: on an internal run network, the worker starts only once the egress guard is in place.
    """
    suffix = f"-{generation}" if generation else ""
    return ContainerRecipe(
        name=f"{prefix}-w{slot}{suffix}",
        role="worker",
        image=image,
        command=guarded_command(
            ("provision", "worker", "--host", "0.0.0.0", "--port", str(WORKER_PORT), *worker_args),  # noqa: S104
            guarded=guarded,
            preload=WORKER_PRELOAD,
        ),
        guarded=guarded,
        environment={
            **environment,
            "PROVISION_WORKER_SLOT": str(slot),
            "PROVISION_WORKER_ID": f"{prefix}-w{slot}{suffix}",
        },
        secret_environment=dict(secret_environment),
        labels={**labels, L.ROLE: L.ROLE_WORKER, L.SLOT: str(slot)},
        networks=(NetworkAttachment(network, (f"w{slot}",)),),
        mounts=mounts,
        slot=slot,
        **limits,
    )


# What a worker's start-up imports, loaded by the gate while the egress guard runs (see netguard.py), in
# this order: the worker's entry point first, because importing it installs provisioner._dspy_import's
# hook, which must be in place before DSPy's import (with "dspy" first, every guarded worker paid DSPy's
# five stack walks: 0.40 -> 0.50 s of CPU per start in the worker image, 1-CPU quota, load 2).
WORKER_PRELOAD = ("provisioner.bridge.worker", "dspy")


def guarded_command(
    command: tuple[str, ...], *, guarded: bool, preload: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """``command`` behind the gate that waits for the egress guard (unchanged when not ``guarded``).

    ``preload``: modules the gate imports while it waits (the command then runs in its process).
    """
    if not guarded:
        return command
    options = ("--preload", ",".join(preload)) if preload else ()
    return ("python3", "-P", NETGUARD_SCRIPT, "wait", *options, "--", *command)


def guard_recipe(
    target: ContainerRecipe, network_mode: str, *, gateways: tuple[str, ...] = ()
) -> ContainerRecipe:
    """The short-lived container that cuts ``target`` off from the host (see :mod:`.netguard`).

    ``network_mode``: ``container:<target id>`` (compose: ``service:<name>``). It runs the target's
    image as root with CAP_NET_ADMIN only (root: Docker grants added capabilities to uid 0 alone),
    no-new-privileges, a read-only root, no HEALTHCHECK, and exits as soon as the routes are set.
    ``gateways``: the run network's gateway addresses, blocked even when there is no default route.
    """
    if not target.guarded:
        raise ValueError(f"{target.name} is not guarded; only containers on an internal run network are")
    command: tuple[str, ...] = ("python3", "-I", NETGUARD_SCRIPT, "block")
    for gateway in gateways:
        command += ("--gateway", gateway)
    return ContainerRecipe(
        name=f"{target.name}-guard",
        role="guard",
        image=target.image,
        command=command,
        environment=_common_env(),
        labels={**{k: v for k, v in target.labels.items() if k != L.SLOT}, L.ROLE: L.ROLE_GUARD},
        networks=(),
        network_mode=network_mode,
        user="0:0",
        read_only=True,
        memory="64m",
        cpus=min(target.cpus, 1.0),
        pids_limit=16,
        cap_drop=("ALL",),
        cap_add=("NET_ADMIN",),
        healthcheck=NO_HEALTHCHECK,
    )


def replacement_recipe(recipe: ContainerRecipe, generation: int) -> ContainerRecipe:
    """The same worker recipe under a fresh container name (its slot alias stays)."""
    from dataclasses import replace

    if recipe.slot is None:
        raise ValueError(f"{recipe.name} is not a worker recipe (it has no slot)")
    base_name = recipe.name.rsplit(f"-w{recipe.slot}", 1)[0] + f"-w{recipe.slot}"
    name = f"{base_name}-{generation}" if generation else base_name
    return replace(recipe, name=name, environment={**recipe.environment, "PROVISION_WORKER_ID": name})


def _common_env() -> dict[str, str]:
    # Read-only root filesystem: everything a process writes goes to the /tmp tmpfs.
    return {
        "HOME": "/tmp",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "DSPY_CACHEDIR": "/tmp/dspy_cache",
        "XDG_CACHE_HOME": "/tmp/.cache",
    }
