"""The bridge's command handlers as a plain class: no sockets, no threads of its own.

The server (TCP or stdio) and :class:`~provisioner.bridge.local.LocalBridge` (in-process) both drive
a :class:`BridgeService`. A handler validates its arguments, then either answers at once (a ``dict``)
or returns a :class:`Deferred` — work that may be slow (``execute_program``) and that the server runs
on its bounded pool. Everything a handler needs (the program, the LM) is resolved *before* the
Deferred is returned, so pipelined requests on one connection see the state in the order they were
sent even when their replies come back out of order.

Every problem a client can cause raises :class:`~provisioner.errors.BridgeError` with the
``error_type`` that goes into the error reply (see :class:`~provisioner.bridge.protocol.ErrorType`).

Who may do what (docs/protocol.md, "Access"):

* **session commands** are open to every connection, as DSPex's clients expect: a session is a
  namespace, and naming a session is what gives access to it;
* **worker-wide commands** — the worker-default LM (``configure_lm`` without ``session_id``),
  listing every session (``list_programs`` with ``all_sessions``; the session ids in ``get_stats``),
  ``reset_state`` and ``shutdown`` — need the *control* capability. A connection has it when the
  worker was started without a control token, or after a ``hello`` with the run's token
  (:class:`Access`). In-process callers (``LocalBridge``, :meth:`BridgeService.call`) have it;
* **a process of its own**: a fork-mode child serves one connection and ends with it, so what only
  that process holds is the connection's: without the token it may set the worker-default LM (of
  its own process), list every session and see the default LM and session ids in ``get_stats`` —
  all of them its own (``Access.own_process``, the ``process`` capability). ``reset_state`` and
  ``shutdown`` act on the worker (the parent and every other process) and stay gated;
* **run-owned LM fields** (:data:`~provisioner.lmconfig.RUN_OWNED_LM_FIELDS`: endpoint, key,
  limits, run dir, cassettes...) are never accepted by ``configure_lm``, with or without the token:
  they come from the worker's start-up configuration only.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from provisioner.bridge.programs import (
    DEFAULT_MAX_PROGRAMS,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_SESSION,
    PROGRAM_TYPES,
    Program,
    ProgramRegistry,
    build_program,
    new_program_id,
    parse_signature_spec,
)
from provisioner.bridge.protocol import ErrorType, rejected
from provisioner.errors import BridgeError, ProvisionerError, SignatureSpecError
from provisioner.lm.callstats import Tally, tally
from provisioner.lm.ledger import for_session
from provisioner.lmconfig import RUN_OWNED_LM_FIELDS, LMConfig

log = logging.getLogger("provisioner.bridge")

LMFactory = Callable[[LMConfig], Any]
COMMANDS: tuple[str, ...] = (
    "ping",
    "configure_lm",
    "create_program",
    "execute_program",
    "get_program_info",
    "list_programs",
    "delete_program",
    "get_stats",
    "cleanup_session",
    "reset_state",
    "shutdown",
    "hello",
)
LM_FIELDS: tuple[str, ...] = tuple(LMConfig.model_fields)
# What configure_lm accepts for a session: every LMConfig field that does not belong to the run.
SESSION_LM_FIELDS: tuple[str, ...] = tuple(f for f in LM_FIELDS if f not in RUN_OWNED_LM_FIELDS)
PROTOCOL_VERSION = 2
CAPABILITY_SESSION = "session"
CAPABILITY_CONTROL = "control"
# A fork-mode child's one connection: the process's own worker-wide state is the connection's.
CAPABILITY_PROCESS = "process"
# Refused once shutdown has begun; everything else (pings, stats, removing state) still works, so
# a host can clean up its sessions while the worker drains.
_NEW_WORK = frozenset({"configure_lm", "create_program", "execute_program"})
# The longest simulated LM latency a mock rule sent over the wire may ask for (docs/protocol.md,
# "configure_lm"): a rule's sleep holds an execution slot, and the slot stays taken past the
# request's Timeout until the sleep ends. 10 s covers timeout tests against a short
# process_timeout; settings-file rules (the layer's start-up LM) are the run's and not bounded.
MAX_WIRE_LATENCY_MS = 10_000
# The same kind for the session-settable fields that bound how long one real call may take and be
# retried: over the wire they may not exceed these (defaults: 30 s, 3, 1 s, 60 s).
WIRE_LM_MAXIMA: dict[str, float] = {
    "request_timeout_s": 120.0,
    "max_retries": 10,
    "retry_base_delay_s": 10.0,
    "retry_max_delay_s": 60.0,
}
_MISSING: Any = object()


def default_lm_factory(config: LMConfig) -> Any:
    """``provisioner.lm.build_lm`` — imported late: it pulls in DSPy and the engines."""
    from provisioner.lm import build_lm

    return build_lm(config)


_NOT_ADMITTED = (
    "{command}: this worker is published off loopback, so every connection must start with"
    ' {{"command": "hello", "args": {{"token": ...}}}} carrying the run\'s PROVISION_BRIDGE_TOKEN (from its'
    " env file); the connection is closed"
)


@dataclass(slots=True)
class Access:
    """What one connection may do. ``control``: the worker-wide commands (see the module docstring).

    The server keeps one per connection; ``hello`` with the right token sets ``control``.
    ``admitted``: the connection may send commands other than ``hello``. False on a new network
    connection of a worker with a bridge token (a run published off loopback) until a ``hello``
    carries that token or the control token; the server closes a connection whose first frame
    does not admit it.
    ``own_process``: the connection is the only one its process will ever serve (a fork-mode child's,
    :mod:`provisioner.bridge.forking`): the process ends with it, so what is worker-wide *in that
    process* — its default LM, its sessions — is the connection's own, token or not. What reaches
    beyond the process (``reset_state`` ends other processes, ``shutdown`` stops the parent) still
    needs ``control``.
    """

    control: bool
    admitted: bool = True
    own_process: bool = False

    def owns(self) -> bool:
        """Whether the process-wide state this connection sees is its own: ``control``, or a process
        of its own (see the class)."""
        return self.control or self.own_process


@dataclass(slots=True)
class Deferred:
    """Slow work a handler hands back to its caller to run (on a pool, in the server)."""

    command: str
    run: Callable[[], dict[str, Any]]
    # Whose work it is: the server's scheduler shares execution slots fairly between sessions.
    session_id: str | None = None
    # The LM calls the work made so far (``lm_usage`` shape), readable while it runs: a reply sent
    # before the work ends (the server's ``Timeout``) carries them, so their cost is booked.
    usage: Callable[[], dict[str, Any]] | None = None


class _Args:
    """Typed access to a request's ``args``; every mistake names the argument."""

    def __init__(self, command: str, args: Mapping[str, Any], accepted: tuple[str, ...]) -> None:
        self.command = command
        self.args = args
        unknown = sorted(set(args) - set(accepted))
        if unknown:
            listed = ", ".join(accepted) if accepted else "none"
            raise rejected(
                ErrorType.INVALID_ARGUMENT,
                f"unknown argument {unknown[0]!r} for {command} (accepted: {listed})",
            )

    def _bad(self, name: str, expected: str, value: Any) -> BridgeError:
        return rejected(
            ErrorType.INVALID_ARGUMENT,
            f"argument {name!r} of {self.command} must be {expected}, got {_describe(value)}",
        )

    def string(self, name: str, default: Any = _MISSING, *, alias: str | None = None) -> Any:
        value = self.args.get(name, _MISSING)
        if alias is not None and alias in self.args:
            other = self.args[alias]
            if value is not _MISSING and other != value:
                raise rejected(
                    ErrorType.INVALID_ARGUMENT,
                    f"arguments {name!r} and its alias {alias!r} of {self.command} disagree",
                )
            value = other
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise rejected(ErrorType.INVALID_ARGUMENT, f"missing argument {name!r} for {self.command}")
            return default
        if not isinstance(value, str) or not value:
            raise self._bad(name, "a non-empty string", value)
        return value

    def obj(self, name: str) -> dict[str, Any]:
        value = self.args.get(name, _MISSING)
        if value is _MISSING:
            raise rejected(ErrorType.INVALID_ARGUMENT, f"missing argument {name!r} for {self.command}")
        if not isinstance(value, dict):
            raise self._bad(name, "an object", value)
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.args.get(name, default)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false", value)
        return value


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return "an empty string" if not value else f"string {value[:40]!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class BridgeService:
    """The worker's state (sessions, programs, LMs, counters) and its command handlers.

    ``lm_config`` is the start-up LM configuration: its LM is the worker default, and
    ``configure_lm`` merges its arguments over it. ``None`` starts without a default LM (then every
    execution needs a ``configure_lm`` first); ``provision worker`` always passes one.

    ``max_programs`` / ``max_sessions`` bound what clients can make the worker hold
    (``TooManyPrograms`` / ``TooManySessions``); ``control_token`` guards the worker-wide commands.

    ``record_history`` keeps DSPy's per-LM call history (up to 10 000 prompts and answers per LM).
    Nothing can read it over the wire, so a worker turns it off to keep its memory flat; in-process
    use keeps it for ``inspect_history``.
    """

    def __init__(
        self,
        lm_config: LMConfig | None = None,
        *,
        lm_factory: LMFactory | None = None,
        worker_id: str | None = None,
        record_history: bool = False,
        control_token: str | None = None,
        bridge_token: str | None = None,
        max_programs: int = DEFAULT_MAX_PROGRAMS,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> None:
        self.record_history = record_history
        # None or "": no token, every connection has control (a worker started by hand).
        self._control_token = control_token or None
        self._bridge_token = bridge_token or None
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self._lm_factory: LMFactory = lm_factory or default_lm_factory
        self._startup_config = lm_config
        self._default_lm: Any = None
        self._default_public: dict[str, Any] | None = None
        if lm_config is not None:
            self._default_lm = self._lm_factory(lm_config)
            self._default_public = _public(lm_config)
        self.registry = ProgramRegistry(max_programs, max_sessions)
        self._counts_lock = threading.Lock()
        self._commands: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._executions = 0
        self._shutdown_callbacks: list[Callable[[], None]] = []
        self._reset_callbacks: list[Callable[[], None]] = []
        # Set by a fork-mode child (provisioner.bridge.forking): {"mode": "fork", "pid", "parent_pid"},
        # shown by hello, ping and get_stats.
        self.process: dict[str, Any] | None = None
        self._shutting_down = threading.Event()
        # The server adds live figures (connections, in-flight executions) to get_stats.
        self.stats_hooks: list[Callable[[], dict[str, Any]]] = []
        self._handlers: dict[str, Callable[[dict[str, Any], Access], dict[str, Any] | Deferred]] = {
            name: getattr(self, f"_cmd_{name}") for name in COMMANDS
        }

    # -- entry points ------------------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down.is_set()

    @property
    def lm_configured(self) -> bool:
        return self._default_lm is not None

    @property
    def default_lm(self) -> Any:
        """The worker-default ``dspy.LM`` (None when the worker has none)."""
        return self._default_lm

    @property
    def control_token_required(self) -> bool:
        """Whether worker-wide commands need a ``hello`` with the control token first."""
        return self._control_token is not None

    @property
    def bridge_token_required(self) -> bool:
        """Whether every network connection must start with a ``hello`` carrying a token (a run
        published off loopback: ``PROVISION_BRIDGE_TOKEN``)."""
        return self._bridge_token is not None

    def new_access(self) -> Access:
        """The access of a new network connection: control only when the worker has no control
        token; admitted only when it has no bridge token."""
        return Access(control=self._control_token is None, admitted=self._bridge_token is None)

    def restart_clock(self) -> None:
        """``started_at`` and ``uptime_s`` count from now (a fork-mode child inherits its service
        from the parent, built before the fork: its uptime is its own process's)."""
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()

    def on_shutdown(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once) when a ``shutdown`` command arrives."""
        self._shutdown_callbacks.append(callback)

    def on_reset(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each ``reset_state`` (a fork-mode child tells its parent)."""
        self._reset_callbacks.append(callback)

    def begin(
        self, command: str, args: dict[str, Any], access: Access | None = None
    ) -> dict[str, Any] | Deferred:
        """Validate and handle a command: a result now, or a :class:`Deferred` to run.

        ``access`` is the calling connection's (a ``hello`` may change it); in-process callers
        have full access.

        Raises :class:`BridgeError` (already counted in the stats) for an error reply.
        """
        if access is None:
            access = Access(control=True)
        if not access.admitted and command != "hello":
            with self._counts_lock:
                self._commands["<not admitted>"] += 1
            raise rejected(ErrorType.UNAUTHORIZED, _NOT_ADMITTED.format(command=command))
        handler = self._handlers.get(command)
        with self._counts_lock:
            self._commands[command if handler else "<unknown>"] += 1
        try:
            if handler is None:
                raise rejected(
                    ErrorType.UNKNOWN_COMMAND,
                    f"unknown command {command!r}; known commands: {', '.join(COMMANDS)}",
                )
            if self._shutting_down.is_set() and command in _NEW_WORK:
                raise rejected(ErrorType.SHUTTING_DOWN, f"the worker is shutting down; {command} refused")
            outcome = handler(args, access)
        except BridgeError as exc:
            self.count_error(exc.error_type)
            # One line per refused command: a failed test's report shows its worker's lines.
            session = args.get("session_id") if isinstance(args, dict) else None
            log.info("%s refused (session %s): %s", command, session or DEFAULT_SESSION, exc)
            raise
        except Exception as exc:  # a bug in a handler must not take the worker down
            log.exception("internal error in %s", command)
            self.count_error(ErrorType.INTERNAL_ERROR)
            problem = f"{command} failed: {type(exc).__name__}: {exc}"
            raise rejected(ErrorType.INTERNAL_ERROR, problem) from exc
        return outcome

    def call(self, command: str, args: dict[str, Any], access: Access | None = None) -> dict[str, Any]:
        """Handle a command to completion in the calling thread (in-process use)."""
        outcome = self.begin(command, args, access)
        return outcome.run() if isinstance(outcome, Deferred) else outcome

    def count_error(self, error_type: str) -> None:
        with self._counts_lock:
            self._errors[str(error_type)] += 1

    # -- LMs ---------------------------------------------------------------------------------------

    def _lm_for(self, session_id: str) -> Any:
        lm = self.registry.lm_of(session_id)
        if lm is None:
            lm = self._default_lm
        if lm is None:
            raise rejected(
                ErrorType.LM_NOT_CONFIGURED,
                f"no LM is configured for session '{session_id}' and the worker has no default LM;"
                " call configure_lm first",
            )
        return lm

    def _merged_config(self, fields: dict[str, Any]) -> LMConfig:
        """``fields`` (session-settable ones only) over the start-up configuration.

        The start-up API key is carried over only while the endpoint is the start-up one: a
        configuration that points anywhere else never gets the run's key (defence in depth — a
        client cannot set ``base_url`` in the first place).
        """
        base = self._startup_config or LMConfig()
        data: dict[str, Any] = base.model_dump(exclude={"api_key"})
        data.update(fields)
        if base.api_key is not None and data.get("base_url") == base.base_url:
            data["api_key"] = base.api_key
        try:
            return LMConfig.model_validate(data)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                # Never echo the value: it may be (or contain) a secret.
                problems.append(f"argument {where!r}: {err['msg']}")
            raise rejected(ErrorType.INVALID_LM_CONFIG, "configure_lm: " + "; ".join(problems)) from None

    def _require_control(self, access: Access, what: str, *, own_process: bool = False) -> None:
        """Refuse ``what`` unless the connection has control, or — ``own_process``: the command only
        touches this process's state — the connection is its process's only one."""
        if not (access.control or (own_process and access.own_process)):
            if access.own_process:  # a fork-mode connection: say why its own process is not enough
                raise rejected(
                    ErrorType.UNAUTHORIZED,
                    f"{what} acts on the whole fork-mode worker (its other processes and their parent),"
                    " not only this connection's process, so it needs the run's control token: send"
                    ' {"command": "hello", "args": {"token": ...}} first (PROVISION_CONTROL_TOKEN in the'
                    " run's env file). This connection's own process needs no token: configure_lm without"
                    " session_id sets its default LM; closing the connection ends it",
                )
            raise rejected(
                ErrorType.UNAUTHORIZED,
                f"{what} is a worker-wide command and needs the run's control token: send"
                ' {"command": "hello", "args": {"token": ...}} first on this connection (the token is'
                " PROVISION_CONTROL_TOKEN in the run's env file); session commands need no token",
            )

    # -- handlers ----------------------------------------------------------------------------------

    def _cmd_hello(self, args: dict[str, Any], access: Access) -> dict[str, Any]:
        a = _Args("hello", args, ("token", "client"))
        token = a.string("token", None)
        a.string("client", None)  # a free-form client name, for the client's own logs
        if self._bridge_token is not None and not access.admitted:
            if token is None or not any(
                hmac.compare_digest(token.encode("utf-8"), known.encode("utf-8"))
                for known in (self._bridge_token, self._control_token) if known is not None
            ):
                why = _NOT_ADMITTED.format(command="hello without the token")
                raise rejected(ErrorType.UNAUTHORIZED, why)
            access.admitted = True
            if self._control_token is None or not hmac.compare_digest(
                token.encode("utf-8"), self._control_token.encode("utf-8")
            ):
                token = None  # the bridge token admits; it is no control token
        if token is not None and self._control_token is not None:
            if not hmac.compare_digest(token.encode("utf-8"), self._control_token.encode("utf-8")):
                access.control = False
                raise rejected(
                    ErrorType.UNAUTHORIZED,
                    "hello: the token is not this run's control token (PROVISION_CONTROL_TOKEN in the"
                    " run's env file); this connection keeps session access only",
                )
            access.control = True
        capabilities = [CAPABILITY_SESSION, *([CAPABILITY_CONTROL] if access.control else []),
                        *([CAPABILITY_PROCESS] if access.own_process else [])]
        return {
            "status": "ok",
            "protocol_version": PROTOCOL_VERSION,
            "worker_id": self.worker_id,
            "capabilities": capabilities,
            "control_token_required": self.control_token_required,
            "bridge_token_required": self.bridge_token_required,
            "commands": list(COMMANDS),
            **({"process": self.process} if self.process is not None else {}),
        }

    def _cmd_ping(self, args: dict[str, Any], access: Access) -> dict[str, Any]:
        _Args("ping", args, ())
        return {
            "status": "ok",
            "lm_configured": self.lm_configured,
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started_monotonic, 3),
            "timestamp": time.time(),
            **({"process": self.process} if self.process is not None else {}),
        }

    def _cmd_configure_lm(self, args: dict[str, Any], access: Access) -> dict[str, Any]:
        owned = [name for name in RUN_OWNED_LM_FIELDS if name in args]
        if owned:
            # Checked before anything else, and never echoing a value (api_key is a secret).
            raise rejected(
                ErrorType.INVALID_LM_CONFIG,
                f"configure_lm: {', '.join(repr(n) for n in owned)}"
                f" {'belongs' if len(owned) == 1 else 'belong'} to the run and cannot be set"
                " over the bridge (endpoint, key, limits, run dir and cassettes are fixed by the"
                " controller when it starts the workers: settings lm.*); remove them from the request",
            )
        a = _Args("configure_lm", args, ("session_id", *SESSION_LM_FIELDS))
        session_id = a.string("session_id", None)
        if session_id is None:
            self._require_control(access, "configure_lm without session_id (the worker-default LM)",
                                  own_process=True)
        fields = {k: v for k, v in args.items() if k != "session_id"}
        config = self._merged_config(fields)
        for name, most in WIRE_LM_MAXIMA.items():
            value = getattr(config, name)
            if name in fields and value > most:
                raise rejected(
                    ErrorType.INVALID_LM_CONFIG,
                    f"configure_lm: argument {name!r} is {value:g}; over the bridge it may be at most"
                    f" {most:g} (a slow call holds an execution slot); use a smaller value",
                )
        for i, rule in enumerate(config.mock_rules if "mock_rules" in fields else ()):
            if rule.latency_ms > MAX_WIRE_LATENCY_MS:
                raise rejected(
                    ErrorType.INVALID_LM_CONFIG,
                    f"configure_lm: argument 'mock_rules.{i}.latency_ms' is {rule.latency_ms} ms; over the"
                    f" bridge a rule may delay at most {MAX_WIRE_LATENCY_MS} ms (a sleeping rule holds an"
                    " execution slot); use a shorter latency, or put the rule in the layer's settings",
                )
        try:
            lm = self._lm_factory(config)
        except (ProvisionerError, ValueError, TypeError) as exc:
            raise rejected(ErrorType.INVALID_LM_CONFIG, f"configure_lm: {exc}") from None
        public = _public(config)
        if session_id is None:
            self._default_lm, self._default_public = lm, public
        else:
            self.registry.set_lm(session_id, lm, public)
        target = session_id or "the worker default"
        log.info("LM configured for %s: mode=%s model=%s", target, config.mode, config.model)
        return {"status": "configured", "session_id": session_id, "lm": public}

    def _cmd_create_program(self, args: dict[str, Any], access: Access) -> dict[str, Any]:
        a = _Args("create_program", args, ("signature", "program_id", "id", "program_type", "session_id"))
        session_id = a.string("session_id", DEFAULT_SESSION)
        program_id = a.string("program_id", None, alias="id") or new_program_id()
        program_type = a.string("program_type", "predict")
        if program_type not in PROGRAM_TYPES:
            raise rejected(
                ErrorType.INVALID_ARGUMENT,
                f"argument 'program_type' of create_program must be one of {', '.join(PROGRAM_TYPES)},"
                f" got {program_type!r}",
            )
        if "signature" not in args:
            raise rejected(ErrorType.INVALID_ARGUMENT, "missing argument 'signature' for create_program")
        if self.registry.exists(session_id, program_id):  # fail before the (costlier) build
            raise rejected(
                ErrorType.PROGRAM_EXISTS,
                f"Program with ID '{program_id}' already exists in session '{session_id}'",
            )
        try:
            spec = parse_signature_spec(args["signature"])
            if program_type == "chain_of_thought":
                for index, out in enumerate(spec.outputs):
                    if out.name == "reasoning":
                        raise SignatureSpecError(
                            f"signature.outputs[{index}].name",
                            "'reasoning' is added by chain_of_thought; choose another name",
                        )
            program = build_program(program_id, session_id, spec, program_type)
        except SignatureSpecError as exc:
            raise rejected(ErrorType.INVALID_SIGNATURE, str(exc)) from None
        self.registry.add(program)
        return {
            "status": "created",
            "program_id": program_id,
            "session_id": session_id,
            "program_type": program_type,
            "signature": spec.public(),
        }

    def _cmd_execute_program(self, args: dict[str, Any], access: Access) -> Deferred:
        a = _Args("execute_program", args, ("program_id", "id", "inputs", "session_id"))
        session_id = a.string("session_id", DEFAULT_SESSION)
        program_id = a.string("program_id", alias="id")
        raw_inputs = a.obj("inputs")
        program = self.registry.get(session_id, program_id)
        inputs = _validate_inputs(program, raw_inputs)
        lm = self._lm_for(session_id)
        calls = Tally()

        def run() -> dict[str, Any]:
            return self._execute(program, inputs, lm, calls)

        return Deferred("execute_program", run, session_id, usage=calls.as_dict)

    def _execute(self, program: Program, inputs: dict[str, Any], lm: Any,
                 calls: Tally | None = None) -> dict[str, Any]:
        import dspy

        started = time.perf_counter()
        usage = None
        try:
            # LM calls are attributed to the session in the run's ledger (per-test cost in pytest),
            # and tallied for the reply (lm_usage: the caller counts them, mock calls included —
            # also when the program fails after some calls: the error reply carries them too).
            with tally(calls) as usage, for_session(program.session_id), dspy.context(
                lm=lm, disable_history=not self.record_history
            ):
                prediction = program.module(**inputs)
            outputs = _outputs(prediction)
        except BridgeError as exc:
            self._record_execution(program, exc.error_type)
            log.warning("execute_program failed (session %s): %s", program.session_id, _first_line(exc))
            exc.lm_usage = None if usage is None else usage.as_dict()
            raise
        except Exception as exc:
            error = _execution_error(program, exc)
            self._record_execution(program, error.error_type)
            log.warning("execute_program failed (session %s): %s", program.session_id, _first_line(error))
            error.lm_usage = None if usage is None else usage.as_dict()
            raise error from exc
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self._record_execution(program, None)
        return {
            "program_id": program.program_id,
            "session_id": program.session_id,
            "outputs": outputs,
            "execution_time_ms": round(elapsed_ms, 3),
            "lm_usage": usage.as_dict(),
        }

    def _record_execution(self, program: Program, error_type: str | None) -> None:
        with self._counts_lock:
            self._executions += 1
            program.execution_count += 1
            program.last_executed_at = time.time()
            if error_type is not None:
                program.error_count += 1
                self._errors[str(error_type)] += 1

    def _cmd_get_program_info(self, args: dict[str, Any], access: Access) -> dict[str, Any]:
        a = _Args("get_program_info", args, ("program_id", "id", "session_id"))
        session_id = a.string("session_id", DEFAULT_SESSION)
        program = self.registry.get(session_id, a.string("program_id", alias="id"))
        return program.info()

    def _cmd_list_programs(self, args: dict[str, Any], access: Access) -> dict[str, Any]:
        a = _Args("list_programs", args, ("session_id", "all_sessions"))
        all_sessions = a.flag("all_sessions", False)
        if all_sessions:
            self._require_control(access, "list_programs with all_sessions", own_process=True)
        session_id = None if all_sessions else a.string("session_id", DEFAULT_SESSION)
        programs = [p.info() for p in self.registry.programs(session_id)]
        return {"session_id": session_id, "programs": programs, "total_count": len(programs)}

    def _cmd_delete_program(self, args: dict[str, Any], access: Access) -> dict[str, Any]:
        a = _Args("delete_program", args, ("program_id", "id", "session_id"))
        session_id = a.string("session_id", DEFAULT_SESSION)
        program = self.registry.delete(session_id, a.string("program_id", alias="id"))
        return {"status": "deleted", "program_id": program.program_id, "session_id": session_id}

    def _cmd_get_stats(self, args: dict[str, Any], access: Access) -> dict[str, Any]:
        _Args("get_stats", args, ())
        sessions = self.registry.summary()
        with self._counts_lock:
            commands = dict(self._commands)
            errors = dict(self._errors)
            executions = self._executions
        stats: dict[str, Any] = {
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started_monotonic, 3),
            "started_at": self.started_at,
            "lm": self._default_public,
            "lm_configured": self.lm_configured,
            "sessions": sessions,
            "session_count": len(sessions),
            "program_count": sum(s["programs"] for s in sessions.values()),
            "commands": commands,
            "command_count": sum(commands.values()),
            "errors": errors,
            "error_count": sum(errors.values()),
            "executions": executions,
            "rss_bytes": _rss_bytes(),
            "shutting_down": self.shutting_down,
            "max_programs": self.registry.max_programs,
            "max_sessions": self.registry.max_sessions,
            "scope": "worker" if access.control else "process" if access.own_process else "aggregate",
        }
        if self.process is not None:
            stats["process"] = self.process
            stats["parent_pid"] = self.process["parent_pid"]
        for hook in self.stats_hooks:
            stats.update(hook())
        if not access.owns():
            # Without the token (and not a process of its own): counts only. Session ids are what
            # give access to sessions, and the default LM's configuration is the run's business.
            del stats["sessions"], stats["lm"]
        return stats

    def _cmd_cleanup_session(self, args: dict[str, Any], access: Access) -> dict[str, Any]:
        a = _Args("cleanup_session", args, ("session_id",))
        session_id = a.string("session_id")
        removed = self.registry.remove_session(session_id)
        return {
            "status": "cleaned" if removed else "not_found",
            "session_id": session_id,
            "programs_removed": len(removed.programs) if removed else 0,
            "lm_removed": bool(removed and removed.lm is not None),
        }

    def _cmd_reset_state(self, args: dict[str, Any], access: Access) -> dict[str, Any]:
        _Args("reset_state", args, ())
        self._require_control(access, "reset_state")
        removed = self.registry.clear()
        # The default LM returns to the start-up one: a worker is never left without its LM.
        if self._startup_config is not None:
            self._default_lm = self._lm_factory(self._startup_config)
            self._default_public = _public(self._startup_config)
        else:
            self._default_lm, self._default_public = None, None
        for callback in self._reset_callbacks:
            callback()
        return {
            "status": "reset",
            "sessions_removed": len(removed),
            "programs_removed": sum(len(s.programs) for s in removed),
        }

    def _cmd_shutdown(self, args: dict[str, Any], access: Access) -> dict[str, Any]:
        _Args("shutdown", args, ())
        self._require_control(access, "shutdown")
        first = not self._shutting_down.is_set()
        self._shutting_down.set()
        if first:
            for callback in self._shutdown_callbacks:
                callback()
        return {"status": "shutting_down", "worker_id": self.worker_id}

    def begin_shutdown(self) -> None:
        """Refuse new work from now on (SIGTERM path); in-flight work still completes."""
        self._shutting_down.set()


