"""The real engine through docker-py (imported lazily: ``provision --help`` stays fast).

The only module of provisioner that talks to docker-py.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from provisioner.errors import DockerUnavailableError, ImageError, RecreateError, RuntimeProblem
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


def engine_url() -> tuple[str | None, str]:
    """The engine docker-py would reach and where that choice came from: ``DOCKER_HOST`` when set,
    else the current docker context (``DOCKER_CONTEXT`` or ``currentContext`` of the docker CLI's
    config.json, read through docker-py's :class:`docker.context.ContextAPI`) when it is not
    ``default``, else
    ``(None, "default")`` (the local socket).

    Returns:
        ``(url, source)`` — e.g. ``("tcp://10.0.0.5:2376", "DOCKER_HOST")``.
    """
    import os

    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"], "DOCKER_HOST"
    context = _current_context()
    if context is not None:
        return str(context.Host), f"docker context {context.Name}"
    return None, "default"


def _names_a_context() -> bool:
    """Could docker-py's current context be other than ``default``: ``DOCKER_CONTEXT`` is set, or the
    docker CLI's config file (found in docker-py's order: ``$DOCKER_CONFIG/config.json``,
    ``~/.docker/config.json``, ``~/.dockercfg``) names a ``currentContext``. False means docker-py
    would answer ``default``: the answer without importing docker-py (≈ 0.25 s), which every
    pytest start of a layer that blocks the network would otherwise pay (testing.network.engine_hosts)."""
    import json
    import os

    if os.environ.get("DOCKER_CONTEXT"):
        return True
    home = os.path.expanduser("~")
    config_dir = os.environ.get("DOCKER_CONFIG")
    candidates = [os.path.join(config_dir, "config.json")] if config_dir else []
    candidates += [os.path.join(home, ".docker", "config.json"), os.path.join(home, ".dockercfg")]
    path = next((c for c in candidates if os.path.exists(c)), None)
    if path is None:
        return False
    try:
        with open(path) as f:
            name = json.load(f).get("currentContext", "default")
    except Exception:  # docker-py reads it as "default" too
        return False
    return name != "default"


def _current_context() -> Any:
    """docker-py's current context when it names an engine other than the default one, else None."""
    import os

    if not _names_a_context():
        return None
    try:
        from docker.context import ContextAPI

        # The docker CLI's order: DOCKER_CONTEXT, then currentContext of its config.json (docker-py
        # reads the latter only).
        name = os.environ.get("DOCKER_CONTEXT")
        context = ContextAPI.get_context(name) if name else ContextAPI.get_current_context()
    except Exception:  # a broken docker CLI config: docker-py's own default applies
        return None
    if context is None or context.Name == "default" or not context.Host:
        return None
    return context


def connect(timeout: float) -> Any:
    """A docker-py client for the engine :func:`engine_url` names, configured by docker-py itself:
    ``docker.from_env`` for ``DOCKER_HOST``/``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH`` (``ssh://``
    through paramiko, or the ``ssh`` binary when ``PROVISION_DOCKER_SSH_CLIENT=1``), the context's
    host and TLS configuration for a docker context.

    Raises:
        DockerUnavailableError: docker-py cannot make a client for it (names what to do).
    """
    import os

    use_ssh_client = os.environ.get("PROVISION_DOCKER_SSH_CLIENT", "") in ("1", "true", "yes")
    try:
        import docker

        context = None if os.environ.get("DOCKER_HOST") else _current_context()
        if context is not None:
            kwargs: dict[str, Any] = {"base_url": context.Host, "tls": context.TLSConfig}
        else:
            kwargs = docker.utils.kwargs_from_env()
        if not kwargs.get("tls"):
            return docker.DockerClient(timeout=timeout, use_ssh_client=use_ssh_client, **kwargs)
        # TLS: requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE (set system-wide on many machines)
        # override the session's CA, so docker-py's DOCKER_CERT_PATH/ca.pem would be ignored and the
        # engine's certificate refused (psf/requests#3829). The engine's session takes nothing from
        # the environment; the API version is then asked for as docker-py's "auto" does.
        client = docker.DockerClient(timeout=timeout, use_ssh_client=use_ssh_client, version=_PROBE_API,
                                     **kwargs)
        client.api.trust_env = False
        client.api._version = client.api._retrieve_server_version()
        return client
    except Exception as exc:  # docker.errors.DockerException and socket errors
        raise DockerUnavailableError(_no_engine(exc)) from None


