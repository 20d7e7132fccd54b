"""Signature specs become typed DSPy signatures; programs live in per-session namespaces.

A signature spec is what a client sends in ``create_program``::

    {"name": "QA", "description": "Answer briefly.",
     "inputs":  [{"name": "question", "type": "str", "description": "..."}],
     "outputs": [{"name": "answer", "type": "int"}]}

or a DSPy signature string (``"question: str -> answer: int"``). Every mistake is an
``InvalidSignature`` error naming the offending field — never a silent fallback to
``question -> answer`` (DSPex's bridge did that, and it hid bugs).
"""

from __future__ import annotations

import functools
import keyword
import operator
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from provisioner.bridge.protocol import ErrorType, rejected
from provisioner.errors import SignatureSpecError

PROGRAM_TYPES: tuple[str, ...] = ("predict", "chain_of_thought")
DEFAULT_SESSION = "anonymous"
_IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_MAX_TYPE_DEPTH = 8

# Type names a spec may use, and what they mean. The JSON-schema-ish spellings are aliases for
# clients in other languages (DSPex's Elixir side); anything else is an error, never `str`.
_SCALARS: dict[str, Any] = {
    "str": str,
    "string": str,
    "int": int,
    "integer": int,
    "float": float,
    "number": float,
    "bool": bool,
    "boolean": bool,
    "Any": Any,
    "any": Any,
    "None": type(None),
}
_GENERICS: tuple[str, ...] = ("list", "dict", "tuple", "Optional", "Literal", "Union")
KNOWN_TYPES: tuple[str, ...] = (*_SCALARS, *_GENERICS)


# --- type expressions ---------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_.]*)|(?P<str>'[^']*'|"[^"]*")|(?P<num>-?\d+)|(?P<punct>[\[\],|]))"""
)


def parse_type(text: str, where: str = "type") -> Any:
    """A Python annotation from a type expression such as ``list[str]``, ``dict[str, int]``,
    ``Optional[float]``, ``int | None`` or ``Literal['yes', 'no']``."""
    if not isinstance(text, str) or not text.strip():
        raise SignatureSpecError(where, "must be a non-empty type expression such as 'str' or 'list[int]'")
    tokens = _tokenize(text, where)
    parser = _TypeParser(tokens, text, where)
    annotation = parser.union(0)
    if parser.pos != len(tokens):
        raise SignatureSpecError(where, f"unexpected {tokens[parser.pos][1]!r} in type {text!r}")
    return annotation


