"""Against the real engine: one mock-LM run shared by the module (2 workers), checked for what the
recipes promise — reachable through the env file, unprivileged, no way out (not even to the host),
isolated from other runs, dead workers replaced, relay and workers healthy in `docker ps` — and
removed without leftovers at the end, also when a test fails."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from provisioner.errors import RuntimeProblem, WorkerLostError, WorkerNotReadyError
from provisioner.layers import get_layer
from provisioner.runtime import labels as L
from provisioner.runtime import netguard
from provisioner.runtime.deployment import Deployment, WorkerInfo, bridge_probe
from provisioner.runtime.egress import block_host_access
from provisioner.runtime.engine import DockerRuntime, remove_by_selector
from provisioner.runtime.lifecycle import UpOptions, down, up
from provisioner.runtime.pool import WorkerPool
from provisioner.runtime.recipes import Owner, PlanOptions, RunPlan, RunTarget, plan_run
from provisioner.settings import Settings

from .._helpers import tcp_listener
from .conftest import leftovers, scratch_settings

# The first session on a fresh machine builds the image (debootstrap base, wheelhouse): allow for it.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]


def _settings(folder: Path) -> Settings:
    return scratch_settings(folder, 60.0)


def _one_worker_plan(settings: Settings, name: str, image: str, **options: Any) -> RunPlan:
    """The plan of a run of one mock-LM integration worker, ``name`` + this process's id."""
    layer = get_layer(settings, "integration")
    target = RunTarget(f"{name}{os.getpid()}", Owner.this_process())
    return plan_run(settings, layer, layer.lm_config(settings.lm, "mock"), target, image,
                    PlanOptions(workers=1, **options))


