"""A dead published port (issue 14, item 7, host side): does a flood kill the engine's forwarder,
and how long does the pool's heal take?

Usage::

    .venv/bin/python benchmarks/bench_dead_port.py [--rounds 3] [--flood 10000]

Method (real Docker engine, the worker image already built; wall clock with ``time.perf_counter``):
``WorkerPool.start`` brings up an integration layer (LM mock) with one worker. Then, per round:

* **flood** (first round only): ``--flood`` connections opened at once to the worker's 127.0.0.1
  port and held (loopback only; stops at the first refusal or after 60 s); reported: connections
  opened, whether the port refused afterwards and whether its ``docker-proxy`` process still exists;
* otherwise the forwarder is SIGKILLed (tests/runtime/forwarder.py), the deterministic way to the
  same state;
* **heal**: ``pool.heal_path()`` — two pings find the refusal, the relay is re-created on the same
  ports, and the worker answers a ping there again — timed, with a ping at the address after it.

Printed as JSON; docs/benchmarks.md ("Dead published port") has the figures with date and load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "runtime"))

from forwarder import forwarder_pid, kill_forwarder, refuses

from provisioner.bridge.client import BridgeClient
from provisioner.runtime.lifecycle import UpOptions
from provisioner.runtime.pool import WorkerPool
from provisioner.settings import load_settings


def flood(port: int, count: int) -> dict[str, object]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 256)), hard))
    held: list[socket.socket] = []
    start = time.perf_counter()
    try:
        while len(held) < count and time.perf_counter() - start < 60:
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
    finally:
        opened = len(held)
        for sock in held:
            sock.close()
    return {
        "connections_opened": opened,
        "seconds": round(time.perf_counter() - start, 2),
        "port_refuses_after": refuses(port),
        "forwarder_alive_after": forwarder_pid(port) is not None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flood", type=int, default=10_000)
    args = parser.parse_args()
    with __import__("tempfile").TemporaryDirectory(prefix="bench-dead-port-") as tmp:
        root = Path(tmp)
        (root / "pyproject.toml").write_text("[project]\nname = 'bench-dead-port'\n")
        settings = load_settings(cli={"state_dir": str(root / ".provision"),
                                      "lm.cache_dir": str(root / "cassettes"),
                                      "container.ready_timeout_s": 180.0}, project_dir=root)
        pool = WorkerPool.start(settings, UpOptions(layer="integration", lm_mode="mock", workers=1))
        rounds = []
        flooded: dict[str, object] = {}
        try:
            port = pool.environment.workers[0].port
            for n in range(args.rounds):
                if n == 0 and args.flood:
                    flooded = flood(port, args.flood)
                    if not flooded["port_refuses_after"]:
                        kill_forwarder(port)
                else:
                    kill_forwarder(port)
                start = time.perf_counter()
                healed = pool.heal_path()
                seconds = time.perf_counter() - start
                with BridgeClient("127.0.0.1", port, request_timeout=30) as client:
                    ok = client.ping()["status"] == "ok"
                rounds.append({"healed": healed, "heal_s": round(seconds, 3), "ping_after": ok})
        finally:
            pool.close()
    heal = [r["heal_s"] for r in rounds]
    print(json.dumps({
        "flood": flooded,
        "rounds": rounds,
        "heal_s_median": statistics.median(heal),
        "heal_s_min": min(heal),
        "heal_s_max": max(heal),
        "load_1min_after": round(os.getloadavg()[0], 1),
    }, indent=2))


if __name__ == "__main__":
    main()
