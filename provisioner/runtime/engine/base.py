"""The container runtime interface: the protocol, the values it speaks in, and helpers over it.

Everything above :mod:`provisioner.runtime.engine` (pool, environment, resource manager, reaper)
talks to a :class:`ContainerRuntime`; the adapters are :mod:`.docker` (a real engine through
docker-py) and :mod:`.fake` (dictionaries in memory).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol, runtime_checkable

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
    # When its process last ended, Unix seconds (Docker's ``State.FinishedAt``); None: it has not
    # ended since it was started, or the engine does not say.
    finished_at: float | None = None

    @property
    def running(self) -> bool:
        return self.status == "running"


def utc_clock(timestamp: float) -> str:
    """A moment as the CLI shows times: ``2026-11-30 21:40:03 UTC`` (``history list``'s "started
    (UTC)" column; whole seconds)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


@dataclass(frozen=True)
class ImageInfo:
    """An image in the engine's store (Docker's ``GET /images/{name}/json``: ``Id``, ``RepoTags``,
    ``Config.Labels``)."""

    id: str  # the content id, ``sha256:<hex>``
    tags: tuple[str, ...] = ()  # ``repository:tag`` references that name it
    labels: Mapping[str, str] = field(default_factory=dict, compare=False)
    size: int = field(default=0, compare=False)  # bytes of its layers (Docker's ``Size``); 0: unknown


@dataclass(frozen=True)
class EngineInfo:
    """What the engine says about itself (Docker's ``GET /version`` and ``GET /info``)."""

    name: str  # "Docker" | "fake"
    version: str  # the engine's version (Docker's ``Version``)
    api_version: str  # the API version spoken (Docker's ``ApiVersion``)
    root_dir: str | None = None  # where it keeps images and containers (``DockerRootDir``); None: no disk
    arch: str = ""  # the architecture its containers run (Docker's ``Arch``: amd64, arm64, ...)


@runtime_checkable
class ImageStore(Protocol):
    """The engine's image store: what :mod:`provisioner.runtime.images` needs to find, build, tag and
    prune the worker image. References are ``repository:tag`` or image ids."""

    def image_exists(self, ref: str) -> bool: ...

    def image(self, ref: str) -> ImageInfo | None:
        """The image ``ref`` names; None when there is none."""

    def list_images(self, repository: str) -> list[ImageInfo]:
        """Every image with a tag in ``repository`` (e.g. ``provisioner-worker``)."""

    def images_in_use(self) -> set[str]:
        """Ids of the images any container (running or not) was created from."""

    def pull(self, ref: str) -> ImageInfo:
        """Pull ``ref`` from its registry.

        Raises:
            ImageError: the registry cannot be reached or has no such image (offline, DNS, timeout).
        """

    def build(
        self,
        context: IO[bytes],
        tag: str,
        *,
        build_args: Mapping[str, str],
        labels: Mapping[str, str],
        on_output: Callable[[str], None] | None = None,
    ) -> ImageInfo:
        """Build the Dockerfile of ``context`` (an uncompressed tar stream of the build context) as
        ``tag``, never pulling; ``on_output`` receives each line of build output.

        Raises:
            ImageError: the build failed (with the last lines of its output).
        """

    def import_rootfs(self, tarball: Path, ref: str, *, changes: list[str]) -> ImageInfo:
        """Make the image ``ref`` from a root filesystem tarball (``docker import``); ``changes`` are
        Dockerfile instructions applied to it (``ENV``, ``CMD``, ``LABEL``).

        Raises:
            ImageError: the engine refused the import.
        """

    def tag(self, ref: str, target: str) -> None:
        """Point the reference ``target`` (``repository:tag``) at the image ``ref`` names."""

    def remove_image(self, ref: str) -> bool:
        """Remove the reference ``ref`` (the image itself when no other tag names it); False when it
        did not exist or the engine refused (an image a container still uses)."""

    def save(self, ref: str) -> Iterator[bytes]:
        """The image ``ref`` names, with its tags, as a ``docker save`` tar archive (Docker's
        ``GET /images/{name}/get``), in chunks as the engine sends them — never whole in memory.

        Raises:
            ImageError: there is no such image, or the engine broke off the stream.
        """

    def load(self, archive: Iterable[bytes]) -> list[ImageInfo]:
        """Load a ``docker save`` tar archive, streamed in chunks (Docker's ``POST /images/load``);
        the images it held, as this engine now has them (tags included).

        Raises:
            ImageError: the engine refused the archive (naming its reason).
        """

    def image_source(self) -> ImageStore | None:
        """Another engine this one's images come from by :meth:`save` | :meth:`load` when it lacks
        them: for an engine reached over the network (``DOCKER_HOST``, a docker context), the local
        engine when one answers and runs the same architecture; None otherwise (then an image is
        built on this engine). Owned by this runtime: closed by its ``close()``.
        """


@runtime_checkable
class ContainerRuntime(ImageStore, Protocol):
    """What provisioner needs from a container engine. All ids may also be names.

    ``publish_host``: the IP address of the engine's host published ports go on and the controller
    connects to (``127.0.0.1`` for a local engine); ``engine``: which engine, for people to read.
    """

    publish_host: str
    engine: str

    def ping(self) -> None:
        """Raise :class:`DockerUnavailableError` when the engine does not answer."""

    def engine_info(self) -> EngineInfo:
        """Raises :class:`DockerUnavailableError` when the engine does not answer."""

    def create_network(self, recipe: NetworkRecipe) -> str:
        """Create the network; return its id. A name clash raises :class:`RuntimeProblem`."""

    def create_container(self, recipe: ContainerRecipe) -> str:
        """Create (not start) the container attached to all its networks; return its id."""

    def start_container(self, container_id: str) -> None: ...

    def recreate_container(self, container_id: str, host_ports: Mapping[int, int]) -> str:
        """Force-remove the container and create and start it again from its own configuration
        (same name, image, command, labels, limits, networks and aliases), publishing each container
        port of ``host_ports`` on that 127.0.0.1 host port; return the new id. The engine makes a
        container's port forwarding only when the container starts, so this is how a published port
        whose forwarder died comes back at the same address (see :mod:`provisioner.runtime.health`).

        The new container is created (under a temporary name) before the old one is removed, and
        is left in place, created but not running, when it cannot start: a failed call never leaves
        the name without a container, so the next call can try again from what is there.

        Raises:
            RuntimeProblem: the container does not exist.
            RecreateError: the engine refused to make or start it again (e.g. a host port of
                ``host_ports`` is taken meanwhile); its ``container_id`` is the container that holds
                the name now (the old one, or the new one, not running).
        """

    def remove_container(self, container_id: str) -> bool:
        """Force-remove; False when it did not exist."""

    def remove_network(self, network_id: str) -> bool:
        """Remove (disconnecting leftovers first); False when it did not exist."""

    def remove_volume(self, volume_id: str) -> bool: ...

    def container_state(self, container_id: str) -> ContainerState | None:
        """None when the container does not exist."""

    def published_port(self, container_id: str, container_port: int) -> int | None:
        """The 127.0.0.1 host port Docker chose for ``container_port``."""

    def container_ip(self, container_id: str, network: str) -> str | None: ...

    def container_gateway(self, container_id: str, network: str) -> str | None:
        """The gateway address of ``network`` as the container sees it (a host address)."""

    def logs(self, container_id: str, tail: int | None = 40, *, since: float | None = None,
             until: float | None = None) -> str:
        """The container's output (stdout and stderr as the engine stamped it): of the lines written
        between ``since`` and ``until`` (Unix time in seconds, fractions kept; ``None``: open), the
        last ``tail`` (``None``: all). "" when the container does not exist (any more)."""

    def exec(self, container_id: str, command: list[str]) -> tuple[int, str]:
        """Run ``command`` in the running container; (exit code, stdout and stderr)."""

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
class ExitWaiter(Protocol):
    """A runtime that can block until a container stops, without polling its state.

    The egress guard's wait (:func:`provisioner.runtime.egress.block_host_access`) uses it: polling
    a one-shot container every 20 ms cost the engine and this process an inspect each (≈ 1.2 ms of
    CPU together, measured at load 7), next to the workers' start-up on the same cores.
    """

    def wait_exit(self, container_id: str, timeout_s: float) -> bool:
        """Block until the container is not running (exited, dead, gone) or ``timeout_s`` passed;
        False when it still runs, True otherwise — also when the engine could not say (the caller
        reads the container's state next either way)."""


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


def remove_resource(runtime: ContainerRuntime, ref: ResourceRef) -> bool:
    if ref.kind == "container":
        return runtime.remove_container(ref.id)
    if ref.kind == "network":
        return runtime.remove_network(ref.id)
    return runtime.remove_volume(ref.id)


def remove_by_selector(
    runtime: ContainerRuntime,
    selector: Mapping[str, str],
    where: Callable[[ResourceRef], bool] | None = None,
) -> list[ResourceRef]:
    """Remove everything matching ``selector`` (and ``where``, when given): containers first (in
    parallel — each forced removal takes a few hundred ms), then the networks and volumes they used.
    Returns what was removed."""
    from concurrent.futures import ThreadPoolExecutor

    found = [ref for ref in runtime.list_resources(selector) if where is None or where(ref)]
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
