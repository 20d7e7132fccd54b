"""Watchdog bookkeeping that needs no engine: owners, pid reuse, one watchdog per run."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_dependant_keeps_the_run_only_while_its_principal_lives(tmp_path: Path) -> None:
    principal, dependant = _sleeper(), _sleeper()
    try:
        wd.register_owner(tmp_path, dependant.pid, principal=wd.process_entry(principal.pid))
        assert (tmp_path / wd.OWNERS_DIR / wd.process_entry(dependant.pid)).read_text().startswith(
            wd.DEPENDANT_PREFIX
        )
        assert wd.owner_states(tmp_path) == (1, 1, [])
        principal.kill()
        principal.wait()
        registered, keeping, orphans = wd.owner_states(tmp_path)
        assert (registered, keeping) == (1, 0)
        assert [pid for pid, _ in orphans] == [dependant.pid]
        assert wd.owners_alive(tmp_path) == (1, 0)  # the watchdog would remove the run now
        assert wd.terminate_orphans(orphans, grace_s=5) == [f"process {dependant.pid}"]
        # psutil reaped our child while waiting for it: gone is all Popen can still tell.
        dependant.wait(timeout=10)
        assert wd.owner_states(tmp_path) == (1, 0, [])
    finally:
        for proc in (principal, dependant):
            proc.kill()
            proc.wait()


def test_an_orphan_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    stubborn = subprocess.Popen([
        sys.executable, "-c",
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)",
    ], stdout=subprocess.PIPE)
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
        entry = wd.process_entry(stubborn.pid)
        pid, start = int(entry.split("-")[0]), float(entry.split("-")[1])
        assert wd.terminate_orphans([(pid, start)], grace_s=0.2) == [f"process {pid}"]
        stubborn.wait(timeout=10)  # it ignores SIGTERM: only the SIGKILL can have ended it
    finally:
        stubborn.kill()
        stubborn.wait()


def test_a_reused_pid_is_neither_principal_nor_orphan(tmp_path: Path) -> None:
    folder = tmp_path / wd.OWNERS_DIR
    folder.mkdir()
    # The principal's pid is ours, but its start time is not: the principal is gone.
    (folder / wd.process_entry()).write_text(f"{wd.DEPENDANT_PREFIX}{os.getpid()}-12345.000\n")
    assert wd.owner_states(tmp_path) == (1, 0, [(os.getpid(), float(wd.process_entry().split("-")[1]))])
    # An orphan entry naming our pid with another start time is not us: never signalled.
    assert wd.terminate_orphans([(os.getpid(), 12345.0)]) == []


def test_an_owner_entry_with_torn_or_garbage_content_is_a_live_principal_owner(tmp_path: Path) -> None:
    """A hand edit or a disk error in an owner entry never crashes the watchdog, reap or status:
    the entry counts as the plain owner its name says it is (the run is kept while it lives)."""
    folder = tmp_path / wd.OWNERS_DIR
    folder.mkdir()
    for content in (b"\xff\xfe\x00garbage", b"dependant of ", b"dependant of x-y\n"):
        (folder / wd.process_entry()).write_bytes(content)
        assert wd.owner_states(tmp_path) == (1, 1, []), content
    wd.register_owner(tmp_path, principal=wd.process_entry())
    assert [p.name for p in folder.iterdir()] == [wd.process_entry()]  # no temporary file left


def test_an_orphans_children_go_with_it(tmp_path: Path) -> None:
    import psutil

    parent = subprocess.Popen([
        sys.executable, "-c",
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(c.pid, flush=True); time.sleep(60)",
    ], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        start = psutil.Process(parent.pid).create_time()
        assert wd.terminate_orphans([(parent.pid, start)], grace_s=5) == [f"process {parent.pid}"]
        parent.wait(timeout=10)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        parent.kill()
        parent.wait()


def test_a_process_that_is_gone_has_an_entry_without_a_start_time() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert wd.process_entry(child.pid) == f"{child.pid}-0"  # never confused with a live process


def test_a_watchdog_that_never_starts_is_an_error_with_its_log(tmp_path: Path) -> None:
    from provisioner.errors import RuntimeProblem

    (tmp_path / wd.LOG_FILE).write_text("Traceback: the watchdog could not import docker\n")
    try:
        wd.wait_watching(tmp_path, timeout_s=0.05)
    except RuntimeProblem as exc:
        assert "did not start within" in str(exc) and "could not import docker" in str(exc)
    else:
        raise AssertionError("no RuntimeProblem")


def test_owner_entries_that_are_not_owners_are_skipped_and_unreadable_ones_keep_the_run(
    tmp_path: Path,
) -> None:
    folder = tmp_path / wd.OWNERS_DIR
    folder.mkdir()
    (folder / ".123-4.0.tmp").write_text("")  # a registration cut short before its rename
    (folder / "notes.txt").write_text("")
    assert wd.owner_states(tmp_path) == (0, 0, [])
    (folder / wd.process_entry()).mkdir()  # unreadable as a file: a plain owner, as its name says
    assert wd.owner_states(tmp_path) == (1, 1, [])


def test_finishing_a_run_stands_its_watchdog_down_unless_it_was_retained(tmp_path: Path) -> None:
    wd.finish_run(tmp_path)  # never watched: nothing to tell
    assert not (tmp_path / wd.STOPPED_MARKER).exists()
    (tmp_path / wd.LOCK_FILE).touch()
    wd.mark(tmp_path, wd.RETAIN_MARKER)
    wd.finish_run(tmp_path)
    assert not (tmp_path / wd.STOPPED_MARKER).exists()  # kept for inspection: the watchdog already left
    (tmp_path / wd.RETAIN_MARKER).unlink()
    wd.finish_run(tmp_path)
    assert (tmp_path / wd.STOPPED_MARKER).exists()


# --- an engine out of reach when the run is to go (remote engines: issue 13) ----------------------


class _FlakyEngine:
    """A FakeRuntime that is out of reach for its first ``failures`` listings (a cut network)."""

    def __init__(self, failures: int) -> None:
        from provisioner.runtime.engine import FakeRuntime

        self.fake = FakeRuntime()
        self.failures = failures

    def __getattr__(self, name: str) -> object:
        return getattr(self.fake, name)

    def list_resources(self, selector: dict[str, str]) -> list[object]:
        from provisioner.errors import DockerUnavailableError

        if self.failures > 0:
            self.failures -= 1
            raise DockerUnavailableError("no Docker engine is reachable (ConnectionError: test)")
        return self.fake.list_resources(selector)  # type: ignore[return-value]


def _dead_owner(run_dir: Path) -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    wd.register_owner(run_dir, child.pid)
    return child.pid


def _a_run(fake: object, run_id: str, project: str, owner_pid: int) -> None:
    from provisioner.runtime import labels as L
    from provisioner.runtime.recipes import NetworkRecipe

    labels = L.run_labels(run_id, "integration", "main", project=project, owner_pid=owner_pid)
    fake.create_network(NetworkRecipe(f"prov-{run_id}-net", True, labels))  # type: ignore[attr-defined]


def test_the_watchdog_outlasts_a_brief_loss_of_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(wd, "ENGINE_RETRY_S", (0.0,))
    monkeypatch.setattr(wd, "LATE_SWEEPS_S", ())
    flaky = _FlakyEngine(failures=3)
    _a_run(flaky.fake, "lost1", "p", _dead_owner(tmp_path))
    assert wd.watch("lost1", tmp_path, 0.01, runtime=flaky, engine_deadline_s=60) == 0  # type: ignore[arg-type]
    assert flaky.fake.list_resources({}) == [] and (tmp_path / wd.REAPED_MARKER).exists()
    log = capsys.readouterr().out
    assert log.count("cannot reach the engine (DockerUnavailableError") == 3 and "removed 1 resource" in log


def test_an_engine_out_of_reach_past_the_deadline_leaves_the_run_to_reap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from provisioner.runtime import labels as L
    from provisioner.runtime.lifecycle import reap
    from provisioner.settings import load_settings

    monkeypatch.setattr(wd, "ENGINE_RETRY_S", (0.0,))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    settings = load_settings(cli={"state_dir": str(tmp_path / ".provision")})
    flaky = _FlakyEngine(failures=10**9)
    run_dir = tmp_path / "run"
    _a_run(flaky.fake, "lost2", L.project_id(settings.project_dir), _dead_owner(run_dir))
    status = wd.watch("lost2", run_dir, 0.01, runtime=flaky, engine_deadline_s=0.05)  # type: ignore[arg-type]
    assert status == wd.ENGINE_LOST_EXIT and not (run_dir / wd.REAPED_MARKER).exists()
    assert "leaving run lost2 to `provision reap`" in capsys.readouterr().out
    assert [r.name for r in flaky.fake.list_resources(L.selector("lost2"))] == ["prov-lost2-net"]
    results = reap(settings, runtime=flaky.fake)  # the engine is back: reap finds the run by its labels
    assert [r.run_id for r in results] == ["lost2"] and flaky.fake.list_resources(L.selector("lost2")) == []


def test_removing_a_run_terminates_its_processes_and_skips_files_that_are_not_entries(tmp_path: Path) -> None:
    """`processes/` may hold a file no process entry names (an atomic write's `.<name>.<random>.tmp`
    left by a kill -9, a hand-made file): the run's cleanup skips it and still terminates every
    registered process, alongside removing the run's containers."""
    from provisioner.runtime import labels as L
    from provisioner.runtime.engine import FakeRuntime
    from provisioner.runtime.recipes import ContainerRecipe

    child = _sleeper()
    rt = FakeRuntime()
    try:
        wd.register_process(tmp_path, child.pid)
        (tmp_path / wd.PROCESSES_DIR / f".{child.pid}-1.x1y2.tmp").write_text("")
        (tmp_path / wd.PROCESSES_DIR / "notes.txt").write_text("hand made")
        rt.add_image("img")
        rt.create_container(ContainerRecipe("c-of-run", "worker", "img", (), {}, L.selector("rr"), ()))
        removed = wd.remove_run("rr", tmp_path, None, rt)
        assert sorted(removed) == ["container c-of-run", f"process {child.pid}"]
        child.wait(timeout=10)
        assert rt.containers == {}
    finally:
        child.kill()
        child.wait()



