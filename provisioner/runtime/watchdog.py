"""The per-run watchdog: when every owner of a run is gone — even by SIGKILL — remove the run.

testcontainers' Ryuk needs an image pull and the docker socket inside a container; neither works
offline, and a socket-mounted container is a privilege we do not want. The watchdog is a plain,
detached host process instead (``python -m provisioner.runtime.watchdog``):

* owners (the ``provision run`` process, each pytest or xdist worker process) register a file
  ``<run_dir>/owners/<pid>-<start time>``; the start time guards against pid reuse. An owner has a
  *role*: a ``principal`` (the file is empty) keeps the run alive on its own; a ``dependant`` (the
  file reads ``dependant of <pid>-<start time>``: an xdist worker, of its controller) keeps it alive
  only while its principal lives. A dependant whose principal is gone is the run's own orphan: the
  watchdog terminates it (SIGTERM, then SIGKILL after ``DEPENDANT_GRACE_S``) instead of waiting for
  it to notice — an xdist worker of a SIGKILLed controller only dies through execnet's timeouts,
  6 to 16 s later (issue 14, item 9);
* exactly one watchdog per run: it holds an exclusive ``flock`` on ``<run_dir>/watchdog.lock`` for
  its whole life. Anyone can tell whether a run is watched by trying that lock, and a second
  watchdog started by a racing owner exits at once;
* every ``interval`` seconds it checks the owners with psutil (zombies count as dead). When none is
  alive, it removes everything labelled ``provisioner.run=<id>`` (containers first, in parallel,
  then networks) while it terminates orphaned dependants and the host processes registered under
  ``<run_dir>/processes/``, sweeps
  again shortly after (a create call in flight when the owner died may still land), and exits;
* the engine may be out of reach when the run is to go (a remote engine's network, an engine
  restarting): each removal that fails is tried again, on a fresh connection, until
  ``ENGINE_DEADLINE_S`` (``--engine-deadline``) has passed since the first failure; then the
  watchdog says so in its log and exits with status 3, leaving the run to ``provision reap`` (its
  resources keep their labels and no owner of it lives);
* ``<run_dir>/persist`` (written by ``provision up`` once the environment is up) and
  ``<run_dir>/retain`` (cleanup policy kept it) make it exit without removing anything;
  ``<run_dir>/stopped`` (``provision down`` finished) makes it exit too.

The watchdog double-forks, so it is nobody's child: it survives its owner's process group being
killed, leaves no zombie, and does not show up in the owner's child-process leak checks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from provisioner._files import atomic_write, try_lock

if TYPE_CHECKING:
    from provisioner.runtime.engine import ContainerRuntime

LOCK_FILE = "watchdog.lock"
LOG_FILE = "watchdog.log"
OWNERS_DIR = "owners"
PROCESSES_DIR = "processes"
PERSIST_MARKER = "persist"
RETAIN_MARKER = "retain"
STOPPED_MARKER = "stopped"
REAPED_MARKER = "reaped"
# An owner that never registers (crashed between spawn and registration) must not keep a run forever.
NO_OWNER_GRACE_S = 30.0
LATE_SWEEPS_S = (1.0, 3.0)
# How long an orphaned dependant gets between SIGTERM and SIGKILL (seconds).
DEPENDANT_GRACE_S = 1.0
DEPENDANT_PREFIX = "dependant of "
# How long the watchdog keeps trying an engine it cannot reach before it leaves the run to
# `provision reap` (seconds, from the first failed removal); each call waits ENGINE_CALL_TIMEOUT_S.
ENGINE_DEADLINE_S = 120.0
ENGINE_CALL_TIMEOUT_S = 30.0
ENGINE_RETRY_S = (0.5, 1.0, 2.0, 4.0)  # pauses between tries (the last repeats): a backoff
ENGINE_LOST_EXIT = 3


# --- owner side -------------------------------------------------------------------------------------


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _entry_name(pid: int) -> str:
    start = _process_start(pid)
    return f"{pid}-{start:.3f}" if start is not None else f"{pid}-0"


def process_entry(pid: int | None = None) -> str:
    """``<pid>-<start time>`` of a process (default: this one): how the run's files name it, so a
    reused pid is never taken for it. Pass it to another process as its principal."""
    return _entry_name(pid or os.getpid())


def register_owner(run_dir: Path, pid: int | None = None, *, principal: str | None = None) -> Path:
    """Register ``pid`` (default: this process) as an owner of the run at ``run_dir``.

    ``principal`` (a :func:`process_entry` of another process, e.g. the pytest controller of an
    xdist worker): register as its *dependant* — the run is not kept alive by this process once the
    principal is gone, and the watchdog then terminates this process. ``None``: a principal owner.
    """
    folder = run_dir / OWNERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / _entry_name(pid or os.getpid())
    # Written whole or not at all (a kill -9 mid-write must not leave a half principal behind).
    return atomic_write(entry, f"{DEPENDANT_PREFIX}{principal}\n" if principal else "")


def unregister_owner(run_dir: Path, pid: int | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        (run_dir / OWNERS_DIR / _entry_name(pid or os.getpid())).unlink()


def register_process(run_dir: Path, pid: int) -> Path:
    """A host process of the run (e.g. the command of ``provision run``): terminated on cleanup."""
    folder = run_dir / PROCESSES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / _entry_name(pid)
    entry.touch()
    return entry


def mark(run_dir: Path, marker: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / marker).write_text(f"{time.time()}\n")


def watchdog_alive(run_dir: Path) -> bool:
    """True when a watchdog holds the run's lock."""
    try:
        fd = try_lock(run_dir / LOCK_FILE, create=False)
    except FileNotFoundError:
        return False
    if fd is None:
        return True
    os.close(fd)
    return False