# --- helpers --------------------------------------------------------------------------------------


def _public(config: LMConfig) -> dict[str, Any]:
    import json

    public: dict[str, Any] = json.loads(config.public_json())
    return public


def _validate_inputs(program: Program, raw: dict[str, Any]) -> dict[str, Any]:
    declared = program.input_validators
    for name in raw:
        if name not in declared:
            raise rejected(
                ErrorType.INVALID_ARGUMENT,
                f"inputs.{name} is not an input of program '{program.program_id}'"
                f" (inputs: {', '.join(declared)})",
            )
    values: dict[str, Any] = {}
    for name, validate in declared.items():
        if name not in raw:
            raise rejected(
                ErrorType.INVALID_ARGUMENT,
                f"inputs.{name} is missing (program '{program.program_id}' needs: {', '.join(declared)})",
            )
        try:
            values[name] = validate(raw[name])
        except ValidationError as exc:
            first = exc.errors()[0]
            expected = next(f.type for f in program.spec.inputs if f.name == name)
            raise rejected(
                ErrorType.INVALID_ARGUMENT, f"inputs.{name} must be {expected}: {first['msg']}"
            ) from None
    return values


def _outputs(prediction: Any) -> dict[str, Any]:
    from pydantic_core import PydanticSerializationError, to_jsonable_python

    outputs: dict[str, Any] = {}
    for name, value in prediction.items():
        try:
            converted = to_jsonable_python(value)
        except PydanticSerializationError as exc:
            raise rejected(
                ErrorType.EXECUTION_ERROR, f"output {name!r} is not JSON-serialisable: {exc}"
            ) from None
        if not _finite(converted):
            raise rejected(
                ErrorType.EXECUTION_ERROR, f"output {name!r} holds NaN or infinity, which JSON cannot carry"
            )
        outputs[name] = converted
    return outputs


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s text for the worker's log: the caller gets the whole text in
    the error reply, and a failing test shows the log beside it — a cassette miss's diff against the
    nearest recording was printed twice."""
    text = str(error)
    first, _, rest = text.partition("\n")
    return f"{first} (+{rest.count(chr(10)) + 1} more lines in the error reply)" if rest else first


def _execution_error(program: Program, exc: Exception) -> BridgeError:
    """A failure inside DSPy or the LM as an error reply. DSPy's and provisioner's own exception
    names are kept as the error_type (``AdapterParseError``, ``LMRateLimitError``, ...); a
    provisioner error behind DSPy's wrapper (``CostLimitExceeded``, ``CassetteMissError``,
    ``ConfigError`` of a mock rule, ...) gives its own name, which says more than the wrapper's."""
    from dspy.utils.exceptions import DSPyError

    from provisioner.lm import provisioner_error

    name = type(exc).__name__
    error_type = name if isinstance(exc, DSPyError | ProvisionerError) else str(ErrorType.EXECUTION_ERROR)
    cause = provisioner_error(exc)
    if cause is not None and cause is not exc:
        error_type = type(cause).__name__
    return BridgeError(f"program '{program.program_id}' failed: {name}: {exc}", error_type)


def _rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or /proc unreadable: stats stay useful without RSS
        return None
