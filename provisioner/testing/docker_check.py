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


#: The words every test-level message about a missing engine carries: the summary counts the tests
#: whose report says them (also those an xdist worker reported).
UNREACHABLE = "needs a reachable Docker engine"


def unreachable_message(what: str, why: str) -> str:
    text = f"{what} {UNREACHABLE}, but none answered ({why})"
    if running_in_ci():
        return text + " — CI=true, so this is a failure, not a skip"
    return text + " — skipped here; it fails under CI=true"


def engine_where() -> str:
    """Where the engine that did not answer was looked for, for a one-line summary:
    ``unix:///x.sock (from DOCKER_HOST)``, or the local socket when nothing names one."""
    from provisioner.runtime.engine.docker import engine_url

    try:
        url, source = engine_url()
    except Exception:  # a broken docker CLI config: the per-test message has the details
        url, source = None, "default"
    return f"{url} (from {source})" if url else "unix:///var/run/docker.sock (DOCKER_HOST is not set)"


def unreachable_summary(counts: dict[str, int], where: str) -> list[str]:
    """The terminal summary's lines for tests that needed an engine none answered: how many, with
    which outcome (``counts``: pytest outcome → tests, e.g. ``{"skipped": 5}``), and what to do.
    Empty when no test needed one."""
    from provisioner.runtime.engine.docker import ENGINE_ADVICE

    total = sum(counts.values())
    if not total:
        return []
    outcomes = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    lines = [f"Docker engine unreachable at {where}: {total} test(s) needed it ({outcomes})"]
    if running_in_ci():
        lines.append(f"  CI=true, so they fail rather than skip. {ENGINE_ADVICE}.")
    else:
        lines.append(f"  skipped here (under CI=true they fail). {ENGINE_ADVICE}; `-rs` lists them.")
    return lines
