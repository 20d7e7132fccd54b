"""What a test program, signature and session are, as data — and ids that never collide.

The pydantic models (:class:`FieldSpec`, :class:`SignatureSpec`, :class:`ProgramSpec`,
:class:`SessionSpec`), the unique ids (:func:`unique_id`) and a session's identity
(:func:`new_session`), with pydantic and the stdlib only. :mod:`provisioner.factories` builds these
models with polyfactory and re-exports them; the Python API and every test's ``isolated`` session use
this module directly, so the plugin's start and ``provisioner.environment()`` do not import
polyfactory and Faker (≈ 1 s of every pytest start: docs/benchmarks.md, "pytest start-up with the
plugin").

Two rules shape these models:

* **Identifiers never collide** — across tests, processes, xdist workers and runs. Every id is
  ``<kind>_<run>_<worker>_<pid>_<n>``: the run id (shared by the whole run), the xdist worker id
  (``gw0``… or ``main``), the process id, and a per-process counter. No more
  *"Program with ID 'test_program_layer_3' already exists"*.
* **Everything else is deterministic.** Instructions, field names and descriptions have fixed defaults
  (override them per test), because they end up in the LM prompt and the cached LM mode keys its
  recordings on the prompt: random text would make every cached test a cache miss.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import threading
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RUN_ID_ENV = "PROVISION_RUN_ID"
XDIST_WORKER_ENV = "PYTEST_XDIST_WORKER"

ProgramType = Literal["predict", "chain_of_thought"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The bridge's rule for field names (provisioner.bridge.programs): a letter first.
_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_UNSAFE = re.compile(r"[^a-z0-9]+")

# -- unique identifiers ---------------------------------------------------------------------------

_counter = itertools.count(1)
_counter_lock = threading.Lock()
_run_id: str | None = None
# Guards against pid reuse between runs that have no run id (plain scripts, not the pytest plugin).
_process_token = secrets.token_hex(2)


def set_run_id(run_id: str | None) -> None:
    """Bind ids made in this process to a run (the pytest plugin and ``environment()`` call this)."""
    global _run_id
    _run_id = run_id


def _token(value: str) -> str:
    # The tail: a run id's random part is at its end (see provisioner.run.new_run_id).
    return _UNSAFE.sub("", value.lower())[-16:] or "x"


def id_parts() -> tuple[str, str, str]:
    """(run, worker, pid) for the calling process; the stable part of every unique id."""
    run = _run_id or os.environ.get(RUN_ID_ENV) or _process_token
    worker = os.environ.get(XDIST_WORKER_ENV) or "main"
    return _token(run), _token(worker), str(os.getpid())


def unique_id(kind: str) -> str:
    """A new id ``<kind>_<run>_<worker>_<pid>_<n>``: unique across tests, processes and xdist workers.

    Only lowercase letters, digits and underscores, so it is safe as a program id, a namespace and a
    container-name fragment.
    """
    if not _IDENT.match(kind):
        raise ValueError(f"id kind must be an identifier, got {kind!r}")
    # next() on a shared count is atomic under the GIL; the lock keeps it so on free-threaded builds.
    with _counter_lock:
        number = next(_counter)
    run, worker, pid = id_parts()
    return f"{kind.lower()}_{run}_{worker}_{pid}_{number}"


# -- the models -----------------------------------------------------------------------------------


class FieldSpec(BaseModel):
    """One input or output field of a signature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    # Any type expression the bridge accepts: str, int, bool, list[str], Literal['a', 'b'], int | None ...
    type: str = "str"
    description: str = ""

    @field_validator("name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _FIELD_NAME.match(value):
            raise ValueError(f"field name must be an identifier starting with a letter, got {value!r}")
        return value

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        from provisioner.bridge.programs import parse_type  # the bridge's own parser: one set of rules

        parse_type(value, "type")  # raises a ValueError naming what is wrong
        return value

    def to_wire(self) -> dict[str, str]:
        wire = {"name": self.name, "type": self.type}
        if self.description:  # absent rather than empty: DSPy then uses its own default
            wire["description"] = self.description
        return wire


class SignatureSpec(BaseModel):
    """A DSPy signature as data: what the bridge's ``create_program`` receives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "QuestionAnswer"
    instructions: str = "Answer the question."
    inputs: tuple[FieldSpec, ...] = (FieldSpec(name="question"),)
    outputs: tuple[FieldSpec, ...] = (FieldSpec(name="answer"),)

    @model_validator(mode="after")
    def _fields_distinct(self) -> SignatureSpec:
        if not self.inputs:
            raise ValueError("a signature needs at least one input field")
        if not self.outputs:
            raise ValueError("a signature needs at least one output field")
        names = [f.name for f in (*self.inputs, *self.outputs)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"field names must be distinct across inputs and outputs: {duplicates}")
        return self

    def as_string(self) -> str:
        """DSPy's string form, e.g. ``"question: str -> answer: str"``."""

        def side(fields: tuple[FieldSpec, ...]) -> str:
            return ", ".join(f"{f.name}: {f.type}" for f in fields)

        return f"{side(self.inputs)} -> {side(self.outputs)}"

    def to_wire(self) -> dict[str, Any]:
        """The spec as the bridge's ``create_program`` takes it (instructions travel as ``description``)."""
        return {
            "name": self.name,
            "description": self.instructions,
            "inputs": [f.to_wire() for f in self.inputs],
            "outputs": [f.to_wire() for f in self.outputs],
        }

    def to_dspy(self) -> Any:
        """The ``dspy.Signature`` class, built exactly as a bridge worker builds it.

        Same class name, instructions and fields as on the worker means the same prompt, so an
        in-process test and a bridge test of one signature share their LM recordings.
        """
        from provisioner.bridge.programs import make_dspy_signature, parse_signature_spec

        return make_dspy_signature(parse_signature_spec(self.to_wire()))


class ProgramSpec(BaseModel):
    """A program to create on a bridge (or build in-process)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    signature: SignatureSpec = Field(default_factory=SignatureSpec)
    program_type: ProgramType = "predict"

    def create_args(self) -> dict[str, Any]:
        """Keyword arguments for ``create_program`` (client method and wire command alike)."""
        return {
            "program_id": self.id,
            "signature": self.signature.to_wire(),
            "program_type": self.program_type,
        }

    def to_dspy(self) -> Any:
        """A fresh in-process DSPy module for this program (as a bridge worker would build it)."""
        from provisioner.bridge.programs import build_program, parse_signature_spec

        spec = parse_signature_spec(self.signature.to_wire())
        return build_program(self.id, "in-process", spec, self.program_type).module


class SessionSpec(BaseModel):
    """The identity of one isolated test session: its id, namespace and program-id prefix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: str
    namespace: str
    program_prefix: str
    metadata: dict[str, str] = Field(default_factory=dict)

    def program_id(self, name: str) -> str:
        """A program id inside this session's prefix."""
        return f"{self.program_prefix}{name}"


def _session_fields() -> dict[str, str]:
    # A random part (64 bits): on a worker, naming a session is what gives access to it, so the ids
    # handed out must not be guessable from the run id, the xdist worker and a counter.
    session_id = f"{unique_id('session')}_{secrets.token_hex(8)}"
    suffix = session_id.removeprefix("session_")
    return {"session_id": session_id, "namespace": f"ns_{suffix}", "program_prefix": f"p_{suffix}_"}


def new_session(metadata: dict[str, str] | None = None) -> SessionSpec:
    """A new session's identity (what :meth:`SessionFactory.build` gives), made directly: the
    ``isolated`` fixture makes one per test, and polyfactory's build (field introspection on every
    call) was ≈ 0.3 ms of a pooled test's ≈ 1.9 ms overhead (cProfile, benchmarks/bench_suite.py)."""
    return SessionSpec(**_session_fields(), metadata=metadata or {})


__all__ = [
    "FieldSpec",
    "ProgramSpec",
    "ProgramType",
    "SessionSpec",
    "SignatureSpec",
    "id_parts",
    "new_session",
    "set_run_id",
    "unique_id",
]
