"""A local stand-in for the Gemini API, speaking its REST wire format.

``POST /{v1,v1beta}/models/{model}:generateContent`` with the key in ``x-goog-api-key`` or
``?key=``; the body's ``systemInstruction``/``system_instruction``, ``contents`` and
``generationConfig`` are read in camelCase or snake_case, as Google accepts both. The reply has
``candidates[0].content.parts[].text``, ``finishReason``, ``usageMetadata`` (``promptTokenCount``,
``candidatesTokenCount``, ``totalTokenCount``, and ``thoughtsTokenCount`` /
``cachedContentTokenCount`` when configured), ``modelVersion`` (the requested model) and
``responseId``. ``set_usage(omit=...)`` leaves counts (or the whole ``usageMetadata``) out of
the replies, as some proxies and error paths do. Errors use Google's envelope
``{"error": {"code", "message", "status", "details"}}``:

* no key → ``403 PERMISSION_DENIED``; a wrong key → ``400 INVALID_ARGUMENT`` with an
  ``ErrorInfo`` reason ``API_KEY_INVALID`` (what Google answers for an invalid key), or
  ``403 PERMISSION_DENIED`` with ``wrong_key_status=403`` (a revoked/leaked key);
* injected ``429 RESOURCE_EXHAUSTED`` (with ``Retry-After`` and a ``RetryInfo`` detail) or
  ``500 INTERNAL`` / ``503 UNAVAILABLE``;
* an unknown route → ``404 NOT_FOUND``.

By default it answers like the mock LM — a well-formed answer for whatever DSPy signature the
prompt carries — so a whole DSPy program runs against it; scripted replies take precedence.
Only the standard library plus provisioner's own mock code is used, so it runs in the worker image
(``provision standin gemini --host 0.0.0.0 --port 8080``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from provisioner._accept import ACCEPT_EXHAUSTED, AcceptBackoff
from provisioner._files import atomic_write
from provisioner.lm.mock import MockEngine
from provisioner.lm.signature import parse_prompt
from provisioner.reprs import safe_repr

READY_LINE = "PROVISION_STANDIN_READY"
_ROUTE = re.compile(r"^/(?P<version>v1|v1beta|v1alpha)/models/(?P<model>[^/:]+):(?P<method>[A-Za-z]+)$")
_MAX_BODY = 32 * 1024 * 1024


log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` that survives running out of descriptors.

    socketserver's loop swallows an ``accept()`` error and selects again; with EMFILE the
    connection stays queued and the listener readable, so it spun at 100 % CPU until descriptors
    came back. Here the accept backs off (10 ms doubling to 1 s, reset on success), and
    :meth:`shutdown` still ends a wait at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._stopping = threading.Event()
        self.backoff = AcceptBackoff(f"Gemini stand-in on port {self.server_address[1]}",
                                     self._stopping.wait, log)

    def get_request(self) -> tuple[Any, Any]:
        try:
            request = super().get_request()
        except OSError as exc:
            if exc.errno in ACCEPT_EXHAUSTED:
                self.backoff.failed(exc, refused=False)
            raise  # socketserver ignores it and selects again
        self.backoff.succeeded()
        return request

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()


@dataclass
class StandinReply:
    """One scripted answer: a text, or an error status (with optional Retry-After)."""

    text: str | None = None
    status: int = 200
    retry_after: float | None = None
    finish_reason: str = "STOP"
    thoughts_tokens: int = 0
    cached_tokens: int = 0
    latency_ms: int = 0


@dataclass
class RecordedRequest:
    """What the stand-in saw of one request (the key itself is never kept)."""

    model: str
    version: str
    method: str
    body: dict[str, Any]
    key_source: str | None  # "header", "query" or None
    key_ok: bool


_STATUS_NAMES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}


def _tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / 4) if text else 0


def _texts(value: Any) -> str:
    """All ``parts[].text`` of a Content (or a bare string, as Google also accepts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "".join(str(p.get("text", "")) for p in value.get("parts", []) if isinstance(p, dict))
    return ""


@dataclass
class _State:
    api_key: str | None
    wrong_key_status: int
    latency_ms: int
    thoughts_tokens: int
    cached_tokens: int
    omit_usage: frozenset[str] = frozenset()
    script: deque[StandinReply] = field(default_factory=deque)
    requests: list[RecordedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class GeminiStandin:
    """A Gemini API stand-in on a local port (threaded; start/stop or use as a context manager).

    ``api_key``: the only key accepted (``None`` = any non-empty key). ``latency_ms`` delays every
    reply (a simulated slow server). ``thoughts_tokens`` / ``cached_tokens`` are reported in
    every reply's ``usageMetadata`` to exercise billing of thinking and cached tokens.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 wrong_key_status: int = 400, latency_ms: int = 0, thoughts_tokens: int = 0,
                 cached_tokens: int = 0, mock: MockEngine | None = None) -> None:
        if wrong_key_status not in (400, 401, 403):
            raise ValueError(f"wrong_key_status must be 400, 401 or 403, got {wrong_key_status}")
        self.host = host
        self._requested_port = port
        self._state = _State(api_key, wrong_key_status, latency_ms, thoughts_tokens, cached_tokens)
        self._mock = mock or MockEngine(count_calls=False)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @safe_repr
    def __repr__(self) -> str:
        return f"GeminiStandin(url={self.url if self._server else None!r}, requests={self.request_count})"

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> GeminiStandin:
        if self._server is not None:
            return self
        handler = _make_handler(self._state, self._mock)
        self._server = _Server((self.host, self._requested_port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="gemini-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> GeminiStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the stand-in is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL to give google-genai (``HttpOptions(base_url=...)``) or ``lm.base_url``."""
        host = self.host if self.host not in ("0.0.0.0", "") else "127.0.0.1"  # noqa: S104
        return f"http://{host}:{self.port}/"

    # -- scripting --------------------------------------------------------------------------

    def script(self, *replies: str | StandinReply) -> None:
        """Queue replies, used in order before the default mock answers."""
        with self._state.lock:
            for reply in replies:
                self._state.script.append(StandinReply(text=reply) if isinstance(reply, str) else reply)

    def fail_next(self, count: int = 1, *, status: int = 429, retry_after: float | None = None) -> None:
        """Make the next ``count`` requests fail with ``status`` (429, 500, 503, ...)."""
        self.script(*[StandinReply(status=status, retry_after=retry_after) for _ in range(count)])

    def set_latency(self, latency_ms: int) -> None:
        with self._state.lock:
            self._state.latency_ms = latency_ms

    def set_usage(self, *, thoughts_tokens: int | None = None, cached_tokens: int | None = None,
                  omit: Iterable[str] | None = None) -> None:
        """Counts every reply reports; ``omit`` names ``usageMetadata`` keys to leave out
        (``"promptTokenCount"``, ``"candidatesTokenCount"``, ``"totalTokenCount"``, …) or
        ``"usageMetadata"`` for the whole object; ``omit=()`` reports everything again."""
        with self._state.lock:
            if thoughts_tokens is not None:
                self._state.thoughts_tokens = thoughts_tokens
            if cached_tokens is not None:
                self._state.cached_tokens = cached_tokens
            if omit is not None:
                self._state.omit_usage = frozenset(omit)

    @property
    def request_count(self) -> int:
        with self._state.lock:
            return len(self._state.requests)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._state.lock:
            return list(self._state.requests)

    def reset(self) -> None:
        with self._state.lock:
            self._state.requests.clear()
            self._state.script.clear()
            self._state.omit_usage = frozenset()


def _error_body(code: int, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "status": _STATUS_NAMES.get(code, "UNKNOWN")}
    if details:
        error["details"] = details
    return {"error": error}


def _make_handler(state: _State, mock: MockEngine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "GeminiStandin/1"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: requests can carry ?key=
            return

        def _send(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            payload = json.dumps(body).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self._send(404, _error_body(404, "The stand-in serves POST :generateContent only."))

        def do_POST(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                self._send(400, _error_body(400, "Request payload size exceeds the limit."))
                return
            raw = self.rfile.read(length) if length else b""
            route = _ROUTE.match(parts.path)
            if route is None or route["method"] != "generateContent":
                self._send(404, _error_body(404, f"Method not found: {parts.path}"))
                return
            header_key = self.headers.get("x-goog-api-key")
            query_keys = parse_qs(parts.query).get("key") or []
            query_key = query_keys[0] if query_keys else None
            key = header_key or query_key
            source = "header" if header_key else ("query" if query_key else None)
            key_ok = bool(key) and (state.api_key is None or hmac.compare_digest(str(key), state.api_key))
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError:
                self._send(400, _error_body(400, "Invalid JSON payload received."))
                return
            with state.lock:
                state.requests.append(RecordedRequest(route["model"], route["version"], route["method"],
                                                      body, source, key_ok))
                reply = state.script.popleft() if (key_ok and state.script) else None
                latency = state.latency_ms
                thoughts, cached = state.thoughts_tokens, state.cached_tokens
                omit = state.omit_usage
            if not key:
                self._send(403, _error_body(
                    403, "Method doesn't allow unregistered callers (callers without established identity). "
                         "Please use API Key or other form of API consumer identity to call this API."))
                return
            if not key_ok:
                if state.wrong_key_status == 400:
                    self._send(400, _error_body(400, "API key not valid. Please pass a valid API key.", [{
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"}}]))
                else:
                    self._send(state.wrong_key_status, _error_body(
                        state.wrong_key_status, "Permission denied: the API key was rejected."))
                return
            delay_ms = latency + (reply.latency_ms if reply else 0)
            if delay_ms:
                time.sleep(delay_ms / 1000)  # a simulated slow server
            if reply is not None and reply.status != 200:
                self._send_failure(reply)
                return
            self._answer(route["model"], body, reply, thoughts, cached, omit)

        def _send_failure(self, reply: StandinReply) -> None:
            code = reply.status
            headers: dict[str, str] = {}
            details: list[dict[str, Any]] = []
            if reply.retry_after is not None:
                headers["Retry-After"] = f"{reply.retry_after:g}"
                details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                "retryDelay": f"{reply.retry_after:g}s"})
            messages = {429: "Resource has been exhausted (e.g. check quota).",
                        500: "An internal error has occurred. Please retry or report.",
                        503: "The model is overloaded. Please try again later."}
            self._send(code, _error_body(code, messages.get(code, "Injected failure."), details), headers)

        def _answer(self, model: str, body: dict[str, Any], reply: StandinReply | None,
                    thoughts: int, cached: int, omit: frozenset[str] = frozenset()) -> None:
            system = _texts(body.get("systemInstruction", body.get("system_instruction")))
            turns: list[tuple[str, str]] = []
            for content in body.get("contents") or []:
                if isinstance(content, dict):
                    role = "assistant" if content.get("role") == "model" else "user"
                    turns.append((role, _texts(content)))
                elif isinstance(content, str):
                    turns.append(("user", content))
            config = body.get("generationConfig", body.get("generation_config")) or {}
            wants_json = str(config.get("responseMimeType", config.get("response_mime_type", ""))) == (
                "application/json")
            if reply is not None and reply.text is not None:
                text = reply.text
            else:
                text, _ = mock.answer(parse_prompt(system, turns, json_requested=wants_json))
            finish = reply.finish_reason if reply else "STOP"
            max_out = config.get("maxOutputTokens", config.get("max_output_tokens"))
            output_tokens = _tokens(text)
            if isinstance(max_out, int) and output_tokens > max_out:
                # Like Gemini: never more output than allowed; the answer is cut and says so.
                text = text.encode("utf-8")[: max_out * 4].decode("utf-8", "ignore")
                output_tokens = max_out
                finish = "MAX_TOKENS"
            prompt_tokens = _tokens(system) + sum(_tokens(t) for _, t in turns)
            thoughts = reply.thoughts_tokens if reply and reply.thoughts_tokens else thoughts
            if isinstance(max_out, int):
                thoughts = min(thoughts, max(max_out - output_tokens, 0))  # thinking counts against it
            cached = min(reply.cached_tokens if reply and reply.cached_tokens else cached, prompt_tokens)
            usage: dict[str, Any] = {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": output_tokens,
                "totalTokenCount": prompt_tokens + output_tokens + thoughts,
            }
            if thoughts:
                usage["thoughtsTokenCount"] = thoughts
            if cached:
                usage["cachedContentTokenCount"] = cached
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]
            answer: dict[str, Any] = {
                "candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                "finishReason": finish, "index": 0}],
                "usageMetadata": {k: v for k, v in usage.items() if k not in omit},
                "modelVersion": model,
                "responseId": f"standin-{digest}",
            }
            if "usageMetadata" in omit:
                del answer["usageMetadata"]
            self._send(200, answer)

    return Handler


def ready_line(port: int) -> str:
    """The line ``provision standin gemini`` prints once it listens (like the worker's ready line)."""
    return f"{READY_LINE} port={port}"


def serve(*, host: str, port: int, api_key: str | None, ready_file: Path | None = None,
          latency_ms: int = 0, stop: threading.Event | None = None, fail_first: int = 0,
          fail_status: int = 429, retry_after: float | None = None) -> None:
    """Run a stand-in until ``stop`` is set or SIGTERM/SIGINT arrives (the CLI command).

    Prints :func:`ready_line` once listening and, like the worker, writes the port to
    ``ready_file`` atomically (readers see nothing or the whole number). The SIGTERM/SIGINT
    handlers it installs (main thread only) are the previous ones again when it returns, as
    ``provision worker``'s are: a caller in the same process (a test) keeps its own.
    ``fail_first``: the first that many requests are answered ``fail_status`` (asking for
    ``retry_after`` seconds, if given), as :meth:`GeminiStandin.fail_next`.
    """
    import signal

    stop = stop or threading.Event()
    standin = GeminiStandin(host=host, port=port, api_key=api_key, latency_ms=latency_ms).start()
    if fail_first:
        standin.fail_next(fail_first, status=fail_status, retry_after=retry_after)
    previous: dict[signal.Signals, Any] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
        if ready_file is not None:
            atomic_write(ready_file, f"{standin.port}\n")
        print(ready_line(standin.port), flush=True)
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        standin.stop()
