"""Helpers several test files (and benchmarks/bench_controller_kill.py) share, one copy each.

Two kinds the duplicate finder (`duplicates`) found written out several times:

* **A TCP listener with an accept thread** (:func:`tcp_listener`): the relay's upstream echo server,
  a fake relay's upstream, a host listener the egress guard must keep workers from. What each does
  with a connection is its own (``handle``); starting, accepting and stopping are the same.
* **A killed pytest controller's run** (:func:`start_held_run`, :func:`run_processes`,
  :func:`run_resources`, :func:`lives`, :func:`end_run`, :data:`HOLD_SUITE`, :func:`scratch_env`):
  a scratch project whose two tests hold their pool sessions until the controller is killed, and
  the clean-up that removes whatever such a test or benchmark round left (its process group, the
  run's processes, the run's containers and networks) even when it failed half-way.
* **An environment without provisioner's settings** (:func:`is_setting_variable`,
  :func:`without_settings`, :func:`clear_settings`; the ``no_settings_env`` fixture of tests/conftest.py):
  a test, or the pytest/``provision``/worker process it starts, must see only the settings it gives,
  not the ``PROVISION_*`` (or ``TEST_MODE``/``LM_CACHE_DIR``/``GEMINI_TEST_API_KEY``) of the shell or CI
  job that runs the suite. Written out in some 30 places before, with three different lists of names.
* **A run a test makes on the engine itself** (:func:`watched_run`; the ``watched_run`` fixture of
  tests/conftest.py): the product's watchdog, so a test process killed before its ``finally`` leaves
  no containers or networks behind.

Imported as ``tests._helpers`` (pytest's importlib mode names test modules from the rootdir; the
benchmark puts the repository root on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

# --- a TCP listener ------------------------------------------------------------------------------


def echo(transform: Callable[[bytes], bytes] = lambda data: data) -> Callable[[socket.socket], None]:
    """A ``handle`` for :func:`tcp_listener`: send back every chunk received (``transform`` ed)
    until the peer closes."""

    def handle(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(transform(data))

    return handle


@contextlib.contextmanager
def tcp_listener(handle: Callable[[socket.socket], None] | None = None,
                 host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP listener on ``host`` (a port the kernel picks; ``"0.0.0.0"``: every host address), its
    port for the block. One thread accepts and runs ``handle(conn)`` for each connection in turn
    (None: close it at once); the connection is closed after. On exit the listener is shut down —
    that wakes the blocked ``accept()``, which ``close()`` alone does not on Linux — and the thread
    joined."""
    server = socket.create_server((host, 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                if handle is not None:
                    handle(conn)

    thread = threading.Thread(target=serve, daemon=True, name=f"tcp-listener-{host}")
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(timeout=5)


# --- an environment without provisioner's settings -----------------------------------------------


def is_setting_variable(name: str) -> bool:
    """``name`` is an environment variable provisioner reads a setting from (provisioner/settings.py):
    ``PROVISION_*`` (pydantic-settings matches the prefix in any case) or one of the un-prefixed
    aliases ``TEST_MODE``, ``LM_CACHE_DIR``, ``GEMINI_TEST_API_KEY``."""
    from provisioner.lmconfig import API_KEY_ENV, CACHE_DIR_ENV
    from provisioner.settings import ENV_PREFIX, LAYER_ALIAS_ENV

    return name.upper().startswith(ENV_PREFIX) or name in (LAYER_ALIAS_ENV, CACHE_DIR_ENV, API_KEY_ENV)


def without_settings(environ: Mapping[str, str] | None = None, *,
                     also: Callable[[str], bool] = lambda _name: False) -> dict[str, str]:
    """A copy of ``environ`` (default: this process's) without the variables of
    :func:`is_setting_variable` and those ``also`` names: the environment for a process a test starts."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if not (is_setting_variable(k) or also(k))}


def clear_settings(monkeypatch: Any, *, also: Callable[[str], bool] = lambda _name: False) -> None:
    """Delete from this process's environment, for the test (``monkeypatch``: pytest's, which puts
    them back), every variable of :func:`is_setting_variable` and every one ``also`` names."""
    for name in list(os.environ):
        if is_setting_variable(name) or also(name):
            monkeypatch.delenv(name, raising=False)


# --- a tar of a few files ---------------------------------------------------------------------------


def dockerfile_context(dockerfile: str) -> io.BytesIO:
    """A build context with only ``dockerfile`` (an uncompressed tar stream, at its start)."""
    context = io.BytesIO()
    write_tar(context, {"Dockerfile": dockerfile.encode()})
    context.seek(0)
    return context


def write_tar(target: Path | IO[bytes], files: Mapping[str, bytes]) -> None:
    """An uncompressed tar of ``files`` (name in the archive -> contents) into ``target`` (a file's
    path, or an open binary stream, left open)."""
    where: dict[str, Any] = {"name": target} if isinstance(target, Path) else {"fileobj": target}
    with tarfile.open(mode="w", **where) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# --- a killed pytest controller's run -----------------------------------------------------------

#: Two integration tests that hold their pool session until the controller is killed; each writes
#: ``started-<xdist worker>`` into ``{out}`` once it holds it (``.format(out=...)``).
HOLD_SUITE = '''
import os
import time

import pytest


@pytest.mark.integration
@pytest.mark.timeout(0)  # held until the controller is killed, however slow the other worker starts
@pytest.mark.parametrize("n", range(2))
def test_hold(isolated, n):
    isolated.adapter.ping()
    open(os.path.join({out!r}, "started-" + os.environ.get("PYTEST_XDIST_WORKER", "main")), "w").close()
    time.sleep(600)
'''


def scratch_env(folder: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a pytest of a scratch project in ``folder``: this one's, without
    provisioner's settings and the API key, with the cassettes in the folder."""
    env = without_settings(environ)
    env["PROVISION_LM__CACHE_DIR"] = str(folder / "cassettes")
    return env


def start_held_run(folder: Path, name: str, **popen: Any) -> tuple[subprocess.Popen[bytes], Path]:
    """Write the scratch project ``name`` of :data:`HOLD_SUITE` into ``folder`` and start ``pytest -n 2
    --layer integration --lm mock`` on it (:func:`scratch_env`, its own session: a process group as a
    terminal's foreground job has; ``popen``: the rest of ``subprocess.Popen``'s arguments, e.g.
    where its output goes). Returns the controller and the folder its tests mark themselves started
    in (two files once both hold their session). The caller ends it with :func:`end_run`."""
    (folder / "pyproject.toml").write_text(f"[project]\nname = '{name}'\n")
    out = folder / "out"
    out.mkdir()
    (folder / "test_hold.py").write_text(HOLD_SUITE.format(out=str(out)))
    command = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--layer", "integration", "--lm", "mock",
               "-p", "no:cacheprovider", "test_hold.py"]
    proc = subprocess.Popen(command, cwd=folder, env=scratch_env(folder), start_new_session=True, **popen)
    return proc, out


