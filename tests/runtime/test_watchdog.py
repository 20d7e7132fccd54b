"""Watchdog bookkeeping that needs no engine: owners, pid reuse, one watchdog per run."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from provisioner.runtime import watchdog as wd


def test_owners_register_and_die(tmp_path: Path) -> None:
    assert wd.owners_alive(tmp_path) == (0, 0)
    wd.register_owner(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    wd.register_owner(tmp_path, child.pid)
    assert wd.owners_alive(tmp_path) == (2, 2)
    child.kill()
    child.wait()
    assert wd.owners_alive(tmp_path) == (2, 1)
    wd.unregister_owner(tmp_path)
    assert wd.owners_alive(tmp_path) == (1, 0)


def test_a_zombie_owner_counts_as_dead(tmp_path: Path) -> None:
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    wd.register_owner(tmp_path, child.pid)
    # Not reaped: once it exits the child is a zombie, which still "exists" as a pid.
    proc = psutil.Process(child.pid)
    for _ in range(1000):
        if proc.status() == psutil.STATUS_ZOMBIE:
            break
        threading_wait(0.01)
    assert psutil.pid_exists(child.pid)
    assert wd.owners_alive(tmp_path) == (1, 0)
    child.wait()


def threading_wait(seconds: float) -> None:
    import threading

    threading.Event().wait(seconds)


def test_a_reused_pid_is_not_the_owner(tmp_path: Path) -> None:
    folder = tmp_path / wd.OWNERS_DIR
    folder.mkdir()
    (folder / f"{os.getpid()}-12345.000").touch()  # our pid, but a different start time
    assert wd.owners_alive(tmp_path) == (1, 0)


def test_watchdog_alive_follows_the_lock(tmp_path: Path) -> None:
    assert not wd.watchdog_alive(tmp_path)
    with open(tmp_path / wd.LOCK_FILE, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        # flock locks belong to the open file description: a second open sees it held.
        assert wd.watchdog_alive(tmp_path)
    assert not wd.watchdog_alive(tmp_path)


def test_only_one_watchdog_runs_per_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    wd.register_owner(run_dir)  # we are the owner and stay alive
    wd.spawn_watchdog("unit-test-run", run_dir, interval_s=0.05)
    wd.wait_watching(run_dir, timeout_s=20)
    # A second, racing watchdog must give up at once.
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "provisioner.runtime.watchdog",
            "--run",
            "unit-test-run",
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 0 and "already watched" in second.stdout
    wd.mark(run_dir, wd.STOPPED_MARKER)  # a finished `down`: the watchdog exits without cleanup
    for _ in range(1000):
        if not wd.watchdog_alive(run_dir):
            break
        threading_wait(0.01)
    assert not wd.watchdog_alive(run_dir)
    assert "stopped marker found" in (run_dir / wd.LOG_FILE).read_text()
