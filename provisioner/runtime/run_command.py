"""``provision run``: bring a layer up, run a command with the run's env, bring it down again."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
from collections.abc import Sequence

from provisioner.bridge.protocol import BRIDGE_TOKEN_ENV, CONTROL_TOKEN_ENV
from provisioner.errors import (
    ConfigError,
)
from provisioner.runtime import watchdog as wd
from provisioner.runtime.deployment import Deployment, Probe, Progress, bridge_probe
from provisioner.runtime.engine import ContainerRuntime
from provisioner.runtime.lifecycle import UpOptions, down, up
from provisioner.runtime.resources import should_remove
from provisioner.runtime.runs import settings_or_load
from provisioner.runtime.state import run_dir_of
from provisioner.settings import Settings


def run_command(
    command: Sequence[str],
    settings: Settings | None = None,
    options: UpOptions = UpOptions(persistent=False),  # noqa: B008 - frozen
    *,
    runtime: ContainerRuntime | None = None,
    probe: Probe = bridge_probe,
    progress: Progress | None = None,
) -> int:
    """Bring a layer up, run ``command`` with the run's env, bring it down; return the command's code.

    SIGINT/SIGTERM are passed on to the command and the run is still removed; SIGKILL of this
    process leaves the cleanup to the run's watchdog (within a few seconds). When the command
    fails, ``cleanup_policy``/``retain_on_failure`` may keep the run for inspection
    (:func:`~provisioner.runtime.resources.should_remove`). ``options``: as for :func:`up`, except
    that the run is never persistent (it is this command's).

    Raises:
        ConfigError: no command, or it cannot be started; the errors of :func:`up`.
    """
    if not command:
        raise ConfigError(
            "provision run needs a command after `--`, e.g. provision run --layer e2e -- pytest"
        )
    settings = settings_or_load(settings)
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
        child_env = {**os.environ, **env.state.env(run_dir.state_file)}
        if env.control_token:
            child_env[CONTROL_TOKEN_ENV] = env.control_token
        if env.plan.bridge_token:  # published off loopback: every connection says hello with it
            child_env[BRIDGE_TOKEN_ENV] = env.plan.bridge_token
        try:
            child = subprocess.Popen(list(command), env=child_env)
        except OSError as exc:
            raise ConfigError(f"cannot run {command[0]!r}: {exc}") from None
        wd.register_process(run_dir.path, child.pid)
        code = child.wait()
        code = 128 + received[0] if received and code < 0 else code
        failed = code != 0
        return code
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
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


