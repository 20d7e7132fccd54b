"""The egress guard's in-container script: reading the route table, the gate, its arguments.

The netlink part (``block``) needs CAP_NET_ADMIN in a container's namespace: it is exercised
against the real engine in tests/runtime/test_docker_isolation.py."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from provisioner.runtime import netguard

# /proc/net/route of a container on an internal Docker network (172.18.0.0/16), before and after.
BEFORE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010012AC\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
"""
AFTER = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
*\t010012AC\t00000000\t0205\t0\t0\t0\tFFFFFFFF\t0\t0\t0
"""
# Half done (default route deleted, gateway not prohibited): not in place.
NO_REJECT = "\n".join(AFTER.splitlines()[:2]) + "\n"


def test_route_table_parsing() -> None:
    routes = netguard.read_ipv4_routes(BEFORE)
    assert routes[0] == {"iface": "eth0", "destination": 0, "gateway": 0x010012AC, "flags": 3, "mask": 0}
    assert len(routes) == 2


@pytest.mark.parametrize(
    ("text", "in_place"), [(BEFORE, False), (AFTER, True), (NO_REJECT, False), ("", False)]
)
def test_the_gate_waits_for_no_default_route_and_a_reject_route(text: str, in_place: bool) -> None:
    assert netguard.guard_in_place(text) is in_place


def test_ipv6_interfaces_ignore_loopback() -> None:
    text = (
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fe800000000000000042acfffe120002 05 40 20 80     eth0\n"
    )
    assert netguard.ipv6_interfaces(text) == ["eth0"]
    assert netguard.ipv6_interfaces(text.splitlines()[0]) == []


def test_the_gate_does_not_start_the_command_without_the_guard() -> None:
    # This host has a default route: the gate must give up after its deadline, not run the command.
    done = subprocess.run(
        [sys.executable, "-I", netguard.__file__, "wait", "--", sys.executable, "-c", "print('STARTED')"],
        capture_output=True,
        text=True,
        timeout=60,
        env={netguard.WAIT_ENV: "0.3", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == netguard.EXIT_TIMEOUT and "STARTED" not in done.stdout
    assert "the egress guard was not applied within 0s" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "usage"),
        (["wait"], "no command given"),
        (["block", "--frobnicate"], "unexpected argument '--frobnicate'"),
    ],
)
def test_bad_arguments_are_refused_with_usage(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert netguard.main(args) == netguard.EXIT_REFUSED
    assert message in capsys.readouterr().err


def test_a_malformed_gateway_is_refused() -> None:
    with pytest.raises(OSError):
        netguard.main(["block", "--gateway", "not-an-address"])


def _after_file(tmp_path: Path) -> str:
    path = tmp_path / "route"
    path.write_text(AFTER)
    return str(path)


def test_once_the_guard_holds_a_console_script_runs_in_the_gates_process_after_its_preload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `provision --version` is the installed console script here, as `provision worker` is in the image.
    monkeypatch.setattr(sys, "argv", ["netguard.py"])
    with pytest.raises(SystemExit) as info:
        netguard.wait_for_guard(
            ["provision", "--version"], timeout_s=30, preload=["json"], route_file=_after_file(tmp_path)
        )
    assert info.value.code in (0, None) and sys.argv == ["provision", "--version"]
    assert "provision" in capsys.readouterr().out.lower()


def test_once_the_guard_holds_any_other_command_is_execd(tmp_path: Path) -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import netguard; "
        "netguard.wait_for_guard(['sh', '-c', 'echo EXECD $$'], timeout_s=30, route_file=sys.argv[2])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(netguard.__file__).parent), _after_file(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.startswith("EXECD "), done.stderr


def test_the_guards_netlink_dump_shows_the_routes_proc_net_route_shows() -> None:
    # Dumping routes needs no privilege: this process's own namespace, read both ways. Other runs on
    # this host's engine add and remove networks: a dump between two equal reads of the file.
    for _ in range(50):
        before = Path("/proc/net/route").read_text()
        with netguard.RouteSocket() as rtnl:
            dumped = rtnl.routes()
        if Path("/proc/net/route").read_text() == before:
            break
    proc = netguard.read_ipv4_routes(before)

    def key(dst: str | None, dst_len: int, gateway: str | None) -> tuple[str, int, str]:
        return (dst or "0.0.0.0", dst_len, gateway or "0.0.0.0")

    def quad(value: object) -> str:
        return socket.inet_ntoa(struct.pack("<I", int(str(value))))

    from_proc = {
        (quad(r["destination"]), bin(int(str(r["mask"]))).count("1"), quad(r["gateway"])) for r in proc
    }
    assert from_proc and {key(r.dst, r.dst_len, r.gateway) for r in dumped} == from_proc


def test_a_route_message_is_parsed_with_its_attributes() -> None:
    # struct rtmsg of a default route via 172.18.0.1 on ifindex 7, main table, then a prohibit /32.
    default = netguard.RTMSG.pack(socket.AF_INET, 0, 0, 0, 254, 3, 0, 1, 0) + b"".join(
        netguard._attribute(kind, value)
        for kind, value in ((netguard.RTA_TABLE, struct.pack("=I", 254)),
                            (netguard.RTA_GATEWAY, socket.inet_aton("172.18.0.1")),
                            (netguard.RTA_OIF, struct.pack("=i", 7)))
    )
    assert netguard.parse_route(default) == netguard.Route(0, 1, 254, None, "172.18.0.1", 7)
    prohibit = netguard.RTMSG.pack(socket.AF_INET, 32, 0, 0, 254, 3, 0, netguard.RTN_PROHIBIT, 0)
    prohibit += netguard._attribute(netguard.RTA_DST, socket.inet_aton("172.18.0.1"))
    assert netguard.parse_route(prohibit) == netguard.Route(32, 8, 254, "172.18.0.1", None, None)
