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
from collections.abc import Callable, Iterator, Mapping
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


@dataclass(frozen=True)
class EngineEvent:
    """One creation or removal the engine reported (Docker's ``/events``: ``Type``, ``Action``,
    ``Actor.ID``, ``Actor.Attributes``, ``timeNano``).

    ``labels`` is None when the engine's event does not carry them: Docker's network and volume
    events name the resource only, so a watcher asks :meth:`EventSource.resource_labels`.
    ``time_ns``: the engine's clock, nanoseconds since the epoch.
    """

    kind: ResourceKind
    action: Literal["create", "destroy"]
    id: str
    name: str
    time_ns: int
    labels: Mapping[str, str] | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[int, str, str, str]:
        """Identifies the event across two reads of the stream (live and replayed)."""
        return (self.time_ns, self.kind, self.id, self.action)


class EventStream(Protocol):
    """An iterable of :class:`EngineEvent`; ``close()`` (from any thread) ends a live one."""

    def __iter__(self) -> Iterator[EngineEvent]: ...

    def close(self) -> None: ...


@runtime_checkable
class EventSource(Protocol):
    """A runtime that reports creations and removals of containers, networks and volumes.

    The leak check (:class:`provisioner.runtime.resources.EngineWatch`) follows this stream instead
    of listing the engine's resources around every test.
    """

    def events(self, since_ns: int, until_ns: int | None = None) -> EventStream:
        """Creations and removals from ``since_ns`` on (nanoseconds, this host's clock, which a local
        engine shares): up to ``until_ns`` and then the stream ends, or live until ``close()``."""

    def resource_labels(self, kind: ResourceKind, resource_id: str) -> dict[str, str] | None:
        """The labels of a network or volume (containers' events carry theirs); None when gone."""


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
        self._timeout = timeout
        self._events_lock = threading.Lock()
        self._events_conn: Any = None

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

    def events(self, since_ns: int, until_ns: int | None = None) -> EventStream:
        """Docker's ``/events``, filtered to creations and removals of containers, networks and
        volumes (other engineers' too: networks and volumes carry no labels in their events, so the
        caller matches them). Raises :class:`DockerUnavailableError` when the engine does not answer."""
        filters = {"type": ["container", "network", "volume"], "event": ["create", "destroy"]}
        if until_ns is not None:
            past = self._past_events(since_ns, until_ns, filters)
            if past is not None:
                return _PastEvents(past)
        try:
            raw = self.client.api.events(
                since=_timestamp(since_ns), until=_timestamp(until_ns) if until_ns is not None else None,
                filters=filters, decode=True,
            )
        except Exception as exc:
            raise DockerUnavailableError(_no_engine(exc)) from None
        return _DockerEvents(raw)

    def _past_events(
        self, since_ns: int, until_ns: int, filters: dict[str, list[str]]
    ) -> list[EngineEvent] | None:
        """A bounded ``/events`` read over a kept-open HTTP connection to a local engine's socket.

        The leak check makes this read after every test: through docker-py's requests stack it costs
        ≈ 1.3 ms, through ``http.client`` ≈ 0.3 ms (same machine, benchmarks/bench_suite.py). None
        when the engine is not on a local Unix socket or the read failed (then docker-py is used).
        """
        import http.client
        import json
        import urllib.parse

        with self._events_lock:
            if self._events_conn is None:
                adapter = None
                if self.client.api.base_url == "http+docker://localhost":
                    with contextlib.suppress(Exception):
                        adapter = self.client.api.get_adapter("http+docker://localhost/")
                path = getattr(adapter, "socket_path", None)
                if not isinstance(path, str):
                    return None
                self._events_conn = _unix_http_connection(path, self._timeout)
            query = urllib.parse.urlencode(
                {"since": _timestamp(since_ns), "until": _timestamp(until_ns), "filters": json.dumps(filters)}
            )
            try:
                self._events_conn.request("GET", f"/v{self.client.api.api_version}/events?{query}")
                response = self._events_conn.getresponse()
                body = response.read().decode("utf-8")
            except (OSError, http.client.HTTPException):
                self._events_conn.close()
                self._events_conn = None
                return None
            if response.status != 200:
                return None
        decoder = json.JSONDecoder()
        raw: list[dict[str, Any]] = []
        index = 0
        while True:
            while index < len(body) and body[index].isspace():
                index += 1
            if index >= len(body):
                break
            item, index = decoder.raw_decode(body, index)
            raw.append(item)
        return list(_DockerEvents(iter(raw)))

    def resource_labels(self, kind: ResourceKind, resource_id: str) -> dict[str, str] | None:
        import docker.errors

        try:
            if kind == "network":
                info = self.client.api.inspect_network(resource_id)
            elif kind == "volume":
                info = self.client.api.inspect_volume(resource_id)
            else:
                info = (self.client.api.inspect_container(resource_id).get("Config") or {})
        except docker.errors.NotFound:
            return None
        return dict(info.get("Labels") or {})

    def close(self) -> None:
        with self._events_lock:
            if self._events_conn is not None:
                self._events_conn.close()
                self._events_conn = None
        if self._own_client:
            self.client.close()


