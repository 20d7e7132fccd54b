"""The container runtime interface, with the real Docker engine and an in-memory fake side by side.

Like httpx's ``_transports`` package: :mod:`.base` holds the :class:`ContainerRuntime` protocol, the
values it speaks in (:class:`ResourceRef`, :class:`ContainerState`, :class:`EngineEvent`) and helpers
written against it (:func:`remove_by_selector`); :mod:`.docker` is the adapter to a real engine
(:class:`DockerRuntime`, the only module that imports docker-py); :mod:`.fake` keeps containers and
networks in dictionaries (:class:`FakeRuntime`) so the logic above can be tested without an engine.

:func:`open_runtime` is the one place a runtime for the real engine is made: every command, the
pytest plugin, the Python API and the watchdog call it (or are handed a runtime by their caller).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from provisioner.runtime.engine.address import is_loopback, is_network_url, publish_host_for, remote_hosts
from provisioner.runtime.engine.base import (
    ContainerRuntime,
    ContainerState,
    EngineEvent,
    EngineInfo,
    EventSource,
    EventStream,
    ExitWaiter,
    ImageInfo,
    ImageStore,
    ResourceKind,
    ResourceRef,
    remove_by_selector,
    remove_resource,
)

if TYPE_CHECKING:
    from provisioner.runtime.engine.docker import DockerRuntime
    from provisioner.runtime.engine.fake import FakeContainer, FakeImage, FakeNetwork, FakeRuntime
    from provisioner.settings import Settings

# The adapters, imported on first use (like the root package's API): docker-py and the fake engine
# cost ≈ 0.3 s to import, and this package is imported by code that needs only the protocol and its
# values — the pytest plugin's start, every leak check (resources), log windows — in projects that
# may never touch an engine (docs/benchmarks.md, "pytest start-up with the plugin").
_LAZY = {
    "DockerRuntime": "provisioner.runtime.engine.docker",
    **dict.fromkeys(("FakeContainer", "FakeImage", "FakeNetwork", "FakeRuntime"),
                    "provisioner.runtime.engine.fake"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once: later look-ups are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_runtime(
    settings: Settings | None = None, *, ping: bool = True, timeout: float = 60.0
) -> ContainerRuntime:
    """The runtime for the engine these settings use; the caller closes it.

    The engine is the one docker-py's own configuration names (:func:`.docker.connect`):
    ``DOCKER_HOST`` with ``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH`` (``tcp://``, ``ssh://``), else the
    current docker context (docker-py's ``ContextAPI``), else the local socket. Workers are published
    on :func:`.address.publish_host_for` of that engine (``settings.publish_host`` overrides it).
    An engine reached over the network gets its images from the local engine when there is one
    (:meth:`ImageStore.image_source`). ``ping`` (default) asks the engine once, so a missing
    engine is reported here, naming what to do, rather than at the first container.

    Raises:
        DockerUnavailableError: no engine answers.
        ConfigError: the publish address is every interface, or a host name does not resolve.
    """
    from provisioner.runtime.engine.docker import DockerRuntime, engine_url

    url, source = engine_url()
    override = settings.publish_host if settings is not None else None
    publish_host = publish_host_for(url, override)
    # An engine reached over the network gets its images from the local engine, if there is one.
    image_source = functools.partial(_local_engine, timeout) if is_network_url(url) else None
    runtime = DockerRuntime(publish_host=publish_host, engine=f"{url or 'local socket'} ({source})",
                            timeout=timeout, image_source=image_source)
    if ping:
        try:
            runtime.ping()
        except BaseException:
            runtime.close()
            raise
    return runtime

def _local_engine(timeout: float) -> DockerRuntime | None:
    """The engine on docker-py's default local socket (a remote engine's image source), or None."""
    from provisioner.runtime.engine.docker import DockerRuntime, local_client

    client = local_client(timeout)
    if client is None:
        return None
    return DockerRuntime(client, timeout=timeout, engine="local socket", owns_client=True)


__all__ = [
    "ContainerRuntime",
    "ContainerState",
    "DockerRuntime",
    "EngineEvent",
    "EngineInfo",
    "EventSource",
    "EventStream",
    "ExitWaiter",
    "FakeContainer",
    "FakeImage",
    "FakeNetwork",
    "FakeRuntime",
    "ImageInfo",
    "ImageStore",
    "ResourceKind",
    "ResourceRef",
    "is_loopback",
    "is_network_url",
    "open_runtime",
    "publish_host_for",
    "remote_hosts",
    "remove_by_selector",
    "remove_resource",
]
