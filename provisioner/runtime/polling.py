"""One polling loop with a deadline, for the host side's waits on the engine and the workers.

A worker's readiness, the Gemini stand-in's start, a repaired worker's ``ping`` and the egress
guard's exit are all observed by asking again until a deadline: the engine has no cheap push for
"this process now answers". Kept here (not in :mod:`tenacity`, which the host does not depend on)
because the loop is six lines and its callers want the wait to wake at once when a run is stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def poll_until(
    check: Callable[[], bool],
    timeout_s: float,
    interval_s: float,
    *,
    stop: threading.Event | None = None,
) -> bool:
    """Call ``check`` until it returns True (then True) or ``timeout_s`` seconds have passed (then False).

    ``check`` is called at least once, and raises to give up early (a container that exited, a run
    being stopped). Between calls it waits ``interval_s`` seconds — on ``stop`` when given, so
    setting ``stop`` ends the wait at once and the next ``check`` can see it.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        if stop is not None:
            stop.wait(interval_s)
        else:
            time.sleep(interval_s)
