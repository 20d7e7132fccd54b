"""The container runtime interface, with the real Docker engine and an in-memory fake side by side.

Like httpx's ``_transports`` package: :mod:`.base` holds the :class:`ContainerRuntime` protocol, the
values it speaks in (:class:`ResourceRef`, :class:`ContainerState`, :class:`EngineEvent`) and helpers
written against it (:func:`remove_by_selector`); :mod:`.docker` is the adapter to a real engine
(:class:`DockerRuntime`, the only module that imports docker-py); :mod:`.fake` keeps containers and
networks in dictionaries (:class:`FakeRuntime`) so the logic above can be tested without an engine.
"""

from provisioner.runtime.engine.base import (
    ContainerRuntime,
    ContainerState,
    EngineEvent,
    EventSource,
    EventStream,
    ResourceKind,
    ResourceRef,
    remove_by_selector,
    remove_resource,
    run_container,
)
from provisioner.runtime.engine.docker import DockerRuntime
from provisioner.runtime.engine.fake import FakeContainer, FakeNetwork, FakeRuntime

__all__ = [
    "ContainerRuntime",
    "ContainerState",
    "DockerRuntime",
    "EngineEvent",
    "EventSource",
    "EventStream",
    "FakeContainer",
    "FakeNetwork",
    "FakeRuntime",
    "ResourceKind",
    "ResourceRef",
    "remove_by_selector",
    "remove_resource",
    "run_container",
]