class _LateCreate:
    """An engine on which a create call that was in flight when the owner died lands right after the
    watchdog's first removal: one more network with the run's labels."""

    def __init__(self, run_id: str, owner_pid: int) -> None:
        from provisioner.runtime.engine import FakeRuntime

        self.fake = FakeRuntime()
        self.run_id, self.owner_pid = run_id, owner_pid
        self.landed = False

    def __getattr__(self, name: str) -> object:
        return getattr(self.fake, name)

    def remove_network(self, network_id: str) -> object:
        from provisioner.runtime import labels as L
        from provisioner.runtime.recipes import NetworkRecipe

        removed = self.fake.remove_network(network_id)
        if not self.landed:
            self.landed = True
            labels = L.run_labels(self.run_id, "integration", "main", project="p", owner_pid=self.owner_pid)
            self.fake.create_network(NetworkRecipe(f"prov-{self.run_id}-late", True, labels))
        return removed


def test_a_resource_that_lands_after_the_removal_goes_in_the_late_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from provisioner.runtime import labels as L

    monkeypatch.setattr(wd, "LATE_SWEEPS_S", (0.0,))  # the sweep's delay is not what is tested
    owner = _dead_owner(tmp_path)
    engine = _LateCreate("late1", owner)
    _a_run(engine.fake, "late1", "p", owner)
    assert wd.watch("late1", tmp_path, 0.01, runtime=engine) == 0  # type: ignore[arg-type]
    assert engine.landed and engine.fake.list_resources(L.selector("late1")) == []
    log = capsys.readouterr().out
    assert "removed 1 resource(s)" in log and "late sweep removed: network prov-late1-late" in log, log
