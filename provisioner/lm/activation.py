"""Make an LM the active one for a block: in this thread *and* in every thread the block starts.

``dspy.context(lm=...)`` sets a :mod:`contextvars` override. asyncio tasks, ``dspy.Parallel`` and
DSPy's ``asyncify`` copy it, but a plain ``threading.Thread`` or a ``ThreadPoolExecutor`` the code
under test starts does not — there DSPy falls back to its process-global configuration
(``dspy.configure``) and, when that has no LM, raises ``No LM is loaded``.

:func:`activate` therefore does both for the duration of the block: ``dspy.configure(lm=lm)``
(the process-global default every thread sees) and ``dspy.context(lm=lm)`` (this thread, which
also wins over an outer ``dspy.context``), and on exit restores the previous global LM.

DSPy's rule (``dspy/dsp/utils/settings.py``): only the thread that first called ``dspy.configure``
may call it again, and inside an asyncio task only the task that called it first. When this block
runs where DSPy forbids ``configure``, :func:`activate` keeps the per-thread ``dspy.context`` only
and warns (:class:`GlobalLMNotSetWarning`) that threads started in the block will not see the LM.

Processes are separate: each pytest-xdist worker has its own global configuration, so two tests
running in parallel in two processes each see their own LM.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

_UNSET: Any = object()
_lock = threading.Lock()


class GlobalLMNotSetWarning(UserWarning):
    """DSPy did not allow ``dspy.configure`` here; only this thread sees the LM."""


def global_lm() -> Any:
    """The LM of DSPy's process-global configuration (what a plain thread sees), or None."""
    import importlib

    # The module, not the ``settings`` object ``dspy.dsp.utils`` re-exports under the same name.
    dspy_settings = importlib.import_module("dspy.dsp.utils.settings")
    return dspy_settings.main_thread_config.get("lm")


def _configure(lm: Any) -> str | None:
    """``dspy.configure(lm=lm)``; the reason DSPy refused it, or None when it was set."""
    import dspy

    try:
        dspy.configure(lm=lm)
    except RuntimeError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def activate(lm: Any, *, what: str = "the layer's LM") -> Iterator[Any]:
    """Make ``lm`` active in this thread and, for the block, process-wide; yields ``lm``.

    Restores DSPy's previous global LM on exit (also after an error), so nothing of a test's LM
    outlives the test.

    Warns:
        GlobalLMNotSetWarning: DSPy refused ``dspy.configure`` here (another thread configured DSPy
            first, or this runs inside an asyncio task that did not); ``lm`` is then active in this
            thread, its asyncio tasks and ``dspy.Parallel`` only.
    """
    import dspy

    with _lock:
        previous = global_lm()
        refused = _configure(lm)
    if refused is not None:
        warnings.warn(
            f"{what} is active in this thread only, not in threads it starts: dspy.configure was refused "
            f"({refused}). Enter the block in the thread that first called dspy.configure, or pass "
            "`with dspy.context(lm=...)` into the threads you start.",
            GlobalLMNotSetWarning,
            stacklevel=3,
        )
    try:
        with dspy.context(lm=lm):
            yield lm
    finally:
        if refused is None:
            with _lock:
                _configure(previous)


__all__ = ["GlobalLMNotSetWarning", "activate", "global_lm"]
