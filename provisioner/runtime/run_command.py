"""``provision run``: bring a layer up, run a command with the run's env, bring it down again.

While the command runs, a health check (:func:`~provisioner.runtime.health.heal_deployment`, every
``health_interval_s`` in a thread of its own) repairs the run's published path (a dead port
forwarder or relay: the relay is re-created on the same ports) and replaces a worker whose
container died (killed, OOM-killed, crashed) behind the same address, saying why on stderr — the
run belongs to this process, so nobody else (no pool, no ``status --repair``) would heal it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence

from provisioner.bridge.protocol import BRIDGE_TOKEN_ENV, CONTROL_TOKEN_ENV
from provisioner.errors import (
    ConfigError,
)
from provisioner.runtime import watchdog as wd
from provisioner.runtime.deployment import Deployment, Probe, Progress, bridge_probe
from provisioner.runtime.engine import ContainerRuntime
from provisioner.runtime.health import heal_deployment
from provisioner.runtime.lifecycle import STANDIN_NOTE, UpOptions, down, up
from provisioner.runtime.resources import should_remove
from provisioner.runtime.runs import opened_runtime, settings_or_load
from provisioner.runtime.state import run_dir_of, write_state
from provisioner.settings import Settings

#: Seconds between two health checks of the run while the command runs (one engine call and one
#: ``ping`` through the published path per worker each time).
HEALTH_INTERVAL_S = 2.0


def run_command(
    command: Sequence[str],
    settings: Settings | None = None,
    options: UpOptions = UpOptions(persistent=False),  # noqa: B008 - frozen
    *,
    runtime: ContainerRuntime | None = None,
    probe: Probe = bridge_probe,
    progress: Progress | None = None,
    notify: Progress | None = None,
    health_interval_s: float | None = HEALTH_INTERVAL_S,
) -> int:
    """Bring a layer up, run ``command`` with the run's env, bring it down; return the command's code.

    SIGINT/SIGTERM are passed on to the command and the run is still removed; SIGKILL of this
    process leaves the cleanup to the run's watchdog (within a few seconds). When the command
    fails, ``cleanup_policy``/``retain_on_failure`` may keep the run for inspection
    (:func:`~provisioner.runtime.resources.should_remove`). ``options``: as for :func:`up`, except
    that the run is never persistent (it is this command's).

    ``health_interval_s`` (seconds; None: no checks): how often the run is checked and healed
    while the command runs (see the module docstring); ``notify`` receives each repair's message
    (default: ``progress``). ``runtime``: the engine (the caller's, left open); without it the
    engine's runtime is opened for the run and closed at the end, on every path.

    Raises:
        ConfigError: no command, or it cannot be started (checked before anything starts: a name
            not on ``PATH``, a path that is not an executable file); the errors of :func:`up`.
    """
    if not command:
        raise ConfigError(
            "provision run needs a command after `--`, e.g. provision run --layer e2e -- pytest"
        )
    if shutil.which(command[0]) is None:  # before a layer is brought up for nothing
        where = "is not an executable file" if os.sep in command[0] else "is not on PATH"
        raise ConfigError(
            f"cannot run {command[0]!r}: it {where} (PATH={os.environ.get('PATH', '')}); nothing was "
            "started. Check the spelling, activate the virtualenv that has it, or give its path"
        )
    settings = settings_or_load(settings)
    with opened_runtime(runtime, settings) as rt:
        return _run(list(command), settings, options, rt, probe, progress,
                    notify or progress, health_interval_s)


def _run(
    command: list[str],
    settings: Settings,
    options: UpOptions,
    runtime: ContainerRuntime,
    probe: Probe,
    progress: Progress | None,
    notify: Progress | None,
    health_interval_s: float | None,
) -> int:
    received: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)
        else:
            raise KeyboardInterrupt

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    env: Deployment | None = None
    watcher: _HealthWatch | None = None
    failed: bool | None = None  # None: the command did not finish (interrupted, crashed)
    try:
        env = up(
            settings,
            dataclasses.replace(options, persistent=False),
            runtime=runtime,
            probe=probe,
            progress=progress,
        )
        assert env.state is not None
        run_dir = run_dir_of(settings, env.state.run_id)
        # The run's id (its containers are prov-<run id>-*) is progress: gone with -q. Who answers
        # the LM when it is a stand-in, not Gemini, is a notice, said also with -q.
        if progress is not None:
            progress(f"provision run: run {env.state.run_id}, layer {env.state.layer}, "
                     f"{len(env.state.workers)} worker(s); `provision status --run {env.state.run_id}` "
                     "shows them")
        say = notify or progress
        if say is not None and env.state.uses_standin:
            say(STANDIN_NOTE)
        child_env = {**os.environ, **env.state.env(run_dir.state_file)}
        if env.control_token:
            child_env[CONTROL_TOKEN_ENV] = env.control_token
        if env.plan.bridge_token:  # published off loopback: every connection says hello with it
            child_env[BRIDGE_TOKEN_ENV] = env.plan.bridge_token
        try:
            child = subprocess.Popen(command, env=child_env)
        except OSError as exc:
            raise ConfigError(f"cannot run {command[0]!r}: {exc}") from None
        wd.register_process(run_dir.path, child.pid)
        if health_interval_s is not None:
            watcher = _HealthWatch(env, settings, health_interval_s, notify or (lambda _m: None))
            watcher.start()
        code = child.wait()
        code = 128 + received[0] if received and code < 0 else code
        failed = code != 0
        return code
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if watcher is not None:
            watcher.stop()
        if env is not None and env.state is not None:
            run_id = env.state.run_id
            # Interrupted before the command finished: always clean up.
            if failed is not None and not should_remove(
                settings.cleanup_policy, settings.retain_on_failure, failed
            ):
                wd.mark(run_dir_of(settings, run_id).path, wd.RETAIN_MARKER)  # the watchdog leaves it too
                (progress or (lambda _m: None))(
                    f"kept run {run_id} (cleanup_policy={settings.cleanup_policy}, "
                    f"retain_on_failure={settings.retain_on_failure}); remove it with "
                    f"`provision down --run {run_id}`"
                )
            else:
                down(settings, run_id=run_id, runtime=runtime)


class _HealthWatch:
    """Runs :func:`heal_deployment` every ``interval_s`` in a daemon thread until :meth:`stop`.

    A thread rather than checks between ``wait(timeout=…)`` calls of the command: a repair may wait
    up to ``container.ready_timeout_s`` for a replacement, and the command's exit (and its exit
    code) must not wait for that. After a worker was replaced the run's state file names the new
    container (``provision status`` and attached pytest sessions read it).
    """

    def __init__(self, env: Deployment, settings: Settings, interval_s: float, say: Progress) -> None:
        self.env = env
        self.settings = settings
        self.interval_s = interval_s
        self.say = say
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="provision-run-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop checking; a repair in progress is told to stop (the run is being stopped) and the
        thread is waited for, so nothing is created after the run's removal starts."""
        self._stop.set()
        if self._thread.is_alive():
            self.env.interrupt()  # a replacement waiting for readiness gives up at once
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                notes = heal_deployment(self.env)
            except Exception as exc:  # retried at the next check
                if not self._stop.is_set():
                    self.say(f"provision run: repairing run {self.env.plan.run_id} failed: {exc}; "
                             "trying again at the next health check")
                continue
            if not notes:
                continue
            self._record()  # first: whoever reads a note finds the state file up to date
            for note in notes:
                self.say(f"provision run: {note}")

    def _record(self) -> None:
        """The state file names the workers' current containers."""
        state = self.env.state
        assert state is not None  # provision run's deployment comes from up(), which always sets it
        state.workers = [
            {"slot": w.slot, "name": w.name, "container_id": w.container_id, "address": w.address}
            for w in self.env.workers
        ]
        try:
            write_state(self.settings, state, current=False, control_token=self.env.plan.control_token,
                        bridge_token=self.env.plan.bridge_token)
        except OSError as exc:
            self.say(f"provision run: could not update the run's state file: {exc}")