def run_processes(run_id: str) -> list[Any]:
    """Live processes of the run (not this one): any whose command line names the run id (the
    watchdog) or whose environment carries it (pytest's processes once they joined the run)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            named = run_id in " ".join(proc.info["cmdline"] or ())
            if named or proc.environ().get("PROVISION_RUN_ID") == run_id:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def run_resources(client: Any, run_id: str) -> list[str]:
    """The run's containers and networks on the engine (``client``: a docker-py ``DockerClient``),
    as ``"container <name>"`` / ``"network <name>"``."""
    labels = {"label": [f"provisioner.run={run_id}"]}
    return [f"container {c['Names'][0]}" for c in client.api.containers(all=True, filters=labels)] + [
        f"network {n['Name']}" for n in client.api.networks(filters=labels)
    ]


def lives(proc: Any) -> bool:
    """A psutil process is running and not a zombie."""
    import psutil

    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def end_run(proc: subprocess.Popen[bytes], run_id: str, runtime: Any = None) -> None:
    """After a killed-controller test or benchmark round, whatever happened: SIGKILL ``proc``'s
    process group (it was started with ``start_new_session=True``) and reap it; then, when the run
    id is known, kill the run's processes and remove its containers and networks (``runtime``: a
    :class:`~provisioner.runtime.engine.ContainerRuntime`, default the engine's)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait()
    if not run_id:
        return
    from provisioner.runtime.engine import open_runtime, remove_by_selector
    from provisioner.runtime.labels import selector

    for p in run_processes(run_id):
        with contextlib.suppress(Exception):
            p.kill()
    remove_by_selector(runtime if runtime is not None else open_runtime(), selector(run_id))


# --- a child that dies with its test process ----------------------------------------------------

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it


