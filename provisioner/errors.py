"""Every exception provisioner raises, in one place.

    ProvisionerError
    ├── ConfigError               a setting, layer or other input is invalid (names field, value and source)
    │   ├── UnknownNameError      a name the user gave (layer, run, month, setting key) is not known
    │   │   └── UnknownLayerError a layer name that is not defined
    │   ├── AmbiguousRunError     several runs could be meant (lists them): name one with --run
    │   └── NoContainersError     a layer runs in-process, so it has no containers (e.g. no compose file)
    ├── SignatureSpecError        a program's signature spec is invalid (names the dotted path at fault)
    ├── BridgeError               the bridge worker answered a request with an error reply
    │   └── BridgeConnectionError the worker could not be reached, or the connection broke
    │       └── ProcessGoneError  a fork-mode connection's process ended: its state is gone (no reconnect)
    ├── ForkUnsafeError           a fork-mode worker's parent is not single-threaded, so it will not fork
    ├── ProtocolError             a frame or envelope is malformed (on either side)
    ├── LMError                   an LM managed by provisioner failed
    │   ├── CassetteError         a cassette file could not be used (names the file or directory)
    │   │   ├── CassetteMissError     cached/replay mode has no recording for a request
    │   │   │   └── CassetteNotWritableError a miss that could not be recorded (directory not writable)
    │   │   └── CorruptCassetteError  an entry is not a valid recording (names the file and why)
    │   ├── CostLimitExceeded     a real call would pass the run's dollar limit
    │   ├── RateLimitExceeded     the run's request-per-minute budget could not be had in time
    │   └── UnknownModelPriceError a real model with no known or configured price
    ├── SpendingBlockedError      a test layer blocked a network connection or an LM provisioner did not build
    ├── HistoryError              the run history database cannot be used (newer schema, not a database)
    ├── ClosedError               an environment or isolated session was used after it was closed
    ├── CleanupError              one or more cleanups failed (every one still ran; lists them)
    └── RuntimeProblem            containers: something a user can act on
        ├── DockerUnavailableError no Docker engine is reachable
        ├── ImageError            an image is missing or failed to build
        ├── WorkerNotReadyError   a worker did not become ready (carries its last log lines)
        ├── WorkerLostError       a pooled worker died; its sessions are gone
        ├── StateUnreadableError  a run's state file exists but cannot be used (names it and why)
        └── LeakError             resources were left behind (lists them by kind and name)

Which to raise: ``ConfigError`` for anything the user configured or passed (a setting, a layer, a
run id, a CLI option: the CLI exits with status 2 for it); ``RuntimeProblem`` for the engine and
the containers; ``LMError`` for the LM; never a bare ``RuntimeError``/``ValueError`` for those. Some
errors also derive from the built-in their callers used to catch (``ConfigError`` is a
``ValueError``, ``ClosedError`` and ``CleanupError`` are ``RuntimeError``s). Programming errors
(a wrong argument type, an unknown resource kind) stay ``TypeError``/``ValueError``.
tests/test_architecture.py checks that no other module defines a public exception.

Errors that cross DSPy's LM boundary are additionally raised as dspy/lm15 error types by
the engines (see provisioner.lm), so DSPy's own retry and error handling keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class ProvisionerError(Exception):
    """Base class of every error provisioner raises on purpose."""


class ConfigError(ProvisionerError, ValueError):
    """A setting, layer or LM configuration value is invalid."""


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """The known value closest to ``name`` (difflib's ratio of at least 0.6), or None."""
    import difflib

    found = difflib.get_close_matches(name, list(known), n=1)
    return found[0] if found else None


class UnknownNameError(ConfigError):
    """A name the user gave (a layer, a run id, a month, a setting key) is not one of the known ones.

    The message names what was given, the closest known value ("did you mean") and every known value;
    the CLI exits with status 2 (a usage error) for it, the pytest plugin raises ``pytest.UsageError``.

    Attributes: ``what`` (e.g. ``"layer"``), ``name`` (the given value), ``known`` (the known values,
    in order), ``suggestion`` (the closest known value or None). ``more``: further problems found at
    the same time (one line each, after this one).
    """

    def __init__(self, what: str, name: str, known: Iterable[str], *, hint: str = "",
                 plural: str | None = None, more: Iterable[str] = ()) -> None:
        self.what = what
        self.name = name
        self.known = list(known)
        self.suggestion = did_you_mean(name, self.known)
        message = f"unknown {what} {name!r}"
        if self.suggestion is not None:
            message += f" (did you mean {self.suggestion!r}?)"
        plural = plural or f"{what}s"
        message += f"; known {plural}: {', '.join(self.known)}" if self.known else f"; no {plural} are known"
        if hint:
            message += f" ({hint})"
        super().__init__("\n".join([message, *more]))

    def __str__(self) -> str:  # KeyError subclasses would otherwise repr() the message
        return str(self.args[0])


class UnknownLayerError(UnknownNameError, KeyError):
    """A layer name that is not defined in the built-ins or the user's configuration."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__("layer", name, known)


class ProtocolError(ProvisionerError):
    """A frame or message envelope violated the bridge wire protocol."""


class BridgeError(ProvisionerError):
    """The bridge worker replied with ``success: false``.

    ``error_type`` is the worker-side error name (e.g. ``ProgramExists``, ``ValidationError``).
    """

    def __init__(
        self,
        message: str,
        error_type: str = "BridgeError",
        request_id: object = None,
        *,
        lm_usage: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.request_id = request_id
        # A failed execute_program's LM calls made before it failed (the reply's ``lm_usage``,
        # docs/protocol.md); None for other errors.
        self.lm_usage = lm_usage

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"


class BridgeConnectionError(BridgeError):
    """The worker could not be reached, timed out, or closed the connection."""

    def __init__(self, message: str, request_id: object = None) -> None:
        super().__init__(message, "ConnectionError", request_id)


class ProcessGoneError(BridgeConnectionError):
    """The process that served a fork-mode connection ended (or the connection to it broke): its
    sessions, programs and LM state went with it. The client does not reconnect to a fresh process.

    Its text is the message alone ("process 10 (forked from 1) of fork-mode worker w1 ... ended
    ..."): what happened comes first, not the ``ConnectionError:`` prefix of other connection
    errors (``error_type`` is still ``ConnectionError``, for code that sorts errors by it).
    """

    def __init__(self, message: str, request_id: object = None, *, worker: str | None = None) -> None:
        """``worker``: the fork-mode worker (container) whose process ended, when known."""
        super().__init__(message, request_id)
        self.worker = worker

    def __str__(self) -> str:
        return self.message


class ForkUnsafeError(ProvisionerError, RuntimeError):
    """A fork-mode worker's parent runs more than one thread, so forking it would be unsafe."""


class LMError(ProvisionerError):
    """An LM managed by provisioner failed."""


class CassetteError(LMError):
    """A cassette of the cached LM could not be used; the message names the file or directory."""


class CassetteMissError(CassetteError):
    """The cached LM has no recording for a request and may not (or could not) record one."""


class CassetteNotWritableError(CassetteMissError):
    """A miss that should have been recorded, but the cassette directory is not writable.

    ``why`` names the directory and the reason (read-only mode, permission, read-only mount, full disk).
    """

    def __init__(self, message: str, why: str = "") -> None:
        self.why = why
        super().__init__(message)


class CorruptCassetteError(CassetteError):
    """A cassette file is not a valid recording (torn, edited, or of another format)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"corrupt cassette {path}: {reason}; delete it to re-record (or provision cassettes verify)"
        )


class CostLimitExceeded(LMError):
    """A real LM call was refused because it could pass the run's cost limit."""


class RateLimitExceeded(LMError):
    """The run's request-per-minute budget could not be obtained before the deadline.

    ``waited_s``: seconds the call waited for a slot before it was refused (0.0: refused at once).
    """

    waited_s: float = 0.0


class UnknownModelPriceError(LMError, ConfigError):
    """A real model has no price in the table and none is configured."""


class SpendingBlockedError(ProvisionerError, RuntimeError):
    """A test of a layer without real LM calls (unit, integration: LM mode mock or cached) tried to
    reach the network outside this machine, or to call an LM provisioner did not build.

    A ``RuntimeError`` (as pytest-socket's errors), so callers' ``except OSError`` retry loops do not
    swallow it. Attributes: ``layer`` (the layer's name), ``target`` (the host or LM model).
    """

    def __init__(self, message: str, *, layer: str, target: str | None) -> None:
        super().__init__(message)
        self.layer = layer
        self.target = target


class SignatureSpecError(ProvisionerError, ValueError):
    """A signature spec is invalid; ``where`` is the dotted path of the bad part."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")


class AmbiguousRunError(ConfigError):
    """Several runs could be meant; ``candidates`` lists them (``run id (layer …, started …)``)."""

    def __init__(self, message: str, candidates: list[str]) -> None:
        super().__init__(message)
        self.candidates = candidates


class NoContainersError(ConfigError):
    """A layer that runs in-process has no containers, so it has no compose file."""


class HistoryError(ProvisionerError):
    """The history database cannot be used (newer schema, not a database, bad import)."""


class ClosedError(ProvisionerError, RuntimeError):
    """An :class:`~provisioner.api.Environment` or an isolated session was used after it was closed."""


class CleanupError(ProvisionerError, RuntimeError):
    """One or more cleanups failed; all of them still ran.

    Raised by an isolated test's :meth:`~provisioner.isolated.IsolatedTest.close`, by
    :meth:`provisioner.api.Environment.close` and when a dedicated worker could not be removed.
    ``failures``: ``[(what, exception or problem text)]``, in the order they happened.
    """

    def __init__(
        self, failures: Sequence[tuple[str, BaseException | str]], *, what: str = "cleanup(s)"
    ) -> None:
        self.failures = list(failures)
        listed = "; ".join(
            f"{name}: {problem if isinstance(problem, str) else f'{type(problem).__name__}: {problem}'}"
            for name, problem in failures
        )
        super().__init__(f"{len(failures)} {what} failed: {listed}")


class RuntimeProblem(ProvisionerError):
    """A container-runtime problem the user can act on."""


class DockerUnavailableError(RuntimeProblem):
    """No Docker engine is reachable."""


class ImageError(RuntimeProblem):
    """A worker image is missing or failed to build."""


class RecreateError(RuntimeProblem):
    """Re-creating a container (the relay, :meth:`ContainerRuntime.recreate_container`) failed.

    ``container_id``: the container that holds the name now, so the caller's records can follow it
    and a later attempt can start from it — the new one when it was made but did not start (or its
    workers did not answer through it), the old one when the engine refused to make a new one.
    """

    def __init__(self, message: str, container_id: str) -> None:
        self.container_id = container_id
        super().__init__(message)


class WorkerNotReadyError(RuntimeProblem):
    """A worker did not become ready before its deadline."""

    def __init__(self, message: str, last_logs: str = "") -> None:
        self.last_logs = last_logs
        text = message if not last_logs else f"{message}\n--- last worker log lines ---\n{last_logs}"
        super().__init__(text)


class WorkerLostError(RuntimeProblem):
    """A pooled worker died; sessions pinned to it cannot continue."""


class WorkerNotReplaceableError(WorkerLostError):
    """A pooled worker died and this process may not replace it (a ``provision up`` run's worker:
    only its owner replaces it); no replacement was attempted."""


class StateUnreadableError(RuntimeProblem):
    """A run's state file exists but cannot be used: truncated (a process killed mid-write), hand
    edited, or written by an incompatible version. ``path``: the file; ``reason``: what is wrong."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"the run's state file {path} is unreadable ({reason})")
        self.path = path
        self.reason = reason


class LeakError(RuntimeProblem):
    """Resources were left behind after a test or a run."""

    def __init__(self, leaks: list[tuple[str, str]]) -> None:
        self.leaks = leaks
        listed = ", ".join(f"{kind} {name}" for kind, name in leaks)
        super().__init__(f"{len(leaks)} resource(s) leaked: {listed}")
