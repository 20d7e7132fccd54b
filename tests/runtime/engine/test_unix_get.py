"""The leak check's bounded ``/events`` read goes through ``_UnixGet`` (a kept-open Unix socket, a
minimal HTTP/1.1 reader): every body shape the engine may send, a broken connection, a reconnect."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.runtime.engine.docker import _UnixGet


class _Server:
    """A Unix-socket server answering each request with the next of ``answers`` (raw bytes); None
    closes the connection instead of answering, as does an answer saying ``Connection: close``
    after it is sent."""

    def __init__(self, path: Path, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                data = b""
                while self.answers:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    if b"\r\n\r\n" not in data:
                        break
                    request, _, data = data.partition(b"\r\n\r\n")
                    self.requests.append(request)
                    answer = self.answers.pop(0)
                    if answer is None:
                        break
                    conn.sendall(answer)
                    if b"Connection: close" in answer:
                        break

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "engine.sock"


def test_chunked_sized_and_empty_bodies_over_one_connection(sock_path: Path) -> None:
    server = _Server(sock_path, [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\n{\"a\":\r\n3;ext=1\r\n 1}\r\n0\r\nX-Trailer: y\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n0\r\n\r\n",
    ])
    client = _UnixGet(str(sock_path), timeout=10)
    try:
        assert client.get("/v1.41/events?since=1") == (200, b'{"a": 1}')
        assert client.get("/x") == (200, b"{}")
        assert client.get("/y") == (200, b"")
        assert server.connections == 1  # kept open between requests
        assert server.requests[0].startswith(b"GET /v1.41/events?since=1 HTTP/1.1\r\nHost: docker")
    finally:
        client.close()
        server.close()


def test_status_and_a_body_to_the_end_of_the_connection(sock_path: Path) -> None:
    server = _Server(sock_path, [b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\nno such thing",
                                 b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    client = _UnixGet(str(sock_path), timeout=10)
    try:
        assert client.get("/gone") == (404, b"no such thing")
        assert client.get("/again") == (200, b"")  # reconnected
        assert server.connections == 2
    finally:
        client.close()
        server.close()


def test_a_broken_connection_answers_none_and_the_next_request_reconnects(sock_path: Path) -> None:
    server = _Server(sock_path, [None, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nk"])
    client = _UnixGet(str(sock_path), timeout=10)
    try:
        assert client.get("/first") is None  # closed without an answer: the caller uses docker-py
        assert client.get("/second") == (200, b"k")
        assert server.connections == 2
    finally:
        client.close()
        server.close()


def test_no_engine_at_the_path_answers_none(tmp_path: Path) -> None:
    client = _UnixGet(str(tmp_path / "missing.sock"), timeout=1)
    assert client.get("/x") is None
