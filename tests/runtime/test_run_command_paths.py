"""provision run on the paths the main tests do not take (issue 14's coverage of the critical paths,
docs/quality.md): no command, a command the OS will not execute, a signal before and while the
command runs, a run published off loopback, an engine lost during a health check, and a state file
that cannot be updated. Each run is removed at the end. The in-memory engine (FakeRuntime)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from provisioner.errors import ConfigError
from provisioner.runtime.deployment import ProbeResult
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.engine.fake import FakeContainer
from provisioner.runtime.lifecycle import UpOptions
from provisioner.runtime.polling import poll_until
from provisioner.runtime.run_command import run_command
from provisioner.runtime.runs import list_runs
from provisioner.runtime.state import run_dir_of
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE, FakeWorkers, run_command_while

OPTIONS = UpOptions(layer="integration", lm_mode="mock", workers=1, image=FAKE_IMAGE, watchdog=False)


def test_no_command_is_refused_with_an_example(settings: Settings) -> None:
    with pytest.raises(ConfigError,
                       match=r"needs a command after `--`, e\.g\. provision run --layer e2e -- pytest"):
        run_command([], settings, OPTIONS)


def test_a_command_the_os_will_not_execute_is_an_error_and_the_run_is_removed(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    """An executable file with no interpreter line and no binary format passes the `which` check;
    the exec itself fails (ENOEXEC)."""
    rt, workers = fake
    junk = tmp_path / "not-a-program"
    junk.write_bytes(b"\x00\x01\x02 not a program\n")
    junk.chmod(0o755)
    with pytest.raises(ConfigError, match=r"cannot run '.*not-a-program': \[Errno 8\] Exec format error"):
        run_command([str(junk)], settings, OPTIONS, runtime=rt, probe=workers.probe)
    assert rt.containers == {} and rt.networks == {}


def test_a_signal_before_the_command_starts_stops_the_run_and_removes_it(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    """SIGTERM while the layer comes up (no command to pass it to yet) is a KeyboardInterrupt: up
    stops and nothing stays."""
    rt, workers = fake

    def term_on_worker_start(container: FakeContainer) -> None:
        if container.recipe.role == "worker":
            os.kill(os.getpid(), signal.SIGTERM)

    rt.on_start = term_on_worker_start
    with pytest.raises(KeyboardInterrupt):
        run_command(["true"], settings, OPTIONS, runtime=rt, probe=workers.probe)
    assert rt.containers == {} and rt.networks == {}


def test_a_signal_while_the_command_runs_goes_to_the_command_and_its_code_says_so(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    rt, workers = fake
    started = tmp_path / "started"

    def term_once_started() -> None:
        poll_until(started.exists, 60.0, 0.02)
        os.kill(os.getpid(), signal.SIGTERM)  # run_command's handler passes it on to the command

    sender = threading.Thread(target=term_once_started, daemon=True)
    sender.start()
    code = run_command(["sh", "-c", f'touch "{started}"; exec sleep 600'], settings, OPTIONS,
                       runtime=rt, probe=workers.probe, health_interval_s=None)
    sender.join()
    assert code == 128 + signal.SIGTERM  # the shell convention for "killed by SIGTERM"
    assert rt.containers == {} and rt.networks == {}


def test_a_run_published_off_loopback_gives_the_command_its_bridge_token(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    rt, workers = fake
    rt.publish_host = "192.0.2.10"  # an engine on another machine (TEST-NET-1)
    seen = tmp_path / "token"

    def probe(_host: str, port: int, timeout: float) -> ProbeResult:  # the fake serves on loopback
        return workers.probe("127.0.0.1", port, timeout)

    code = run_command(["sh", "-c", f'printf %s "$PROVISION_BRIDGE_TOKEN" > "{seen}"'], settings, OPTIONS,
                       runtime=rt, probe=probe, health_interval_s=None)
    assert code == 0
    assert len(seen.read_text()) >= 32  # secrets.token_urlsafe(32)
    assert rt.containers == {}


def test_an_engine_lost_during_a_health_check_is_said_and_checked_again(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    rt, _ = fake

    def drive(notes: list[str]) -> None:
        try:
            poll_until(lambda: bool(list_runs(rt)) and any("run " in n for n in notes), 60.0, 0.02)
            rt.available = False
            poll_until(lambda: any("repairing run" in n for n in notes), 60.0, 0.02)
        finally:
            rt.available = True

    code, notes = run_command_while(drive, settings, fake, tmp_path, OPTIONS, health_interval_s=0.02)
    assert code == 0
    failed = next(n for n in notes if "repairing run" in n)
    assert "failed: no Docker engine is reachable" in failed
    assert failed.endswith("trying again at the next health check")
    assert rt.containers == {} and rt.networks == {}


def test_a_state_file_that_cannot_be_updated_after_a_repair_is_said(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    """The worker is replaced either way; the message says the state file is stale and why."""
    rt, _ = fake
    blocked: list[Path] = []

    def drive(notes: list[str]) -> None:
        try:
            def block_and_crash() -> bool:
                runs = list_runs(rt)
                ws = [c for c in rt.containers.values()
                      if c.recipe.role == "worker" and c.status == "running"]
                if not runs or not ws:
                    return False
                env_file = run_dir_of(settings, runs[0].run_id).env_file
                if not env_file.exists():
                    return False
                env_file.unlink()
                env_file.mkdir()  # a directory where the env file goes: its rename fails (EISDIR)
                blocked.append(env_file)
                rt.crash(ws[0].id)
                return True

            poll_until(block_and_crash, 60.0, 0.02)
            poll_until(lambda: any("state file" in n for n in notes), 60.0, 0.02)
        finally:
            for path in blocked:
                path.rmdir()

    code, notes = run_command_while(drive, settings, fake, tmp_path, OPTIONS, health_interval_s=0.02)
    assert code == 0
    stale = next(n for n in notes if "state file" in n)
    assert stale.startswith("provision run: could not update the run's state file: ")
    assert "Is a directory" in stale
    assert any("replaced it" in n for n in notes)
    assert rt.containers == {} and rt.networks == {}


def test_a_healthy_run_s_health_checks_say_nothing_and_leave_the_state_file_alone(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], monkeypatch: pytest.MonkeyPatch
) -> None:
    """provision run's thread checks the run every interval; a check that finds nothing to repair
    prints nothing and does not rewrite the run's state file."""
    from provisioner.runtime import run_command as rc
    from provisioner.runtime.lifecycle import down, up

    rt, workers = fake
    env = up(settings, OPTIONS, runtime=rt, probe=workers.probe)
    checks: list[list[str]] = []
    real = rc.heal_deployment

    def counted(deployment: object) -> list[str]:
        notes = real(deployment)  # type: ignore[arg-type]
        checks.append(notes)
        return notes

    said: list[str] = []
    try:
        state_file = run_dir_of(settings, env.plan.run_id).state_file
        before = state_file.stat().st_mtime_ns
        monkeypatch.setattr(rc, "heal_deployment", counted)
        watch = rc._HealthWatch(env, settings, 0.01, said.append)
        watch.start()
        try:
            assert poll_until(lambda: len(checks) >= 3, 60, 0.01)
        finally:
            watch.stop()
        assert said == [] and all(notes == [] for notes in checks)
        assert state_file.stat().st_mtime_ns == before
    finally:
        monkeypatch.undo()
        down(settings, runtime=rt)
    assert rt.containers == {}
