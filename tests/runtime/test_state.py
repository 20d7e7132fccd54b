"""A run's files: the env file and the current-run pointer."""

from __future__ import annotations

from pathlib import Path

from provisioner.runtime.state import (
    CURRENT_RUN,
    current_run_id,
    render_env,
)
from provisioner.settings import Settings


def test_env_file_quotes_values() -> None:
    assert render_env({"A": "x y", "B": "1"}) == "export A='x y'\nexport B=1\n"


def test_a_torn_current_file_means_no_current_run(settings: Settings) -> None:
    current = Path(settings.state_dir) / CURRENT_RUN
    current.parent.mkdir(parents=True, exist_ok=True)
    for text in (b"", b"\xff\xfe", b"../../etc\n", b"ab12"):
        current.write_bytes(text)
        assert current_run_id(settings) == ("ab12" if text == b"ab12" else None)


def test_run_dir_names_every_path_of_a_run(tmp_path: Path) -> None:
    from provisioner.runtime import watchdog as wd
    from provisioner.runtime.state import RunDir

    run_dir = RunDir.of(tmp_path / "rel" / ".." / "state", "r1")
    root = (tmp_path / "state" / "runs" / "r1").resolve()
    assert run_dir.path == root and run_dir.run_id == "r1"
    assert run_dir.state_file == root / "state.json" and run_dir.env_file == root / "env"
    assert run_dir.lm_dir == root / "lm"
    assert run_dir.owners_dir == root / wd.OWNERS_DIR and run_dir.processes_dir == root / wd.PROCESSES_DIR
    assert run_dir.watchdog_lock == root / wd.LOCK_FILE
    assert run_dir.marker(wd.RETAIN_MARKER) == root / "retain"
