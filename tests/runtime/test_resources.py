"""ResourceManager: tracking, reverse-order cleanup, per-owner cleanup, leak checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from provisioner.errors import LeakError
from provisioner.runtime import labels as L
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.recipes import NetworkRecipe
from provisioner.runtime.resources import ResourceManager, leaks, should_remove


def test_cleanup_all_runs_in_reverse_order_and_survives_a_failing_cleanup() -> None:
    rm = ResourceManager()
    order: list[str] = []

    def boom() -> None:
        order.append("b")
        raise OSError("cannot")

    rm.track("tempfile", "a", cleanup=lambda: order.append("a"))
    rm.track("tempfile", "b", cleanup=boom)
    rm.track("tempfile", "c", cleanup=lambda: order.append("c"))
    report = rm.cleanup_all()
    assert order == ["c", "b", "a"]
    assert [r.name for r in report.removed] == ["c", "a"]
    assert [(r.name, str(e)) for r, e in report.errors] == [("b", "cannot")]
    assert rm.tracked() == []


def test_cleanup_owner_touches_only_that_owner() -> None:
    rm = ResourceManager()
    done: list[str] = []
    rm.track("tempfile", "s1-a", owner="session:1", cleanup=lambda: done.append("s1-a"))
    rm.track("tempfile", "s2-a", owner="session:2", cleanup=lambda: done.append("s2-a"))
    rm.track("tempfile", "s1-b", owner="session:1", cleanup=lambda: done.append("s1-b"))
    rm.cleanup_owner("session:1")
    assert done == ["s1-b", "s1-a"]
    assert [r.name for r in rm.tracked()] == ["s2-a"]


def test_release_and_forget() -> None:
    rm = ResourceManager()
    done: list[str] = []
    a = rm.track("port", 5555, cleanup=lambda: done.append("a"))
    b = rm.track("port", 5556, cleanup=lambda: done.append("b"))
    rm.release(a)
    rm.forget(b)
    assert done == ["a"] and rm.tracked() == []
    with pytest.raises(ValueError, match="unknown resource kind"):
        rm.track("gpu", "x")  # type: ignore[arg-type]


def test_engine_resources_are_removed_through_the_runtime() -> None:
    rt = FakeRuntime()
    rm = ResourceManager(rt)
    net = rt.create_network(NetworkRecipe("n1", internal=True, labels=L.selector("r")))
    rm.track("network", net, name="n1")
    rm.cleanup_all()
    assert rt.networks == {} and ("remove_network", "n1") in rt.calls


def test_default_cleanup_of_files_and_processes(tmp_path: Path) -> None:
    rm = ResourceManager(process_grace_s=2)
    folder = tmp_path / "scratch"
    (folder / "deep").mkdir(parents=True)
    (folder / "deep" / "f").write_text("x")
    single = tmp_path / "single.txt"
    single.write_text("x")
    # A process that ignores SIGTERM: the manager must escalate to SIGKILL.
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('armed', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "armed"
    rm.track("tempfile", folder)
    rm.track("tempfile", single)
    rm.track("process", proc.pid)
    report = rm.cleanup_all()
    assert report.ok
    assert not folder.exists() and not single.exists()
    assert not psutil.pid_exists(proc.pid)  # psutil reaped it after SIGTERM was ignored and SIGKILL sent


def test_snapshot_and_leak_check_name_what_was_left(tmp_path: Path) -> None:
    rt = FakeRuntime()
    rm = ResourceManager(rt)
    before = rm.snapshot()
    rt.create_network(NetworkRecipe("prov-leaky", internal=True, labels=L.selector("r9")))
    rt.create_network(NetworkRecipe("not-ours", internal=True, labels={}))  # unmanaged: ignored
    stray = tmp_path / "stray"
    stray.write_text("x")
    rm.track("tempfile", stray)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(LeakError) as info:
            rm.check_leaks(before)
        found = info.value.leaks
        assert ("network", "prov-leaky") in found and ("tempfile", str(stray)) in found
        assert any(kind == "process" and name.startswith(f"{child.pid} ") for kind, name in found)
        assert not any(name == "not-ours" for _, name in found)
        assert "network prov-leaky" in str(info.value)
    finally:
        child.kill()
        child.wait()
    rt.remove_network("prov-leaky")
    stray.unlink()
    rm.check_leaks(before)  # nothing left: no error


def test_leaks_sorts_by_kind() -> None:
    assert leaks([("network", "a")], [("tempfile", "t"), ("network", "a"), ("container", "c")]) == [
        ("container", "c"),
        ("tempfile", "t"),
    ]


def test_port_leaks_are_listening_ports_we_tracked() -> None:
    import socket

    rm = ResourceManager()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    rm.track("port", port, cleanup=sock.close)
    before: frozenset[tuple[str, str]] = frozenset()
    assert ("port", str(port)) in rm.snapshot()
    rm.cleanup_all()
    assert ("port", str(port)) not in rm.snapshot() and psutil.pid_exists(1)
    rm.check_leaks(before)


@pytest.mark.parametrize(
    ("policy", "retain", "failed", "removed"),
    [
        ("aggressive", True, True, True),
        ("aggressive", True, False, True),
        ("on_success", True, False, True),
        ("on_success", True, True, False),
        ("on_success", False, True, True),
        ("never", False, False, False),
    ],
)
def test_should_remove(policy: str, retain: bool, failed: bool, removed: bool) -> None:
    assert should_remove(policy, retain, failed) is removed
