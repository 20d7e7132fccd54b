"""Talking to a bridge worker: :class:`BridgeClient` (TCP) and :class:`SessionClient` (one session).

Every error reply raises :class:`~provisioner.errors.BridgeError` with the worker's ``error_type``;
a worker that cannot be reached, times out or hangs up raises
:class:`~provisioner.errors.BridgeConnectionError` (a ``BridgeError`` subclass).

A client holds one connection and sends one request at a time (a lock makes it thread-safe); use
one client per thread when you want requests to run concurrently. After a connection error, or
when the worker closed the connection between requests, the next request reconnects: the worker's
state (sessions, programs, LMs) does not depend on the connection.

Except on a **fork-mode** worker (``provision worker --fork``, layer isolation ``process``): there the
connection *is* a process, and its state ends with it. A client that knows it talks to one
(``fork=True``, or a ``hello`` reply that says so) never reconnects: once its connection is lost,
every request raises :class:`~provisioner.errors.ProcessGoneError` naming the worker and the
process. A client that did not know finds out on reconnecting (it asks the fresh connection with a
``hello``) and raises the same error instead of carrying on in a fresh process.

With ``token=`` (the run's ``PROVISION_CONTROL_TOKEN``) every connection starts with a ``hello``
carrying it, which unlocks the worker-wide commands (``reset_state``, ``shutdown``, the default LM,
every session's stats); session commands need no token.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, BinaryIO, TypeVar, cast

from provisioner.bridge.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    Reply,
    decode_reply,
    dumps,
    encode_frame,
    read_frame,
)
from provisioner.errors import BridgeConnectionError, ProcessGoneError, ProtocolError, ProvisionerError
from provisioner.lm.callstats import record_elsewhere
from provisioner.reprs import safe_repr
from provisioner.settings import DEFAULT_PROCESS_TIMEOUT_S, reply_timeout

DEFAULT_SESSION = "anonymous"
# How long a client that lost its fork-mode process looks for how it ended (the worker's parent notes
# it once it has reaped the process, read through a new connection's get_stats; seconds).
ENDED_LOOKUP_S = 2.0
_T = TypeVar("_T")


# -- how the host names a session ---------------------------------------------------------------------
# A worker knows a session by its id only; the caller by the name it gave it (``env.session("smoke")``,
# a pytest node id). Everything the host shows the user — a worker's log window, an error a session's
# request raised, the errors of opening and closing one — names it ``<name> (<session id>)``: the name
# to recognise, the id to grep the worker's own log for. Rewritten on the host, not sent to the worker
# (docs/architecture.md, "How a request flows").

# The session ids provisioner hands out (provisioner.specs.new_session): "session_" and word characters;
# one already inside "(...)" is named already.
_SESSION_ID = re.compile(r"(?<!\()\bsession_[A-Za-z0-9_]+")


def session_name(session_id: str, label: str | None) -> str:
    """``<label> (<session id>)``, or the id alone for a session opened without a label."""
    return f"{label} ({session_id})" if label else session_id


def name_sessions(text: str, labels: Mapping[str, str]) -> str:
    """``text`` with each session id of ``labels`` (session id -> the name the caller gave it) shown
    as :func:`session_name` does; ids it does not know, and ids named already, stay as they are."""
    if not labels or "session_" not in text:
        return text

    def named(match: re.Match[str]) -> str:
        session = match.group(0)
        return session_name(session, labels.get(session))

    return _SESSION_ID.sub(named, text)


def name_session(text: str, session_id: str, label: str | None) -> str:
    """``text`` with ``session_id`` (any id, not only provisioner's ``session_…`` ones) named as
    :func:`session_name` does, where it is not named already; unchanged without a label."""
    if not label or session_id not in text:
        return text
    own = re.compile(rf"(?<![(\w-]){re.escape(session_id)}(?![\w-])")
    name = session_name(session_id, label)
    return own.sub(lambda _m: name, text)


def name_session_in(exc: BaseException, session_id: str, label: str | None) -> None:
    """Rewrite ``exc``'s message in place so it names ``session_id`` as :func:`name_session` does;
    nothing without a label. A message that does not contain the id (the worker's
    ``InvalidSignature: …``, ``CostLimitExceeded: program 'qa' failed: …``) gets
    `` (session <label> (<session id>))`` appended, once: a second call finds the id and leaves
    it. The exception keeps its type, attributes and traceback: callers re-raise it."""
    if not label:
        return

    def fix(text: str) -> str:
        return name_session(text, session_id, label)

    exc.args = tuple(fix(arg) if isinstance(arg, str) else arg for arg in exc.args)
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        exc.message = fix(message)  # type: ignore[attr-defined]
    if session_id in str(exc):
        return
    suffix = f" (session {session_name(session_id, label)})"
    # The message is the first argument (every ProvisionerError's str() shows it); BridgeError
    # shows its ``message`` attribute after the worker's error type.
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (exc.args[0] + suffix, *exc.args[1:])
    elif not exc.args:
        exc.args = (suffix.lstrip(),)
    if isinstance(message, str):
        exc.message = exc.message + suffix  # type: ignore[attr-defined]


def _drop_none(**args: Any) -> dict[str, Any]:
    return {k: v for k, v in args.items() if v is not None}


class BridgeCommands:
    """The worker's commands as methods, over any ``request(command, **args) -> dict``."""

    def request(self, command: str, **args: Any) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def ping(self) -> dict[str, Any]:
        return self.request("ping")

    def hello(self, token: str | None = None) -> dict[str, Any]:
        """``{status, protocol_version, worker_id, capabilities, control_token_required, commands}``;
        with the run's control token the connection gains the ``control`` capability."""
        return self.request("hello", **_drop_none(token=token))

    def configure_lm(self, session_id: str | None = None, **lm_fields: Any) -> dict[str, Any]:
        """Set the LM of ``session_id`` (or the worker default when None) from LMConfig fields."""
        return self.request("configure_lm", session_id=session_id, **lm_fields)

    def create_program(
        self,
        signature: dict[str, Any] | str,
        program_id: str | None = None,
        program_type: str = "predict",
        session_id: str = DEFAULT_SESSION,
    ) -> dict[str, Any]:
        return self.request(
            "create_program",
            **_drop_none(
                signature=signature, program_id=program_id, program_type=program_type, session_id=session_id
            ),
        )

    def execute_program(
        self, program_id: str, inputs: dict[str, Any], session_id: str = DEFAULT_SESSION
    ) -> dict[str, Any]:
        """``{program_id, session_id, outputs: {...}, execution_time_ms, lm_usage}`` (``lm_usage``: the
        LM calls the worker made for it, by kind — see :func:`provisioner.lm.callstats.tally`)."""
        return self.request("execute_program", program_id=program_id, inputs=inputs, session_id=session_id)

    def get_program_info(self, program_id: str, session_id: str = DEFAULT_SESSION) -> dict[str, Any]:
        return self.request("get_program_info", program_id=program_id, session_id=session_id)

    def list_programs(self, session_id: str = DEFAULT_SESSION, all_sessions: bool = False) -> dict[str, Any]:
        if all_sessions:
            return self.request("list_programs", all_sessions=True)
        return self.request("list_programs", session_id=session_id)

    def delete_program(self, program_id: str, session_id: str = DEFAULT_SESSION) -> dict[str, Any]:
        return self.request("delete_program", program_id=program_id, session_id=session_id)

    def get_stats(self) -> dict[str, Any]:
        return self.request("get_stats")

    def cleanup_session(self, session_id: str) -> dict[str, Any]:
        return self.request("cleanup_session", session_id=session_id)

    def reset_state(self) -> dict[str, Any]:
        return self.request("reset_state")

    def shutdown(self) -> dict[str, Any]:
        return self.request("shutdown")

    def session(self, session_id: str) -> SessionClient:
        """The program commands bound to one session (its own namespace and LM)."""
        return SessionClient(self, session_id)


class SessionClient:
    """One session's view of a worker: every program command carries this ``session_id``.

    ``label``: the name the caller gave the session (``env.session("smoke")``, the plugin's test node
    id; None: none). Every :class:`~provisioner.errors.ProvisionerError` a command raises names the
    session ``<label> (<session id>)`` (:func:`session_name`), as the worker log windows do — the
    worker itself knows the id only.

    ``close()`` (or leaving the ``with`` block) runs ``cleanup_session``: the session's programs and
    LM are gone afterwards.
    """

    def __init__(self, bridge: BridgeCommands, session_id: str, label: str | None = None) -> None:
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
        self.bridge = bridge
        self.session_id = session_id
        self.label = label
        self.closed = False

    @safe_repr
    def __repr__(self) -> str:
        label = f", label={self.label!r}" if self.label else ""
        return f"SessionClient(session_id={self.session_id!r}{label})"

    @property
    def name(self) -> str:
        """How the host names this session: ``<label> (<session id>)``, or the id."""
        return session_name(self.session_id, self.label)

    def _named(self, run: Callable[[], _T]) -> _T:
        try:
            return run()
        except ProvisionerError as exc:
            name_session_in(exc, self.session_id, self.label)
            raise

    def request(self, command: str, **args: Any) -> dict[str, Any]:
        """Any command, with this session's id added when the command takes one."""
        if command in _SESSION_COMMANDS:
            args.setdefault("session_id", self.session_id)
        return self._named(lambda: self.bridge.request(command, **args))

    def ping(self) -> dict[str, Any]:
        return self._named(self.bridge.ping)

    def configure_lm(self, **lm_fields: Any) -> dict[str, Any]:
        return self._named(lambda: self.bridge.configure_lm(session_id=self.session_id, **lm_fields))

    def create_program(
        self, signature: dict[str, Any] | str, program_id: str | None = None, program_type: str = "predict"
    ) -> dict[str, Any]:
        return self._named(
            lambda: self.bridge.create_program(signature, program_id, program_type, self.session_id)
        )

    def execute_program(self, program_id: str, inputs: dict[str, Any]) -> dict[str, Any]:
        return self._named(lambda: self.bridge.execute_program(program_id, inputs, self.session_id))

    def get_program_info(self, program_id: str) -> dict[str, Any]:
        return self._named(lambda: self.bridge.get_program_info(program_id, self.session_id))

    def list_programs(self) -> dict[str, Any]:
        return self._named(lambda: self.bridge.list_programs(self.session_id))

    def delete_program(self, program_id: str) -> dict[str, Any]:
        return self._named(lambda: self.bridge.delete_program(program_id, self.session_id))

    def cleanup(self) -> dict[str, Any]:
        return self._named(lambda: self.bridge.cleanup_session(self.session_id))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.cleanup()

    def __enter__(self) -> SessionClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_SESSION_COMMANDS = frozenset(
    {"configure_lm", "create_program", "execute_program", "get_program_info", "list_programs",
     "delete_program", "cleanup_session"}
)


class BridgeClient(BridgeCommands):
    """A synchronous client for one worker at ``host:port``.

    ``connect_timeout`` bounds connecting; ``request_timeout`` bounds waiting for each reply (pass
    ``timeout=`` to :meth:`call` to change it for one request), in seconds. Its default is the
    default ``process_timeout`` (30 s) plus :data:`~provisioner.settings.REPLY_GRACE_S` (5 s), so a
    request the worker stops at its deadline gets the worker's ``Timeout`` reply (a
    :class:`~provisioner.errors.BridgeError` carrying the calls made, ``lm_usage``), not a
    client-side timeout; for a worker with another ``process_timeout`` pass
    ``request_timeout=settings.request_timeout``. ``token``: the run's control
    token, presented in a ``hello`` on every (re)connection; a wrong one raises
    :class:`~provisioner.errors.BridgeError` with error_type ``Unauthorized`` on connecting.
    ``fork``: True for a fork-mode worker (a ``hello`` on connecting records its process; a lost
    connection raises :class:`~provisioner.errors.ProcessGoneError`, never a reconnect); None
    (default) learns it from the worker; False: an ordinary worker, reconnect freely.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 5.0,
        request_timeout: float = reply_timeout(DEFAULT_PROCESS_TIMEOUT_S),
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        token: str | None = None,
        fork: bool | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_frame_bytes = max_frame_bytes
        self._token = token or None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._reader: BinaryIO | None = None
        self._closed = False
        self._fork = fork
        # A fork-mode connection's process: {"mode": "fork", "pid", "parent_pid"} and the worker id.
        self.process: dict[str, Any] | None = None
        # Whether an earlier connection was answered (so state may have lived on it).
        self._connected_before = False
        self._gone: str | None = None

    @safe_repr
    def __repr__(self) -> str:
        return f"BridgeClient({self.host!r}, {self.port})"

    # -- connection --------------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection now (requests also connect on demand)."""
        with self._lock:
            self._ensure_connected()

    def _ensure_connected(self) -> tuple[socket.socket, BinaryIO]:
        if self._closed:
            raise BridgeConnectionError(f"{self!r} is closed")
        if self._gone is not None:
            raise ProcessGoneError(self._gone, worker=(self.process or {}).get("worker_id"))
        if self._sock is not None and self._reader is not None:
            if not self._peer_closed(self._sock):
                return self._sock, self._reader
            # The worker closed the connection while we were idle (restart, idle limit): nothing
            # was sent yet, so connecting again is safe — unless the connection was a process.
            self._drop_connection()
            if self._is_fork:
                raise self._process_gone("ended{how} while this client was idle (the connection closed)")
        if self._connected_before and self._is_fork:
            raise self._process_gone("is gone (its connection was lost)")
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise BridgeConnectionError(
                f"cannot connect to the bridge worker at {self.host}:{self.port}: {exc}"
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = cast(BinaryIO, sock.makefile("rb", buffering=65536))
        self._sock, self._reader = sock, reader
        reconnected = self._connected_before
        if self._token is not None or self._fork or (reconnected and self._fork is None):
            # A fork-mode worker says so (and which process this is) in its hello reply.
            args = {"token": self._token} if self._token is not None else {}
            try:
                hello = self._exchange(sock, reader, "hello", args, self.connect_timeout).unwrap()
            except BaseException:
                self._drop_connection()
                raise
            process = hello.get("process")
            if isinstance(process, dict) and process.get("mode") == "fork":
                if reconnected and self.process is None and self._fork is None:
                    # We did not know; our earlier process (and its state) is gone. Never carry on here.
                    self._drop_connection()
                    self._fork = True
                    self.process = {"worker_id": hello.get("worker_id")}
                    raise self._process_gone("is gone (its connection was lost; this client reached a fresh"
                                             " process instead)")
                self._fork = True
                self.process = {**process, "worker_id": hello.get("worker_id")}
            elif self._fork is None:
                self._fork = False
        return sock, reader

    @property
    def _is_fork(self) -> bool:
        return bool(self._fork)

    def _process_gone(self, what: str, *, ended: str | None = None) -> ProcessGoneError:
        """The error of every later request once a fork-mode connection is lost; ``what`` says what
        happened to the process ("ended{how} while this client was idle (...)"), ``{how}`` filled
        with how it ended when the worker can say; ``ended``: the words instead of ``what`` when it
        can (``what`` then says only that the process is gone: a broken connection need not mean
        its process ended).

        A closed socket carries no exit status: for ``{how}`` the client asks the worker, on a new
        connection (a fresh process, closed at once), whose ``get_stats`` lists how its last
        processes ended (``fork.ended``), for up to :data:`ENDED_LOOKUP_S` (the parent notes it
        once it reaped the process). Not found (the worker gone, busy or slow): the message points
        to the worker's log, where the parent logged it."""
        process = self.process or {}
        worker = process.get("worker_id") or "?"
        pid = process.get("pid")
        which = f"process {pid} (forked from {process.get('parent_pid')})" if pid else "the process"
        template = ended or what
        how_ended = None
        if pid and "{how}" in template:
            how_ended = self._how_it_ended(pid, process.get("parent_pid"))
        what = template.replace("{how}", f" {how_ended}") if how_ended else what.replace("{how}", "")
        if how_ended:
            how = "the worker's log has its line too"
        else:
            how = "the worker's log says how it ended"
            if pid:
                how += (f" ('process {pid} serving ... ended by signal ...' or '... by exit code ...'; a"
                        " failed test's report shows that log)")
        self._gone = (
            f"{which} of fork-mode worker {worker} at {self.host}:{self.port} that served this client"
            f" {what}; its sessions, programs and LM state went with it, and {how}. This client does"
            " not reconnect: open a new BridgeClient for a fresh process (under pytest: the next test"
            " gets one)"
        )
        return ProcessGoneError(self._gone, worker=process.get("worker_id"))

    def _how_it_ended(self, pid: int, parent_pid: int | None) -> str | None:
        """``"by signal SIGKILL"`` / ``"with exit code 70"``: how the worker says process ``pid`` of
        parent ``parent_pid`` ended (see :meth:`_process_gone`); None when it cannot say in time."""
        deadline = time.monotonic() + ENDED_LOOKUP_S
        try:
            with BridgeClient(self.host, self.port, connect_timeout=ENDED_LOOKUP_S,
                              request_timeout=ENDED_LOOKUP_S, token=self._token, fork=True) as probe:
                if probe.process is None or probe.process.get("parent_pid") != parent_pid:
                    return None  # another worker behind the address now (a replacement)
                while True:
                    for entry in probe.get_stats().get("fork", {}).get("ended", []):
                        if entry.get("pid") == pid:
                            if entry.get("signal"):
                                return f"by signal {entry['signal']}"
                            return f"with exit code {entry.get('exit_code')}"
                    if time.monotonic() >= deadline:
                        return None
                    time.sleep(0.05)  # polled, with the deadline above: the parent reaps soon
        except (ProvisionerError, OSError):
            return None

    @staticmethod
    def _peer_closed(sock: socket.socket) -> bool:
        """Whether an idle connection has something to read. Between requests nothing is owed to
        us, so that is the worker closing it (EOF, a reset, or its last error frame)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _drop_connection(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(OSError):
                self._reader.close()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._reader = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_connection()

    def __enter__(self) -> BridgeClient:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------------

    def request(self, command: str, **args: Any) -> dict[str, Any]:
        """Send ``command`` with ``args``; the reply's result, or ``BridgeError``."""
        return self.call(command, args)

    def call(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Like :meth:`request`, with the args as a dict and an optional per-request timeout."""
        wait = self.request_timeout if timeout is None else timeout
        with self._lock:
            sock, reader = self._ensure_connected()
            reply = self._exchange(sock, reader, command, args or {}, wait)
        if command == "execute_program":
            # The worker's LM calls for this request are this process's (a test's lm_cost, the
            # run report): mock calls have no other record (provisioner.lm.callstats). A failed
            # execution's calls (made before it failed) come in its error reply.
            usage = reply.result.get("lm_usage") if reply.success and reply.result else reply.lm_usage
            if isinstance(usage, dict):
                record_elsewhere(usage)
        return reply.unwrap()

    def _exchange(
        self, sock: socket.socket, reader: BinaryIO, command: str, args: dict[str, Any], wait: float
    ) -> Reply:
        """Send one request and read its reply (the caller holds the lock). Any failure of the
        connection drops it, so the next request connects afresh."""
        request_id = next(self._ids)
        try:
            frame = encode_frame(dumps({"id": request_id, "command": command, "args": args}))
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"the args of {command} cannot be sent as JSON: {exc}") from None
        try:
            sock.settimeout(wait)
            sock.sendall(frame)
            deadline = time.monotonic() + wait
            while True:
                payload = read_frame(reader, self.max_frame_bytes)
                if payload is None:
                    raise BridgeConnectionError(
                        f"the bridge worker at {self.host}:{self.port} closed the connection"
                        f" before answering {command}", request_id
                    )
                reply = decode_reply(payload)
                if reply.id == request_id:
                    # A process answered us: from now on a lost connection may have lost state.
                    self._connected_before = True
                    break
                if reply.id is None:
                    break
                # A late reply to an earlier request that timed out on our side: skip it.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
        except TimeoutError:
            self._drop_connection()
            if self._is_fork:
                raise self._process_gone(f"is gone: no reply to {command} within {wait:g} s, so this client"
                                         " dropped the connection, and the process ends with it") from None
            raise BridgeConnectionError(
                f"no reply to {command} from {self.host}:{self.port} within {wait:g} s", request_id
            ) from None
        except BridgeConnectionError as exc:
            self._drop_connection()
            if self._is_fork:
                raise self._process_gone(f"ended{{how}} before answering {command} (it crashed or was"
                                         " killed: the connection closed)") from exc
            raise
        except (OSError, ProtocolError) as exc:
            self._drop_connection()
            if self._is_fork:
                raise self._process_gone(f"is gone: the connection broke during {command}: {exc}",
                                         ended=f"ended{{how}} during {command} (the connection broke: {exc})"
                                         ) from exc
            raise BridgeConnectionError(
                f"connection to the bridge worker at {self.host}:{self.port} broke"
                f" during {command}: {exc}",
                request_id,
            ) from exc
        if reply.id is None:
            # Connection-level errors (oversized frame, too many connections) end the connection.
            self._drop_connection()
        return reply


def check_json(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` as the worker would see them after a trip through JSON (used by LocalBridge)."""
    try:
        decoded: dict[str, Any] = json.loads(dumps(args))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"args cannot be sent as JSON: {exc}") from None
    return decoded
