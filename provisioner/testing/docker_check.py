"""Is a Docker engine reachable? Asked once per process, and only by tests that need one."""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_cached: tuple[bool, str] | None = None


def docker_problem(*, refresh: bool = False) -> str | None:
    """``None`` when an engine answers a ping, else why not (one line)."""
    global _cached
    with _lock:
        if _cached is None or refresh:
            _cached = _probe()
        ok, why = _cached
    return None if ok else why


def _probe() -> tuple[bool, str]:
    from provisioner.runtime.engine import open_runtime

    try:
        open_runtime().close()  # pings: DockerUnavailableError names the reason
        return True, ""
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def unreachable_message(what: str, why: str) -> str:
    text = f"{what} needs a reachable Docker engine, but none answered ({why})"
    if running_in_ci():
        return text + " — CI=true, so this is a failure, not a skip"
    return text + " — skipped here; it fails under CI=true"
