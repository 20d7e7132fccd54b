"""Reprs that never raise.

pytest, debuggers and loggers call ``repr()`` on objects whose ``__init__`` failed half-way (pytest
shows ``self`` of every frame in a traceback): a ``__repr__`` that reads an attribute set later in
``__init__`` then raises inside the error report and buries the real error (issue 8). Every hand-written
``__repr__`` in provisioner is wrapped with :func:`safe_repr`; tests/test_reprs.py checks them all on
objects whose ``__init__`` never ran.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def safe_repr(method: Callable[[T], str]) -> Callable[[T], str]:
    """Wrap a ``__repr__``: when it raises, return ``<ClassName (not fully built)>`` instead."""

    @functools.wraps(method)
    def wrapper(self: T) -> str:
        try:
            return method(self)
        except Exception:
            return f"<{type(self).__name__} (not fully built)>"

    return wrapper
