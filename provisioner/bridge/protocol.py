"""The bridge wire protocol: framing and the request/reply envelope.

Every message is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON —
the framing Erlang/Elixir's ``gen_tcp`` and ports call ``packet: 4``, so DSPex-style hosts speak it
natively.

Request: ``{"id": <int|str>, "command": <str>, "args": {...}}``.
Reply:   ``{"id": ..., "success": true, "result": {...}}`` or
         ``{"id": ..., "success": false, "error": "<message>", "error_type": "<Name>"}``.

This module has no I/O policy of its own: it turns bytes into validated envelopes and back, and
raises :class:`~provisioner.errors.BridgeError` (with the ``error_type`` that belongs in the reply)
for anything a peer sent wrong. See docs/protocol.md for the full specification.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, cast

from provisioner.errors import BridgeError, ProtocolError

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
# The header is unsigned 32-bit: nothing larger can be framed at all.
ABSOLUTE_MAX_FRAME_BYTES = 2**32 - 1
# The run's controller token: the worker reads it from this environment variable at start-up (and
# removes it from its environment); the controller writes it to the run's env file under this name.
CONTROL_TOKEN_ENV = "PROVISION_CONTROL_TOKEN"  # noqa: S105 - a variable name, not a secret
# A run published off loopback: every connection's first frame is a `hello` carrying this token (or
# the control token). Read and removed at start-up like the control token; in the env file too.
BRIDGE_TOKEN_ENV = "PROVISION_BRIDGE_TOKEN"  # noqa: S105 - a variable name, not a secret

RequestId = int | str | None


class ErrorType(StrEnum):
    """Every ``error_type`` the worker puts in an error reply (documented in docs/protocol.md).

    Execution failures may also carry the name of the DSPy or provisioner exception that caused
    them (``AdapterParseError``, ``LMRateLimitError``, ``CostLimitExceeded``, ...).
    """

    FRAME_TOO_LARGE = "FrameTooLarge"
    INVALID_ENCODING = "InvalidEncoding"
    INVALID_JSON = "InvalidJSON"
    INVALID_REQUEST = "InvalidRequest"
    UNKNOWN_COMMAND = "UnknownCommand"
    INVALID_ARGUMENT = "InvalidArgument"
    INVALID_SIGNATURE = "InvalidSignature"
    INVALID_LM_CONFIG = "InvalidLMConfig"
    PROGRAM_EXISTS = "ProgramExists"
    PROGRAM_NOT_FOUND = "ProgramNotFound"
    LM_NOT_CONFIGURED = "LMNotConfigured"
    EXECUTION_ERROR = "ExecutionError"
    TIMEOUT = "Timeout"
    TOO_MANY_CONNECTIONS = "TooManyConnections"
    FRAME_TIMEOUT = "FrameTimeout"
    OVERLOADED = "Overloaded"
    TOO_MANY_PROGRAMS = "TooManyPrograms"
    TOO_MANY_SESSIONS = "TooManySessions"
    SHUTTING_DOWN = "ShuttingDown"
    UNAUTHORIZED = "Unauthorized"
    REPLY_TOO_LARGE = "ReplyTooLarge"
    INTERNAL_ERROR = "InternalError"


def rejected(error_type: ErrorType, message: str, request_id: RequestId = None) -> BridgeError:
    """The exception that becomes an error reply of ``error_type``."""
    return BridgeError(message, str(error_type), request_id)


# --- framing ------------------------------------------------------------------------------------


class ByteReader(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def encode_frame(payload: bytes) -> bytes:
    """``payload`` with its 4-byte big-endian length in front."""
    if len(payload) > ABSOLUTE_MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame holds at most {ABSOLUTE_MAX_FRAME_BYTES} bytes, got {len(payload)}")
    return HEADER.pack(len(payload)) + payload


def read_frame(stream: ByteReader, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes | None:
    """The next frame's payload, or ``None`` when the peer has gone (EOF, also mid-frame).

    Raises :class:`ProtocolError` when the announced length is over ``max_bytes``; the stream is
    then out of step (the body was not read) and must be closed.
    """
    header = stream.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        return None
    (length,) = HEADER.unpack(header)
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the maximum of {max_bytes} bytes")
    if length == 0:
        return b""
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return payload


def dumps(message: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON. Non-finite floats are refused: many JSON parsers (Elixir's too) reject them.

    A string holding a lone surrogate (JSON text may carry one as an escape, e.g. a request id
    ``"\\ud800"``, and ``json.loads`` keeps it) cannot be UTF-8: such a message is written with
    ``\\uXXXX`` escapes instead, so the peer gets back exactly the string it sent.

    Raises:
        ValueError: a non-finite float. TypeError: a value JSON cannot hold.
    """
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(message, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def encode_message(message: Mapping[str, Any]) -> bytes:
    """A whole frame holding ``message`` as JSON."""
    return encode_frame(dumps(message))


def decode_json(payload: bytes) -> Any:
    """Strict UTF-8 JSON (``json.loads`` alone would also guess UTF-16/32)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise rejected(
            ErrorType.INVALID_ENCODING, f"frame is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        return json.loads(text)
    except RecursionError:
        raise rejected(ErrorType.INVALID_JSON, "frame is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise rejected(ErrorType.INVALID_JSON, f"frame is not valid JSON: {exc}") from None


# --- envelope ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    id: int | str
    command: str
    args: dict[str, Any]

    def to_message(self) -> dict[str, Any]:
        return {"id": self.id, "command": self.command, "args": self.args}


def _valid_id(value: Any) -> bool:
    # bool is an int subclass; true/false as ids would be too easy to confuse with flags.
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def parse_request(message: Any) -> Request:
    """Validate a decoded request envelope. Errors carry the request's id when it was readable."""
    if not isinstance(message, dict):
        raise rejected(
            ErrorType.INVALID_REQUEST, f"a request must be a JSON object, got {_a(_json_type(message))}"
        )
    request_id = message.get("id")
    if "id" not in message or not _valid_id(request_id):
        shown = "missing" if "id" not in message else _a(_json_type(request_id))
        raise rejected(ErrorType.INVALID_REQUEST, f"request 'id' must be an integer or a string, got {shown}")
    command = message.get("command")
    if not isinstance(command, str) or not command:
        shown = "missing" if "command" not in message else _a(_json_type(command))
        raise rejected(
            ErrorType.INVALID_REQUEST,
            f"request 'command' must be a non-empty string, got {shown}",
            request_id,
        )
    args = message.get("args")
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        raise rejected(
            ErrorType.INVALID_REQUEST,
            f"request 'args' must be an object, got {_a(_json_type(args))}",
            request_id,
        )
    unknown = sorted(set(message) - {"id", "command", "args"})
    if unknown:
        raise rejected(
            ErrorType.INVALID_REQUEST,
            f"unknown request key(s) {', '.join(map(repr, unknown))}; a request has 'id', 'command', 'args'",
            request_id,
        )
    return Request(cast(int | str, request_id), command, args)


def decode_request(payload: bytes) -> Request:
    """Bytes of one frame to a validated :class:`Request` (raises ``BridgeError`` for the reply)."""
    return parse_request(decode_json(payload))


def ok_reply(request_id: RequestId, result: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "success": True, "result": result}


def error_reply(
    request_id: RequestId, message: str, error_type: str, *, lm_usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The error envelope; ``lm_usage``: a failed ``execute_program``'s LM calls made before it
    failed (the same shape as a result's ``lm_usage``), so the caller still counts them."""
    reply: dict[str, Any] = {"id": request_id, "success": False, "error": message, "error_type": error_type}
    if lm_usage is not None:
        reply["lm_usage"] = lm_usage
    return reply


@dataclass(frozen=True, slots=True)
class Reply:
    id: RequestId
    success: bool
    result: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    lm_usage: dict[str, Any] | None = None  # an error reply's (a failed execute_program's) LM calls

    def unwrap(self) -> dict[str, Any]:
        """The result, or the error raised as :class:`BridgeError`."""
        if self.success:
            return self.result or {}
        raise BridgeError(self.error or "", self.error_type or "BridgeError", self.id, lm_usage=self.lm_usage)


def parse_reply(message: Any) -> Reply:
    """Validate a decoded reply envelope (client side). Malformed replies raise ``ProtocolError``."""
    if not isinstance(message, dict):
        raise ProtocolError(f"a reply must be a JSON object, got {_a(_json_type(message))}")
    if "id" not in message or not (_valid_id(message["id"]) or message["id"] is None):
        raise ProtocolError("reply 'id' must be an integer, a string or null")
    success = message.get("success")
    if success is True:
        result = message.get("result")
        if not isinstance(result, dict):
            raise ProtocolError(f"reply 'result' must be an object, got {_a(_json_type(result))}")
        return Reply(message["id"], True, result=result)
    if success is False:
        error, error_type = message.get("error"), message.get("error_type")
        if not isinstance(error, str) or not isinstance(error_type, str):
            raise ProtocolError("an error reply needs string 'error' and 'error_type'")
        usage = message.get("lm_usage")
        return Reply(message["id"], False, error=error, error_type=error_type,
                     lm_usage=usage if isinstance(usage, dict) else None)
    raise ProtocolError("reply 'success' must be true or false")


def decode_reply(payload: bytes) -> Reply:
    try:
        message = decode_json(payload)
    except BridgeError as exc:
        raise ProtocolError(f"malformed reply: {exc.message}") from None
    return parse_reply(message)


def _a(noun: str) -> str:
    """``noun`` with its indefinite article ("an object", "a string"; "null" stays bare)."""
    if noun == "null":
        return noun
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
