"""The same ``provisioner.environment`` path on FakeRuntime(serve=True) and on the Docker engine.

Usage::

    .venv/bin/python benchmarks/bench_fake_runtime.py [--rounds 3] [--sessions 50] [--json] [--write-docs]

Method (wall clock, ``time.perf_counter``; the worker image already built): each round opens
``provisioner.open_environment("integration", lm="mock")`` in a fresh scratch project whose
``container.image`` is the built worker image, once with ``runtime=FakeRuntime(serve=True)`` (the
workers are real bridge servers in this process behind a real forwarder) and once with the default
engine. Timed per round: **start** — from ``open_environment`` until the first isolated session is
open (the pool's worker started and ready); **session** — each of ``--sessions`` isolated sessions:
open, ``create_program`` + ``execute_program``, close (p50 / p99 over all rounds); **close** —
``Environment.close()`` (everything removed). The first round of each side also pays its one-time
imports (dspy in the test process for the fake; docker-py for Docker): the median is the figure.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _docs import run

from provisioner.api import open_environment
from provisioner.factories import ProgramFactory
from provisioner.runtime.engine import FakeRuntime, open_runtime
from provisioner.runtime.images import build_worker_image

SECTION = "## Fake runtime vs Docker (the environment path)"


def one_round(image: str, sessions: int, fake: bool) -> dict[str, Any]:
    project = Path(tempfile.mkdtemp(prefix="provision-bench-fake-"))
    (project / "pyproject.toml").write_text(f'[tool.provisioner]\ncontainer.image = "{image}"\n')
    runtime = FakeRuntime(images=(image,), serve=True) if fake else None
    try:
        t0 = time.perf_counter()
        env = open_environment("integration", lm="mock", project_dir=project, runtime=runtime)
        try:
            env.isolated("warm-up").close()
            start = time.perf_counter() - t0
            per_session = []
            for n in range(sessions):
                t = time.perf_counter()
                with env.session(f"s{n}") as test:
                    test.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
                    test.adapter.execute_program("qa", {"question": str(n)})
                per_session.append(time.perf_counter() - t)
        finally:
            t = time.perf_counter()
            env.close()
            close = time.perf_counter() - t
    finally:
        if runtime is not None:
            runtime.close()
    return {"start": start, "sessions": per_session, "close": close}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(rounds: int, sessions: int) -> dict[str, Any]:
    engine = open_runtime()
    try:
        image = build_worker_image(engine).tag
        docker_version = engine.engine_info().version
    finally:
        engine.close()
    results: dict[str, Any] = {
        "image": image, "docker_version": docker_version, "load_before": os.getloadavg()[0]
    }
    for side, fake in (("fake", True), ("docker", False)):
        runs = [one_round(image, sessions, fake) for _ in range(rounds)]
        all_sessions = [s for r in runs for s in r["sessions"]]
        results[side] = {
            "start": [r["start"] for r in runs],
            "close": [r["close"] for r in runs],
            "session_p50_ms": percentile(all_sessions, 0.5) * 1000,
            "session_p99_ms": percentile(all_sessions, 0.99) * 1000,
        }
    results["load_after"] = os.getloadavg()[0]
    return results


def markdown(results: dict[str, Any], rounds: int, sessions: int) -> str:
    def seconds(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f} to {max(values):.2f})"

    fake, docker = results["fake"], results["docker"]
    return "\n".join([
        SECTION,
        "",
        f"`.venv/bin/python benchmarks/bench_fake_runtime.py --rounds {rounds} --sessions {sessions} "
        "--write-docs` — the same `open_environment('integration', lm='mock')` path, workers as real bridge",
        "servers in the test process (`FakeRuntime(serve=True)`) or as containers on the engine; median "
        f"(min to max) of {rounds} rounds; session figures over all {rounds * sessions} sessions. See the "
        "script's docstring for what each row times.",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} vCPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}, Docker {results['docker_version']}; image {results['image']}. Date: "
        f"{time.strftime('%Y-%m-%d')}. Load average (1 min) before/after: {results['load_before']:.1f} / "
        f"{results['load_after']:.1f} (other engineers' work shared the 2 cores).",
        "",
        "| what | FakeRuntime(serve=True) | Docker |",
        "|---|---:|---:|",
        f"| start: open to first session (s) | {seconds(fake['start'])} | {seconds(docker['start'])} |",
        f"| isolated session p50 (ms) | {fake['session_p50_ms']:.1f} | {docker['session_p50_ms']:.1f} |",
        f"| isolated session p99 (ms) | {fake['session_p99_ms']:.1f} | {docker['session_p99_ms']:.1f} |",
        f"| close: everything removed (s) | {seconds(fake['close'])} | {seconds(docker['close'])} |",
        "",
        "- What differs: the fake's start is an in-process BridgeService (its first round also imports dspy",
        "  into the benchmark's process); Docker's is two networks, the relay and worker containers and the",
        "  worker's own Python start-up and `import dspy` under its 1-CPU limit. A Docker session's requests",
        "  cross the published port and the relay container; the fake's, one loopback forwarder thread.",
        "  The client, protocol and worker code are the same. This is why the unit tests of the pool and",
        "  `isolated` path (tests/test_api.py) run on the fake: no engine, and seconds instead of minutes.",
        "",
    ])


def main() -> None:
    run(SECTION, lambda args: measure(args.rounds, args.sessions),
        lambda results, args: markdown(results, args.rounds, args.sessions), rounds=3,
        options=lambda parser: parser.add_argument("--sessions", type=int, default=50))


if __name__ == "__main__":
    main()
