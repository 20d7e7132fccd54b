"""Test-data factories for DSPy programs, signatures and bridge sessions.

Built on `polyfactory <https://polyfactory.litestar.dev>`_ rather than factory_boy because the objects
are pydantic models (as is the rest of provisioner): polyfactory builds them from their type hints,
validates every built object through the model and is fully typed, while factory_boy is geared to
ORMs and would need every field declared by hand.

polyfactory is an optional extra, ``pip install 'dspy-provisioner[factories]'``: it depends on Faker,
and Faker registers a pytest plugin of its own (a ``pytest11`` entry point) that imports faker at
every pytest start of a project that has it installed, whether a test uses it or not (≈ 0.5 s each:
docs/benchmarks.md, "pytest start-up with the plugin"). The factory classes (``ProgramFactory``,
``SignatureFactory``, ``SessionFactory``) are imported from :mod:`provisioner.factories._polyfactory`
on first use; without the extra that use raises an :class:`ImportError` naming the extra.

The models themselves, the unique ids and ``new_session`` live in :mod:`provisioner.specs` (pydantic
only; re-exported here, usable without the extra): the plugin and the Python API use them without
importing polyfactory and Faker. The factories keep the specs' two rules: ids never collide
(``ProgramFactory`` draws its ids from :func:`~provisioner.specs.unique_id`) and everything else is a
fixed default (prompts stay cacheable).

Usage::

    program = ProgramFactory.build()                                   # question -> answer
    programs = ProgramFactory.build_batch(3, program_type="chain_of_thought")
    sig = SignatureFactory.build(inputs=[FieldSpec(name="text")], outputs=[FieldSpec(name="label")])
    bridge.create_program(**ProgramFactory.build(signature=sig).create_args())   # bridge = isolated.adapter
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from provisioner.specs import (
    FieldSpec,
    ProgramSpec,
    SessionSpec,
    SignatureSpec,
    new_session,
    set_run_id,
    unique_id,
)

if TYPE_CHECKING:
    from provisioner.factories._polyfactory import ProgramFactory, SessionFactory, SignatureFactory

EXTRA = "factories"
_FACTORIES = ("ProgramFactory", "SessionFactory", "SignatureFactory")
# What the factories import that the base install does not have (polyfactory pulls in Faker).
_EXTRA_MODULES = ("polyfactory", "faker")


def __getattr__(name: str) -> Any:
    """The factory classes, imported on first use (PEP 562).

    Raises:
        ImportError: polyfactory (or Faker) is not installed; the message names the extra to install.
        AttributeError: ``name`` is not a name of this module.
    """
    if name not in _FACTORIES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module("provisioner.factories._polyfactory")
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in _EXTRA_MODULES:
            raise
        raise ImportError(
            f"provisioner.factories.{name} is built on polyfactory, and {missing} is not installed: "
            f"install provisioner's '{EXTRA}' extra, pip install 'dspy-provisioner[{EXTRA}]' (from a "
            f"wheel file: pip install '<the .whl file>[{EXTRA}]'). The specs (FieldSpec, SignatureSpec, "
            "ProgramSpec, SessionSpec, new_session, unique_id) need no extra: import them from "
            "provisioner.specs.",
            name=missing,
        ) from exc
    value = getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


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
