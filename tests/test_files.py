"""provisioner._files: atomic replacement and flock locks shared by host and worker code."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from provisioner._files import atomic_write, locked, try_lock


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_whole_with_exact_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state.json"
    assert atomic_write(path, "old\n") == path
    atomic_write(path, "new ✓\n", mode=0o600)
    assert path.read_text(encoding="utf-8") == "new ✓\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # exact: the umask does not widen or narrow it
    atomic_write(path, b"\x00bytes", mode=0o644, fsync=True, hold_lock=True)
    assert path.read_bytes() == b"\x00bytes" and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert _leftovers(path.parent) == []


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "ready"
    target.mkdir()  # os.replace(file, directory) fails
    with pytest.raises(IsADirectoryError):
        atomic_write(target, "1234\n")
    assert target.is_dir() and _leftovers(tmp_path) == []


def test_a_held_lock_excludes_other_holders_until_released(tmp_path: Path) -> None:
    path = tmp_path / "run.lock"
    with locked(path):
        assert try_lock(path) is None  # another open file description: refused, not blocked
    fd = try_lock(path)
    assert fd is not None
    try:
        assert try_lock(path) is None
    finally:
        os.close(fd)  # closing the fd releases it
    again = try_lock(path)
    assert again is not None
    os.close(again)


def test_try_lock_without_create_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        try_lock(tmp_path / "absent.lock", create=False)
    assert not (tmp_path / "absent.lock").exists()