def _timestamp(ns: int) -> str:
    """Docker's ``since``/``until`` format: seconds with nanoseconds (``1700000000.000000001``)."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _unix_http_connection(path: str, timeout: float) -> Any:
    """An ``http.client.HTTPConnection`` over a Unix socket (the local engine's API). Imported here:
    ``http.client`` pulls in the email package, too slow for ``provision --help``."""
    import http.client
    import socket

    class UnixHTTPConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(path)
            self.sock = sock

    return UnixHTTPConnection("localhost", timeout=timeout)


class _PastEvents:
    def __init__(self, events: list[EngineEvent]) -> None:
        self._events = events

    def __iter__(self) -> Iterator[EngineEvent]:
        return iter(self._events)

    def close(self) -> None:
        pass


class _DockerEvents:
    """docker-py's decoded event stream as :class:`EngineEvent` values."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __iter__(self) -> Iterator[EngineEvent]:
        for ev in self._raw:
            kind, action = ev.get("Type"), ev.get("Action")
            if kind not in ("container", "network", "volume") or action not in ("create", "destroy"):
                continue
            actor = ev.get("Actor") or {}
            attributes = dict(actor.get("Attributes") or {})
            resource_id = str(actor.get("ID") or ev.get("id") or "")
            name = attributes.get("name") or resource_id
            time_ns = int(ev.get("timeNano") or int(ev.get("time") or 0) * 1_000_000_000)
            yield EngineEvent(kind, action, resource_id, name, time_ns,
                              attributes if kind == "container" else None)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()


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
        # The event stream (see EventSource): every creation and removal, in order. Tests hold live
        # streams back with ``stream_paused`` (a lagging engine) and hook the finite reads with
        # ``on_events_query``.
        self.event_log: list[EngineEvent] = []
        self._events_changed = threading.Condition(self._lock)
        self._last_event_ns = 0
        self.stream_paused = False
        self.on_events_query: Callable[[], None] | None = None

    # helpers for tests
    def add_volume(self, name: str, labels: Mapping[str, str]) -> None:
        with self._lock:
            self.volumes[name] = dict(labels)
            self._event("volume", "create", name, name, None)

    def resume_stream(self) -> None:
        with self._lock:
            self.stream_paused = False
            self._events_changed.notify_all()

    def _event(self, kind: ResourceKind, action: Literal["create", "destroy"], resource_id: str, name: str,
               labels: Mapping[str, str] | None) -> None:
        with self._lock:  # strictly increasing times, like one engine's clock
            self._last_event_ns = max(time.time_ns(), self._last_event_ns + 1)
            self.event_log.append(EngineEvent(kind, action, resource_id, name, self._last_event_ns,
                                              dict(labels) if labels is not None else None))
            self._events_changed.notify_all()

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
            self._event("network", "create", net.id, recipe.name, None)
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
            self._event("container", "create", c.id, recipe.name, recipe.labels)
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
            self._event("container", "destroy", c.id, c.recipe.name, c.recipe.labels)
            return True

    def remove_network(self, network_id: str) -> bool:
        self._check()
        with self._lock:
            n = self._find_net(network_id)
            if n is None:
                return False
            del self.networks[n.id]
            self.calls.append(("remove_network", n.recipe.name))
            self._event("network", "destroy", n.id, n.recipe.name, None)
            return True

    def remove_volume(self, volume_id: str) -> bool:
        self._check()
        with self._lock:
            if self.volumes.pop(volume_id, None) is None:
                return False
            self._event("volume", "destroy", volume_id, volume_id, None)
            return True

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

    def events(self, since_ns: int, until_ns: int | None = None) -> EventStream:
        self._check()
        if until_ns is not None:
            if self.on_events_query is not None:
                self.on_events_query()
            with self._lock:
                return _FakeEvents(self, [e for e in self.event_log if since_ns <= e.time_ns <= until_ns])
        return _FakeEvents(self, None, since_ns)

    def resource_labels(self, kind: ResourceKind, resource_id: str) -> dict[str, str] | None:
        with self._lock:
            if kind == "network":
                net = self._find_net(resource_id)
                return None if net is None else dict(net.recipe.labels)
            if kind == "volume":
                labels = self.volumes.get(resource_id)
                return None if labels is None else dict(labels)
            c = self._find(resource_id)
            return None if c is None else dict(c.recipe.labels)

    def close(self) -> None:
        pass


class _FakeEvents:
    """A finite list of events, or a live stream of :attr:`FakeRuntime.event_log` from ``since_ns``."""

    def __init__(self, runtime: FakeRuntime, past: list[EngineEvent] | None, since_ns: int = 0) -> None:
        self._runtime = runtime
        self._past = past
        self._since_ns = since_ns
        self._closed = False

    def __iter__(self) -> Iterator[EngineEvent]:
        if self._past is not None:
            yield from self._past
            return
        rt = self._runtime
        position = 0
        while True:
            with rt._events_changed:
                while not self._closed and (rt.stream_paused or position >= len(rt.event_log)):
                    rt._events_changed.wait()
                if self._closed:
                    return
                batch = rt.event_log[position:]
                position = len(rt.event_log)
            yield from (e for e in batch if e.time_ns >= self._since_ns)

    def close(self) -> None:
        with self._runtime._events_changed:
            self._closed = True
            self._runtime._events_changed.notify_all()
