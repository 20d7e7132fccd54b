"""An engine in dictionaries: the same observable behaviour as Docker where the code above relies
on it (names unique, aliases, 127.0.0.1 ports, label selection, missing resources reported as
missing), so the logic above the runtime is tested without an engine."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

from provisioner.errors import DockerUnavailableError, ImageError, RecreateError, RuntimeProblem
from provisioner.runtime import labels as L
from provisioner.runtime.engine.base import (
    ContainerState,
    EngineEvent,
    EngineInfo,
    EventStream,
    ImageInfo,
    ResourceKind,
    ResourceRef,
)
from provisioner.runtime.recipes import ContainerRecipe, NetworkRecipe


@dataclass
class FakeContainer:
    id: str
    recipe: ContainerRecipe
    status: str = "created"
    exit_code: int | None = None
    finished_at: float | None = None  # when crash() ended it (Docker's State.FinishedAt)
    ports: dict[int, int] = field(default_factory=dict)
    ips: dict[str, str] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    # When each line of log_lines was written (index -> Unix time; see write_log). Lines appended to
    # log_lines directly count as written when the container was created.
    log_stamps: dict[int, float] = field(default_factory=dict)
    image_id: str = ""
    served: Any = field(default=None, repr=False)  # its process when the runtime serves (see inprocess)
    pinned_ports: dict[int, int] = field(default_factory=dict)  # container port -> host port asked for

    def write_log(self, line: str, at: float | None = None) -> None:
        """Append a log line stamped ``at`` (default: now), as the engine stamps a container's output."""
        self.log_stamps[len(self.log_lines)] = time.time() if at is None else at
        self.log_lines.append(line)

    def stamp(self, index: int) -> float:
        return self.log_stamps.get(index, self.created)


