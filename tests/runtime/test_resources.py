"""ResourceManager: tracking, reverse-order cleanup, per-owner cleanup, leak checks."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from provisioner.errors import LeakError, RuntimeProblem
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
    before = rm.snapshot()  # what this process has already (e.g. children other tests started)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    rm.track("port", port, cleanup=sock.close)
    assert ("port", str(port)) in rm.snapshot()
    with pytest.raises(LeakError, match=f"port {port}"):
        rm.check_leaks(before)
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


# --- the per-test check without polling the machine (issue 10) ------------------------------------


def _selector(run: str) -> dict[str, str]:
    return L.selector(run, "main-1")


def _counting_lists(rt: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = rt.list_resources

    def counted(selector: dict[str, str]) -> list[object]:
        calls.append(1)
        return original(selector)  # type: ignore[return-value]

    monkeypatch.setattr(rt, "list_resources", counted)
    return calls


def _container(rt: FakeRuntime, name: str, labels: dict[str, str]) -> str:
    from provisioner.runtime.recipes import ContainerRecipe

    rt.add_image("img")
    recipe = ContainerRecipe(name=name, role="worker", image="img", command=("true",), environment={},
                             networks=(), labels=labels)
    return rt.create_container(recipe)


def test_engine_leaks_come_from_the_event_stream_not_list_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = FakeRuntime()
    lists = _counting_lists(rt, monkeypatch)
    sel = _selector("r1")
    rm = ResourceManager(rt, selector=sel)
    try:
        before = rm.snapshot(sync=False)
        for _ in range(5):  # a clean test: nothing listed, nothing found
            rm.check_leaks(rm.snapshot(sync=False))
        _container(rt, "prov-left-c", sel)
        rt.create_network(NetworkRecipe("prov-left-n", internal=True, labels=sel))
        rt.add_volume("prov-left-v", sel)
        rt.create_network(NetworkRecipe("other-process", internal=True, labels=_selector("r2")))
        with pytest.raises(LeakError) as info:
            rm.check_leaks(before)
        assert info.value.leaks == [
            ("container", "prov-left-c"), ("network", "prov-left-n"), ("volume", "prov-left-v")
        ]
        rt.remove_container("prov-left-c")
        rt.remove_network("prov-left-n")
        rt.remove_volume("prov-left-v")
        rm.check_leaks(before)
        assert lists == [1]  # once, when the watch started; every check after that read the stream
        assert rm._watch is not None and rm._watch.fallbacks == 0
    finally:
        rm.close()


def test_a_create_the_stream_has_not_delivered_yet_is_still_found() -> None:
    """The handshake: the check reads the engine's events up to now and waits for the stream."""
    rt = FakeRuntime()
    sel = _selector("r1")
    rm = ResourceManager(rt, selector=sel)
    try:
        before = rm.snapshot(sync=False)
        rt.stream_paused = True  # the engine has the event; the live stream has not delivered it
        rt.create_network(NetworkRecipe("prov-late", internal=True, labels=sel))
        assert ("network", "prov-late") not in rm.snapshot(sync=False)
        rt.on_events_query = rt.resume_stream  # the stream catches up once the check has asked
        with pytest.raises(LeakError, match="network prov-late"):
            rm.check_leaks(before)
        assert rm._watch is not None and rm._watch.fallbacks == 0
    finally:
        rm.close()


