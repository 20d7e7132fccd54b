"""provision run: the command gets the run's env and exit code; the run is removed or kept by policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import ConfigError
from provisioner.runtime import watchdog as wd
from provisioner.runtime.deployment import ProbeResult
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.lifecycle import STANDIN_NOTE, UpOptions
from provisioner.runtime.polling import poll_until
from provisioner.runtime.run_command import run_command
from provisioner.runtime.runs import list_runs
from provisioner.runtime.state import read_state, run_dir_of
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE, FakeWorkers, run_command_while


def test_run_command_passes_the_env_and_the_exit_code_and_cleans_up(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    rt, workers = fake
    out = tmp_path / "seen"
    script = f'echo "$PROVISION_RUN_ID $PROVISION_BRIDGE_ADDRS" > {out}; exit 3'
    code = run_command(
        ["sh", "-c", script],
        settings,
        UpOptions(layer="integration", lm_mode="mock", workers=2, image=FAKE_IMAGE, watchdog=False),
        runtime=rt,
        probe=workers.probe,
    )
    assert code == 3
    run_id, addresses = out.read_text().split()
    assert len(addresses.split(",")) == 2 and run_id
    assert rt.containers == {} and rt.networks == {}  # aggressive (default): removed even on failure


def test_run_command_keeps_a_failed_run_when_the_policy_says_so(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, workers = fake
    keep = settings.model_copy(update={"cleanup_policy": "on_success", "retain_on_failure": True})
    messages: list[str] = []
    code = run_command(
        ["false"],
        keep,
        UpOptions(layer="integration", lm_mode="mock", workers=1, image=FAKE_IMAGE, watchdog=False),
        runtime=rt,
        probe=workers.probe,
        progress=messages.append,
    )
    assert code == 1
    kept = list_runs(rt)
    assert len(kept) == 1 and any("kept run" in m for m in messages)
    assert (run_dir_of(keep, kept[0].run_id).marker(wd.RETAIN_MARKER)).exists()  # the watchdog leaves it too
    assert (
        run_command(
            ["true"],
            keep,
            UpOptions(layer="integration", lm_mode="mock", workers=1, image=FAKE_IMAGE, watchdog=False),
            runtime=rt,
            probe=workers.probe,
        )
        == 0
    )
    assert [r.run_id for r in list_runs(rt)] == [kept[0].run_id]  # the successful run was removed


# --- the run heals while the command runs (provision run's own health check) ----------------------


def test_run_command_replaces_a_dead_worker_and_heals_a_dead_port_while_the_command_runs(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    rt, workers = fake
    killed: dict[str, str] = {}

    def break_it() -> bool:  # once the run is up (its state file written): kill worker 0 and
        runs = list_runs(rt)  # worker 1's port forwarder
        if not runs or not run_dir_of(settings, runs[0].run_id).state_file.exists():
            return False
        relay = next((c for c in rt.containers.values() if c.recipe.role == "relay"), None)
        ws = sorted((c for c in rt.containers.values() if c.recipe.role == "worker"),
                    key=lambda c: c.recipe.name)
        if relay is None or len(ws) < 2 or relay.status != "running" or not relay.ports:
            return False
        killed["worker"] = ws[0].recipe.name
        rt.crash(ws[0].id, exit_code=137)
        workers.kill_forwarder(sorted(relay.ports.values())[1])
        return True

    def healed(notes: list[str]) -> bool:
        return any("replaced it" in n for n in notes) and any("re-created the relay" in n for n in notes)

    def drive(notes: list[str]) -> None:
        poll_until(break_it, 60.0, 0.02)
        poll_until(lambda: healed(notes), 60.0, 0.02)

    code, notes = run_command_while(
        drive, settings, fake, tmp_path,
        UpOptions(layer="integration", lm_mode="mock", workers=2, image=FAKE_IMAGE, watchdog=False),
        health_interval_s=0.05,
        command=lambda fifo: [
            "sh", "-c", f'cat "{fifo}" > /dev/null; echo "$PROVISION_BRIDGE_ADDRS" > "{tmp_path}/addrs"'],
    )
    assert code == 0
    assert healed(notes), notes
    replaced = next(n for n in notes if "replaced it" in n)
    assert killed["worker"] in replaced and "exited with code 137 (SIGKILL)" in replaced, replaced
    assert "behind the same address" in replaced
    relay_note = next(n for n in notes if "re-created the relay" in n)
    assert "refuses connections" in relay_note, relay_note
    assert rt.containers == {} and rt.networks == {}  # removed at the end, replacements included


def test_the_health_check_records_the_replacement_in_the_state_file(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    """`provision status` (and a pytest session attached to the run) read the state file: after a
    replacement it names the new container, at the old address."""
    rt, _ = fake
    seen: dict[str, Any] = {}

    def crash_then_read(notes: list[str]) -> None:
        def up_and_crash() -> bool:
            runs = list_runs(rt)
            ws = [c for c in rt.containers.values() if c.recipe.role == "worker" and c.status == "running"]
            if not runs or not ws or not run_dir_of(settings, runs[0].run_id).state_file.exists():
                return False
            seen["run_id"], seen["old"] = runs[0].run_id, ws[0].id
            seen["before"] = read_state(settings, runs[0].run_id)
            rt.crash(ws[0].id)
            return True

        poll_until(up_and_crash, 60.0, 0.02)
        poll_until(lambda: any("replaced it" in n for n in notes), 60.0, 0.02)
        seen["after"] = read_state(settings, seen["run_id"])

    code, notes = run_command_while(
        crash_then_read, settings, fake, tmp_path,
        UpOptions(layer="integration", lm_mode="mock", workers=1, image=FAKE_IMAGE, watchdog=False),
        health_interval_s=0.05)
    assert code == 0 and "after" in seen, notes
    before, after = seen["before"].workers[0], seen["after"].workers[0]
    assert before["container_id"] == seen["old"] and after["container_id"] != seen["old"]
    assert after["address"] == before["address"]


# --- the engine connection is closed on every path ---------------------------------------------


class ClosingRuntime(FakeRuntime):
    """A FakeRuntime that counts :meth:`close` (what a docker-py client session needs)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.closed = 0

    def close(self) -> None:
        self.closed += 1
        super().close()


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[ClosingRuntime]:
    """Every runtime the code under test opens itself (``engine.open_runtime``) — a ClosingRuntime."""
    made: list[ClosingRuntime] = []

    def open_runtime(settings: Any = None, **_kw: Any) -> ClosingRuntime:
        rt = ClosingRuntime(images=(FAKE_IMAGE,))
        made.append(rt)
        return rt

    monkeypatch.setattr("provisioner.runtime.engine.open_runtime", open_runtime)
    return made


