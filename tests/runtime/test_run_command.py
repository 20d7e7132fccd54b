"""provision run: the command gets the run's env and exit code; the run is removed or kept by policy."""

from __future__ import annotations

from pathlib import Path

from provisioner.runtime import watchdog as wd
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.lifecycle import UpOptions
from provisioner.runtime.run_command import run_command
from provisioner.runtime.runs import list_runs
from provisioner.runtime.state import (
    run_dir_of,
)
from provisioner.settings import Settings

from .conftest import FAKE_IMAGE, FakeWorkers


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
