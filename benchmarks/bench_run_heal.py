"""How fast does ``provision run`` heal its run while the command runs, and what does a check cost?

Usage (one command; writes its section of docs/benchmarks.md, "provision run heals its run")::

    .venv/bin/python benchmarks/bench_run_heal.py [--rounds 3] [--checks 20] [--no-docs]

Method (real Docker engine, the worker image already built or built once; wall clock with
``time.monotonic``): ``lifecycle.up`` starts an integration layer (LM mock, 2 workers) as
``provision run`` does, and the same health watch ``provision run`` runs
(``run_command._HealthWatch``, interval ``run_command.HEALTH_INTERVAL_S``) watches it.

* **check cost**: ``health.heal_deployment`` on the healthy run, ``--checks`` times (one engine call
  and one ``ping`` through the published path per worker): median and max;
* **worker killed**: ``docker kill`` of worker 0, then the time until the watch reports it replaced
  (detection ≤ one interval + a new container started, guarded and answering ``ping``);
* **relay killed**: ``docker kill`` of the relay, then the time until the watch reports it
  re-created on the same ports (detection + re-creation + a ping answered through every worker's
  old address).

Each kill waits for the previous repair; ``--rounds`` of each, median and range. The load average
(1 min) is recorded before and after: the machine is shared, so under load the seconds are upper bounds.
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

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## provision run heals its run"
sys.path.insert(0, str(ROOT / "benchmarks"))

from _docs import machine, replace_section  # noqa: E402 - run as a script: this folder is on sys.path

from provisioner.runtime.engine import open_runtime  # noqa: E402
from provisioner.runtime.health import heal_deployment  # noqa: E402
from provisioner.runtime.lifecycle import UpOptions, down, up  # noqa: E402
from provisioner.runtime.polling import poll_until  # noqa: E402
from provisioner.runtime.run_command import HEALTH_INTERVAL_S, _HealthWatch  # noqa: E402
from provisioner.settings import load_settings  # noqa: E402


def _summary(values: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
            "max_s": round(max(values), 3)}


def measure(rounds: int, checks: int) -> dict[str, object]:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-run-heal-") as tmp:
        root = Path(tmp)
        (root / "pyproject.toml").write_text("[project]\nname = 'bench-run-heal'\n")
        settings = load_settings(cli={"state_dir": str(root / ".provision"),
                                      "lm.cache_dir": str(root / "cassettes"),
                                      "container.ready_timeout_s": 180.0}, project_dir=root)
        rt = open_runtime(settings)
        env = up(settings, UpOptions(layer="integration", lm_mode="mock", workers=2, persistent=False),
                 runtime=rt)
        assert env.state is not None
        run_id = env.state.run_id
        notes: list[tuple[float, str]] = []
        lock = threading.Lock()

        def note(message: str) -> None:
            with lock:
                notes.append((time.monotonic(), message))

        def wait_note(after: float, text: str) -> float:
            def seen() -> bool:
                with lock:
                    return any(t >= after and text in m for t, m in notes)

            if not poll_until(seen, 300.0, 0.01):
                raise RuntimeError(f"no note with {text!r} within 300 s: {notes[-5:]}")
            with lock:
                return next(t for t, m in notes if t >= after and text in m) - after

        try:
            cost = []
            for _ in range(checks):
                start = time.monotonic()
                assert heal_deployment(env) == []
                cost.append(time.monotonic() - start)
            watch = _HealthWatch(env, settings, HEALTH_INTERVAL_S, note)
            watch.start()
            worker_s, relay_s = [], []
            try:
                for _ in range(rounds):
                    victim = env.workers[0].container_id
                    start = time.monotonic()
                    rt.client.api.kill(victim)  # type: ignore[attr-defined]
                    worker_s.append(wait_note(start, "; replaced it with"))
                    start = time.monotonic()
                    rt.client.api.kill(env.container_ids[env.plan.relay.name])  # type: ignore[attr-defined]
                    relay_s.append(wait_note(start, "re-created the relay"))
            finally:
                watch.stop()
        finally:
            down(settings, run_id=run_id, runtime=rt)
            rt.close()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "interval_s": HEALTH_INTERVAL_S,
        "workers": 2,
        "check": {**_summary(cost), "checks": checks},
        "worker_killed_to_replaced": {**_summary(worker_s), "rounds": rounds},
        "relay_killed_to_recreated": {**_summary(relay_s), "rounds": rounds},
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def render(r: dict[str, object]) -> str:
    check, worker, relay = r["check"], r["worker_killed_to_replaced"], r["relay_killed_to_recreated"]
    assert isinstance(check, dict) and isinstance(worker, dict) and isinstance(relay, dict)
    load_before, load_after = r["load_before"], r["load_after"]
    assert isinstance(load_before, list) and isinstance(load_after, list)

    def span(s: dict[str, float]) -> str:
        return f"{s['median_s']:.2f} s ({s['min_s']:.2f} to {s['max_s']:.2f})"

    return "\n".join([
        SECTION,
        "",
        "`.venv/bin/python benchmarks/bench_run_heal.py` — an integration layer (LM mock, 2 workers)",
        "started as `provision run` starts it, watched by the health check `provision run` runs while",
        f"its command runs (every {r['interval_s']} s). A worker, then the relay, is `docker kill`ed;",
        "the time is from the kill to the watch's note that it was replaced / re-created (detection",
        "within one interval, then a new container started, guarded and answering `ping`, or the",
        "relay re-created on the same ports and answering through every worker's old address).",
        f"Machine: {r['machine']}. Date: {r['date']}. Load average (1, 5, 15 min) before "
        f"{load_before}, after {load_after} — the machine was shared, the seconds are upper bounds.",
        "",
        "| what | figure |",
        "|---|---|",
        f"| one health check of a healthy run (engine state + a ping per worker), median of "
        f"{check['checks']} | {check['median_s'] * 1000:.0f} ms (max {check['max_s'] * 1000:.0f} ms) |",
        f"| worker killed → replaced behind the same address, median of {worker['rounds']} "
        f"| {span(worker)} |",
        f"| relay killed → re-created on the same ports, median of {relay['rounds']} | {span(relay)} |",
        "",
        "- Before: nothing healed a `provision run`'s run — its command saw the dead worker or port for",
        "  the rest of its life (no pool monitor, and `status --repair` only knows `provision up` runs).",
        "",
    ])


def write_docs(text: str) -> None:
    replace_section(DOC, SECTION, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checks", type=int, default=20)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()
    result = measure(args.rounds, args.checks)
    print(json.dumps(result, indent=2))
    if not args.no_docs:
        write_docs(render(result))
        print(f"wrote the section {SECTION!r} of {DOC}")


if __name__ == "__main__":
    main()