@pytest.fixture(scope="module")
def mock_run(
    docker_engine: Any, worker_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    settings = _settings(tmp_path_factory.mktemp("mockrun"))
    env = up(
        settings,
        UpOptions(layer="integration", lm_mode="mock", workers=2, image=worker_image, persistent=False),
    )
    try:
        yield settings, env
    finally:
        down(settings, run_id=env.plan.run_id)
        assert leftovers(docker_engine, env.plan.run_id) == []


def _call(address: str, command: str, args: dict[str, Any]) -> dict[str, Any]:
    """One request over a plain socket — what a non-Python test suite would do with the env file."""
    host, port = address.rsplit(":", 1)
    body = json.dumps({"id": 1, "command": command, "args": args}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(struct.pack(">I", len(body)) + body)
        reader = sock.makefile("rb")
        (size,) = struct.unpack(">I", reader.read(4))
        return dict(json.loads(reader.read(size)))


def test_the_env_file_reaches_every_worker_from_a_plain_socket(mock_run: Any) -> None:
    settings, env = mock_run
    env_file = Path(settings.state_dir) / "runs" / env.plan.run_id / "env"
    shell = subprocess.run(
        ["bash", "-c", f"source {shlex.quote(str(env_file))} && echo $PROVISION_BRIDGE_ADDRS"],
        capture_output=True,
        text=True,
        check=True,
    )
    addresses = shell.stdout.strip().split(",")
    assert len(addresses) == 2 and all(a.startswith("127.0.0.1:") for a in addresses)
    for i, address in enumerate(addresses):
        created = _call(
            address,
            "create_program",
            {"signature": "question -> answer", "program_id": f"p{i}", "session_id": "plain"},
        )
        assert created["success"], created
        done = _call(
            address,
            "execute_program",
            {"program_id": f"p{i}", "inputs": {"question": "hi"}, "session_id": "plain"},
        )
        assert done["success"] and "answer" in done["result"]["outputs"], done


def test_workers_are_unprivileged_read_only_and_publish_nothing(docker_engine: Any, mock_run: Any) -> None:
    _, env = mock_run
    rt = DockerRuntime(docker_engine)
    worker = env.workers[0]
    code, out = rt.exec(
        worker.container_id, ["sh", "-c", "id -u; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status"]
    )
    uid, cap_eff, no_new_privs = out.split()[0], out.split()[2], out.split()[4]
    assert code == 0 and uid != "0" and int(cap_eff, 16) == 0 and no_new_privs == "1"
    code, out = rt.exec(worker.container_id, ["sh", "-c", "touch /etc/x 2>&1; ls /var/run/docker.sock 2>&1"])
    assert "Read-only file system" in out and "No such file" in out
    code, _ = rt.exec(worker.container_id, ["python3", "-c", "import docker"])
    assert code != 0  # no docker-py (nor the socket) inside workers
    info = docker_engine.api.inspect_container(worker.container_id)
    assert info["HostConfig"]["PortBindings"] in (None, {}) and info["HostConfig"]["Privileged"] is False
    relay = docker_engine.api.inspect_container(env.plan.relay.name)
    bindings = [b for bs in relay["NetworkSettings"]["Ports"].values() for b in (bs or [])]
    assert bindings and {b["HostIp"] for b in bindings} == {"127.0.0.1"}


@contextlib.contextmanager
def _outside_target(prerequisite: Callable[[str], NoReturn]) -> Iterator[tuple[str, int]]:
    """A TCP listener in a network namespace of our own, routed from the host like the internet
    would be (a veth pair, 198.18.77.0/30 — a benchmarking range nobody uses)."""
    if os.geteuid() != 0:
        prerequisite("creating the stand-in 'outside' network namespace needs root")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"provtest{tag}", f"pvh{tag}", f"pvn{tag}"
    listener = None

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", ns)
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", "198.18.77.1/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", "198.18.77.2/30", "dev", ns_if)
        ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        ip("netns", "exec", ns, "ip", "route", "add", "default", "via", "198.18.77.1")
        server = (
            "import socket; s = socket.create_server(('198.18.77.2', 18080)); print('up', flush=True)\n"
            "while True:\n    c, _ = s.accept(); c.sendall(b'outside'); c.close()"
        )
        listener = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", server], stdout=subprocess.PIPE, text=True
        )
        assert listener.stdout is not None and listener.stdout.readline().strip() == "up"
        yield "198.18.77.2", 18080
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


PROBE = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
except OSError as e:
    sys.exit(print("blocked", type(e).__name__))
c.settimeout(0.5)
try:
    data = c.recv(16).decode()
except OSError:
    data = ""  # a bridge worker waits for a request: connecting is what counts
print("reached", data)
"""


def _probe_all(rt: DockerRuntime, containers: list[str], host: str, port: int) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(containers)) as pool:
        return list(pool.map(lambda c: rt.exec(c, ["python3", "-c", PROBE, host, str(port)])[1], containers))


def test_mock_workers_cannot_reach_anything_outside_the_host(
    docker_engine: Any, mock_run: Any, prerequisite: Callable[[str], NoReturn]
) -> None:
    _, env = mock_run
    rt = DockerRuntime(docker_engine)
    with _outside_target(prerequisite) as (host, port):
        # Control: the relay sits on an ordinary network, so the target is reachable from there.
        _, relay_out = rt.exec(env.plan.relay.name, ["python3", "-c", PROBE, host, str(port)])
        assert relay_out.strip() == "reached outside"
        outs = _probe_all(rt, [w.container_id for w in env.workers], host, port)
        assert all(out.startswith("blocked") for out in outs), outs


def test_a_run_cannot_reach_another_runs_workers(
    docker_engine: Any, worker_image: str, mock_run: Any, tmp_path: Path
) -> None:
    _, env_a = mock_run
    rt = DockerRuntime(docker_engine)
    target_ip = rt.container_ip(env_a.workers[0].container_id, env_a.plan.run_network)
    assert target_ip
    # Control: inside run A the worker answers on that address.
    _, ok = rt.exec(env_a.plan.relay.name, ["python3", "-c", PROBE, target_ip, "8765"])
    assert ok.startswith("reached"), ok
    settings_b = _settings(tmp_path / "b")
    env_b = up(
        settings_b,
        UpOptions(layer="integration", lm_mode="mock", workers=1, image=worker_image, persistent=False),
    )
    try:
        outs = _probe_all(rt, [env_b.workers[0].container_id, env_b.plan.relay.name], target_ip, 8765)
        assert all(out.startswith("blocked") for out in outs), outs
    finally:
        down(settings_b, run_id=env_b.plan.run_id)
    assert leftovers(docker_engine, env_b.plan.run_id) == []


def test_a_killed_worker_is_replaced_behind_the_same_address(docker_engine: Any, mock_run: Any) -> None:
    _, env = mock_run
    pool = WorkerPool(env)  # not owning: the module fixture removes the run
    session = pool.open_session("victim")
    client = pool.client("victim")
    client.create_program("question -> answer", "kept")
    victim = pool.environment.worker(session.slot).container_id
    docker_engine.api.kill(victim)
    docker_engine.api.wait(victim, timeout=30)  # kill returns before the container has stopped
    assert pool.check() == [session.slot]
    with pytest.raises(WorkerLostError, match="victim"):
        pool.report_failure("victim")
    fresh = pool.open_session("next")
    assert fresh.slot == session.slot and fresh.generation == 1 and fresh.address == session.address
    again = pool.client("next")
    assert again.request("list_programs")["programs"] == []  # a new worker: nothing carried over
    assert _call(fresh.address, "ping", {})["result"]["lm_configured"] is True


@pytest.mark.slow
def test_readiness_failure_names_the_worker_and_shows_its_log(
    docker_engine: Any, worker_image: str, tmp_path: Path, watched_run: Any
) -> None:
    settings = _settings(tmp_path)
    plan = _one_worker_plan(settings, "bad", worker_image, worker_args=("--no-such-flag",))
    env = Deployment(plan, DockerRuntime(docker_engine), ready_timeout_s=60)
    watched_run(plan.run_id)  # removed by the watchdog if this process is killed before the finally
    try:
        with pytest.raises(WorkerNotReadyError) as info:
            env.start()
        assert plan.workers[0].name in str(info.value) and "exited" in str(info.value)
        assert "no-such-flag" in info.value.last_logs
        assert leftovers(docker_engine, plan.run_id) == []
    finally:
        remove_by_selector(DockerRuntime(docker_engine), L.selector(plan.run_id))


# --- the host is out of reach too (issue 14 item 5) ------------------------------------------------

CONNECT = """
import errno, socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print(target, "reached")
    except OSError as e:
        print(target, errno.errorcode.get(e.errno, type(e).__name__))
"""


RESTORE_DEFAULT = """
import errno, sys
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
try:
    IPRoute().route("add", dst="0.0.0.0", dst_len=0, gateway=sys.argv[1])
except NetlinkError as e:
    sys.exit(errno.errorcode.get(e.code, str(e.code)))
print("default route restored")
"""


def _connect_from(rt: DockerRuntime, container: str, targets: list[str]) -> dict[str, str]:
    code, out = rt.exec(container, ["python3", "-c", CONNECT, *targets])
    assert code == 0, out
    return dict(line.rsplit(" ", 1) for line in out.strip().splitlines())


def _host_listener() -> contextlib.AbstractContextManager[int]:
    """A TCP listener on every host address (0.0.0.0), as a careless dev server would bind."""
    return tcp_listener(host="0.0.0.0")  # what the guard must keep workers from


def _docker0_address(docker_engine: Any) -> str:
    """The default bridge's address on the host (its IPAM gateway, or docker0's interface address)."""
    info = docker_engine.api.inspect_network("bridge")
    configured = [c["Gateway"] for c in info["IPAM"]["Config"] if c.get("Gateway")]
    if configured:
        return str(configured[0])
    device = info["Options"].get("com.docker.network.bridge.name", "docker0")
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", device], capture_output=True, text=True)
    assert shown.returncode == 0 and " inet " in shown.stdout, shown
    return shown.stdout.split(" inet ", 1)[1].split("/", 1)[0]


def _host_addresses(docker_engine: Any, rt: DockerRuntime, env: Any) -> dict[str, str]:
    """The host's own addresses a worker could try: its run network's gateway, docker0's address
    (the default bridge's gateway), and the relay's edge network gateway."""
    relay = env.plan.relay.name
    bridge = _docker0_address(docker_engine)
    found = {
        "run network gateway": rt.container_gateway(env.workers[0].container_id, env.plan.run_network),
        "docker0": bridge,
        "edge network gateway": rt.container_gateway(relay, f"{env.plan.run_network}-edge"),
    }
    assert all(found.values()), found
    return {name: str(address) for name, address in found.items()}


def test_mock_workers_cannot_reach_any_host_listener_but_reach_their_run(
    docker_engine: Any, mock_run: Any
) -> None:
    _, env = mock_run
    rt = DockerRuntime(docker_engine)
    with _host_listener() as port:
        addresses = _host_addresses(docker_engine, rt, env)
        targets = [f"{address}:{port}" for address in addresses.values()]
        # Control: from the relay (edge network) the listener answers on every one of these addresses.
        assert set(_connect_from(rt, env.plan.relay.name, targets).values()) == {"reached"}
        gateway = f"{addresses['run network gateway']}:{port}"
        peers = [f"w{w.slot}:8765" for w in env.workers] + [f"{env.plan.relay.name}:9000"]
        for worker in env.workers:
            seen = _connect_from(rt, worker.container_id, [*targets, *peers])
            # The gateway is prohibited (EACCES); everything off the run's subnet has no route.
            assert seen[gateway] == errno.errorcode[errno.EACCES], seen
            assert all(seen[t] == errno.errorcode[errno.ENETUNREACH] for t in targets if t != gateway), seen
            assert all(seen[p] == "reached" for p in peers), seen  # the run's own network still works
            _, routes = rt.exec(worker.container_id, ["cat", "/proc/net/route"])
            _, inet6 = rt.exec(worker.container_id, ["cat", "/proc/net/if_inet6"])
            assert netguard.guard_in_place(routes) and netguard.ipv6_interfaces(inet6) == [], routes
            # The worker cannot undo it: without CAP_NET_ADMIN, putting the default route back fails.
            code, out = rt.exec(
                worker.container_id, ["python3", "-c", RESTORE_DEFAULT, addresses["run network gateway"]]
            )
            assert code != 0 and "EPERM" in out, out
    assert _call(env.workers[0].address, "ping", {})["success"]  # and the relay path serves clients


def _processes(rt: DockerRuntime, container_id: str) -> list[list[str]]:
    code, out = rt.exec(
        container_id,
        [
            "python3",
            "-c",
            "import json, os, pathlib\nprint(json.dumps([pathlib.Path(f'/proc/{p}/cmdline')"
            ".read_bytes().decode().split(chr(0))[:-1] for p in os.listdir('/proc') if p.isdigit() and "
            "int(p) != os.getpid()]))",
        ],
    )
    assert code == 0, out
    return [argv for argv in json.loads(out) if argv]


def test_a_guarded_worker_serves_only_after_its_guard(
    docker_engine: Any, worker_image: str, tmp_path: Path, watched_run: Any
) -> None:
    settings = _settings(tmp_path)
    plan = _one_worker_plan(settings, "gate", worker_image)
    rt = DockerRuntime(docker_engine)
    base = Deployment(dataclasses.replace(plan, workers=()), rt, ready_timeout_s=60)
    watched_run(plan.run_id)  # removed by the watchdog if this process is killed before the finally
    try:
        base.start()  # networks and relay
        worker = plan.workers[0]
        cid = rt.create_container(worker)
        rt.start_container(cid)
        # Started, but held by the gate: its only process is `netguard.py wait`, nothing listens.
        procs = _processes(rt, cid)
        assert any(argv[2:4] == ["/opt/provisioner/netguard.py", "wait"] for argv in procs), procs
        assert not any("provision" in argv[1:2] or argv[:1] == ["provision"] for argv in procs), procs
        port = rt.published_port(base.container_ids[plan.relay.name], plan.relay_port_for(0))
        assert port and not bridge_probe("127.0.0.1", port, 2.0).ok
        block_host_access(rt, worker, cid, network=plan.run_network)
        info = WorkerInfo(0, worker.name, cid, "127.0.0.1", port)
        base.container_ids[worker.name] = cid
        base.wait_ready(info)  # now it serves
        assert leftovers(docker_engine, plan.run_id).count(f"container {worker.name}-guard") == 0
    finally:
        remove_by_selector(rt, L.selector(plan.run_id))
    assert leftovers(docker_engine, plan.run_id) == []


def test_a_guard_that_finds_no_gateway_fails_loudly_and_the_worker_never_starts(
    docker_engine: Any, worker_image: str, tmp_path: Path, watched_run: Any
) -> None:
    settings = _settings(tmp_path)
    plan = _one_worker_plan(settings, "nogw", worker_image)
    rt = DockerRuntime(docker_engine)
    # No network at all: no default route, no gateway to prohibit.
    lonely = dataclasses.replace(plan.workers[0], networks=(), network_mode="none")
    watched_run(plan.run_id)  # removed by the watchdog if this process is killed before the finally
    cid = rt.create_container(lonely)
    try:
        rt.start_container(cid)
        with pytest.raises(RuntimeProblem, match=r"failed \(exit code 2\)") as info:
            block_host_access(rt, lonely, cid, network=plan.run_network)
        assert "found no gateway to block" in str(info.value)
        assert not any(argv[:1] == ["provision"] for argv in _processes(rt, cid))
    finally:
        remove_by_selector(rt, L.selector(plan.run_id))
    assert leftovers(docker_engine, plan.run_id) == []


def _health(docker_engine: Any, name: str) -> str:
    state = docker_engine.api.inspect_container(name)["State"]
    return str((state.get("Health") or {}).get("Status", "none"))


def test_relay_and_workers_are_healthy_in_docker_ps(docker_engine: Any, mock_run: Any) -> None:
    _, env = mock_run
    names = [env.plan.relay.name, *(w.name for w in env.workers)]
    deadline = time.monotonic() + 180  # the first check runs one interval after the start
    while (states := {n: _health(docker_engine, n) for n in names}) and set(states.values()) != {"healthy"}:
        assert "unhealthy" not in states.values(), states
        assert time.monotonic() < deadline, f"not healthy within 180s: {states}"
        time.sleep(0.5)
    shown = subprocess.run(
        [
            "docker",
            "ps",
            "--filter",
            f"label=provisioner.run={env.plan.run_id}",
            "--format",
            "{{.Names}} {{.Status}}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert all(f"{n} " in shown for n in names) and shown.count("(healthy)") == len(names), shown
