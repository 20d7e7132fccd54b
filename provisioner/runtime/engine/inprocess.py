"""What a :class:`~provisioner.runtime.engine.FakeRuntime` runs when it serves (``serve=True``).

A worker container becomes the real bridge server (:class:`provisioner.bridge.server.BridgeServer`
around a :class:`~provisioner.bridge.service.BridgeService`) on a loopback port of this process,
configured from the container's environment and command the way ``provision worker`` configures
itself; a relay container becomes a TCP forwarder whose published ports lead, per connection, to the
worker that holds the route's alias then (like the real relay, which asks Docker's DNS each time: a
replacement that takes over a slot is reachable at once, a gone worker closes the connection).

So the pool, the ``isolated`` sessions, the readiness probe and every client speak the real protocol
to real workers, and only the engine is in memory. Not served: the Gemini stand-in container (its
URL names an alias no host process can resolve) and fork-mode workers (a fork of this multi-threaded
process per connection is unsafe): both are refused at start, naming what to use instead.

Threads, not asyncio: each forwarded connection is two blocking copy loops, and a stop is a socket
shutdown — simple to make deterministic in tests, and the connection counts are a test suite's.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath
from typing import Any

from provisioner._accept import ACCEPT_EXHAUSTED, AcceptBackoff
from provisioner.errors import RuntimeProblem
from provisioner.runtime.recipes import RELAY_SCRIPT, WORKER_PORT, ContainerRecipe

LOOPBACK = "127.0.0.1"
BUFFER = 256 * 1024
# accept(2) on a listener that stop() or close_port() shut down or closed.
_CLOSED = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})


class ServedWorker:
    """A worker container's process: the bridge server on ``127.0.0.1:port``."""

    def __init__(self, recipe: ContainerRecipe) -> None:
        from provisioner.bridge.protocol import BRIDGE_TOKEN_ENV, CONTROL_TOKEN_ENV
        from provisioner.bridge.server import READY_PREFIX, BridgeServer, startup_lm_config
        from provisioner.bridge.service import BridgeService
        from provisioner.settings import WorkerSettings

        env = {**recipe.environment, **recipe.secret_environment}
        config = _host_paths(startup_lm_config(env), recipe)
        self.container_port = _option(recipe.command, "--port", WORKER_PORT)
        # The worker's settings the way `provision worker` reads them (PROVISION_WORKER__* into
        # WorkerSettings, which forbids unknown keys: a setting the fake does not know fails loudly).
        prefix = "PROVISION_WORKER__"
        worker = WorkerSettings.model_validate(
            {key[len(prefix):].lower(): value for key, value in env.items() if key.startswith(prefix)}
        )
        self.service = BridgeService(
            config,
            worker_id=env.get("PROVISION_WORKER_ID"),
            control_token=env.get(CONTROL_TOKEN_ENV) or None,
            bridge_token=env.get(BRIDGE_TOKEN_ENV) or None,
            max_programs=worker.max_programs,
            max_sessions=worker.max_sessions,
        )
        self.server = BridgeServer(
            self.service,
            max_frame_bytes=worker.max_frame_bytes,
            max_inflight=worker.max_inflight,
            max_connections=worker.max_connections,
            request_timeout_s=float(env.get("PROVISION_PROCESS_TIMEOUT", "30")),
            max_inflight_bytes=worker.max_inflight_bytes,
            frame_timeout_s=worker.frame_timeout_s,
            pids=None,  # this process's cgroup is not the container's
            max_inflight_per_session=worker.max_inflight_per_session,
        )
        try:
            self.port = self.server.listen(LOOPBACK, 0)
        except BaseException:
            self.server.close(timeout=0)
            raise
        self.ready_line = f"{READY_PREFIX} port={self.container_port}"  # what `provision worker` prints

    def stop(self) -> None:
        self.server.request_stop()
        self.server.close(timeout=2.0)


