"""The egress guard, inside containers: a run's internal-network containers cannot open connections to
the host.

Docker's ``internal`` networks drop forwarded traffic, but a container on one still has a default
route via the network's gateway — an address of the host — so it reaches every host listener
(the gateway address, docker0's address, anything bound to 0.0.0.0). This file closes that from
inside the container's own network namespace, with no host root and no host state (nothing to clean
up after a SIGKILL: the rules die with the namespace). Copied into the worker image as
``/opt/provisioner/netguard.py``; two commands:

``python3 -I /opt/provisioner/netguard.py block [--gateway ADDR ...]``
    The guard. Runs in a short-lived container that joins the target's network namespace
    (``network_mode: container:<target>``) as root with only CAP_NET_ADMIN (every other capability
    dropped, no-new-privileges) and exits at once. Over rtnetlink (stdlib sockets) it adds a ``prohibit``
    host route for every gateway (the ``--gateway`` addresses and the default routes' gateways) —
    more specific than the on-link subnet route, so connecting to it fails with EACCES — and then
    deletes the default routes, so every address off the run's subnet fails with ENETUNREACH. The
    subnet itself stays reachable: the relay, the Gemini stand-in and the run's other workers. It
    checks the table afterwards and exits 0 only when the guard holds; running it again is harmless.
    IPv4 only: it refuses (exit 2) when a non-loopback interface has IPv6 (Docker disables IPv6 in
    containers of networks without ``--ipv6``, which is how provisioner creates its networks).

``python3 -P /opt/provisioner/netguard.py wait [--preload MOD,MOD] -- COMMAND ...``
    The gate, as the guarded container's own command: polls ``/proc/net/route`` (stdlib only) until
    the guard is in place — no default route and at least one reject route — and then starts
    COMMAND, so the worker never listens before it is cut off from the host. After
    ``PROVISION_NETGUARD_WAIT_S`` seconds (default 120) without the guard it exits 3 with a message.
    With ``--preload`` and a COMMAND that is an installed console script (``provision``), the
    script's module and the listed modules (e.g. ``dspy``) are imported in a thread *while* the
    gate waits, and the script then runs in this process: the worker's start-up overlaps the
    guard instead of following it. Otherwise COMMAND is ``exec``'d. (``-P``, not ``-I``: the
    command must see the container's ``PYTHON*`` environment, e.g. ``PYTHONUNBUFFERED``.)

The container's own process cannot undo this: workers run without CAP_NET_ADMIN.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import time
from typing import Any, NamedTuple

WAIT_ENV = "PROVISION_NETGUARD_WAIT_S"
DEFAULT_WAIT_S = 120.0
POLL_S = 0.01
RTF_REJECT = 0x0200  # include/uapi/linux/route.h
RT_TABLE_MAIN = 254
RTN_PROHIBIT = 8  # include/uapi/linux/rtnetlink.h
EXIT_REFUSED = 2
EXIT_TIMEOUT = 3


# --- the gate (stdlib only: it runs before every guarded container's command) ---------------------


def read_ipv4_routes(text: str) -> list[dict[str, int | str]]:
    """``/proc/net/route`` as dicts: ``iface`` (str); ``destination``, ``gateway``, ``flags``,
    ``mask`` (ints; addresses as the kernel prints them, little-endian hex)."""
    routes: list[dict[str, int | str]] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        routes.append(
            {
                "iface": fields[0],
                "destination": int(fields[1], 16),
                "gateway": int(fields[2], 16),
                "flags": int(fields[3], 16),
                "mask": int(fields[7], 16),
            }
        )
    return routes


def guard_in_place(route_text: str) -> bool:
    """True when ``/proc/net/route`` shows the guard: no default route, at least one reject route."""
    routes = read_ipv4_routes(route_text)
    no_default = not any(r["destination"] == 0 and r["mask"] == 0 for r in routes)
    return no_default and any(int(r["flags"]) & RTF_REJECT for r in routes)


def _preload(modules: list[str]) -> None:
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: S112 - the command itself reports a broken import when it runs
            continue


def _console_script(name: str) -> Any:
    from importlib.metadata import entry_points

    return next(iter(entry_points(group="console_scripts", name=name)), None)


def wait_for_guard(
    command: list[str],
    *,
    timeout_s: float | None = None,
    preload: list[str] | None = None,
    route_file: str = "/proc/net/route",
) -> int:
    """Poll until the guard is in place, then start ``command``; 3 after the deadline.

    ``preload``: modules to import while waiting; then a console-script ``command`` runs in this
    process (its exit status is raised as SystemExit), anything else is ``exec``'d.
    """
    if not command:
        print("netguard wait: no command given; usage: netguard.py wait -- COMMAND ...", file=sys.stderr)
        return EXIT_REFUSED
    if timeout_s is None:
        timeout_s = float(os.environ.get(WAIT_ENV) or DEFAULT_WAIT_S)
    script = _console_script(command[0]) if preload else None
    loader = None
    if script is not None:
        import threading

        loader = threading.Thread(
            target=_preload, args=([script.module, *(preload or [])],), name="netguard-preload", daemon=True
        )
        loader.start()
    deadline = time.monotonic() + timeout_s
    while True:
        with open(route_file) as fh:
            if guard_in_place(fh.read()):
                break
        if time.monotonic() >= deadline:
            print(
                f"netguard wait: the egress guard was not applied within {timeout_s:.0f}s, so "
                f"{command[0]!r} was not started. provisioner runs the guard right after starting this "
                "container; started by hand (or by compose without the '-guard' service), run "
                "`python3 -I /opt/provisioner/netguard.py block` in a container with "
                "network_mode container:<this one> and --cap-add NET_ADMIN.",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_TIMEOUT
        time.sleep(POLL_S)
    if script is not None and loader is not None:
        loader.join()
        sys.argv = list(command)
        raise SystemExit(script.load()())
    os.execvp(command[0], command)  # noqa: S606 - the container's own command, as given
    return 0  # pragma: no cover - execvp does not return


# --- the guard (root with CAP_NET_ADMIN only, in the target's network namespace) ------------------


def ipv6_interfaces(if_inet6_text: str) -> list[str]:
    """Non-loopback interfaces with an IPv6 address, from ``/proc/net/if_inet6``."""
    names = {line.split()[-1] for line in if_inet6_text.splitlines() if line.split()}
    return sorted(n for n in names if n != "lo")


def block(gateways: list[str]) -> int:
    """Prohibit the gateways, delete the IPv4 default routes, verify. Exit code 0 when the guard holds."""
    try:
        with open("/proc/net/if_inet6") as fh:
            v6 = ipv6_interfaces(fh.read())
    except FileNotFoundError:  # a kernel without IPv6
        v6 = []
    if v6:
        print(
            f"netguard block: IPv6 is enabled on {', '.join(v6)}; this guard covers IPv4 only. Create "
            "the run network without IPv6 (provisioner's default).",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    default = "0.0.0.0"  # noqa: S104 - the default route's destination, deleted below
    with RouteSocket() as rtnl:
        defaults = [r for r in rtnl.routes() if r.dst_len == 0]
        found = [r.gateway for r in defaults if r.gateway]
        targets = list(dict.fromkeys([*gateways, *found]))
        prohibited = _prohibited(rtnl)
        if not targets and not prohibited:
            print(
                "netguard block: found no gateway to block (no default route and no --gateway); "
                "pass the run network's gateway with --gateway",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        for gateway in targets:
            if gateway not in prohibited:
                rtnl.add_prohibit(gateway)
        for route in defaults:
            rtnl.delete(default, 0, oif=route.oif)
        left = [r for r in rtnl.routes() if r.dst_len == 0]
        prohibited = _prohibited(rtnl)
    missing = [g for g in targets if g not in prohibited]
    if left or missing:
        print(
            f"netguard block: the guard did not hold (default routes left: {len(left)}, "
            f"gateways not prohibited: {missing})",
            file=sys.stderr,
        )
        return 1
    print(f"netguard: blocked {', '.join(sorted(prohibited))}; no default route", flush=True)
    return 0


def _prohibited(rtnl: RouteSocket) -> set[str]:
    return {r.dst for r in rtnl.routes() if r.type == RTN_PROHIBIT and r.dst_len == 32 and r.dst}


# --- rtnetlink, stdlib only ---------------------------------------------------------------------
# The guard's three operations (dump the main table's IPv4 routes, add a prohibit host route, delete a
# route) over a NETLINK_ROUTE socket, as `ip route` does. Written here instead of pyroute2 (which did
# this before): `from pyroute2 import IPRoute` runs the whole package's __init__ (conntrack, ndb,
# asyncio, multiprocessing ...): 0.12 s of CPU per guard in the worker image (0.144-0.159 s against
# 0.029 s for a bare interpreter, 1-CPU quota), and a pool start runs one guard per worker alongside
# the workers' own imports on the same cores. Layouts: include/uapi/linux/{netlink,rtnetlink}.h.

NLMSG_HEADER = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTATTR = struct.Struct("=HH")  # rta_len, rta_type
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x200, 0x400, 0x300
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 0, 255


class Route(NamedTuple):
    """One IPv4 route of a dump: ``dst`` / ``gateway`` dotted quads or None, ``oif`` an ifindex or None."""

    dst_len: int
    type: int
    table: int
    dst: str | None
    gateway: str | None
    oif: int | None


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attribute(kind: int, payload: bytes) -> bytes:
    size = RTATTR.size + len(payload)
    return RTATTR.pack(size, kind) + payload + bytes(_align(size) - size)


def parse_route(payload: bytes) -> Route:
    """A ``struct rtmsg`` and its attributes (the payload of an RTM_NEWROUTE message) as a :class:`Route`."""
    family, dst_len, _src, _tos, table, _proto, _scope, kind, _flags = RTMSG.unpack_from(payload)
    attrs: dict[int, bytes] = {}
    at = RTMSG.size
    while at + RTATTR.size <= len(payload):
        size, attr = RTATTR.unpack_from(payload, at)
        if size < RTATTR.size:
            break
        attrs[attr & 0x3FFF] = payload[at + RTATTR.size : at + size]  # without NLA_F_NESTED / _BYTEORDER
        at += _align(size)

    def address(attr: int) -> str | None:
        value = attrs.get(attr)
        return socket.inet_ntoa(value) if value is not None and len(value) == 4 else None

    if RTA_TABLE in attrs:
        table = struct.unpack("=I", attrs[RTA_TABLE][:4])[0]
    oif = struct.unpack("=i", attrs[RTA_OIF][:4])[0] if RTA_OIF in attrs else None
    if family != socket.AF_INET:
        return Route(dst_len, kind, table, None, None, oif)
    return Route(dst_len, kind, table, address(RTA_DST), address(RTA_GATEWAY), oif)


class RouteSocket:
    """A NETLINK_ROUTE socket for the guard: :meth:`routes`, :meth:`add_prohibit`, :meth:`delete`.

    Raises:
        OSError: the kernel refused a request (its errno: e.g. EPERM without CAP_NET_ADMIN).
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # 0: NETLINK_ROUTE
        self._sock.bind((0, 0))
        self._seq = 0

    def __enter__(self) -> RouteSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def _request(self, kind: int, flags: int, body: bytes) -> list[bytes]:
        """Send one request; the payloads of its RTM_NEWROUTE replies (a dump) until DONE or the ack."""
        self._seq += 1
        self._sock.send(NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), kind, flags, self._seq, 0) + body)
        payloads: list[bytes] = []
        while True:
            data = self._sock.recv(1 << 16)
            at = 0
            while at + NLMSG_HEADER.size <= len(data):
                size, msg_type, _flags, seq, _pid = NLMSG_HEADER.unpack_from(data, at)
                if size < NLMSG_HEADER.size:
                    raise OSError(errno.EPROTO, "netlink: malformed reply")
                payload = data[at + NLMSG_HEADER.size : at + size]
                at += _align(size)
                if seq != self._seq:
                    continue
                if msg_type == NLMSG_DONE:
                    return payloads
                if msg_type == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, f"netlink: {os.strerror(code)}")
                    return payloads  # the ack
                if msg_type == RTM_NEWROUTE:
                    payloads.append(payload)

    def routes(self) -> list[Route]:
        """The IPv4 routes of the main table."""
        body = RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        found = [parse_route(p) for p in self._request(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, body)]
        return [r for r in found if r.table == RT_TABLE_MAIN]

    def add_prohibit(self, address: str) -> None:
        """``ip route add prohibit <address>/32`` in the main table."""
        body = RTMSG.pack(
            socket.AF_INET, 32, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_PROHIBIT, 0
        ) + _attribute(RTA_DST, socket.inet_aton(address))
        self._request(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

    def delete(self, dst: str, dst_len: int, *, oif: int | None = None) -> None:
        """``ip route del <dst>/<dst_len> [dev <oif>]`` in the main table (any type, scope, protocol)."""
        body = RTMSG.pack(socket.AF_INET, dst_len, 0, 0, RT_TABLE_MAIN, 0, RT_SCOPE_NOWHERE, 0, 0)
        body += _attribute(RTA_DST, socket.inet_aton(dst))
        if oif is not None:
            body += _attribute(RTA_OIF, struct.pack("=i", oif))
        self._request(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, body)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["wait"]:
        rest = args[1:]
        preload: list[str] = []
        if rest[:1] == ["--preload"] and len(rest) > 1:
            preload = [m for m in rest[1].split(",") if m]
            rest = rest[2:]
        return wait_for_guard(rest[1:] if rest[:1] == ["--"] else rest, preload=preload)
    if args[:1] == ["block"]:
        gateways: list[str] = []
        rest = args[1:]
        while rest:
            if rest[0] == "--gateway" and len(rest) > 1:
                socket.inet_aton(rest[1])  # OSError for a malformed address
                gateways.append(rest[1])
                rest = rest[2:]
            else:
                print(
                    f"netguard block: unexpected argument {rest[0]!r}; usage: block [--gateway ADDR ...]",
                    file=sys.stderr,
                )
                return EXIT_REFUSED
        return block(gateways)
    print(
        "usage: netguard.py block [--gateway ADDR ...] | netguard.py wait [--preload MOD,...] -- COMMAND ...",
        file=sys.stderr,
    )
    return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
