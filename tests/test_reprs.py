"""No repr in provisioner raises, even on an object whose __init__ failed half-way (issue 8, item 3)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from typing import Any

import pydantic

import provisioner


def _hand_written_reprs() -> list[type[Any]]:
    found = []
    for info in pkgutil.walk_packages(provisioner.__path__, "provisioner."):
        if info.name == "provisioner.__main__":
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or "__repr__" not in cls.__dict__:
                continue
            if dataclasses.is_dataclass(cls) or issubclass(cls, pydantic.BaseModel | BaseException):
                continue  # generated reprs of fields that __init__ sets before anything can fail
            if issubclass(cls, tuple) and hasattr(cls, "_fields"):
                continue  # a NamedTuple's generated repr: the fields are the tuple, set by __new__
            found.append(cls)
    return found


def test_every_hand_written_repr_survives_a_half_built_object() -> None:
    classes = _hand_written_reprs()
    assert len(classes) >= 7, [c.__name__ for c in classes]  # the check must see the package's reprs
    for cls in classes:
        half_built = cls.__new__(cls)  # __init__ never ran: no attribute is set
        text = repr(half_built)
        assert cls.__name__ in text, (cls, text)


def test_gemini_engine_without_a_key_fails_with_its_own_error_not_one_from_repr() -> None:
    import pytest

    from provisioner.errors import ConfigError
    from provisioner.lm.gemini import GeminiEngine
    from provisioner.lmconfig import LMConfig

    with pytest.raises(ConfigError, match="GEMINI_TEST_API_KEY") as info:
        GeminiEngine(LMConfig(mode="real"))
    frames = [entry.frame.f_locals.get("self") for entry in info.traceback]
    assert all("raised in repr" not in repr(obj) for obj in frames)
