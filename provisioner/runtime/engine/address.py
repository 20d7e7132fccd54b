"""Which engine a runtime talks to and the host address its published ports go on.

Workers are published on one address of the engine's host, which the controller connects to:

* a local engine (``unix://``, ``npipe://``, no ``DOCKER_HOST``) and an engine reached on a loopback
  ``tcp://`` address: ``127.0.0.1``, as always;
* a remote engine (``DOCKER_HOST=tcp://HOST:PORT`` or ``ssh://USER@HOST``): HOST itself (a name is
  resolved once, on the controller), the address the controller already reaches that host on;
* ``publish_host`` (setting ``publish_host``, env ``PROVISION_PUBLISH_HOST``) overrides both, the way
  testcontainers users set ``TESTCONTAINERS_HOST_OVERRIDE`` — for an engine behind NAT, or a host
  with several addresses. It must be one address of the engine's host: the engine binds it.

Never ``0.0.0.0``/``::`` (every interface): the controller cannot connect to it, and it would open
the workers to every network the engine's host is on.

The URL itself is parsed by :func:`urllib.parse.urlsplit`; docker-py does the real connection
handling (TLS, ssh) from the same ``DOCKER_HOST``.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from provisioner.errors import ConfigError

LOOPBACK = "127.0.0.1"
_EVERY_INTERFACE = {"0.0.0.0", "::", "[::]"}  # noqa: S104 - the values we refuse


def is_loopback(host: str) -> bool:
    """True for ``127.0.0.0/8``, ``::1`` and ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_network_url(url: str | None) -> bool:
    """True when ``url`` reaches an engine over the network (``tcp://``, ``http(s)://``,
    ``ssh://``), False for a local socket (``unix://``, ``npipe://``, None: docker-py's default)."""
    return bool(url) and urlsplit(url or "").scheme.lower() in ("tcp", "http", "https", "ssh")


def publish_host_for(url: str | None, override: str | None = None) -> str:
    """The IP address workers of the engine at ``url`` are published on (see the module docstring).

    Raises:
        ConfigError: ``override`` is every interface (``0.0.0.0``/``::``) or not an IP address or a
            name that resolves; ``url``'s host name does not resolve (set ``publish_host``).
    """
    if override:
        value = override.strip()
        if value in _EVERY_INTERFACE:
            raise ConfigError(
                f"publish_host {value!r} means every interface: the controller cannot connect to it "
                "and it opens the workers to every network; set PROVISION_PUBLISH_HOST to one address "
                "of the engine's host"
            )
        return _resolve(value, "publish_host (PROVISION_PUBLISH_HOST)")
    if not url:
        return LOOPBACK
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("tcp", "http", "https", "ssh") and parts.hostname:
        host = parts.hostname
        if is_loopback(host):
            return LOOPBACK
        return _resolve(host, f"the engine's host in {url!r}")
    return LOOPBACK  # unix://, npipe://, http+unix://: a local engine


def remote_hosts(url: str | None, publish_host: str) -> tuple[str, ...]:
    """The hosts off this machine a controller of the engine at ``url`` connects to: the engine's
    own host (its API, ``tcp://``/``ssh://``) and ``publish_host`` (the workers); loopback ones
    are left out, so a local engine has none."""
    hosts: list[str] = []
    engine_host = urlsplit(url or "").hostname if is_network_url(url) else None
    for host in (engine_host, publish_host):
        if host and not is_loopback(host) and host not in hosts:
            hosts.append(host)
    return tuple(hosts)


def _resolve(host: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(
            f"{what}: {host!r} does not resolve ({exc}); set PROVISION_PUBLISH_HOST to the IP address "
            "of the engine's host the workers should be published on"
        ) from None
    return str(infos[0][4][0])