def die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` for a long-lived process a test starts (a `provision worker`, a stand-in):
    the child gets SIGKILL when the thread that spawned it ends (``prctl PR_SET_PDEATHSIG``), so it
    never outlives a test process that was killed or interrupted before its teardown stopped it
    (xdist SIGKILLs a worker process that has not ended 10 s after Ctrl-C; one worker of
    tests/bridge/test_regex_rules.py was left running that way).
    A child whose parent already died before the call exits at once. ctypes rather than the
    python-prctl package: one call, and no C extension to build for the test extras."""

    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


# --- a run a test makes itself ---------------------------------------------------------------------


@contextlib.contextmanager
def watched_run(run_id: str, folder: Path) -> Iterator[Path]:
    """The product's watchdog for a run a test makes on the engine itself (resources labelled
    ``provisioner.run=<run_id>`` by ``plan_run`` + ``Deployment``, or by hand), not through ``up``,
    the plugin or the Python API, which start one. This process is the run's owner: if it dies
    before its ``finally`` removed the run — an xdist worker SIGKILLed after Ctrl-C, or SIGTERMed
    (pytest runs no ``finally`` on SIGTERM) — the watchdog removes everything with the run's label,
    as it does for a killed ``provision run``. On a normal exit (the test's own cleanup done inside
    the block) the watchdog is told to stand down. Yields the run's folder (``folder/runs/<run_id>``:
    owners, the lock and ``watchdog.log``) once the watchdog watches and the process that started it
    has gone (so it is not in the test's child processes)."""
    import psutil

    from provisioner.runtime import watchdog as wd

    run_dir = folder / "runs" / run_id
    wd.ensure_watchdog(run_id, run_dir, interval_s=0.5, wait=True)
    # The double fork's first process exits once it forked the watchdog; until then (and until
    # reaped) it is a child of this process, which a test's leak check of child processes would
    # count as its own (tests/runtime/test_resources.py's did, under load).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_is_watchdog(c) for c in psutil.Process().children()):
        time.sleep(0.02)
    try:
        yield run_dir
    finally:
        wd.mark(run_dir, wd.STOPPED_MARKER)
        wd.unregister_owner(run_dir)


def _is_watchdog(proc: Any) -> bool:
    import psutil

    try:
        return "provisioner.runtime.watchdog" in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --- simulated latency held until the test says go -----------------------------------------------

# The longest a gated mock call waits for the test's go: a test that forgets to release fails here.
GATE_TIMEOUT_S = 60.0


class LatencyGate:
    """Holds the in-process mock LM's (and Gemini stand-in's) simulated latency until the test says go.

    While installed (the ``latency_gate`` fixtures of tests/bridge and tests/lm), a mock rule's
    ``latency_ms`` (and a stand-in's ``set_latency``) no longer sleeps
    that long: the call waits until :meth:`release` (or fails after ``GATE_TIMEOUT_S``). A test that
    needs "that request is still in flight" holds it for exactly as long as it checks, instead of
    a fixed delay that is a margin under load. ``waiting`` counts calls held now; ``release(n)`` lets
    n calls through, ``release()`` all. In-process only
    (``BridgeServer``/``BridgeService`` in the test process): a worker subprocess sleeps as asked.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._arrived = 0  # calls that reached the gate, in order: each one's ticket
        self._released = 0  # calls with a ticket below this may go
        self._open = False
        self.waiting = 0

    def sleep(self, seconds: float) -> None:
        with self._changed:
            ticket = self._arrived
            self._arrived += 1
            self.waiting += 1
            try:
                if not self._changed.wait_for(lambda: self._open or ticket < self._released, GATE_TIMEOUT_S):
                    raise AssertionError(f"a gated mock LM call was not released within {GATE_TIMEOUT_S} s")
            finally:
                self.waiting -= 1

    def release(self, calls: int | None = None) -> None:
        """Let the next ``calls`` calls through in the order they reached the gate (held ones first,
        then later ones), or with ``None`` every call from now on."""
        with self._changed:
            if calls is None:
                self._open = True
            else:
                self._released += calls
            self._changed.notify_all()

    def __getattr__(self, name: str) -> Any:  # the rest of the time module, unchanged
        return getattr(time, name)


@contextlib.contextmanager
def slow_qa_session(folder: Path, monkeypatch: Any, name: str, settings_toml: str,
                    latency_ms: int) -> Iterator[tuple[Any, Any, Any]]:
    """A user's project in ``folder`` (its ``[tool.provisioner]`` tables: ``settings_toml``), an
    integration environment with a mock LM on a real worker container, and one session ``name`` with
    program ``qa`` (``question -> answer``) whose question ``slow`` takes ``latency_ms`` to answer.
    Yields ``(env, test, session)``: the environment, the isolated test, its adapter."""
    import provisioner.api as api

    clear_settings(monkeypatch)
    (folder / "pyproject.toml").write_text(f"[project]\nname = '{name}'\n{settings_toml}")
    with api.environment("integration", lm="mock", project_dir=folder, attach=False) as env, \
            env.session(name) as test:
        session = test.adapter
        session.configure_lm(mode="mock", mock_rules=[
            {"match": {"question": "slow"}, "outputs": {"answer": "late"}, "latency_ms": latency_ms}])
        session.create_program("question -> answer", "qa")
        yield env, test, session