# Only to make the client before asking the engine for its API version (docker-py's minimum).
_PROBE_API = "1.24"

_writes_lock = threading.Lock()
_writes = 0


def _bump_writes() -> None:
    global _writes
    with _writes_lock:
        _writes += 1


def count_engine_writes() -> None:
    """Count every request of this process that may change an engine (any method but ``GET`` and
    ``HEAD``, through any docker-py client: provisioner's, testcontainers', a test's own), once
    when it is sent and once when it has returned. Installed once per process by wrapping docker-py's
    ``APIClient.send`` (requests' ``Session.send``, which every docker-py call goes through).

    Why: the per-test leak check reads the engine's events up to *now* only when this count moved
    since its last exact view (:meth:`DockerRuntime.engine_writes`); a test that made no engine
    request cannot have created a container or network with this process's labels, and the read
    (one engine round trip: 0.06 ms on a quiet machine, ≈ 3 ms at load 15) is then not needed.
    """
    from docker.api.client import APIClient

    with _writes_lock:
        original = APIClient.send
        if getattr(original, "_provisioner_counts_writes", False):
            return

        def send(self: Any, request: Any, **kwargs: Any) -> Any:
            if request.method in ("GET", "HEAD"):
                return original(self, request, **kwargs)
            _bump_writes()
            try:
                return original(self, request, **kwargs)
            finally:
                _bump_writes()

        send._provisioner_counts_writes = True  # type: ignore[attr-defined]
        APIClient.send = send