def _tokenize(text: str, where: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    stripped = text.rstrip()
    while pos < len(stripped):
        match = _TOKEN.match(stripped, pos)
        if match is None or match.end() == pos:
            raise SignatureSpecError(where, f"cannot read type {text!r} at {stripped[pos:]!r}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


class _TypeParser:
    def __init__(self, tokens: list[tuple[str, str]], text: str, where: str) -> None:
        self.tokens = tokens
        self.text = text
        self.where = where
        self.pos = 0

    def _fail(self, problem: str) -> SignatureSpecError:
        return SignatureSpecError(self.where, f"{problem} in type {self.text!r}")

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _expect(self, punct: str) -> None:
        token = self._peek()
        if token != ("punct", punct):
            raise self._fail(f"expected {punct!r}" + (f", got {token[1]!r}" if token else " at the end"))
        self.pos += 1

    def union(self, depth: int) -> Any:
        members = [self.atom(depth)]
        while self._peek() == ("punct", "|"):
            self.pos += 1
            members.append(self.atom(depth))
        return members[0] if len(members) == 1 else functools.reduce(operator.or_, members)

    def _args(self, depth: int) -> list[Any]:
        self._expect("[")
        args = [self.union(depth + 1)]
        while self._peek() == ("punct", ","):
            self.pos += 1
            args.append(self.union(depth + 1))
        self._expect("]")
        return args

    def atom(self, depth: int) -> Any:
        if depth > _MAX_TYPE_DEPTH:
            raise self._fail(f"nesting deeper than {_MAX_TYPE_DEPTH}")
        token = self._peek()
        if token is None:
            raise self._fail("missing type")
        kind, value = token
        if kind != "name":
            raise self._fail(f"expected a type name, got {value!r}")
        self.pos += 1
        name = value.removeprefix("typing.")
        if name in _SCALARS:
            return _SCALARS[name]
        has_args = self._peek() == ("punct", "[")
        if name == "Literal":
            return self._literal()
        if name in ("list", "List"):
            inner = self._args(depth) if has_args else [Any]
            if len(inner) != 1:
                raise self._fail("list[...] takes one type")
            return list[inner[0]]  # type: ignore[valid-type]
        if name in ("dict", "Dict"):
            if not has_args:
                return dict[str, Any]
            key_value = self._args(depth)
            if len(key_value) != 2:
                raise self._fail("dict[...] takes a key type and a value type")
            if key_value[0] not in (str, int):
                raise self._fail("dict keys must be str or int (JSON object keys)")
            return dict[key_value[0], key_value[1]]  # type: ignore[valid-type]
        if name in ("tuple", "Tuple"):
            if not has_args:
                return tuple[Any, ...]
            return tuple[tuple(self._args(depth))]  # type: ignore[misc]
        if name == "Optional":
            inner = self._args(depth)
            if len(inner) != 1:
                raise self._fail("Optional[...] takes one type")
            return inner[0] | None
        if name == "Union":
            return functools.reduce(operator.or_, self._args(depth))
        known = ", ".join(KNOWN_TYPES)
        raise self._fail(f"unknown type {value!r} (known: {known})")

    def _literal(self) -> Any:
        self._expect("[")
        values: list[Any] = []
        while True:
            token = self._peek()
            if token is None or token[0] not in ("str", "num", "name"):
                raise self._fail("Literal[...] takes quoted strings, integers, True, False or None")
            kind, raw = token
            if kind == "str":
                values.append(raw[1:-1])
            elif kind == "num":
                values.append(int(raw))
            elif raw in ("True", "False", "None"):
                values.append({"True": True, "False": False, "None": None}[raw])
            else:
                raise self._fail(f"Literal value {raw!r} must be quoted")
            self.pos += 1
            if self._peek() == ("punct", ","):
                self.pos += 1
                continue
            break
        self._expect("]")
        return Literal[tuple(values)]


# --- signature specs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedField:
    """One field of a validated signature spec, with its parsed type (``annotation``).

    "Parsed" keeps it apart from :class:`provisioner.factories.FieldSpec`, the user's data model
    of a field that becomes the spec this is parsed from."""

    name: str
    type: str
    annotation: Any
    description: str | None = None

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.description is not None:
            out["description"] = self.description
        return out


@dataclass(frozen=True)
class ParsedSignature:
    """A validated signature spec (see :func:`parse_signature_spec`), ready for DSPy."""

    inputs: tuple[ParsedField, ...]
    outputs: tuple[ParsedField, ...]
    name: str | None = None
    description: str | None = None

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "inputs": [f.public() for f in self.inputs],
            "outputs": [f.public() for f in self.outputs],
        }
        if self.name is not None:
            out["name"] = self.name
        if self.description is not None:
            out["description"] = self.description
        return out


_SPEC_KEYS = ("name", "description", "inputs", "outputs")
_FIELD_KEYS = ("name", "type", "description")


def _reserved_names() -> frozenset[str]:
    import dspy

    # Class attributes and the metaclass's properties (instructions, fields, ...): a field with one of
    # these names would shadow it and break the signature in confusing ways.
    names = (*dir(dspy.Signature), *dir(type(dspy.Signature)))
    return frozenset(name for name in names if not name.startswith("_"))


def parse_signature_spec(raw: Any, where: str = "signature") -> ParsedSignature:
    """Validate a spec (object or DSPy signature string) into a :class:`ParsedSignature`."""
    if isinstance(raw, str):
        return _spec_from_string(raw, where)
    if not isinstance(raw, dict):
        raise SignatureSpecError(
            where, "must be an object {inputs: [...], outputs: [...]} or a signature string"
        )
    unknown = sorted(set(raw) - set(_SPEC_KEYS))
    if unknown:
        raise SignatureSpecError(
            f"{where}.{unknown[0]}", f"unknown key; a signature spec has {', '.join(_SPEC_KEYS)}"
        )
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not _IDENTIFIER.match(name)):
        raise SignatureSpecError(f"{where}.name", "must be an identifier such as 'AnswerQuestion'")
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        raise SignatureSpecError(f"{where}.description", "must be a string")
    seen: dict[str, str] = {}
    reserved = _reserved_names()
    inputs = _fields(raw, "inputs", where, seen, reserved)
    outputs = _fields(raw, "outputs", where, seen, reserved)
    return ParsedSignature(inputs, outputs, name, description)