def spawn_watchdog(run_id: str, run_dir: Path, *, interval_s: float = 0.5) -> None:
    """Start a detached watchdog for the run unless one is alive. Returns at once; see wait_watching."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if watchdog_alive(run_dir):
        return
    log = open(run_dir / LOG_FILE, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "provisioner.runtime.watchdog",
                "--run",
                run_id,
                "--run-dir",
                str(run_dir),
                "--interval",
                str(interval_s),
                "--daemonize",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
    finally:
        log.close()
    # The first process forks the real watchdog and exits once its imports are done: reap it in the
    # background (no zombie, and the caller need not wait for Python to start).
    import threading

    threading.Thread(target=proc.wait, name="provision-watchdog-reaper", daemon=True).start()


def wait_watching(run_dir: Path, timeout_s: float = 15.0, poll_s: float = 0.02) -> None:
    """Block until the run's watchdog holds its lock; RuntimeProblem after ``timeout_s``."""
    from provisioner.errors import RuntimeProblem

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if watchdog_alive(run_dir):
            return
        time.sleep(poll_s)
    log = run_dir / LOG_FILE
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeProblem(f"the run's watchdog did not start within {timeout_s:.0f}s; its log:\n{tail}")


def ensure_watchdog(
    run_id: str,
    run_dir: Path,
    *,
    owner_pid: int | None = None,
    principal: str | None = None,
    interval_s: float = 0.5,
    wait: bool = True,
) -> None:
    """Register the owner (a dependant of ``principal`` if given), and start the run's watchdog
    unless one is already watching."""
    register_owner(run_dir, owner_pid, principal=principal)
    spawn_watchdog(run_id, run_dir, interval_s=interval_s)
    if wait:
        wait_watching(run_dir)


# --- watchdog side ----------------------------------------------------------------------------------


def _entries(folder: Path) -> Iterator[tuple[int, float]]:
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        parsed = _parse_entry(entry.name)
        if parsed is not None:
            yield parsed


