"""Progress of a test run's start-up phases (worker image, warm pool): one line per phase.

On a terminal the line is a rich spinner while the phase runs (updated with the phase's own
messages, e.g. the image build step) and a final ``✓`` line; otherwise (CI logs, pipes) a plain
line ``provisioner: <phase> … done in 1.2 s`` written in two parts, so a long first image build is
visible while it happens.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any


class Phases:
    """Reports phases through ``write`` (plain text, no newline added) or a rich ``console`` (a TTY).

    ``process``: this is one of several processes writing to one terminal (an xdist worker, whose
    stderr is the terminal's): each phase is then **one whole line** when it starts, prefixed
    ``provisioner [gw0]:`` and on a line of its own (plus a line if it fails), so processes
    waiting for the run's pool say so without their text joining the controller's progress.
    ``midline()``: whether the controller's progress (". s F") may have left the terminal mid-line
    (it printed a test's outcome): the line then starts with a newline; before that the terminal is
    at the start of a line, and a newline would only add a blank line (None: always start with one).
    """

    def __init__(
        self, write: Callable[[str], None], *, console: Any = None, process: str | None = None,
        midline: Callable[[], bool] | None = None,
    ) -> None:
        self._write = write
        self._console = console
        self._process = process
        self._midline = midline

    def _lead(self) -> str:
        return "\n" if self._midline is None or self._midline() else ""

    @contextlib.contextmanager
    def phase(self, title: str) -> Iterator[Callable[[str], None]]:
        """Report ``title`` while the block runs; yields ``update(message)`` for sub-steps (shown on a
        TTY only). A failure is reported on the same line and re-raised."""
        started = time.monotonic()
        if self._process is not None:
            # A leading newline when the controller's progress (". s F") may be mid-line on the terminal.
            self._write(f"{self._lead()}provisioner [{self._process}]: {title} …\n")
            try:
                yield lambda message: None
            except BaseException as exc:
                self._write(f"{self._lead()}provisioner [{self._process}]: {title}: {_outcome(exc)}\n")
                raise
            return
        if self._console is not None:
            from rich.markup import escape

            def line(text: str) -> str:  # one line, whatever the terminal's width (the spinner takes 2)
                room = max(self._console.width - 3, 10)
                return escape(text if len(text) <= room else text[: room - 1] + "…")

            with self._console.status(line(f"provisioner: {title} …")) as status:
                try:
                    yield lambda message: status.update(line(f"provisioner: {title}: {message}"))
                except BaseException as exc:
                    self._console.print(f"provisioner: {title}: [red]{escape(_outcome(exc))}[/red]",
                                        markup=True, highlight=False)
                    raise
            self._console.print(f"provisioner: {title}: [green]✓[/green] {time.monotonic() - started:.1f} s",
                                markup=True, highlight=False)
            return
        self._write(f"provisioner: {title} … ")
        try:
            yield lambda message: None
        except BaseException as exc:
            self._write(f"{_outcome(exc)}\n")
            raise
        self._write(f"done in {time.monotonic() - started:.1f} s\n")


def _outcome(exc: BaseException) -> str:
    """How a phase ended early: ``interrupted (Ctrl-C)`` for a KeyboardInterrupt (its text is empty),
    else ``failed: <the error>`` (the error's type when it has no text)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return f"failed: {exc or type(exc).__name__}"