def _fields(
    raw: dict[str, Any], side: str, where: str, seen: dict[str, str], reserved: frozenset[str]
) -> tuple[ParsedField, ...]:
    items = raw.get(side)
    if items is None:
        raise SignatureSpecError(f"{where}.{side}", "is required (a non-empty list of fields)")
    if not isinstance(items, list) or not items:
        raise SignatureSpecError(f"{where}.{side}", "must be a non-empty list of fields")
    out = []
    for index, item in enumerate(items):
        here = f"{where}.{side}[{index}]"
        if isinstance(item, str):  # shorthand: just the name, type str
            item = {"name": item}
        if not isinstance(item, dict):
            raise SignatureSpecError(here, "must be an object {name, type?, description?} or a field name")
        unknown = sorted(set(item) - set(_FIELD_KEYS))
        if unknown:
            raise SignatureSpecError(
                f"{here}.{unknown[0]}", f"unknown key; a field has {', '.join(_FIELD_KEYS)}"
            )
        name = item.get("name")
        if not isinstance(name, str) or not _IDENTIFIER.match(name) or keyword.iskeyword(name):
            raise SignatureSpecError(
                f"{here}.name",
                f"must be an identifier (letters, digits, _; not starting with _), got {name!r}",
            )
        if name in reserved:
            raise SignatureSpecError(f"{here}.name", f"{name!r} is reserved by dspy.Signature")
        if name in seen:
            raise SignatureSpecError(f"{here}.name", f"duplicate field name {name!r} (also in {seen[name]})")
        seen[name] = side
        type_text = item.get("type", "str")
        annotation = parse_type(type_text, f"{here}.type")
        description = item.get("description")
        if description is not None and not isinstance(description, str):
            raise SignatureSpecError(f"{here}.description", "must be a string")
        out.append(ParsedField(name, type_text.strip(), annotation, description))
    return tuple(out)


def _spec_from_string(text: str, where: str) -> ParsedSignature:
    import dspy

    try:
        signature = dspy.Signature(text)
    except Exception as exc:
        raise SignatureSpecError(where, f"invalid signature string {text!r}: {exc}") from None
    reserved = _reserved_names()

    def convert(fields: dict[str, Any], side: str) -> tuple[ParsedField, ...]:
        specs = []
        for index, (name, info) in enumerate(fields.items()):
            if name in reserved or name.startswith("_"):
                raise SignatureSpecError(f"{where}.{side}[{index}].name", f"{name!r} is reserved")
            annotation = info.annotation
            type_text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
            specs.append(ParsedField(name, type_text or repr(annotation).replace("typing.", ""), annotation))
        return tuple(specs)

    return ParsedSignature(
        convert(signature.input_fields, "inputs"), convert(signature.output_fields, "outputs")
    )


# --- programs and namespaces --------------------------------------------------------------------


@dataclass
class Program:
    program_id: str
    session_id: str
    program_type: str
    spec: ParsedSignature
    module: Any
    input_validators: Mapping[str, Callable[[Any], Any]]
    created_at: float = field(default_factory=time.time)
    execution_count: int = 0
    error_count: int = 0
    last_executed_at: float | None = None

    def info(self) -> dict[str, Any]:
        return {
            "program_id": self.program_id,
            "session_id": self.session_id,
            "program_type": self.program_type,
            "signature": self.spec.public(),
            "created_at": self.created_at,
            "execution_count": self.execution_count,
            "error_count": self.error_count,
            "last_executed_at": self.last_executed_at,
        }


def build_program(program_id: str, session_id: str, spec: ParsedSignature, program_type: str) -> Program:
    """A DSPy module of ``program_type`` over ``spec``, with validators for its inputs."""
    import dspy
    from pydantic import TypeAdapter

    signature = make_dspy_signature(spec)
    if program_type == "predict":
        module = dspy.Predict(signature)
    elif program_type == "chain_of_thought":
        module = dspy.ChainOfThought(signature)
    else:  # callers validate first; this guards the invariant
        raise ValueError(f"unknown program_type {program_type!r}")
    validators = {f.name: TypeAdapter(f.annotation).validate_python for f in spec.inputs}
    return Program(program_id, session_id, program_type, spec, module, validators)


def make_dspy_signature(spec: ParsedSignature) -> Any:
    """A ``dspy.Signature`` subclass with typed fields, in spec order."""
    import dspy

    fields: dict[str, Any] = {}
    for f in spec.inputs:
        fields[f.name] = (f.annotation, dspy.InputField(**_desc(f)))
    for f in spec.outputs:
        fields[f.name] = (f.annotation, dspy.OutputField(**_desc(f)))
    try:
        return dspy.make_signature(fields, spec.description or None, spec.name or "BridgeSignature")
    except Exception as exc:
        raise SignatureSpecError("signature", f"DSPy refused the signature: {exc}") from None


def _desc(spec: ParsedField) -> dict[str, str]:
    # Only pass desc when given: DSPy fills in its own default otherwise.
    return {"desc": spec.description} if spec.description else {}