def _alive(pid: int, start: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        if start and abs(proc.create_time() - start) > 0.01:
            return False  # pid reused
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _parse_entry(name: str) -> tuple[int, float] | None:
    pid_text, _, start_text = name.strip().partition("-")
    try:
        return int(pid_text), float(start_text or 0)
    except ValueError:
        return None


def _principal_of(entry: Path) -> tuple[int, float] | None:
    """The principal a dependant entry names; None for a principal owner (or an unreadable entry)."""
    try:
        text = entry.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    if not text.startswith(DEPENDANT_PREFIX):
        return None
    return _parse_entry(text[len(DEPENDANT_PREFIX):])


def owner_states(run_dir: Path) -> tuple[int, int, list[tuple[int, float]]]:
    """(registered owners, owners that keep the run alive, orphans).

    An owner keeps the run alive while it lives and, for a dependant, while its principal lives.
    Orphans are live dependants whose principal is gone: ``(pid, start time)`` each.
    """
    folder = run_dir / OWNERS_DIR
    registered = 0
    keeping: int = 0
    orphans: list[tuple[int, float]] = []
    if not folder.is_dir():
        return 0, 0, []
    for entry in folder.iterdir():
        parsed = _parse_entry(entry.name)
        if parsed is None:
            continue
        registered += 1
        if not _alive(*parsed):
            continue
        principal = _principal_of(entry)
        if principal is not None and not _alive(*principal):
            orphans.append(parsed)
        else:
            keeping += 1
    return registered, keeping, orphans


def owners_alive(run_dir: Path) -> tuple[int, int]:
    """(registered owners, owners that keep the run alive: see :func:`owner_states`)."""
    registered, keeping, _orphans = owner_states(run_dir)
    return registered, keeping


def terminate_orphans(orphans: list[tuple[int, float]], grace_s: float = DEPENDANT_GRACE_S) -> list[str]:
    """SIGTERM every orphaned dependant (and its child processes) at once, SIGKILL what is left
    after ``grace_s``; returns ``"process <pid>"`` of the dependants that were still there. Only the
    exact processes (pid + start time) registered in the run, and their children, are touched."""
    from provisioner.runtime.resources import process_family, terminate_processes

    found = []
    family = []
    for pid, start in orphans:
        members = process_family(pid, start or None)  # 0: the start time was not recorded
        if members:
            family += members
            found.append(members[-1])
    terminate_processes(family, grace_s)
    return [f"process {p.pid}" for p in found]


def remove_run(
    run_id: str,
    run_dir: Path | None,
    orphans: list[tuple[int, float]] | None,
    runtime: ContainerRuntime,
) -> list[str]:
    """Remove every engine resource labelled with ``run_id`` (containers in parallel, then networks)
    while terminating the run's registered host processes and ``orphans`` (dependants whose principal
    is gone, see :func:`owner_states`). ``runtime``: the engine (the watchdog's, kept open across
    retries). Returns ``"<kind> <name>"`` of what went."""
    from provisioner.runtime import labels as L
    from provisioner.runtime.engine import remove_by_selector
    from provisioner.runtime.resources import terminate_process

    removed: list[str] = []

    def stop_processes() -> list[str]:
        if run_dir is None:
            return []
        return [
            f"process {pid}"
            for pid, start in _entries(run_dir / PROCESSES_DIR)
            if terminate_process(pid, grace_s=2.0, create_time=start or None)
        ]

    with ThreadPoolExecutor(max_workers=2) as pool:
        # Host processes and containers go at the same time: a command that ignores SIGTERM
        # must not delay the containers by its grace period.
        dependants = pool.submit(terminate_orphans, orphans or [])
        processes = pool.submit(stop_processes)
        removed += [f"{ref.kind} {ref.name}" for ref in remove_by_selector(runtime, L.selector(run_id))]
        removed += dependants.result() + processes.result()
    return removed


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} watchdog[{os.getpid()}] {message}", flush=True)


class _Engine:
    """The watchdog's connection to the engine: opened as its owners' was (open_runtime from the
    same environment), or the runtime a test hands in; opened again after a failure, since a
    connection that broke (a remote engine's network, ssh) does not always recover by itself."""

    def __init__(self, given: ContainerRuntime | None) -> None:
        self._given = given
        self._runtime = given

    def get(self) -> ContainerRuntime:
        if self._runtime is None:
            from provisioner.runtime.engine import open_runtime

            self._runtime = open_runtime(ping=False, timeout=ENGINE_CALL_TIMEOUT_S)
        return self._runtime

    def drop(self) -> None:
        if self._runtime is not None and self._runtime is not self._given:
            with contextlib.suppress(Exception):
                self._runtime.close()
            self._runtime = None


def remove_with_retries(
    run_id: str,
    engine: _Engine,
    *,
    run_dir: Path | None = None,
    orphans: list[tuple[int, float]] | None = None,
    deadline_s: float = ENGINE_DEADLINE_S,
) -> list[str] | None:
    """:func:`remove_run`, tried again (a fresh connection each time, pauses of ``ENGINE_RETRY_S``)
    while the engine cannot be reached, up to ``deadline_s`` after the first failure. Returns what
    was removed, or None when the engine stayed out of reach (logged, naming ``provision reap``)."""
    failed_at: float | None = None
    pauses = iter(ENGINE_RETRY_S)
    pause = ENGINE_RETRY_S[0]
    while True:
        try:
            return remove_run(run_id, run_dir, orphans, engine.get())
        except Exception as exc:  # docker-py/requests/paramiko errors, DockerUnavailableError
            engine.drop()
            now = time.monotonic()
            failed_at = now if failed_at is None else failed_at
            reason = f"{type(exc).__name__}: {str(exc)[:300]}"
            if now - failed_at >= deadline_s:
                _log(f"the engine stayed out of reach for {now - failed_at:.0f}s ({reason}); leaving run "
                     f"{run_id} to `provision reap` (its resources keep the run's labels)")
                return None
            pause = next(pauses, pause)
            _log(f"cannot reach the engine ({reason}); trying again in {pause:.1f}s "
                 f"(until {deadline_s:.0f}s after the first failure)")
            time.sleep(pause)  # a retry's backoff, not a wait for another party


