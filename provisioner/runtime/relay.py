"""The run's port relay: a tiny TCP forwarder that runs in its own container.

``python3 -I /opt/provisioner/relay.py 9000=w0:8765 9001=w1:8765`` (this file, copied into the
worker image; ``python -m provisioner.runtime.relay`` works too) listens on each left-hand port
and forwards every connection to the right-hand ``alias:port``, resolved through Docker's embedded
DNS — so a replaced worker that takes over a slot's alias is reachable at the same published address.
A resolved address is reused for at most :data:`RESOLVE_TTL_S` and dropped when a connection to it
fails (:class:`_Resolver`): a suite opening a connection per test (isolation ``process``) then skips
the lookup on almost every connection, while a replaced worker, which takes longer than that to
start listening, is always looked up afresh.

Why a relay at all: workers of mock and cached layers sit on an ``internal`` network (no route out
of the host), and Docker publishes no ports from internal networks. The relay is on that network and
on an ordinary one, and only its ports are published, on 127.0.0.1. It imports nothing but the
standard library: it starts in milliseconds and carries no LM code or key.

``relay.py --check 9000 9001`` is its HEALTHCHECK: every listening port accepts a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys

BUFFER = 256 * 1024
# The longest the relay waits for a worker to accept its half of a client's connection (seconds).
# A worker killed while the bridge network's neighbour entry for it is still valid drops the
# relay's SYNs without a reply; the kernel then retries for about two minutes (a new user's client
# hung 40-60 s during a heal, then reached the replacement that took the old address). Past this,
# the client's connection is closed like one to a worker that is not there: it retries or reports.
CONNECT_TIMEOUT_S = 5.0
# How long a worker alias's resolved address is reused (seconds). A lookup through Docker's embedded
# DNS cost 2.0 ms p50 per connection from inside the relay (docs/benchmarks.md, "Process isolation":
# the per-hop table), on the path of every test of a ``process`` layer, which connects once per test.
# A replaced worker re-uses the alias with a new address and is ready only after its Python start-up
# (0.7 s or more, the same table's notes), so no connection that could reach it sees the old address
# for long; a failed connection drops the address at once.
RESOLVE_TTL_S = 0.5


class _Resolver:
    """Resolved ``(host, port)`` addresses, each reused for ``ttl_s`` seconds (monotonic clock).

    :meth:`address` returns an IPv4/IPv6 address string (or ``host`` itself when it is one);
    :meth:`forget` drops an address after a failed connection. Raises ``OSError`` (``socket.gaierror``)
    when the name does not resolve, as ``open_connection`` did.
    """

    def __init__(self, ttl_s: float = RESOLVE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._known: dict[tuple[str, int], tuple[str, float]] = {}

    async def address(self, host: str, port: int) -> str:
        loop = asyncio.get_running_loop()
        known = self._known.get((host, port))
        if known is not None and loop.time() < known[1]:
            return known[0]
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        address = str(infos[0][4][0])
        self._known[(host, port)] = (address, loop.time() + self.ttl_s)
        return address

    def forget(self, host: str, port: int) -> None:
        self._known.pop((host, port), None)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


def _handler(host: str, port: int, connect_timeout_s: float,  # type: ignore[no-untyped-def]
             resolver: _Resolver):
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(
                _connect(resolver, host, port), connect_timeout_s
            )
        except OSError:  # TimeoutError (wait_for) is an OSError too
            # The worker is not there (yet, or any more), or does not answer: close, the client
            # retries or reports; the next connection looks its address up again.
            resolver.forget(host, port)
            client_writer.close()
            return
        try:
            await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))
        finally:
            for w in (client_writer, upstream_writer):
                with contextlib.suppress(Exception):
                    w.close()

    return handle


async def _connect(resolver: _Resolver, host: str, port: int) -> tuple[asyncio.StreamReader,
                                                                        asyncio.StreamWriter]:
    return await asyncio.open_connection(await resolver.address(host, port), port)


def parse_routes(args: list[str]) -> list[tuple[int, str, int]]:
    """``LISTEN=HOST:PORT`` arguments as (listen port, host, port)."""
    routes = []
    for arg in args:
        try:
            listen, target = arg.split("=", 1)
            host, port = target.rsplit(":", 1)
            routes.append((int(listen), host, int(port)))
        except ValueError:
            raise SystemExit(
                f"relay: bad route {arg!r}; expected LISTEN=HOST:PORT, e.g. 9000=w0:8765"
            ) from None
    if not routes:
        raise SystemExit("relay: no routes given; expected LISTEN=HOST:PORT ...")
    return routes


async def serve(
    routes: list[tuple[int, str, int]],
    *,
    bind: str = "0.0.0.0",  # noqa: S104 - inside its container; only 127.0.0.1 is published
    handle_signals: bool = True,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    resolve_ttl_s: float = RESOLVE_TTL_S,
) -> None:
    """Listen on every route's port on ``bind`` and forward until SIGTERM/SIGINT (or cancellation).
    A client's connection is closed when its worker does not accept within ``connect_timeout_s``;
    a worker's resolved address is reused for ``resolve_ttl_s`` (:data:`RESOLVE_TTL_S`)."""
    resolver = _Resolver(resolve_ttl_s)
    servers = [
        await asyncio.start_server(_handler(host, port, connect_timeout_s, resolver), bind, listen,
                                   reuse_address=True)
        for listen, host, port in routes
    ]
    print("PROVISION_RELAY_READY " + " ".join(f"{lp}={h}:{p}" for lp, h, p in routes), flush=True)
    stop = asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for server in servers:
            server.close()


def check(ports: list[str], *, host: str = "127.0.0.1", timeout: float = 2.0) -> int:
    """The relay's HEALTHCHECK (``relay.py --check 9000 9001``): 0 when every port accepts a
    connection on ``host``, else 1 with the first port that does not."""
    if not ports:
        print("relay --check: no ports given; expected --check PORT ...")
        return 1
    for port in ports:
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                pass
        except (OSError, ValueError) as exc:
            print(f"unhealthy: relay port {port}: {exc}")
            return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--check"]:
        sys.exit(check(args[1:]))
    asyncio.run(serve(parse_routes(args)))


if __name__ == "__main__":
    main()
