"""Surviving ``accept(2)`` failures: which errors mean "out of descriptors or memory now", and a
doubling back-off between attempts while they last. Stdlib only, below everything: the bridge's
servers (in the worker), the Gemini stand-in (``provisioner.lm``) and the in-process fake relay
(host) share it.

``accept()`` failing with EMFILE leaves the connection queued and the listener readable, so a loop
that retries at once spins at 100 % CPU (issue 14, item 7); a loop that gives up on the first error
stops serving for good. Written here rather than taken from a library: it is a counter and a wait,
and the servers each wait on their own stop signal.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

# accept(2) errors that mean "no descriptor or memory for a new socket now". The connection stays
# queued, so the listener stays readable: retrying at once spins.
ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Back-off between accept attempts while descriptors are exhausted (seconds): first, cap.
ACCEPT_BACKOFF_S = (0.01, 1.0)


class AcceptBackoff:
    """Doubling waits between accept attempts while descriptors are exhausted; reset on success.

    ``wait(seconds)`` does the waiting (a server waits on its stop signal, so a stop still
    interrupts it). Logs one warning per episode, not one per attempt, to ``logger`` (this
    module's by default)."""

    def __init__(
        self, what: str, wait: Callable[[float], object], logger: logging.Logger | None = None
    ) -> None:
        self.what = what
        self._wait = wait
        self._log = logger or log
        self._delay = 0.0
        self.episodes = 0

    def failed(self, exc: OSError, refused: bool) -> None:
        """After an exhausted accept: ``refused`` says whether a reserve descriptor refused a connection."""
        if self._delay == 0.0:
            self.episodes += 1
            self._log.warning("%s: out of file descriptors (%s); refusing new connections until some close",
                              self.what, exc)
        if refused:
            self._delay = self._delay or ACCEPT_BACKOFF_S[0]
            return  # progress was made: the queued connection got its answer
        self._delay = min(ACCEPT_BACKOFF_S[1], max(ACCEPT_BACKOFF_S[0], self._delay * 2))
        self._wait(self._delay)

    def succeeded(self) -> None:
        if self._delay:
            self._log.info("%s: accepting connections again", self.what)
        self._delay = 0.0
