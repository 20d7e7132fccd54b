"""The factories themselves: polyfactory's ``ModelFactory`` over :mod:`provisioner.specs`.

Imported by :mod:`provisioner.factories` on the first use of a factory's name, so only a project that
builds test data with them needs polyfactory (and Faker, which polyfactory pulls in): the
``factories`` extra, ``pip install 'dspy-provisioner[factories]'``.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from polyfactory import Use
from polyfactory.factories.pydantic_factory import ModelFactory
from pydantic import BaseModel

from provisioner.specs import ProgramSpec, SessionSpec, SignatureSpec, _session_fields, unique_id

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


__all__ = ["ProgramFactory", "SessionFactory", "SignatureFactory"]