def watch(
    run_id: str,
    run_dir: Path,
    interval_s: float,
    *,
    runtime: ContainerRuntime | None = None,
    engine_deadline_s: float = ENGINE_DEADLINE_S,
) -> int:
    """The watchdog loop (runs in the detached process). Returns the exit status: 0, or
    :data:`ENGINE_LOST_EXIT` when the engine stayed out of reach (the run is left to ``reap``).
    ``runtime``: the engine's runtime (tests hand one in; default: :func:`open_runtime` from this
    process's environment, which the owner's was)."""
    # Held for the process's life (the fd is never closed): released when the watchdog exits or dies.
    if try_lock(run_dir / LOCK_FILE) is None:
        _log(f"run {run_id} is already watched; exiting")
        return 0
    # Import and open now what cleanup needs, so a dead owner costs no import time later. The
    # engine is the one open_runtime() finds from this process's environment, as the owner's was.
    import psutil  # noqa: F401

    from provisioner.runtime import resources  # noqa: F401

    engine = _Engine(runtime)
    with contextlib.suppress(Exception):  # an engine out of reach now is tried again when needed
        engine.get()

    _log(f"watching run {run_id} every {interval_s}s")
    started = time.monotonic()
    while True:
        for marker in (PERSIST_MARKER, RETAIN_MARKER, STOPPED_MARKER):
            if (run_dir / marker).exists():
                _log(f"{marker} marker found; exiting without cleanup")
                return 0
        registered, alive, orphans = owner_states(run_dir)
        if alive == 0 and (registered > 0 or time.monotonic() - started > NO_OWNER_GRACE_S):
            break
        if orphans:  # another principal still holds the run: only the orphans go
            _log(f"principal gone; terminating its dependants: {', '.join(terminate_orphans(orphans))}")
        time.sleep(interval_s)
    _log("every owner is gone" + (f" ({len(orphans)} orphaned dependant(s))" if orphans else "")
         + "; removing the run")
    t0 = time.monotonic()
    removed = remove_with_retries(run_id, engine, run_dir=run_dir, orphans=orphans,
                                  deadline_s=engine_deadline_s)
    if removed is None:
        engine.drop()
        return ENGINE_LOST_EXIT
    _log(f"removed {len(removed)} resource(s) in {time.monotonic() - t0:.2f}s: {', '.join(removed) or '-'}")
    mark(run_dir, REAPED_MARKER)
    for delay in LATE_SWEEPS_S:
        time.sleep(delay)
        late = remove_with_retries(run_id, engine, deadline_s=engine_deadline_s)
        if late:
            _log(f"late sweep removed: {', '.join(late)}")
    engine.drop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m provisioner.runtime.watchdog")
    parser.add_argument("--run", required=True)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--engine-deadline", type=float, default=ENGINE_DEADLINE_S,
                        help="seconds to keep trying an unreachable engine before leaving the run to reap")
    parser.add_argument("--daemonize", action="store_true", help="fork and let the parent exit at once")
    args = parser.parse_args(argv)
    if args.daemonize and os.fork() > 0:
        os._exit(0)  # the spawning owner reaps this intermediate; the child is adopted by init
    return watch(args.run, args.run_dir.resolve(), args.interval, engine_deadline_s=args.engine_deadline)


def finish_run(run_dir: Path) -> None:
    """The run is over and every process cleaned up: let the run's watchdog (if any) stand down.

    Owners stay registered until then, so a process killed mid-run is still cleaned up after.
    """
    if (run_dir / LOCK_FILE).exists() and not (run_dir / RETAIN_MARKER).exists():
        mark(run_dir, STOPPED_MARKER)


if __name__ == "__main__":
    sys.exit(main())
