"""The plan's isolated test: one session with its own namespace, program prefix and cleanups.

Every test that asks for ``isolated`` gets a fresh :class:`IsolatedTest`. Its ``adapter`` is bound to
the test's own session — a :class:`~provisioner.bridge.BridgeClient` session on a worker container
for bridge layers, or an in-process :class:`~provisioner.bridge.LocalBridge` session for the unit
layer — so programs of different tests can never see or clash with each other.

Cleanups run in reverse order of registration when the test ends, whether it passed or failed; a
cleanup that raises does not stop the others, and every failure is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from provisioner.bridge.client import session_name
from provisioner.errors import CleanupError, ClosedError
from provisioner.specs import SessionSpec


def _describe(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


@dataclass
class IsolatedTest:
    """One test's isolated session. Use it as a context manager, or call :meth:`close`."""

    spec: SessionSpec
    adapter: Any = None
    layer: str = "unit"
    _cleanups: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = field(
        default_factory=list, repr=False
    )
    closed: bool = False

    @property
    def session_id(self) -> str:
        return self.spec.session_id

    @property
    def label(self) -> str | None:
        """The name the session was opened with (``env.session("smoke")``, the plugin's test node id)."""
        return self.spec.metadata.get("label") or None

    @property
    def name(self) -> str:
        """How errors and worker logs name the session: ``<label> (<session id>)``, or the id."""
        return session_name(self.session_id, self.label)

    @property
    def namespace(self) -> str:
        return self.spec.namespace

    @property
    def program_prefix(self) -> str:
        return self.spec.program_prefix

    def program_id(self, name: str) -> str:
        """A program id inside this test's prefix: ``isolated.program_id("qa")``."""
        return self.spec.program_id(name)

    def add_cleanup(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` when the test ends (last added runs first)."""
        if self.closed:
            raise ClosedError(f"isolated session {self.name} is already closed")
        if not callable(fn):
            raise TypeError(f"add_cleanup needs a callable, got {fn!r}")
        self._cleanups.append((fn, args, kwargs))

    def close(self) -> None:
        """Run every cleanup in reverse order; raise :class:`CleanupError` if any failed."""
        if self.closed:
            return
        self.closed = True
        failures: list[tuple[str, BaseException]] = []
        while self._cleanups:
            fn, args, kwargs = self._cleanups.pop()
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # every cleanup must get its turn
                failures.append((_describe(fn), exc))
        if failures:
            raise CleanupError(failures)

    def __enter__(self) -> IsolatedTest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
