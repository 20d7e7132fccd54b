"""How late after ``process_timeout`` does a worker's ``Timeout`` reply reach the client?

Usage (one command; writes its section of docs/benchmarks.md, "Timeout replies and the client's
grace")::

    .venv/bin/python benchmarks/bench_reply_grace.py [--rounds 10] [--no-docs]

Why: a host-side client waits ``process_timeout + REPLY_GRACE_S`` (provisioner.settings) for a
reply, so that the worker's own ``Timeout`` reply — which carries the calls made (``lm_usage``) —
arrives before the client gives up. This measures what the grace has to cover: the time from
sending ``execute_program`` to receiving its ``Timeout`` reply, minus ``process_timeout``.

Method (wall clock with ``time.monotonic`` around one ``execute_program`` whose mock LM call does
not return before the deadline; ``process_timeout`` 1 s; the client waits the product's
``Settings.request_timeout``, so a round that missed the grace shows as a client-side timeout):

* **in-process**: a ``BridgeServer`` in this process (the mock LM call held on an event);
* **worker container**: ``provisioner.environment("integration", lm="mock")`` on the real Docker
  engine (worker image built or found), one isolated session per round, the session's mock rule
  sleeping 3 s (``latency_ms``); the request goes through the published port and the relay.

``--rounds`` of each: median, max. The load average is recorded before and after; the machine is
shared, so under load the lateness is an upper bound of a quiet machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Timeout replies and the client's grace"
sys.path.insert(0, str(ROOT / "benchmarks"))

from _docs import machine, replace_section  # noqa: E402 - run as a script: this folder is on sys.path

from provisioner.errors import BridgeError  # noqa: E402
from provisioner.settings import REPLY_GRACE_S, reply_timeout  # noqa: E402

DEADLINE_S = 1.0
QA = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer"}]}


def _late(call: Any) -> float:
    """Seconds past DEADLINE_S until ``call()`` raised the worker's Timeout reply."""
    start = time.monotonic()
    try:
        call()
    except BridgeError as exc:
        if exc.error_type != "Timeout":
            raise RuntimeError(f"expected the worker's Timeout reply, got {exc}") from exc
        return time.monotonic() - start - DEADLINE_S
    raise RuntimeError("the request finished before its deadline: nothing measured")


def in_process(rounds: int) -> list[float]:
    from provisioner.bridge.client import BridgeClient
    from provisioner.bridge.server import BridgeServer
    from provisioner.bridge.service import BridgeService
    from provisioner.lm.mock import MockEngine
    from provisioner.lmconfig import LMConfig

    release = threading.Event()
    respond = MockEngine.respond

    def held(self: MockEngine, *args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        return respond(self, *args, **kwargs)

    MockEngine.respond = held  # type: ignore[method-assign]
    server = BridgeServer(BridgeService(LMConfig(mode="mock")), request_timeout_s=DEADLINE_S, pids=None)
    port = server.listen("127.0.0.1", 0)
    out = []
    try:
        with BridgeClient("127.0.0.1", port, request_timeout=reply_timeout(DEADLINE_S)) as client:
            for n in range(rounds):
                session = client.session(f"round-{n}")
                session.create_program(QA, "qa")
                release.clear()
                out.append(_late(lambda s=session: s.execute_program("qa", {"question": "?"})))
                release.set()  # the held call ends; its slot frees
    finally:
        release.set()
        MockEngine.respond = respond  # type: ignore[method-assign]
        server.request_stop()
        server.close(timeout=10)
    return out


def in_container(rounds: int) -> list[float]:
    import provisioner

    out = []
    with tempfile.TemporaryDirectory(prefix="bench-reply-grace-") as tmp:
        project = Path(tmp)
        (project / "pyproject.toml").write_text(f"[tool.provisioner]\nprocess_timeout = {DEADLINE_S}\n")
        with provisioner.environment("integration", lm="mock", project_dir=project) as env:
            assert env.settings.request_timeout == reply_timeout(DEADLINE_S)
            for n in range(rounds):
                with env.session(f"round-{n}") as test:
                    test.adapter.configure_lm(mode="mock", mock_rules=[{"match": {"question": "slow"},
                                                                          "outputs": {"answer": "x"},
                                                                          "latency_ms": 3000}])
                    test.adapter.create_program(QA, "qa")
                    out.append(_late(lambda t=test: t.adapter.execute_program("qa", {"question": "slow"})))
    return out


def _summary(values: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(values), 3), "max_s": round(max(values), 3),
            "rounds": len(values)}


def measure(rounds: int) -> dict[str, object]:
    load_before = os.getloadavg()
    local = in_process(rounds)
    container = in_container(rounds)
    return {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "process_timeout_s": DEADLINE_S,
        "grace_s": REPLY_GRACE_S,
        "in_process_late": _summary(local),
        "container_late": _summary(container),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def render(r: dict[str, Any]) -> str:
    local, container = r["in_process_late"], r["container_late"]
    return "\n".join([
        SECTION,
        "",
        f"`.venv/bin/python benchmarks/bench_reply_grace.py --rounds {local['rounds']}` — how late after",
        "`process_timeout` a worker's `Timeout` reply reaches the client (send to reply, minus",
        f"`process_timeout` = {r['process_timeout_s']:g} s), against the client's grace",
        f"`REPLY_GRACE_S` = {r['grace_s']:g} s (the client waits `process_timeout` + the grace). Machine:",
        f"{r['machine']}. Date: {r['date']}. Load average (1, 5, 15 min) before {r['load_before']}, after",
        f"{r['load_after']} — a shared machine: the lateness is an upper bound of a quiet one's.",
        "",
        "| path | late, median | late, max |",
        "|---|---|---|",
        f"| in-process `BridgeServer` | {local['median_s'] * 1000:.0f} ms | {local['max_s'] * 1000:.0f} ms |",
        f"| worker container (relay, published port) | {container['median_s'] * 1000:.0f} ms | "
        f"{container['max_s'] * 1000:.0f} ms |",
        "",
        "- Before: the client waited exactly `process_timeout` (30 s each), so any lateness above 0 lost",
        "  the race: the client raised its own timeout and dropped the connection with the worker's",
        "  reply and the cost it carried.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()
    result = measure(args.rounds)
    print(json.dumps(result, indent=2))
    if not args.no_docs:
        replace_section(DOC, SECTION, render(result))
        print(f"wrote the section {SECTION!r} of {DOC}")


if __name__ == "__main__":
    main()