class _CountingRuntime(FakeRuntime):
    """A fake engine that counts this process's writes, as the Docker runtime counts docker-py's
    changing requests (:class:`provisioner.runtime.resources.WriteCount`)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.reads = 0
        self.on_events_query = self._read

    def _read(self) -> None:
        self.reads += 1

    def engine_writes(self) -> int:
        return self.writes

    def create_network(self, recipe: NetworkRecipe) -> str:
        self.writes += 1
        try:
            return super().create_network(recipe)
        finally:
            self.writes += 1


def test_checks_without_an_engine_write_spare_the_read_and_a_write_brings_it_back() -> None:
    """Issue 10: the bounded /events read (one engine round trip per test, ≈ 3 ms under load) is made
    only when this process wrote to the engine since the last exact view; the leak is still named."""
    from provisioner.runtime.resources import WriteCount

    rt = _CountingRuntime()
    assert isinstance(rt, WriteCount) and not isinstance(FakeRuntime(), WriteCount)
    sel = _selector("r1")
    rm = ResourceManager(rt, selector=sel)
    try:
        before = rm.snapshot(sync=False)
        for _ in range(5):  # clean tests: no write, no read
            rm.check_leaks(before)
        watch = rm._watch
        assert watch is not None and watch.reads_spared == 5 and rt.reads == 0
        rt.stream_paused = True  # the engine has the event; the live stream has not delivered it
        rt.create_network(NetworkRecipe("prov-late", internal=True, labels=sel))
        rt.on_events_query = lambda: (rt._read(), rt.resume_stream())  # type: ignore[func-returns-value]
        with pytest.raises(LeakError, match="network prov-late"):
            rm.check_leaks(before)
        assert rt.reads == 1 and watch.fallbacks == 0
        with pytest.raises(LeakError, match="network prov-late"):  # still there: no read needed
            rm.check_leaks(before)
        assert rt.reads == 1 and watch.reads_spared == 6
    finally:
        rm.close()


def test_a_write_still_running_at_the_last_read_makes_the_next_check_read() -> None:
    """A creation that began before a handshake and ended after it moves the count again."""
    rt = _CountingRuntime()
    sel = _selector("r1")
    rm = ResourceManager(rt, selector=sel)
    try:
        before = rm.snapshot(sync=False)
        rt.writes += 1  # a creation sent, not yet answered
        rm.check_leaks(before)  # reads (the count moved): nothing yet
        assert rt.reads == 1
        rt.stream_paused = True
        rt.create_network(NetworkRecipe("prov-slow", internal=True, labels=sel))  # ... it lands now
        rt.on_events_query = lambda: (rt._read(), rt.resume_stream())  # type: ignore[func-returns-value]
        with pytest.raises(LeakError, match="network prov-slow"):
            rm.check_leaks(before)
        assert rt.reads == 2
    finally:
        rm.close()


def test_a_stuck_or_broken_stream_falls_back_to_listing() -> None:
    rt = FakeRuntime()
    sel = _selector("r1")
    rm = ResourceManager(rt, selector=sel, sync_timeout_s=0.2)
    try:
        before = rm.snapshot(sync=False)
        rt.stream_paused = True  # never resumed
        rt.create_network(NetworkRecipe("prov-stuck", internal=True, labels=sel))
        with pytest.raises(LeakError, match="network prov-stuck"):
            rm.check_leaks(before)
        watch = rm._watch
        assert watch is not None and watch.fallbacks == 1
        watch._stream.close()  # type: ignore[union-attr]  # the stream ends: from now on, list
        watch._thread.join(timeout=10)
        rt.remove_network("prov-stuck")
        _container(rt, "prov-after-break", sel)
        with pytest.raises(LeakError, match="container prov-after-break"):
            rm.check_leaks(before)
        assert watch.fallbacks == 2
    finally:
        rm.close()


def test_no_port_tracked_means_no_socket_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("scanned sockets")

    monkeypatch.setattr(psutil, "net_connections", forbidden)
    monkeypatch.setattr(psutil.Process, "net_connections", forbidden)
    rm = ResourceManager()
    stray = tmp_path / "t"
    stray.write_text("x")
    rm.track("tempfile", stray)
    assert ("tempfile", str(stray)) in rm.snapshot()


def test_tracked_ports_are_found_on_own_sockets_and_childrens_not_the_machines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("scanned the whole machine")

    monkeypatch.setattr(psutil, "net_connections", forbidden)
    code = (
        "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
        "print(s.getsockname()[1], flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        rm = ResourceManager()
        rm.track("port", port, owner="test:t")
        found = rm.snapshot()
        assert ("port", str(port)) in found
        assert any(kind == "process" and name.startswith(f"{child.pid} ") for kind, name in found)
    finally:
        child.kill()
        child.wait()


def test_children_are_walked_only_when_there_are_any(monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioner.runtime import resources

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert resources.has_children()
        assert (child.pid, psutil.Process(child.pid).name()) in resources.child_processes_of_this_process()
    finally:
        child.kill()
        child.wait()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("walked the process table")

    monkeypatch.setattr(resources, "has_children", lambda: False)
    monkeypatch.setattr(psutil.Process, "children", forbidden)
    assert resources.child_processes_of_this_process() == []


def _key_event(key: tuple[int, str, str, str]) -> tuple[str, str]:
    return key[1], key[3]


@pytest.mark.docker
def test_docker_event_watch_names_what_was_created_right_before_the_check(
    docker_engine: object, worker_image: str, monkeypatch: pytest.MonkeyPatch,
    watched_run: Callable[[str], Path],
) -> None:
    """Against the real engine: created with docker-py directly (not through provisioner), checked
    at once — the handshake makes the stream's delay irrelevant; removed, the check passes."""
    import os

    from provisioner.runtime.engine import DockerRuntime

    rt = DockerRuntime()
    sel = _selector(f"leak{os.getpid()}")
    watched_run(f"leak{os.getpid()}")  # removed by the watchdog if this process is killed before the finally
    rm = ResourceManager(rt, selector=sel)
    api = rt.client.api
    created: list[tuple[str, str]] = []
    try:
        before = rm.snapshot(sync=False)
        rm.check_leaks(before)  # no engine write since the watch listed: no read needed
        assert rm._watch is not None and rm._watch.reads_spared == 1
        start = time.time_ns()
        net = api.create_network(f"prov-leakcheck-{os.getpid()}", labels=sel, internal=True)
        created.append(("network", net["Id"]))
        box = api.create_container(worker_image, command=["true"], name=f"prov-leakcheck-c-{os.getpid()}",
                                   labels=sel)
        created.append(("container", box["Id"]))
        with pytest.raises(LeakError) as info:
            rm.check_leaks(before)
        assert info.value.leaks == [
            ("container", f"prov-leakcheck-c-{os.getpid()}"), ("network", f"prov-leakcheck-{os.getpid()}")
        ]
        rt.remove_container(box["Id"])
        rt.remove_network(net["Id"])
        rm.check_leaks(before)
        assert rm._watch is not None and rm._watch.fallbacks == 0
        # The bounded read over the kept-open socket (_UnixGet) sees what docker-py's stream sees.
        end = time.time_ns()
        ours = {net["Id"], box["Id"]}
        fast = [e.key for e in rt.events(start, end) if e.id in ours]
        monkeypatch.setattr(rt, "_past_events", lambda *args: None)
        assert fast == [e.key for e in rt.events(start, end) if e.id in ours]
        assert [_key_event(k) for k in fast] == [
            ("network", "create"), ("container", "create"), ("container", "destroy"), ("network", "destroy")
        ]
    finally:
        for kind, ident in reversed(created):
            if kind == "container":
                rt.remove_container(ident)
            else:
                rt.remove_network(ident)
        rm.close()
        rt.close()