@dataclass
class FakeImage:
    id: str
    tags: set[str] = field(default_factory=set)
    labels: dict[str, str] = field(default_factory=dict)

    def info(self) -> ImageInfo:
        return ImageInfo(self.id, tuple(sorted(self.tags)), dict(self.labels))


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

    Images: ``images`` are present from the start (each its own image); ``registry`` maps the
    references a pull finds to their labels (empty: offline, like a machine without a registry).
    A build needs its ``FROM`` image present (Docker builds with ``pull=False`` here), inherits its
    labels and counts in :attr:`builds`.

    ``serve``: worker and relay containers run for real, in this process (:mod:`.inprocess`): a
    started worker is the bridge server on a loopback port, a relay's published ports forward to
    the worker holding the route's alias, so clients, probes and pools talk to real workers.
    Removing or crashing a container stops its process; :meth:`close` stops them all.

    ``image_source``: the engine :meth:`image_source` names (a remote engine's local one); images
    move between fakes as ``docker save`` archives (``manifest.json`` and each image's config JSON,
    no layers), and a fake loads Docker's own archives (their ids, tags and labels). ``arch``: what
    :meth:`engine_info` reports.
    """

    def __init__(
        self,
        *,
        images: tuple[str, ...] = (),
        on_start: Callable[[FakeContainer], None] | None = None,
        registry: Mapping[str, Mapping[str, str]] | None = None,
        serve: bool = False,
        image_source: FakeRuntime | None = None,
        arch: str = "amd64",
    ):
        self.publish_host = "127.0.0.1"  # its served workers listen on loopback
        self.engine = "fake"
        self._image_source = image_source
        self.arch = arch
        self.saves: list[str] = []  # references saved, in order
        self.images: dict[str, FakeImage] = {}  # by image id
        self.registry = {ref: dict(labels) for ref, labels in (registry or {}).items()}
        self.builds: list[str] = []  # tags built, in order
        self.containers: dict[str, FakeContainer] = {}
        self.networks: dict[str, FakeNetwork] = {}
        self.volumes: dict[str, dict[str, str]] = {}
        self.on_start = on_start
        self.serve = serve
        self.fail_start: set[str] = set()
        self.dead_forwarders: dict[int, str] = {}  # see kill_forwarder
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
        for ref in images:
            self.add_image(ref)

    # helpers for tests
    def add_image(self, ref: str, labels: Mapping[str, str] | None = None) -> ImageInfo:
        """Make an image tagged ``ref`` (an id from the reference and labels, like content ids)."""
        digest = hashlib.sha256(f"{ref}\0{sorted((labels or {}).items())}".encode()).hexdigest()
        return self._store(f"sha256:{digest}", _normal(ref), labels or {})

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

    def crash(self, name_or_id: str, exit_code: int = 137, *, at: float | None = None) -> None:
        """The container's process dies (as ``docker kill`` would: exit code 137), at ``at`` (Unix
        seconds; default now: the engine's ``State.FinishedAt``)."""
        with self._lock:
            c = self._find(name_or_id)
            if c is not None:
                c.status = "exited"
                c.exit_code = exit_code
                c.finished_at = time.time() if at is None else at
        if c is not None:
            self._stop_served(c)

    def kill_forwarder(self, host_port: int) -> None:
        """The engine's forwarder of 127.0.0.1:``host_port`` dies while its container runs (what a
        connection flood does to docker-proxy): the port refuses until the container is started
        again. Recorded in :attr:`dead_forwarders` (host port -> container id); a served relay's
        listener for the port closes."""
        with self._lock:
            c = next((c for c in self.containers.values() if host_port in c.ports.values()), None)
            if c is None:
                raise RuntimeProblem(f"no container publishes 127.0.0.1:{host_port}")
            self.dead_forwarders[host_port] = c.id
            served = c.served
        if served is not None:
            served.close_port(host_port)

    def _stop_served(self, c: FakeContainer) -> None:
        with self._lock:
            served, c.served = c.served, None
        if served is not None:
            served.stop()

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

    def engine_info(self) -> EngineInfo:
        self._check()
        return EngineInfo("fake", "0", "0", root_dir=None, arch=self.arch)

    # --- the image store

    def _store(self, image_id: str, tag: str | None, labels: Mapping[str, str]) -> ImageInfo:
        with self._lock:
            image = self.images.setdefault(image_id, FakeImage(image_id, labels=dict(labels)))
            if tag is not None:
                for other in self.images.values():
                    other.tags.discard(tag)
                image.tags.add(tag)
            return image.info()

    def _image(self, ref: str) -> FakeImage | None:
        with self._lock:
            if ref in self.images:
                return self.images[ref]
            wanted = _normal(ref)
            return next((i for i in self.images.values() if wanted in i.tags), None)

    def image_exists(self, ref: str) -> bool:
        return self.image(ref) is not None

    def image(self, ref: str) -> ImageInfo | None:
        self._check()
        found = self._image(ref)
        return None if found is None else found.info()

    def list_images(self, repository: str) -> list[ImageInfo]:
        self._check()
        with self._lock:
            return [
                i.info() for i in self.images.values()
                if any(t.rsplit(":", 1)[0] == repository for t in i.tags)
            ]

    def images_in_use(self) -> set[str]:
        self._check()
        with self._lock:
            return {c.image_id for c in self.containers.values()}

    def pull(self, ref: str) -> ImageInfo:
        self._check()
        labels = self.registry.get(ref, self.registry.get(_normal(ref)))
        if labels is None:
            raise ImageError(f"could not pull {ref} (fake registry: no such image)")
        return self.add_image(ref, labels)

    def build(
        self,
        context: IO[bytes],
        tag: str,
        *,
        build_args: Mapping[str, str],
        labels: Mapping[str, str],
        on_output: Callable[[str], None] | None = None,
    ) -> ImageInfo:
        self._check()
        data = context.read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = next((m for m in tar.getmembers() if m.name.lstrip("./") == "Dockerfile"), None)
            if member is None:
                raise ImageError(f"building {tag} failed: the build context has no Dockerfile")
            extracted = tar.extractfile(member)
            dockerfile = extracted.read().decode() if extracted is not None else ""
        args: dict[str, str] = {}
        stages: set[str] = set()
        base: FakeImage | None = None
        own_labels: dict[str, str] = {}
        lines = (raw.strip() for raw in dockerfile.splitlines())
        steps = [line for line in lines if line and not line.startswith("#")]
        if labels:  # Docker adds the build's labels as one last LABEL step
            steps.append("LABEL " + " ".join(f"{key}={value}" for key, value in labels.items()))
        for number, line in enumerate(steps, 1):
            if on_output is not None:  # as Docker prints them: unexpanded, numbered
                on_output(f"Step {number}/{len(steps)} : {line}")
            words = line.split()
            if len(words) >= 2 and words[0].upper() == "ARG":
                name, _, default = words[1].partition("=")
                args[name] = build_args.get(name, default)
            elif len(words) >= 2 and words[0].upper() == "FROM":
                ref = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), words[1])
                if len(words) >= 4 and words[2].upper() == "AS":
                    stages.add(words[3])
                if ref in stages:
                    continue
                base = self._image(ref)
                own_labels = {}
                if base is None:
                    raise ImageError(f"building {tag} failed: base image {ref!r} is not present (no pull)")
            elif words[0].upper() == "LABEL":
                own_labels.update(pair.partition("=")[::2] for pair in words[1:] if "=" in pair)
        if base is None:
            raise ImageError(f"building {tag} failed: the Dockerfile has no FROM")
        digest = hashlib.sha256(data + repr(sorted(labels.items())).encode() + base.id.encode()).hexdigest()
        with self._lock:
            self.builds.append(tag)
        return self._store(f"sha256:{digest}", _normal(tag), {**base.labels, **own_labels, **labels})

    def import_rootfs(self, tarball: Path, ref: str, *, changes: list[str]) -> ImageInfo:
        self._check()
        label_lines = [change.split(None, 1)[1] for change in changes if change.upper().startswith("LABEL ")]
        labels = dict(line.split("=", 1) for line in label_lines)
        digest = hashlib.sha256(tarball.read_bytes() + "\0".join(changes).encode()).hexdigest()
        return self._store(f"sha256:{digest}", _normal(ref), labels)

    def tag(self, ref: str, target: str) -> None:
        self._check()
        with self._lock:
            image = self._image(ref)
            if image is None:
                raise ImageError(f"could not tag {ref} as {target}: no such image")
            self._store(image.id, _normal(target), image.labels)

    def remove_image(self, ref: str) -> bool:
        """Like ``docker rmi`` without force: a tag of an image with other tags is only untagged; the
        last reference of an image a container uses, or an id with several tags, is refused."""
        self._check()
        with self._lock:
            image = self._image(ref)
            if image is None:
                return False
            by_tag = ref != image.id
            if by_tag and len(image.tags) > 1:
                image.tags.discard(_normal(ref))
                return True
            if len(image.tags) > 1 or image.id in self.images_in_use():
                return False
            del self.images[image.id]
            return True

    def save(self, ref: str) -> Iterator[bytes]:
        self._check()
        with self._lock:
            image = self._image(ref)
            if image is None:
                raise ImageError(f"could not save {ref}: no such image")
            self.saves.append(ref)
            hex_id = image.id.removeprefix("sha256:")
            config = json.dumps({"config": {"Labels": dict(image.labels)},
                                 "rootfs": {"type": "layers", "diff_ids": []}}).encode()
            manifest = json.dumps([{"Config": f"{hex_id}.json", "RepoTags": sorted(image.tags),
                                    "Layers": []}]).encode()
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            for name, data in ((f"{hex_id}.json", config), ("manifest.json", manifest)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        data = archive.getvalue()
        for start in range(0, len(data), 4096):  # in chunks, as an engine streams it
            yield data[start:start + 4096]

    def load(self, archive: Iterable[bytes]) -> list[ImageInfo]:
        self._check()
        data = b"".join(archive)
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                files = {m.name: m for m in tar.getmembers() if m.isfile()}
                manifest = json.loads(_member(tar, files, "manifest.json"))
                loaded = []
                for entry in manifest:
                    config = json.loads(_member(tar, files, entry["Config"]))
                    # Docker 20.10 names the config <hex>.json, Docker 25+ blobs/sha256/<hex>
                    hex_id = entry["Config"].rsplit("/", 1)[-1].removesuffix(".json")
                    labels = (config.get("config") or {}).get("Labels") or {}
                    image_id = f"sha256:{hex_id}"
                    info = self._store(image_id, None, labels)
                    for tag in entry.get("RepoTags") or ():
                        info = self._store(image_id, _normal(tag), labels)
                    loaded.append(info)
        except (tarfile.TarError, KeyError, ValueError) as exc:
            raise ImageError(f"the engine refused the image archive: {type(exc).__name__}: {exc}") from None
        return loaded

    def image_source(self) -> FakeRuntime | None:
        return self._image_source

    # --- containers, networks, volumes

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
            image = self._image(recipe.image)
            if image is None:
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
            c = FakeContainer(f"c{next(self._ids):06d}", recipe, image_id=image.id)
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
            if self.serve:
                from provisioner.runtime.engine.inprocess import refuse_unservable

                refuse_unservable(c.recipe)
            c.status = "running"
            if c.recipe.role == "guard":
                c.status, c.exit_code = "exited", 0
            c.ports = {p: c.pinned_ports.get(p) or next(self._ports) for p in c.recipe.ports}
            self.calls.append(("start_container", c.recipe.name))
        if self.serve and c.recipe.role in ("worker", "relay"):
            self._start_served(c)
        if self.on_start is not None:
            self.on_start(c)

    def _start_served(self, c: FakeContainer) -> None:
        """Run the container's process in this one (see :mod:`.inprocess`). A process that fails to
        start exits the container with code 1 and its error in the log, as a crashing command does."""
        from provisioner.runtime.engine import inprocess

        try:
            if c.recipe.role == "worker":
                served: Any = inprocess.ServedWorker(c.recipe)
                c.log_lines.append(served.ready_line)
            else:
                nets = {a.network for a in c.recipe.networks}
                served = inprocess.ServedRelay(
                    c.recipe, lambda alias, port: self._route(nets, alias, port), host_ports=c.pinned_ports
                )
        except Exception as exc:
            with self._lock:
                c.status, c.exit_code = "exited", 1
                c.log_lines.append(f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            alive = self.containers.get(c.id) is c and c.status == "running"
            if alive:
                c.served = served
                if c.recipe.role == "relay":
                    c.ports = dict(served.ports)
        if not alive:  # removed or crashed while it started
            served.stop()

    def _route(self, networks: set[str], alias: str, port: int) -> int | None:
        """The loopback port of the served worker that holds ``alias`` on one of ``networks`` now."""
        with self._lock:
            for c in self.containers.values():
                served = c.served
                if (
                    c.status == "running"
                    and served is not None
                    and getattr(served, "container_port", None) == port
                    and any(a.network in networks and alias in a.aliases for a in c.recipe.networks)
                ):
                    return int(served.port)
        return None

    def recreate_container(self, container_id: str, host_ports: Mapping[int, int]) -> str:
        self._check()
        with self._lock:
            old = self._find(container_id)
            if old is None:
                raise RuntimeProblem(f"could not re-create container {container_id}: it does not exist")
            self.calls.append(("recreate_container", old.recipe.name))
        # As the Docker engine's: made under a temporary name before the old one goes, then renamed;
        # left created (not running) when it cannot start, so the next call starts from it.
        staging = replace(old.recipe, name=f"{old.recipe.name}-next")
        try:
            new_id = self.create_container(staging)
        except RuntimeProblem as exc:
            raise RecreateError(f"could not re-create container {old.recipe.name!r}: {exc}; "
                                "the old one is left as it was", old.id) from None
        self.remove_container(old.id)
        with self._lock:
            new = self.containers[new_id]
            new.recipe, new.pinned_ports = old.recipe, dict(host_ports)
        try:
            self.start_container(new_id)
        except RuntimeProblem as exc:
            raise RecreateError(f"could not re-create container {old.recipe.name!r}: {exc}; it is "
                                f"created but not running ({new_id}), the next attempt starts from it",
                                new_id) from None
        return new_id

    def remove_container(self, container_id: str) -> bool:
        self._check()
        with self._lock:
            c = self._find(container_id)
            if c is None:
                return False
            del self.containers[c.id]
            self.calls.append(("remove_container", c.recipe.name))
            self._event("container", "destroy", c.id, c.recipe.name, c.recipe.labels)
        self._stop_served(c)
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

    def container_state(self, container_id: str) -> ContainerState | None:
        self._check()
        with self._lock:
            c = self._find(container_id)
            if c is None:
                return None
            ended = c.finished_at if c.status in ("exited", "dead") else None
            return ContainerState(c.status, c.exit_code, finished_at=ended)

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

    def logs(self, container_id: str, tail: int | None = 40, *, since: float | None = None,
             until: float | None = None) -> str:
        with self._lock:
            c = self._find(container_id)
            if c is None:
                return ""
            lines = [line for i, line in enumerate(c.log_lines)
                     if (since is None or c.stamp(i) >= since) and (until is None or c.stamp(i) <= until)]
            return "\n".join(lines if tail is None else lines[-tail:] if tail else [])

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
        """Stops the processes it serves (the containers stay, as an engine's do)."""
        with self._lock:
            containers = list(self.containers.values())
        for c in containers:
            self._stop_served(c)


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


def _member(tar: tarfile.TarFile, files: Mapping[str, tarfile.TarInfo], name: str) -> bytes:
    member = files.get(name)
    extracted = tar.extractfile(member) if member is not None else None
    if extracted is None:
        raise KeyError(f"{name} is not in the archive")
    return extracted.read()


def _normal(ref: str) -> str:
    """``repository`` means ``repository:latest`` (a ``:`` in the last path part is the tag's)."""
    return ref if ref.startswith("sha256:") or ":" in ref.rsplit("/", 1)[-1] else f"{ref}:latest"