class DockerRuntime:
    """A real engine through docker-py (imported lazily: ``provision --help`` stays fast).

    ``publish_host``: the address of the engine's host that published ports go on and the controller
    connects to (``127.0.0.1`` for a local engine; see :mod:`provisioner.runtime.engine.address`);
    ``engine``: the engine's URL and where it came from, for ``doctor`` and ``status``;
    ``image_source``: for an engine reached over the network (``tcp://``, ``ssh://``), what opens
    the local engine its images may come from (:meth:`image_source`; :func:`open_runtime` passes
    it). ``owns_client``: close ``client`` on :meth:`close` (default: only a client made here).
    """

    def __init__(
        self,
        client: Any | None = None,
        *,
        timeout: float = 60.0,
        publish_host: str = "127.0.0.1",
        engine: str = "default",
        image_source: Callable[[], DockerRuntime | None] | None = None,
        owns_client: bool | None = None,
    ) -> None:
        self._own_client = client is None if owns_client is None else owns_client
        if client is None:
            client = connect(timeout)
        self.client = client
        self.publish_host = publish_host
        self.engine = engine
        self._timeout = timeout
        self._events_lock = threading.Lock()
        self._events_conn: Any = None
        self._open_source = image_source
        self._source_lock = threading.Lock()
        self._source: DockerRuntime | None = None
        self._source_checked = False
        count_engine_writes()

    def ping(self) -> None:
        try:
            self.client.ping()
        except Exception as exc:
            raise DockerUnavailableError(_no_engine(exc)) from None

    def engine_info(self) -> EngineInfo:
        try:
            version = self.client.version()
            info = self.client.info()
        except Exception as exc:
            raise DockerUnavailableError(_no_engine(exc)) from None
        return EngineInfo(
            "Docker",
            str(version.get("Version", "?")),
            str(version.get("ApiVersion", "?")),
            str(info.get("DockerRootDir") or "/var/lib/docker"),
            arch=str(version.get("Arch") or ""),
        )

    # --- the image store

    def image_exists(self, ref: str) -> bool:
        return self.image(ref) is not None

    def image(self, ref: str) -> ImageInfo | None:
        import docker.errors

        try:
            found = self.client.api.inspect_image(ref)
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as exc:
            if exc.status_code in (400, 404):  # an invalid reference names no image either
                return None
            raise
        labels = (found.get("Config") or {}).get("Labels") or {}
        return ImageInfo(str(found["Id"]), tuple(found.get("RepoTags") or ()), dict(labels),
                         int(found.get("Size") or 0))

    def list_images(self, repository: str) -> list[ImageInfo]:
        return [
            ImageInfo(str(i["Id"]), tuple(i.get("RepoTags") or ()), dict(i.get("Labels") or {}))
            for i in self.client.api.images(name=repository)
        ]

    def images_in_use(self) -> set[str]:
        return {str(c["ImageID"]) for c in self.client.api.containers(all=True)}

    def pull(self, ref: str) -> ImageInfo:
        repo, tag = _repository_tag(ref)
        try:
            self.client.images.pull(repo, tag=tag)
        except Exception as exc:  # offline: registry unreachable, DNS failure, timeout, no such image
            raise ImageError(f"could not pull {ref} ({type(exc).__name__}: {_explain(exc)})") from None
        return self._made(ref, f"the pull of {ref} reported success but the image is missing")

    def build(
        self,
        context: IO[bytes],
        tag: str,
        *,
        build_args: Mapping[str, str],
        labels: Mapping[str, str],
        on_output: Callable[[str], None] | None = None,
    ) -> ImageInfo:
        import docker.errors

        last: list[str] = []
        try:
            stream = self.client.api.build(
                fileobj=context,
                custom_context=True,
                tag=tag,
                buildargs=dict(build_args),
                labels=dict(labels),
                rm=True,
                forcerm=True,
                decode=True,
                pull=False,
            )
            for chunk in stream:
                if "error" in chunk:
                    raise ImageError(
                        f"building {tag} failed: {str(chunk['error']).strip()}\n" + "".join(last[-15:])
                    )
                text = chunk.get("stream") or ""
                if text:
                    last.append(text)
                    if on_output is not None:
                        on_output(text)
        except docker.errors.APIError as exc:
            raise ImageError(f"building {tag} failed: {_explain(exc)}") from None
        return self._made(tag, f"the build reported success but {tag} is missing")

    def import_rootfs(self, tarball: Path, ref: str, *, changes: list[str]) -> ImageInfo:
        import docker.errors

        repo, tag = _repository_tag(ref)
        try:
            self.client.api.import_image_from_file(str(tarball), repository=repo, tag=tag, changes=changes)
        except docker.errors.APIError as exc:
            raise ImageError(f"docker import of {ref} failed: {_explain(exc)}") from None
        return self._made(ref, f"docker import did not produce {ref}")

    def _made(self, ref: str, missing: str) -> ImageInfo:
        """The image ``ref`` an engine call just made (pull, build, import), or ImageError(``missing``)."""
        found = self.image(ref)
        if found is None:
            raise ImageError(missing)
        return found

    def tag(self, ref: str, target: str) -> None:
        import docker.errors

        repo, tag = _repository_tag(target)
        try:
            self.client.api.tag(ref, repo, tag)
        except docker.errors.APIError as exc:
            raise ImageError(f"could not tag {ref} as {target}: {_explain(exc)}") from None

    def remove_image(self, ref: str) -> bool:
        import docker.errors

        try:
            self.client.api.remove_image(ref)
        except docker.errors.APIError:  # NotFound, or a conflict: a container still uses it
            return False
        return True

    def save(self, ref: str) -> Iterator[bytes]:
        import docker.errors

        try:
            # chunk_size=None: each chunk as it arrives (docker-py's default gathers 2 MB first).
            stream = self.client.api.get_image(ref, chunk_size=None)
        except docker.errors.APIError as exc:
            raise ImageError(f"could not save {ref}: {_explain(exc)}") from None
        try:
            yield from stream
        except Exception as exc:  # the engine closed the stream or the connection broke
            raise ImageError(f"saving {ref} broke off ({type(exc).__name__}: {_explain(exc)})") from None

    def load(self, archive: Iterable[bytes]) -> list[ImageInfo]:
        import docker.errors

        names: list[str] = []
        try:
            # A generator body goes out chunked (requests), so the archive is never whole in memory.
            for line in self.client.api.load_image(iter(archive), quiet=True):
                if "error" in line:
                    raise ImageError(f"the engine refused the image archive: {str(line['error']).strip()}")
                text = str(line.get("stream") or "")
                for prefix in ("Loaded image: ", "Loaded image ID: "):
                    if text.startswith(prefix):
                        names.append(text[len(prefix):].strip())
        except docker.errors.APIError as exc:
            raise ImageError(f"the engine refused the image archive: {_explain(exc)}") from None
        except ImageError:
            raise
        except Exception as exc:  # the source's stream broke (its ImageError is raised as is above)
            raise ImageError(f"loading the image archive broke off ({type(exc).__name__}: {exc})") from None
        loaded: dict[str, ImageInfo] = {}
        for name in names:
            found = self.image(name)
            if found is not None:
                loaded[found.id] = found
        return list(loaded.values())

    def image_source(self) -> DockerRuntime | None:
        """The local engine when this one is remote (it was given ``image_source``), answers and
        runs the same architecture (an arm64 laptop's image does not run on an amd64 host); else
        None. Whether it *is* this engine (a ``tcp://`` URL of the local one) needs no check: the
        image is then built here and nothing is sent. (Docker's ``ID`` could not tell: engines that
        share ``/etc/docker/key.json`` report the same one.) Asked once per runtime."""
        with self._source_lock:
            if self._source_checked:
                return self._source
            self._source_checked = True
            source = self._open_source() if self._open_source is not None else None
            if source is None:
                return None
            try:
                same_arch = source.engine_info().arch == self.engine_info().arch
            except DockerUnavailableError:
                same_arch = False
            if not same_arch:
                source.close()
                return None
            self._source = source
            return source

    # --- containers, networks, volumes

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
        kwargs["ports"] = {port: (self.publish_host, None) for port in kwargs.get("ports") or {}}
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

    def recreate_container(self, container_id: str, host_ports: Mapping[int, int]) -> str:
        import docker.errors

        api = self.client.api
        try:
            info = api.inspect_container(container_id)
        except docker.errors.NotFound:
            raise RuntimeProblem(
                f"could not re-create container {container_id[:12]}: it does not exist"
            ) from None
        name = str(info["Name"]).lstrip("/")
        old_alias = str(info["Id"])[:12]  # the engine's automatic alias: the old short id
        config = {k: v for k, v in (info.get("Config") or {}).items() if k != "Hostname"}
        host_config = dict(info.get("HostConfig") or {})
        bindings = dict(host_config.get("PortBindings") or {})
        for container_port, host_port in host_ports.items():
            bindings[f"{container_port}/tcp"] = [{"HostIp": self.publish_host, "HostPort": str(host_port)}]
        host_config["PortBindings"] = bindings
        networks = {
            net: [a for a in (endpoint or {}).get("Aliases") or [] if a != old_alias]
            for net, endpoint in ((info.get("NetworkSettings") or {}).get("Networks") or {}).items()
        }
        primary = str(host_config.get("NetworkMode") or "")
        config["HostConfig"] = host_config
        if primary in networks:
            config["NetworkingConfig"] = {
                "EndpointsConfig": {primary: {"Aliases": networks[primary] or None}}
            }
        # The new container is made under a temporary name before the old one goes, and keeps the
        # name once renamed even when it cannot start: whatever fails, a container of this name is
        # left for the next attempt to start from (removing it left "it does not exist" for good).
        staging = f"{name}-next-{secrets.token_hex(4)}"
        try:
            new_id = str(api.create_container_from_config(config, name=staging)["Id"])
        except docker.errors.APIError as exc:
            raise RecreateError(f"could not re-create container {name!r}: {_explain(exc)}; "
                                "the old one is left as it was", str(info["Id"])) from None
        try:
            self.remove_container(container_id)
        except docker.errors.APIError as exc:
            self.remove_container(new_id)
            raise RecreateError(f"could not re-create container {name!r}: {_explain(exc)}; "
                                "the old one is left as it was", str(info["Id"])) from None
        try:
            api.rename(new_id, name)
            for net, aliases in networks.items():
                if net != primary:
                    api.connect_container_to_network(new_id, net, aliases=aliases or None)
            api.start(new_id)
        except docker.errors.APIError as exc:
            raise RecreateError(
                f"could not re-create container {name!r}: {_explain(exc)}; it is created but not "
                f"running ({new_id[:12]}), the next attempt starts from it", new_id
            ) from None
        return new_id

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

    def container_state(self, container_id: str) -> ContainerState | None:
        import docker.errors

        try:
            info = self.client.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return None
        state = info.get("State") or {}
        status = str(state.get("Status", "unknown"))
        # FinishedAt is "0001-01-01T00:00:00Z" for a container that never ended, and keeps the
        # last end while a restarted container runs: only an ended one's counts.
        finished = _parse_time(state.get("FinishedAt")) if status in ("exited", "dead") else 0.0
        return ContainerState(
            status=status,
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            finished_at=finished if finished > 0 else None,
        )

    def wait_exit(self, container_id: str, timeout_s: float) -> bool:
        """The engine's ``POST /containers/{id}/wait`` (condition ``not-running``): one request that
        returns when the container stops, instead of an inspect every poll (see :class:`ExitWaiter`).
        Any other engine error also returns True: the caller then reads the state, as it would have."""
        import docker.errors
        import requests.exceptions

        try:
            self.client.api.wait(container_id, timeout=max(0.05, timeout_s), condition="not-running")
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            return False  # the read timed out: still running (docker-py raises it as ConnectionError)
        except docker.errors.APIError:  # gone (NotFound), or an engine that cannot wait: look instead
            return True
        return True

    def published_port(self, container_id: str, container_port: int) -> int | None:
        info = self.client.api.inspect_container(container_id)
        bindings = ((info.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{container_port}/tcp") or []
        for binding in bindings:
            if binding.get("HostIp") in (self.publish_host, "") and binding.get("HostPort"):
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

    def logs(self, container_id: str, tail: int | None = 40, *, since: float | None = None,
             until: float | None = None) -> str:
        import docker.errors

        # docker-py passes float since/until through; the engine compares them with each line's
        # own timestamp (nanoseconds), so a window is exact, not rounded to whole seconds.
        window = {k: float(v) for k, v in (("since", since), ("until", until)) if v is not None and v > 0}
        try:
            raw = self.client.api.logs(container_id, stdout=True, stderr=True,
                                       tail="all" if tail is None else tail, **window)
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
        """A bounded ``/events`` read over a kept-open connection to a local engine's socket.

        The leak check makes this read after every test: through docker-py's requests stack it costs
        ≈ 1.3 ms, through ``http.client`` ≈ 0.28 ms, through h11 ≈ 0.22 ms, through
        :class:`_UnixGet` ≈ 0.06 ms (p50 of 300 reads, same machine, load ≈ 3, 2026-11-30). None
        when the engine is not on a local Unix socket or the read failed (then docker-py is used).
        """
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
                self._events_conn = _UnixGet(path, self._timeout)
            query = urllib.parse.urlencode(
                {"since": _timestamp(since_ns), "until": _timestamp(until_ns), "filters": json.dumps(filters)}
            )
            answer = self._events_conn.get(f"/v{self.client.api.api_version}/events?{query}")
            if answer is None or answer[0] != 200:
                return None
            body = answer[1].decode("utf-8")
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

    def engine_writes(self) -> int:
        """Requests of this process that may have changed an engine so far (see
        :func:`count_engine_writes`): +1 when one is sent, +1 when it returned; it only grows."""
        return _writes

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
        with self._source_lock:
            source, self._source = self._source, None
        if source is not None:
            source.close()
        if self._own_client:
            self.client.close()


def local_client(timeout: float) -> Any | None:
    """A docker-py client for the engine on docker-py's default local socket, None when there is no
    such socket (or no client can be made for it)."""
    import docker
    from docker.constants import DEFAULT_UNIX_SOCKET

    if not Path(DEFAULT_UNIX_SOCKET.removeprefix("http+unix://")).exists():
        return None
    try:
        return docker.DockerClient(base_url=DEFAULT_UNIX_SOCKET, timeout=timeout)
    except Exception:
        return None


def _timestamp(ns: int) -> str:
    """Docker's ``since``/``until`` format: seconds with nanoseconds (``1700000000.000000001``)."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


class _UnixGet:
    """``GET`` requests over one kept-open HTTP/1.1 connection to a Unix socket (the local engine's
    API), for the one small request made after every test (:meth:`DockerRuntime._past_events`).

    Its own few lines rather than a library: ``http.client`` spends ≈ 0.2 ms per request in its
    header parsing (the email package), h11's state machine ≈ 0.15 ms, while the engine answers in
    ≈ 0.06 ms (measured, see ``_past_events``). It reads what the engine sends: a status line,
    headers, then a chunked, ``Content-Length`` or read-to-close body. Any failure closes the
    connection and answers None (the caller falls back to docker-py); the next request reconnects.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: Any = None
        self._buffer = b""

    def get(self, target: str) -> tuple[int, bytes] | None:
        """``(status, body)`` of ``GET target``, or None when the connection failed."""
        import socket

        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                self._sock, self._buffer = sock, b""
            self._sock.sendall(f"GET {target} HTTP/1.1\r\nHost: docker\r\n\r\n".encode("ascii"))
            lines = self._until(b"\r\n\r\n").split(b"\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
            if headers.get(b"transfer-encoding") == b"chunked":
                parts = []
                while size := int(self._until(b"\r\n").split(b";")[0], 16):
                    parts.append(self._exactly(size))
                    self._until(b"\r\n")
                while self._until(b"\r\n"):  # trailers, up to the empty line
                    pass
                body = b"".join(parts)
            elif b"content-length" in headers:
                body = self._exactly(int(headers[b"content-length"]))
            else:  # the body runs to the end of the connection
                body = self._buffer + b"".join(iter(lambda: self._sock.recv(65536), b""))
                self.close()
                return status, body
            if headers.get(b"connection") == b"close":
                self.close()
            return status, body
        except (OSError, ValueError, IndexError):
            self.close()
            return None

    def _fill(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionResetError("the engine closed the connection")
        self._buffer += data

    def _until(self, delimiter: bytes) -> bytes:
        while (index := self._buffer.find(delimiter)) < 0:
            self._fill()
        found, self._buffer = self._buffer[:index], self._buffer[index + len(delimiter):]
        return found

    def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        found, self._buffer = self._buffer[:size], self._buffer[size:]
        return found

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock, self._buffer = None, b""


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


def _repository_tag(ref: str) -> tuple[str, str]:
    """``(repository, tag)`` of an image reference, ``latest`` when it names none. The tag is after
    the last ``:`` of the last path part (docker-py's parser): ``localhost:5000/x:1`` is repository
    ``localhost:5000/x``, tag ``1``."""
    from docker.utils import parse_repository_tag

    repo, tag = parse_repository_tag(ref)
    return repo, tag or "latest"


def _explain(exc: Exception) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


#: What a user can do when no engine answers — advice that holds on any machine with a wheel install
#: (no file of provisioner's checkout named): the pytest summary and every error repeat it.
ENGINE_ADVICE = ("Start the Docker engine (e.g. `sudo systemctl start docker`), check that DOCKER_HOST (or "
                 "the docker context) names a running engine, and that your user may use its socket (e.g. "
                 "is in the docker group)")


def _no_engine(exc: Exception) -> str:
    """The error when no engine answers: which engine was tried and where that choice came from
    (:func:`engine_url`), the reason, and what to do."""
    try:
        url, source = engine_url()
    except Exception:  # a broken docker CLI config must not hide the original error
        url, source = None, "default"
    where = (f"at {url} (from {source})" if url
             else "at the local socket (unix:///var/run/docker.sock: DOCKER_HOST is not set)")
    return f"no Docker engine is reachable {where} ({type(exc).__name__}: {exc}). {ENGINE_ADVICE}."