def test_run_command_closes_the_runtime_it_opened_also_when_up_fails(
    settings: Settings, opened: list[ClosingRuntime]
) -> None:
    assert run_command(["true"], settings, UpOptions(layer="integration", lm_mode="mock", workers=1,
                                                     image=FAKE_IMAGE, watchdog=False),
                       probe=lambda h, p, t: ProbeResult(True, True, "ok")) == 0
    assert len(opened) == 1 and opened[0].closed == 1
    with pytest.raises(ConfigError):  # unknown image: up fails before anything runs
        run_command(["true"], settings, UpOptions(layer="integration", lm_mode="mock", workers=1,
                                                  image=FAKE_IMAGE, run_id="Not A Valid Id!", watchdog=False))
    assert len(opened) == 2 and opened[1].closed == 1


def test_a_command_that_cannot_run_is_refused_before_anything_starts(
    settings: Settings, opened: list[ClosingRuntime], tmp_path: Path
) -> None:
    """A new user's `provision run -- no-such-cmd` brought the layer up (20 s), then failed."""
    with pytest.raises(ConfigError, match=r"cannot run 'no-such-command-xyz': it is not on PATH"):
        run_command(["no-such-command-xyz", "-q"], settings, UpOptions(layer="integration"))
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(ConfigError, match=r"not-executable\.sh': it is not an executable file"):
        run_command([str(script)], settings, UpOptions(layer="integration"))
    assert opened == []  # not even the engine was asked


def test_run_command_names_its_run_and_says_when_the_stand_in_answers(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user who wants to `docker kill` a worker, or to know who answers, had to `ls .provision/runs`:
    `provision run` said neither its run id nor, unlike `provision up`, that the stand-in answers."""
    rt, workers = fake
    monkeypatch.delenv("GEMINI_TEST_API_KEY", raising=False)

    def standin_ready(container: Any) -> None:  # the stand-in's ready line, as `provision standin` prints it
        if container.recipe.name.endswith("-standin"):
            container.log_lines.append("PROVISION_STANDIN_READY")

    rt.on_start = standin_ready
    said: list[str] = []  # notices: also under -q
    progressed: list[str] = []  # progress lines: gone under -q
    code = run_command(
        ["sh", "-c", 'echo "$PROVISION_RUN_ID" > /dev/null'],
        settings,
        UpOptions(layer="e2e", lm_mode="real", workers=1, image=FAKE_IMAGE, watchdog=False),
        runtime=rt,
        probe=workers.probe,
        progress=progressed.append,
        notify=said.append,
        health_interval_s=None,
    )
    assert code == 0
    run_id = next(line.split()[3].rstrip(",") for line in progressed
                  if line.startswith("provision run: run "))
    assert f"provision status --run {run_id}" in "\n".join(progressed)
    assert not any(line.startswith("provision run: run ") for line in said), said  # -q drops it
    assert STANDIN_NOTE in said
