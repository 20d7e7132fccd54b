"""Make ``import dspy`` skip a stack walk it does for every optional module that is missing.

DSPy's ``dspy.utils.lazy_import.require(module)`` calls ``inspect.stack()`` when ``module`` is not
installed, only to name its caller's file and line in the ``ImportError`` it raises if the module is
used later. ``inspect.stack()`` builds a ``FrameInfo`` for *every* frame on the stack (about 60 deep
inside nested imports), and each one looks up the frame's module by scanning ``sys.modules``. DSPy
3.x runs it five times at import (``np = require("numpy")`` in five modules; numpy is not in the
worker image nor a dependency): 264-406 ms of CPU of a 1.1-1.6 s ``import dspy`` (25 %), measured with
``time.process_time()`` around the calls, on the host and in the worker image, load ≈ 15-17. Every
worker container pays it on its way to ready (the pool's start) and every pytest session at
collection.

:func:`install` (run when the worker's entry point, ``provisioner.bridge.worker``, is imported —
only in a worker's own process, never in a user's pytest process) adds a one-shot import hook: when
``dspy.utils.lazy_import`` is loaded, its module-level name ``inspect`` is replaced by a proxy whose
``stack()`` builds only the two nearest frames (``require`` and its caller: all ``require`` reads)
and which hands every other attribute to the real ``inspect``. Nothing outside that one DSPy module
sees a difference, ``inspect`` itself is untouched, and the error DSPy raises on use of a missing
module names the same file and line as before. If DSPy changes (no such module, no ``inspect`` in
it) the hook does nothing.

Written here rather than taken from a library: it is a shim over one function of one DSPy module.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import linecache
import sys
from types import FrameType, ModuleType
from typing import Any

TARGET = "dspy.utils.lazy_import"


def shallow_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack(context)`` limited to the caller of ``stack()`` and that caller's caller."""
    frames: list[FrameType] = []
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and len(frames) < 2:
        frames.append(frame)
        frame = frame.f_back
    out = []
    for f in frames:
        filename, lineno = f.f_code.co_filename, f.f_lineno
        line = linecache.getline(filename, lineno, f.f_globals) if context > 0 else ""
        out.append(inspect.FrameInfo(f, filename, lineno, f.f_code.co_name, [line] if line else None,
                                     0 if line else None))
    return out


class _InspectForLazyImport(ModuleType):
    """``inspect`` as ``dspy.utils.lazy_import`` sees it: the real module but a shallow ``stack``."""

    def __init__(self) -> None:
        super().__init__("inspect")
        self.stack = shallow_stack

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        uninstall()  # one shot; finding the real spec below must not come back here
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            if getattr(module, "inspect", None) is inspect:
                module.inspect = _InspectForLazyImport()  # type: ignore[attr-defined]

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_hook = _Hook()


def install() -> None:
    """Add the hook unless DSPy's module is already imported (then it is too late, and harmless)."""
    if TARGET not in sys.modules and _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def uninstall() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