def test_a_failed_label_lookup_makes_the_next_check_list(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = FakeRuntime()
    sel = _selector("r1")
    rm = ResourceManager(rt, selector=sel)
    try:
        before = rm.snapshot(sync=False)

        def broken(kind: str, resource_id: str) -> None:
            raise OSError("engine hiccup")

        monkeypatch.setattr(rt, "resource_labels", broken)
        rt.create_network(NetworkRecipe("prov-unknown", internal=True, labels=sel))
        with pytest.raises(LeakError, match="network prov-unknown"):
            rm.check_leaks(before)
        assert rm._watch is not None and rm._watch.fallbacks == 1
        monkeypatch.undo()
        rt.remove_network("prov-unknown")
        rm.check_leaks(before)  # the stream applies the removal on top of the listed state
        assert rm._watch.fallbacks == 1
    finally:
        rm.close()


def test_an_engine_resource_without_a_runtime_is_a_named_cleanup_failure(tmp_path: Path) -> None:
    manager = ResourceManager(None)
    manager.track("container", "c-1", name="prov-x")
    scratch = tmp_path / "scratch.txt"
    scratch.write_text("x")
    manager.track("tempfile", scratch)
    report = manager.cleanup_all()
    assert [(r.name, type(exc)) for r, exc in report.errors] == [("prov-x", RuntimeProblem)]
    assert "no container runtime" in str(report.errors[0][1])
    assert not scratch.exists()  # the other resource was still removed
