"""The relay forwards bytes both ways and closes connections to absent workers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from provisioner.runtime.relay import parse_routes, serve

from .._helpers import echo, tcp_listener


def test_parse_routes() -> None:
    assert parse_routes(["9000=w0:8765", "9001=w1:8765"]) == [(9000, "w0", 8765), (9001, "w1", 8765)]
    with pytest.raises(SystemExit, match="bad route"):
        parse_routes(["9000-w0"])
    with pytest.raises(SystemExit, match="no routes"):
        parse_routes([])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections for the block: bound, never listening, held — not a
    port that was free a moment ago, which anything else on the machine may bind meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@contextlib.contextmanager
def _relay(routes: list[tuple[int, str, int]], **options: Any) -> Iterator[socket.socket]:
    """The relay serving ``routes`` on 127.0.0.1 in a thread; yields a connection to the first
    route's port once it accepts (polled), and stops the relay after the block."""
    loop = asyncio.new_event_loop()
    task: list[asyncio.Task[None]] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        task.append(loop.create_task(serve(routes, bind="127.0.0.1", handle_signals=False, **options)))
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task[0])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield _connect_when_listening(routes[0][0])
    finally:
        while not task:
            threading.Event().wait(0.01)
        loop.call_soon_threadsafe(task[0].cancel)
        thread.join(timeout=5)


def _connect_when_listening(port: int) -> socket.socket:
    for _ in range(200):
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=1)
        except OSError:
            threading.Event().wait(0.01)
    pytest.fail(f"the relay did not listen on {port}")


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A loopback server that answers every chunk in upper case (the relay's upstream)."""
    with tcp_listener(echo(bytes.upper)) as port:
        yield port


def test_relay_forwards_and_drops_connections_to_missing_targets(echo_server: int) -> None:
    live, dead = _free_port(), _free_port()
    with _refusing_port() as missing_target, \
            _relay([(live, "127.0.0.1", echo_server), (dead, "127.0.0.1", missing_target)]) as conn:
        with conn:
            payload = b"x" * 300_000
            conn.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += conn.recv(65536)
            assert got == payload.upper()
        with socket.create_connection(("127.0.0.1", dead), timeout=2) as conn:
            assert conn.recv(10) == b""  # closed: no worker behind this slot


@pytest.fixture
def unanswering_port() -> Iterator[int]:
    """A loopback port whose SYNs go unanswered: a listener whose accept queue is full (Linux drops
    SYNs then), like a killed worker's address behind a still-valid neighbour entry."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    try:
        while True:  # fill the queue until a connect is not answered
            probe = socket.socket()
            probe.settimeout(0.5)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                probe.close()
                break
            queued.append(probe)
            assert len(queued) < 64, "the accept queue never filled"
        yield port
    finally:
        for conn in queued:
            conn.close()
        listener.close()


def test_a_worker_that_does_not_answer_closes_the_clients_connection(unanswering_port: int) -> None:
    """A new user's client hung 40-60 s on a connection made while its worker was being replaced:
    the relay waited for the kernel's SYN retries. It now gives up after its connect timeout."""
    with _relay([(_free_port(), "127.0.0.1", unanswering_port)], connect_timeout_s=0.5) as conn, conn:
        conn.settimeout(30)  # the kernel alone would retry the SYN for about two minutes
        assert conn.recv(10) == b""  # closed by the relay, not left hanging


def test_check_passes_when_every_port_accepts_and_names_the_first_that_does_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from provisioner.runtime.relay import check

    listening = socket.create_server(("127.0.0.1", 0))
    try:
        with _refusing_port() as refusing:
            port, closed = str(listening.getsockname()[1]), str(refusing)
            assert check([port]) == 0
            assert check([port, closed]) == 1
            assert f"relay port {closed}" in capsys.readouterr().out
            assert check([]) == 1 and "no ports given" in capsys.readouterr().out
    finally:
        listening.close()


def test_main_with_check_exits_with_its_status() -> None:
    from provisioner.runtime.relay import main

    with _refusing_port() as refusing, pytest.raises(SystemExit) as info:
        main(["--check", str(refusing)])
    assert info.value.code == 1


def test_a_worker_s_address_is_reused_for_the_ttl_and_looked_up_again_after_a_failed_connection() -> None:
    """A ``process`` layer connects once per test; the relay looked the worker's alias up through
    Docker's DNS every time (2 ms p50 on the test's path). It reuses the address for ``ttl_s`` and
    forgets it when a connection to it fails, so a replaced worker's new address is found."""
    from provisioner.runtime.relay import _Resolver

    answers = iter(["10.0.0.2", "10.0.0.3", "10.0.0.4"])
    lookups: list[tuple[str, int]] = []

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()

        async def getaddrinfo(host: str, port: int, **_kw: object) -> list[tuple[object, ...]]:
            lookups.append((host, port))
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

        loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign,assignment]
        cached, fresh = _Resolver(ttl_s=3600), _Resolver(ttl_s=0)
        seen = [await cached.address("w0", 8765), await cached.address("w0", 8765)]
        cached.forget("w0", 8765)  # a connection to 10.0.0.2 failed: the worker was replaced
        seen.append(await cached.address("w0", 8765))
        seen.append(await fresh.address("w1", 8765))  # expired at once: looked up every time
        return seen

    assert asyncio.run(scenario()) == ["10.0.0.2", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    assert lookups == [("w0", 8765), ("w0", 8765), ("w1", 8765)]


def test_the_relay_forwards_to_a_worker_named_by_alias() -> None:
    """Routes name workers by alias (``w0:8765``); the relay resolves the name, here ``localhost``."""
    with tcp_listener(echo(bytes.upper)) as upstream:
        listen = _free_port()
        with _relay([(listen, "localhost", upstream)]) as first:
            for attempt in range(3):  # the second and third reuse the address
                conn = first if attempt == 0 else _connect_when_listening(listen)
                with conn:
                    conn.sendall(b"ping %d" % attempt)
                    assert conn.recv(100) == b"PING %d" % attempt
