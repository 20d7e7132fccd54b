"""Containers: cold start of a worker, `provision up`/`down` of the e2e layer, cleanup after SIGKILL.

Usage::

    .venv/bin/python benchmarks/bench_runtime.py [--rounds 5] [--json] [--write-docs]

Method (real Docker engine, the worker image already built; each measurement repeated ``--rounds``
times, median, min and max reported; wall clock with ``time.perf_counter``):

* **cold start** — a fresh run of one mock-LM worker through :class:`Deployment` (its two
  networks, the relay and the worker container), timed from the first engine call until the first
  ``execute_program`` returns OK through the published 127.0.0.1 address. Split into: networks,
  containers created and started, ready (``ping`` OK with the LM configured, polled every 25 ms),
  and the first ``create_program`` + ``execute_program``.
* **up e2e, 2 workers** — ``provision up --layer e2e --workers 2 --json`` as a subprocess (no key:
  the Gemini stand-in container too), so Python start-up and the image check are included; and the
  same through the Python API (``environment.up``).
* **down** — ``provision down`` as a subprocess, and ``environment.down`` in-process.
* **cleanup after SIGKILL** — ``provision run --layer integration --lm mock --workers 1 -- <sleep>``;
  once the command runs, SIGKILL the ``provision`` process and time until no resource labelled with
  the run is left (the watchdog polls owners every 0.5 s).
* **unchanged image build** — ``provision images build`` as a subprocess when nothing changed.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _docs import machine, run

from provisioner.bridge.client import BridgeClient
from provisioner.layers import get_layer
from provisioner.runtime import labels as L
from provisioner.runtime.deployment import Deployment
from provisioner.runtime.engine import ContainerRuntime, open_runtime
from provisioner.runtime.images import build_worker_image
from provisioner.runtime.lifecycle import UpOptions, down, up
from provisioner.runtime.recipes import Owner, PlanOptions, RunTarget, plan_run
from provisioner.settings import load_settings
from tests._helpers import scratch_env

PROVISION = [sys.executable, "-m", "provisioner.cli"]
SECTION = "## Containers"


def scratch_project() -> tuple[Path, dict[str, str]]:
    folder = Path(tempfile.mkdtemp(prefix="provision-bench-"))
    (folder / "pyproject.toml").write_text("[project]\nname = 'bench'\n")
    return folder, scratch_env(folder)


def stats(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def cold_start(rt: ContainerRuntime, image: str, folder: Path) -> dict[str, float]:
    settings = load_settings(cli={"state_dir": str(folder / ".provision")}, project_dir=folder)
    run_id = f"bench{os.getpid()}{int(time.time() * 1000) % 100000}"
    plan = plan_run(
        settings,
        get_layer(settings, "integration"),
        get_layer(settings, "integration").lm_config(settings.lm, "mock"),
        RunTarget(run_id, Owner.this_process()),
        image,
        PlanOptions(workers=1),
    )
    marks: dict[str, float] = {}
    start = time.perf_counter()

    def progress(message: str) -> None:
        if message.startswith("run network ready"):
            marks["networks"] = time.perf_counter() - start
        elif message.startswith("containers started"):
            marks["containers"] = time.perf_counter() - start

    env = Deployment(plan, rt, ready_timeout_s=60, progress=progress)
    try:
        env.start()
        marks["ready"] = time.perf_counter() - start
        w = env.workers[0]
        with BridgeClient(w.host, w.port, request_timeout=60) as client:
            client.create_program("question -> answer", "bench", session_id="bench")
            result = client.execute_program("bench", {"question": "hi"}, session_id="bench")
            assert "answer" in result["outputs"]
        marks["first_execute"] = time.perf_counter() - start
    finally:
        env.stop()
    return marks


def run_cli(folder: Path, env: dict[str, str], *args: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(
        [*PROVISION, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"provision {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return elapsed, done.stdout


def sigkill_cleanup(rt: ContainerRuntime, folder: Path, env: dict[str, str]) -> float:
    script = "import time; print('started', flush=True); time.sleep(300)"
    proc = subprocess.Popen(
        [
            *PROVISION,
            "run",
            "--layer",
            "integration",
            "--lm",
            "mock",
            "--workers",
            "1",
            "--",
            sys.executable,
            "-c",
            script,
        ],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "started":
        raise SystemExit("provision run did not start its command")
    run_id = next(r.run_id for r in rt.list_resources({L.OWNER_PID: str(proc.pid)}) if r.run_id)
    proc.send_signal(signal.SIGKILL)
    start = time.perf_counter()
    proc.wait()
    while rt.list_resources(L.selector(run_id)):
        if time.perf_counter() - start > 60:
            raise SystemExit(f"run {run_id} was not cleaned up within 60 s")
        time.sleep(0.02)
    return time.perf_counter() - start


def measure(rounds: int) -> dict[str, Any]:
    rt = open_runtime()
    image = build_worker_image(rt).tag
    folder, env = scratch_project()
    results: dict[str, Any] = {"image": image, "load_before": os.getloadavg()[0]}

    def repeat(fn: Callable[[], Any]) -> list[Any]:
        return [fn() for _ in range(rounds)]

    cold = repeat(lambda: cold_start(rt, image, folder))
    results["cold_start"] = {key: stats([c[key] for c in cold]) for key in cold[0]}

    up_cli, down_cli, up_api, down_api = [], [], [], []
    for _ in range(rounds):
        elapsed, out = run_cli(folder, env, "up", "--layer", "e2e", "--workers", "2", "--json")
        assert json.loads(out)["uses_standin"]
        up_cli.append(elapsed)
        down_cli.append(run_cli(folder, env, "down")[0])
        settings = load_settings(
            cli={"state_dir": str(folder / ".provision"), "lm.cache_dir": str(folder / "cassettes")},
            project_dir=folder,
        )
        settings = settings.model_copy(update={"lm": settings.lm.model_copy(update={"api_key": None})})
        start = time.perf_counter()
        live = up(settings, UpOptions(layer="e2e", workers=2), runtime=rt)
        up_api.append(time.perf_counter() - start)
        start = time.perf_counter()
        down(settings, run_id=live.plan.run_id, runtime=rt)
        down_api.append(time.perf_counter() - start)
    results["up_e2e_2_workers_cli"] = stats(up_cli)
    results["up_e2e_2_workers_api"] = stats(up_api)
    results["down_cli"] = stats(down_cli)
    results["down_api"] = stats(down_api)
    results["cleanup_after_sigkill"] = stats(repeat(lambda: sigkill_cleanup(rt, folder, env)))
    results["images_build_unchanged_cli"] = stats(repeat(lambda: run_cli(folder, env, "images", "build")[0]))
    results["load_after"] = os.getloadavg()[0]
    return results


NOTES = [
    "- Cold start is dominated by the worker process itself: Python start-up plus `import dspy`",
    "  (≈ 0.9 s inside the container on an idle core, everything byte-compiled at build time).",
    "  Creating and starting the container costs ≈ 0.4 to 0.5 s; the run network ≈ 0.06 s (the edge",
    "  network and the relay are made alongside, off the critical path); readiness is polled every 25 ms.",
    "  Under load the dspy import stretches first: this row is the most load-sensitive one.",
    "- `up` of the e2e layer starts four containers (stand-in, relay, two workers) on two cores; both",
    "  workers import dspy at the same time. The CLI adds Python start-up and the image hash check.",
    "- `down` and the watchdog remove containers in parallel (a forced removal takes ≈ 0.3 to 0.5 s), then",
    "  the two networks. After SIGKILL the watchdog notices within its 0.5 s poll (docker-py and psutil",
    "  are imported when it starts, not when the owner dies), then removes the same way.",
    "- An unchanged `images build` is one hash over provisioner's source and the image files plus one",
    "  `image exists` call (≈ 0.1 s in-process); the rest is the CLI's Python start-up.",
]


def markdown(results: dict[str, Any], rounds: int) -> str:
    def row(label: str, s: dict[str, float], target: str = "") -> str:
        return f"| {label} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} | {target} |"

    cold = results["cold_start"]
    lines = [
        SECTION,
        "",
        "`.venv/bin/python benchmarks/bench_runtime.py --write-docs` — real engine, worker image already",
        f"built ({results['image']}); every figure is the median of {rounds} rounds (min, max beside it),",
        "wall clock. See the script's docstring for exactly what each row times.",
        "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Load average (1 min) before/after: "
        f"{results['load_before']:.1f} / {results['load_after']:.1f} — other work shared the 2 cores, so",
        "medians are the figures to read and the max column shows the noise.",
        "",
        "| what | median s | min s | max s | target |",
        "|---|---:|---:|---:|---|",
        row("cold start: run network created", cold["networks"]),
        row("cold start: relay + worker containers started", cold["containers"]),
        row("cold start: worker ready (ping OK, LM configured)", cold["ready"]),
        row("**cold start to first OK `execute_program`**", cold["first_execute"], "≤ 1.5 s"),
        row(
            "`provision up --layer e2e --workers 2` (CLI, stand-in included)", results["up_e2e_2_workers_cli"]
        ),
        row("`environment.up(layer='e2e', workers=2)` (API)", results["up_e2e_2_workers_api"]),
        row("`provision down` (CLI)", results["down_cli"]),
        row("`environment.down()` (API)", results["down_api"]),
        row("cleanup after SIGKILL of `provision run`", results["cleanup_after_sigkill"], "≤ 10 s"),
        row(
            "`provision images build`, nothing changed (CLI)", results["images_build_unchanged_cli"], "< 1 s"
        ),
        "",
        *NOTES,
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    run(SECTION, lambda args: measure(args.rounds), lambda results, args: markdown(results, args.rounds),
        rounds=5)


if __name__ == "__main__":
    main()
