"""The container runtime interface, with the real Docker engine and an in-memory fake side by side.

Like httpx's transports: everything above this module (pool, environment, resource manager, reaper)
talks to a :class:`ContainerRuntime`; :class:`DockerRuntime` drives a real engine through docker-py,
:class:`FakeRuntime` keeps containers and networks in dictionaries so the logic above can be tested
without an engine — with the same observable behaviour (names unique, aliases, 127.0.0.1 ports,
label selection, missing resources reported as missing).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from provisioner.errors import DockerUnavailableError, ImageError, RuntimeProblem
from provisioner.runtime import labels as L
from provisioner.runtime.recipes import ContainerRecipe, NetworkRecipe

ResourceKind = Literal["container", "network", "volume"]


@dataclass(frozen=True)
class ResourceRef:
    """A managed engine resource, as found by label."""

    kind: ResourceKind
    id: str
    name: str
    labels: dict[str, str] = field(default_factory=dict, compare=False)
    created: float = field(default=0.0, compare=False)  # unix time

    @property
    def run_id(self) -> str | None:
        return self.labels.get(L.RUN)


@dataclass(frozen=True)
class ContainerState:
    status: str  # created | running | exited | dead | ...
    exit_code: int | None = None
    oom_killed: bool = False

    @property
    def running(self) -> bool:
        return self.status == "running"


@runtime_checkable
class ContainerRuntime(Protocol):
    """What provisioner needs from a container engine. All ids may also be names."""

    def ping(self) -> None:
        """Raise :class:`DockerUnavailableError` when the engine does not answer."""

    def image_exists(self, ref: str) -> bool: ...

    def create_network(self, recipe: NetworkRecipe) -> str:
        """Create the network; return its id. A name clash raises :class:`RuntimeProblem`."""

    def create_container(self, recipe: ContainerRecipe) -> str:
        """Create (not start) the container attached to all its networks; return its id."""

    def start_container(self, container_id: str) -> None: ...

    def remove_container(self, container_id: str) -> bool:
        """Force-remove; False when it did not exist."""

    def remove_network(self, network_id: str) -> bool:
        """Remove (disconnecting leftovers first); False when it did not exist."""

    def remove_volume(self, volume_id: str) -> bool: ...

    def kill_container(self, container_id: str) -> None: ...

    def container_state(self, container_id: str) -> ContainerState | None:
        """None when the container does not exist."""

    def published_port(self, container_id: str, container_port: int) -> int | None:
        """The 127.0.0.1 host port Docker chose for ``container_port``."""

    def container_ip(self, container_id: str, network: str) -> str | None: ...

    def container_gateway(self, container_id: str, network: str) -> str | None:
        """The gateway address of ``network`` as the container sees it (a host address)."""

    def logs(self, container_id: str, tail: int = 40) -> str: ...

    def exec(self, container_id: str, command: list[str]) -> tuple[int, str]: ...

    def list_resources(self, selector: Mapping[str, str]) -> list[ResourceRef]:
        """Containers, networks and volumes whose labels include all of ``selector``."""

    def close(self) -> None: ...


def run_container(runtime: ContainerRuntime, recipe: ContainerRecipe) -> str:
    """Create and start; on a failed start the half-made container is removed."""
    container_id = runtime.create_container(recipe)
    try:
        runtime.start_container(container_id)
    except BaseException:
        runtime.remove_container(container_id)
        raise
    return container_id


def remove_resource(runtime: ContainerRuntime, ref: ResourceRef) -> bool:
    if ref.kind == "container":
        return runtime.remove_container(ref.id)
    if ref.kind == "network":
        return runtime.remove_network(ref.id)
    return runtime.remove_volume(ref.id)


def remove_by_selector(runtime: ContainerRuntime, selector: Mapping[str, str]) -> list[ResourceRef]:
    """Remove everything matching ``selector``: containers first (in parallel — each forced removal
    takes a few hundred ms), then the networks and volumes they used. Returns what was removed."""
    from concurrent.futures import ThreadPoolExecutor

    found = runtime.list_resources(selector)
    containers = [r for r in found if r.kind == "container"]
    removed: list[ResourceRef] = []
    if containers:
        with ThreadPoolExecutor(max_workers=min(8, len(containers))) as pool:
            outcomes = list(pool.map(lambda r: runtime.remove_container(r.id), containers))
        removed += [ref for ref, ok in zip(containers, outcomes, strict=True) if ok]
    for ref in found:
        if ref.kind != "container" and remove_resource(runtime, ref):
            removed.append(ref)
    return removed


# --- Docker ---------------------------------------------------------------------------------------


class DockerRuntime:
    """A real engine through docker-py (imported lazily: ``provision --help`` stays fast)."""

    def __init__(self, client: Any | None = None, *, timeout: float = 60.0) -> None:
        self._own_client = client is None
        if client is None:
            try:
                import docker

                client = docker.from_env(timeout=timeout)
            except Exception as exc:  # docker.errors.DockerException and socket errors
                raise DockerUnavailableError(_no_engine(exc)) from None
        self.client = client

    def ping(self) -> None:
        try:
            self.client.ping()
        except Exception as exc:
            raise DockerUnavailableError(_no_engine(exc)) from None

    def image_exists(self, ref: str) -> bool:
        import docker.errors

        try:
            self.client.images.get(ref)
        except docker.errors.ImageNotFound:
            return False
        return True

    def create_network(self, recipe: NetworkRecipe) -> str:
        import docker.errors

        try:
            net = self.client.networks.create(
                recipe.name,
                driver="bridge",
                internal=recipe.internal,
                labels=dict(recipe.labels),
                check_duplicate=True,
            )
        except docker.errors.APIError as exc:
            raise RuntimeProblem(f"could not create network {recipe.name!r}: {_explain(exc)}") from None
        return str(net.id)

    def create_container(self, recipe: ContainerRecipe) -> str:
        import docker.errors

        kwargs = recipe.to_run_kwargs()
        kwargs.pop("detach", None)
        kwargs.pop("network", None)
        primary = recipe.networks[0] if recipe.networks else None
        if primary is not None:
            api = self.client.api
            kwargs["network"] = primary.network
            kwargs["networking_config"] = {
                primary.network: api.create_endpoint_config(aliases=list(primary.aliases) or None)
            }
        try:
            container = self.client.containers.create(**kwargs)
        except docker.errors.ImageNotFound:
            raise ImageError(
                f"image {recipe.image!r} is not present; build it with `provision images build`"
            ) from None
        except docker.errors.APIError as exc:
            raise RuntimeProblem(f"could not create container {recipe.name!r}: {_explain(exc)}") from None
        try:
            for extra in recipe.networks[1:]:
                self.client.api.connect_container_to_network(
                    container.id, extra.network, aliases=list(extra.aliases) or None
                )
        except docker.errors.APIError as exc:
            self.remove_container(container.id)
            raise RuntimeProblem(
                f"could not attach {recipe.name!r} to its networks: {_explain(exc)}"
            ) from None
        return str(container.id)

    def start_container(self, container_id: str) -> None:
        import docker.errors

        try:
            self.client.api.start(container_id)
        except docker.errors.APIError as exc:
            raise RuntimeProblem(f"could not start container {container_id[:12]}: {_explain(exc)}") from None

    def remove_container(self, container_id: str) -> bool:
        import docker.errors

        try:
            self.client.api.remove_container(container_id, force=True, v=True)
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as exc:
            if "already in progress" in str(exc) or "is already" in str(exc):
                return False
            raise
        return True

    def remove_network(self, network_id: str) -> bool:
        import docker.errors

        try:
            info = self.client.api.inspect_network(network_id)
        except docker.errors.NotFound:
            return False
        for cid in info.get("Containers") or {}:
            with contextlib.suppress(docker.errors.APIError):
                self.client.api.disconnect_container_from_network(cid, network_id, force=True)
        try:
            self.client.api.remove_network(network_id)
        except docker.errors.NotFound:
            return False
        return True

    def remove_volume(self, volume_id: str) -> bool:
        import docker.errors

        try:
            self.client.api.remove_volume(volume_id, force=True)
        except docker.errors.NotFound:
            return False
        return True

    def kill_container(self, container_id: str) -> None:
        import docker.errors

        with contextlib.suppress(docker.errors.APIError):
            self.client.api.kill(container_id)

    def container_state(self, container_id: str) -> ContainerState | None:
        import docker.errors

        try:
            info = self.client.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return None
        state = info.get("State") or {}
        return ContainerState(
            status=str(state.get("Status", "unknown")),
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
        )

    def published_port(self, container_id: str, container_port: int) -> int | None:
        info = self.client.api.inspect_container(container_id)
        bindings = ((info.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{container_port}/tcp") or []
        for binding in bindings:
            if binding.get("HostIp") in ("127.0.0.1", "") and binding.get("HostPort"):
                return int(binding["HostPort"])
        return None

    def container_ip(self, container_id: str, network: str) -> str | None:
        info = self.client.api.inspect_container(container_id)
        nets = (info.get("NetworkSettings") or {}).get("Networks") or {}
        ip = (nets.get(network) or {}).get("IPAddress")
        return str(ip) if ip else None

    def container_gateway(self, container_id: str, network: str) -> str | None:
        info = self.client.api.inspect_container(container_id)
        nets = (info.get("NetworkSettings") or {}).get("Networks") or {}
        gateway = (nets.get(network) or {}).get("Gateway")
        return str(gateway) if gateway else None

    def logs(self, container_id: str, tail: int = 40) -> str:
        import docker.errors

        try:
            raw = self.client.api.logs(container_id, stdout=True, stderr=True, tail=tail)
        except docker.errors.APIError:
            return ""
        return bytes(raw).decode("utf-8", "replace")

    def exec(self, container_id: str, command: list[str]) -> tuple[int, str]:
        exec_id = self.client.api.exec_create(container_id, command, stdout=True, stderr=True)
        output = self.client.api.exec_start(exec_id)
        code = self.client.api.exec_inspect(exec_id).get("ExitCode")
        return int(code if code is not None else -1), bytes(output).decode("utf-8", "replace")

    def list_resources(self, selector: Mapping[str, str]) -> list[ResourceRef]:
        filters = {"label": [f"{k}={v}" for k, v in selector.items()]}
        out: list[ResourceRef] = []
        for c in self.client.api.containers(all=True, filters=filters):
            name = (c.get("Names") or ["/" + c["Id"][:12]])[0].lstrip("/")
            out.append(
                ResourceRef("container", c["Id"], name, dict(c.get("Labels") or {}), float(c["Created"]))
            )
        for n in self.client.api.networks(filters=filters):
            out.append(
                ResourceRef(
                    "network", n["Id"], n["Name"], dict(n.get("Labels") or {}), _parse_time(n.get("Created"))
                )
            )
        volumes = (self.client.api.volumes(filters=filters) or {}).get("Volumes") or []
        for v in volumes:
            out.append(
                ResourceRef(
                    "volume",
                    v["Name"],
                    v["Name"],
                    dict(v.get("Labels") or {}),
                    _parse_time(v.get("CreatedAt")),
                )
            )
        return out

    def close(self) -> None:
        if self._own_client:
            self.client.close()


def _parse_time(value: str | None) -> float:
    if not value:
        return 0.0
    from datetime import datetime

    text = value.rstrip("Z")
    if "." in text:  # Docker gives nanoseconds; datetime takes microseconds
        head, frac = text.split(".", 1)
        tz = ""
        for sep in ("+", "-"):
            if sep in frac:
                frac, tz = frac.split(sep, 1)
                tz = sep + tz
                break
        text = f"{head}.{frac[:6]}{tz}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return 0.0
    if parsed.tzinfo is None:
        from datetime import UTC

        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _explain(exc: Exception) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


def _no_engine(exc: Exception) -> str:
    return (
        f"no Docker engine is reachable ({type(exc).__name__}: {exc}). Start dockerd (bash .ci/setup does "
        "it), or point DOCKER_HOST at a running engine."
    )


# --- in-memory fake -----------------------------------------------------------------------------


@dataclass
class FakeContainer:
    id: str
    recipe: ContainerRecipe
    status: str = "created"
    exit_code: int | None = None
    ports: dict[int, int] = field(default_factory=dict)
    ips: dict[str, str] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)


@dataclass
class FakeNetwork:
    id: str
    recipe: NetworkRecipe
    created: float = field(default_factory=time.time)


class FakeRuntime:
    """An engine in dictionaries: same rules as Docker where the code above relies on them.

    ``on_start`` (optional) is called with each container when it starts — tests use it to make
    "workers" ready, fail, or crash. ``fail_start`` names containers whose start fails. An egress
    guard (role ``guard``) runs to completion at once: it exits 0 when started.
    """

    def __init__(
        self, *, images: tuple[str, ...] = (), on_start: Callable[[FakeContainer], None] | None = None
    ):
        self.images = set(images)
        self.containers: dict[str, FakeContainer] = {}
        self.networks: dict[str, FakeNetwork] = {}
        self.volumes: dict[str, dict[str, str]] = {}
        self.on_start = on_start
        self.fail_start: set[str] = set()
        self.calls: list[tuple[str, str]] = []  # (operation, name) in order
        self._ids = itertools.count(1)
        self._ports = itertools.count(40000)
        self._lock = threading.RLock()
        self.available = True

    # helpers for tests
    def crash(self, name_or_id: str, exit_code: int = 137) -> None:
        with self._lock:
            c = self._find(name_or_id)
            if c is not None:
                c.status = "exited"
                c.exit_code = exit_code

    def by_name(self, name: str) -> FakeContainer | None:
        with self._lock:
            return next((c for c in self.containers.values() if c.recipe.name == name), None)

    def _find(self, name_or_id: str) -> FakeContainer | None:
        c = self.containers.get(name_or_id)
        return c if c is not None else self.by_name(name_or_id)

    def _find_net(self, name_or_id: str) -> FakeNetwork | None:
        n = self.networks.get(name_or_id)
        if n is not None:
            return n
        return next((x for x in self.networks.values() if x.recipe.name == name_or_id), None)

    def _check(self) -> None:
        if not self.available:
            raise DockerUnavailableError("no Docker engine is reachable (fake engine switched off)")

    # the interface
    def ping(self) -> None:
        self._check()

    def image_exists(self, ref: str) -> bool:
        self._check()
        return ref in self.images

    def create_network(self, recipe: NetworkRecipe) -> str:
        self._check()
        with self._lock:
            if self._find_net(recipe.name) is not None:
                raise RuntimeProblem(
                    f"could not create network {recipe.name!r}: network with name already exists"
                )
            net = FakeNetwork(f"net{next(self._ids):06d}", recipe)
            self.networks[net.id] = net
            self.calls.append(("create_network", recipe.name))
            return net.id

    def create_container(self, recipe: ContainerRecipe) -> str:
        self._check()
        with self._lock:
            if recipe.image not in self.images:
                raise ImageError(
                    f"image {recipe.image!r} is not present; build it with `provision images build`"
                )
            if self.by_name(recipe.name) is not None:
                raise RuntimeProblem(f"could not create container {recipe.name!r}: name already in use")
            for att in recipe.networks:
                if self._find_net(att.network) is None:
                    raise RuntimeProblem(
                        f"could not create container {recipe.name!r}: network {att.network} not found"
                    )
            c = FakeContainer(f"c{next(self._ids):06d}", recipe)
            for index, att in enumerate(recipe.networks):
                c.ips[att.network] = f"10.{len(self.networks)}.0.{index + 2 + len(self.containers)}"
            self.containers[c.id] = c
            self.calls.append(("create_container", recipe.name))
            return c.id

    def start_container(self, container_id: str) -> None:
        self._check()
        with self._lock:
            c = self._find(container_id)
            if c is None:
                raise RuntimeProblem(f"could not start container {container_id}: no such container")
            if c.recipe.name in self.fail_start:
                raise RuntimeProblem(f"could not start container {c.recipe.name}: injected failure")
            c.status = "running"
            if c.recipe.role == "guard":
                c.status, c.exit_code = "exited", 0
            c.ports = {p: next(self._ports) for p in c.recipe.ports}
            self.calls.append(("start_container", c.recipe.name))
        if self.on_start is not None:
            self.on_start(c)

    def remove_container(self, container_id: str) -> bool:
        self._check()
        with self._lock:
            c = self._find(container_id)
            if c is None:
                return False
            del self.containers[c.id]
            self.calls.append(("remove_container", c.recipe.name))
            return True

    def remove_network(self, network_id: str) -> bool:
        self._check()
        with self._lock:
            n = self._find_net(network_id)
            if n is None:
                return False
            del self.networks[n.id]
            self.calls.append(("remove_network", n.recipe.name))
            return True

    def remove_volume(self, volume_id: str) -> bool:
        self._check()
        with self._lock:
            return self.volumes.pop(volume_id, None) is not None

    def kill_container(self, container_id: str) -> None:
        self.crash(container_id)

    def container_state(self, container_id: str) -> ContainerState | None:
        self._check()
        with self._lock:
            c = self._find(container_id)
            return None if c is None else ContainerState(c.status, c.exit_code)

    def published_port(self, container_id: str, container_port: int) -> int | None:
        with self._lock:
            c = self._find(container_id)
            return None if c is None else c.ports.get(container_port)

    def container_ip(self, container_id: str, network: str) -> str | None:
        with self._lock:
            c = self._find(container_id)
            return None if c is None else c.ips.get(network)

    def container_gateway(self, container_id: str, network: str) -> str | None:
        with self._lock:
            c = self._find(container_id)
            ip = None if c is None else c.ips.get(network)
            return None if ip is None else ip.rsplit(".", 2)[0] + ".0.1"

    def logs(self, container_id: str, tail: int = 40) -> str:
        with self._lock:
            c = self._find(container_id)
            return "" if c is None else "\n".join(c.log_lines[-tail:])

    def exec(self, container_id: str, command: list[str]) -> tuple[int, str]:
        raise NotImplementedError("FakeRuntime runs no processes; exec needs a real engine")

    def list_resources(self, selector: Mapping[str, str]) -> list[ResourceRef]:
        self._check()
        with self._lock:
            out = [
                ResourceRef("container", c.id, c.recipe.name, dict(c.recipe.labels), c.created)
                for c in self.containers.values()
                if L.matches(c.recipe.labels, selector)
            ]
            out += [
                ResourceRef("network", n.id, n.recipe.name, dict(n.recipe.labels), n.created)
                for n in self.networks.values()
                if L.matches(n.recipe.labels, selector)
            ]
            out += [
                ResourceRef("volume", name, name, dict(lbls))
                for name, lbls in self.volumes.items()
                if L.matches(lbls, selector)
            ]
            return out

    def close(self) -> None:
        pass