class ServedRelay:
    """A relay container's process: one loopback listener per route (``LISTEN=ALIAS:PORT``).

    ``resolve(alias, port)`` gives the loopback port of the worker that holds ``alias`` now, or None.
    ``host_ports`` (container port -> loopback port) pins listeners, as a re-created relay asks for.
    """

    def __init__(
        self,
        recipe: ContainerRecipe,
        resolve: Callable[[str, int], int | None],
        *,
        host_ports: Mapping[int, int] | None = None,
    ) -> None:
        from provisioner.runtime.relay import parse_routes

        command = list(recipe.command)
        routes = parse_routes(command[command.index(RELAY_SCRIPT) + 1:])
        self._resolve = resolve
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._threads: list[threading.Thread] = []
        self.ports: dict[int, int] = {}  # container port -> 127.0.0.1 port
        self._listeners: list[socket.socket] = []
        for listen, alias, port in routes:
            listener = socket.create_server((LOOPBACK, (host_ports or {}).get(listen, 0)))
            self._listeners.append(listener)
            self.ports[listen] = listener.getsockname()[1]
            self._spawn(self._accept, listener, alias, port)

    def close_port(self, host_port: int) -> None:
        """The forwarder of ``host_port`` dies: new connections are refused, the ones it carried
        are cut (as when docker-proxy exits); the other ports go on."""
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                if listener.getsockname()[1] == host_port:
                    listener.shutdown(socket.SHUT_RDWR)  # wakes its accept(); a bare close would not
                    listener.close()
        with self._lock:
            carried = [p for p in self._pairs if _local_port(p.sockets[0]) == host_port]
            self._pairs.difference_update(carried)
        for pair in carried:
            pair.close()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=f"fake-relay-{target.__name__}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket, alias: str, port: int) -> None:
        backoff = AcceptBackoff(f"fake relay on {LOOPBACK}:{listener.getsockname()[1]}", self._stopped.wait)
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError as exc:
                if self._stopped.is_set() or listener.fileno() == -1 or exc.errno in _CLOSED:
                    return  # closed (or shut down) by stop() or close_port()
                if exc.errno in ACCEPT_EXHAUSTED:
                    backoff.failed(exc, refused=False)  # the connection stays queued: wait, retry
                # else: e.g. the peer reset before we accepted; keep serving (the real relay's
                # asyncio loop does both)
                continue
            backoff.succeeded()
            target = self._resolve(alias, port)
            upstream = None
            if target is not None:
                with contextlib.suppress(OSError):
                    upstream = socket.create_connection((LOOPBACK, target), timeout=5.0)
            if upstream is None:  # the worker is not there (yet, or any more): close, as the relay does
                client.close()
                continue
            upstream.settimeout(None)
            pair = _Pair(client, upstream)
            with self._lock:
                if self._stopped.is_set():
                    pair.close()
                    return
                self._pairs.add(pair)
            self._spawn(self._pipe, pair, client, upstream)
            self._spawn(self._pipe, pair, upstream, client)

    def _pipe(self, pair: _Pair, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(BUFFER):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            with self._lock:
                pair.open_directions -= 1
                if pair.open_directions == 0:  # both directions done: the pair is finished
                    self._pairs.discard(pair)
                    pair.close()

    def stop(self) -> None:
        self._stopped.set()
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            live, self._pairs = set(self._pairs), set()
            threads = list(self._threads)
        for pair in live:
            pair.close()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5.0)


class _Pair:
    """A forwarded connection: the client's socket and the worker's."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (client, upstream)
        self.open_directions = 2

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _local_port(sock: socket.socket) -> int | None:
    try:
        return int(sock.getsockname()[1])
    except OSError:  # closed already
        return None


def _option(command: tuple[str, ...], name: str, default: int) -> int:
    args = list(command)
    return int(args[args.index(name) + 1]) if name in args[:-1] else default


def _host_paths(config: Any, recipe: ContainerRecipe) -> Any:
    """The LM configuration with paths inside the container (``/provision/cassettes``, the run's LM
    directory) mapped back to the host folders mounted there — what the worker's files really are."""

    def host(path: Any) -> Any:
        if path is None:
            return None
        inside = PurePosixPath(str(path))
        for mount in recipe.mounts:
            target = PurePosixPath(mount.target)
            if inside == target or target in inside.parents:
                from pathlib import Path

                return Path(mount.source) / inside.relative_to(target)
        return path

    return config.model_copy(update={"cache_dir": host(config.cache_dir), "run_dir": host(config.run_dir)})


def refuse_unservable(recipe: ContainerRecipe) -> None:
    """Raise :class:`RuntimeProblem` for a container this process cannot stand in for: the Gemini
    stand-in (its URL names an alias only the run network resolves) and a fork-mode worker (isolation
    ``process``: forking this multi-threaded test process per connection is unsafe)."""
    if recipe.role == "standin":
        what = "the Gemini stand-in (real mode without GEMINI_TEST_API_KEY); use a mock or cached layer"
    elif recipe.role == "worker" and "--fork" in recipe.command:
        what = "fork-mode workers (layer isolation 'process'); use a layer with another isolation"
    else:
        return
    raise RuntimeProblem(
        f"could not start container {recipe.name}: FakeRuntime(serve=True) serves bridge workers and "
        f"relays, not {what} on the fake runtime, or a real engine"
    )