@dataclass
class SessionState:
    session_id: str
    programs: dict[str, Program] = field(default_factory=dict)
    lm: Any = None
    lm_public: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)


# Per-worker bounds: each program holds a DSPy module (~25 KB measured: 20 000 programs took a
# worker from 66 to 565 MB RSS), each session state possibly an LM. Defaults keep a 1 GiB worker
# far from its memory limit; a test suite that needs more should clean its sessions up.
DEFAULT_MAX_PROGRAMS = 5000
DEFAULT_MAX_SESSIONS = 2000


class ProgramRegistry:
    """Programs and LMs by session. Thread-safe; every method takes the registry lock briefly.

    At most ``max_programs`` programs and ``max_sessions`` sessions at once: beyond that
    ``create_program`` / ``configure_lm`` are refused with ``TooManyPrograms`` / ``TooManySessions``.
    """

    def __init__(
        self, max_programs: int = DEFAULT_MAX_PROGRAMS, max_sessions: int = DEFAULT_MAX_SESSIONS
    ) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionState] = {}
        self._program_count = 0
        self.max_programs = max_programs
        self.max_sessions = max_sessions

    def _session_for_new_state(self, session_id: str) -> SessionState:
        """The session (created if new, within ``max_sessions``); the caller holds the lock."""
        session = self._sessions.get(session_id)
        if session is None:
            if len(self._sessions) >= self.max_sessions:
                raise rejected(
                    ErrorType.TOO_MANY_SESSIONS,
                    f"the worker holds {len(self._sessions)} sessions, its limit; clean finished sessions"
                    " up (cleanup_session) before starting new ones",
                )
            session = self._sessions[session_id] = SessionState(session_id)
        return session

    def add(self, program: Program) -> None:
        with self._lock:
            existing = self._sessions.get(program.session_id)
            if existing is not None and program.program_id in existing.programs:
                raise rejected(
                    ErrorType.PROGRAM_EXISTS,
                    f"Program with ID '{program.program_id}' already exists"
                    f" in session '{program.session_id}'",
                )
            if self._program_count >= self.max_programs:
                raise rejected(
                    ErrorType.TOO_MANY_PROGRAMS,
                    f"the worker holds {self._program_count} programs, its limit; delete programs or clean"
                    " finished sessions up (delete_program, cleanup_session) before creating more",
                )
            session = self._session_for_new_state(program.session_id)
            session.programs[program.program_id] = program
            self._program_count += 1

    def exists(self, session_id: str, program_id: str) -> bool:
        with self._lock:
            session = self._sessions.get(session_id)
            return session is not None and program_id in session.programs

    def get(self, session_id: str, program_id: str) -> Program:
        with self._lock:
            session = self._sessions.get(session_id)
            program = session.programs.get(program_id) if session else None
        if program is None:
            raise rejected(
                ErrorType.PROGRAM_NOT_FOUND, f"Program '{program_id}' not found in session '{session_id}'"
            )
        return program

    def delete(self, session_id: str, program_id: str) -> Program:
        with self._lock:
            session = self._sessions.get(session_id)
            program = session.programs.pop(program_id, None) if session else None
            if program is not None:
                self._program_count -= 1
        if program is None:
            raise rejected(
                ErrorType.PROGRAM_NOT_FOUND, f"Program '{program_id}' not found in session '{session_id}'"
            )
        return program

    def programs(self, session_id: str | None = None) -> list[Program]:
        with self._lock:
            if session_id is None:
                return [p for s in self._sessions.values() for p in s.programs.values()]
            session = self._sessions.get(session_id)
            return list(session.programs.values()) if session else []

    def set_lm(self, session_id: str, lm: Any, public: dict[str, Any]) -> None:
        with self._lock:
            session = self._session_for_new_state(session_id)
            session.lm, session.lm_public = lm, public

    def lm_of(self, session_id: str) -> Any:
        with self._lock:
            session = self._sessions.get(session_id)
            return session.lm if session else None

    def remove_session(self, session_id: str) -> SessionState | None:
        with self._lock:
            removed = self._sessions.pop(session_id, None)
            if removed is not None:
                self._program_count -= len(removed.programs)
            return removed

    def clear(self) -> list[SessionState]:
        with self._lock:
            removed = list(self._sessions.values())
            self._sessions.clear()
            self._program_count = 0
            return removed

    def summary(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                sid: {"programs": len(s.programs), "lm_configured": s.lm is not None}
                for sid, s in self._sessions.items()
            }


def new_program_id() -> str:
    return f"prog_{uuid.uuid4().hex[:12]}"
