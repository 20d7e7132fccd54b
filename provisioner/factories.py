"""Test-data factories for DSPy programs, signatures and bridge sessions.

Built on `polyfactory <https://polyfactory.litestar.dev>`_ rather than factory_boy because the objects
are pydantic models (as is the rest of provisioner): polyfactory builds them from their type hints,
validates every built object through the model, is fully typed, and is already a dependency — while
factory_boy is geared to ORMs and would need every field declared by hand.

The models themselves, the unique ids and ``new_session`` live in :mod:`provisioner.specs` (pydantic
only; re-exported here): the plugin and the Python API use them without importing polyfactory and
Faker. The factories keep the specs' two rules: ids never collide (``ProgramFactory`` draws its ids
from :func:`~provisioner.specs.unique_id`) and everything else is a fixed default (prompts stay
cacheable).

Usage::

    program = ProgramFactory.build()                                   # question -> answer
    programs = ProgramFactory.build_batch(3, program_type="chain_of_thought")
    sig = SignatureFactory.build(inputs=[FieldSpec(name="text")], outputs=[FieldSpec(name="label")])
    bridge.create_program(**ProgramFactory.build(signature=sig).create_args())   # bridge = isolated.adapter
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from polyfactory import Use
from polyfactory.factories.pydantic_factory import ModelFactory
from pydantic import BaseModel

from provisioner.specs import (
    FieldSpec,
    ProgramSpec,
    SessionSpec,
    SignatureSpec,
    _session_fields,
    new_session,
    set_run_id,
    unique_id,
)

# -- the factories --------------------------------------------------------------------------------

T = TypeVar("T", bound=BaseModel)


class _Factory(ModelFactory[T], Generic[T]):
    """Common settings: use model defaults (deterministic prompts), check the model once."""

    __is_base_factory__ = True
    __use_defaults__ = True

    @classmethod
    def build_batch(cls, size: int, **overrides: Any) -> list[T]:
        """``size`` objects built with the same overrides (each still gets its own unique ids)."""
        return cls.batch(size, **overrides)


class SignatureFactory(_Factory[SignatureSpec]):
    __model__ = SignatureSpec
    __set_as_default_factory__ = True


class ProgramFactory(_Factory[ProgramSpec]):
    __model__ = ProgramSpec
    id = Use(unique_id, "program")


class SessionFactory(_Factory[SessionSpec]):
    """Sessions whose id, namespace and program prefix share one unique suffix."""

    __model__ = SessionSpec
    @classmethod
    def build(cls, *args: Any, **overrides: Any) -> SessionSpec:
        values: dict[str, Any] = dict(_session_fields())
        values.update(overrides)
        return super().build(*args, **values)

    @classmethod
    def batch(cls, size: int, **overrides: Any) -> list[SessionSpec]:
        return [cls.build(**overrides) for _ in range(size)]


__all__ = [
    "FieldSpec",
    "ProgramFactory",
    "ProgramSpec",
    "SessionFactory",
    "SessionSpec",
    "SignatureFactory",
    "SignatureSpec",
    "new_session",
    "set_run_id",
    "unique_id",
]
