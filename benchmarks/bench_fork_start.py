"""The pool start's critical path at isolation ``process``: a timestamp for every step (issue 12).

Usage::

    .venv/bin/python benchmarks/bench_fork_start.py [--rounds 3] [--json]

(``bench_fork.py`` runs it as its ``start`` part and writes the table into docs/benchmarks.md.)

Method (real Docker engine, the worker image already built): a scratch project with the ``proc``
layer of ``bench_fork.py`` (2 fork-mode workers, mock LM); :func:`provisioner.api.open_environment`,
then one session and its ``ping`` — what the first ``isolated`` test does. Every host-side step is
timed by wrapping the function that does it (the wrappers only read ``time.perf_counter()``):
the pool lock and record (``shared_pool.obtain_pool``), the image check (``launch.ensure_image``;
the pytest plugin does it at session start, before the test loop), the two networks, each
container's create and start, each worker's egress guard, each worker's readiness wait (the host's
``ping`` polls every 25 ms), the session's connect + ``hello`` and the first ``ping``. Inside each
worker container a probe module (``sitecustomize``, bind-mounted read-only for this run only, stdlib,
prints one line per mark) marks when the worker's Python started, when the gate's preload of the
worker's imports (``provisioner.cli``, DSPy, the bridge server) ended, and the worker's own log
lines (docker log timestamps) say when it listened and when its first forked process was ready.
All times are milliseconds from the ``open_environment`` call; container times come from the same
host clock (``time.time()`` and Docker's log timestamps). Reported: the timeline of the pool start
whose first ``ping`` came at the median time of ``--rounds`` starts, with the load average (wall
times on a shared machine swing with it). CPU, which holds under load: when the first ``ping`` is
answered, this process's ``time.process_time()`` since ``open_environment`` and each container's
cgroup counter (workers, relay); the probe's CPU reading in a worker at the end of its imports.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fork

# Mounted into the worker containers of the measured run only: marks the process start and the end
# of the gate's preload (netguard.py imports the worker's modules with importlib.import_module; the mark
# comes after the last of recipes.WORKER_PRELOAD).
PROBE = '''
import importlib, os, sys, time
def _since_start():
    ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    return float(open("/proc/uptime").read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
def _mark(what):
    at = time.time() - _since_start() if what == "process start" else time.time()
    os.write(2, f"BENCHMARK {at:.4f} {what} cpu {time.process_time():.3f}\\n".encode())
_mark("process start")
_import_module = importlib.import_module
def _timed_import(name, package=None):
    module = _import_module(name, package)
    if name == LAST_PRELOAD:
        _mark("imports done")
    return module
importlib.import_module = _timed_import
'''

STEPS = (
    ("pool lock + record", "obtain_pool", None),
    ("image check (the plugin: at session start)", "ensure_image", None),
    ("networks (run, edge; in parallel)", "create_network", None),
    ("relay: create + start", "run relay", None),
    ("workers: create + start (in parallel, once the run network exists)", "start w", None),
    ("workers' egress guard (alongside their imports)", "guard w", None),
    ("worker process: Python up", None, "process start"),
    ("worker: imports (gate's preload: DSPy, bridge)", None, "imports done"),
    ("worker: warmed up, listening", None, "listening"),
    ("worker: first forked process ready", None, "PROVISION_WORKER_READY"),
    ("host: readiness ping answered", "wait_ready", None),
    ("first session: connect + hello", "connect", None),
    ("first `ping` answered", "first ping", None),
)


class Timeline:
    """Host-side steps: (start ms, end ms, label) from the wrapped functions."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.wall0 = 0.0
        self.on = False
        self.events: list[tuple[float, float, str]] = []
        self.lock = threading.Lock()
        self.undo: list[tuple[Any, str, Any]] = []

    def now(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0

    def wrap(self, owner: Any, name: str, label: Any) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return original(*args, **kwargs)
            start = self.now()
            try:
                return original(*args, **kwargs)
            finally:
                what = label(*args, **kwargs) if callable(label) else label
                if what:
                    with self.lock:
                        self.events.append((start, self.now(), what))

        setattr(owner, name, timed)
        self.undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)


def _slot(name: str) -> str:
    return name.rsplit("-", 1)[-1]


def profile_once(folder: Path, probe_dir: Path) -> dict[str, Any]:
    """One pool start: {step label: (start ms, end ms)} and the load average."""
    from provisioner.api import open_environment
    from provisioner.bridge.client import BridgeClient
    from provisioner.runtime import deployment, launch, recipes, shared_pool
    from provisioner.runtime.engine.docker import DockerRuntime

    line = Timeline()
    line.wrap(shared_pool, "obtain_pool", "obtain_pool")
    line.wrap(launch, "ensure_image", "ensure_image")
    line.wrap(DockerRuntime, "create_network", "create_network")
    line.wrap(deployment.Deployment, "_run",
              lambda self, recipe: f"run {_slot(recipe.name)}" if recipe.role == "relay" else None)
    workers: dict[str, str] = {}  # container id -> slot, for the start call's label
    original_create = DockerRuntime.create_container

    def create(self: Any, recipe: Any) -> str:
        start = line.now()
        container_id: str = original_create(self, recipe)
        if line.on and recipe.role == "worker":
            workers[container_id] = _slot(recipe.name)
            with line.lock:
                line.events.append((start, line.now(), f"start {_slot(recipe.name)}"))
        return container_id

    DockerRuntime.create_container = create  # type: ignore[method-assign]
    line.undo.append((DockerRuntime, "create_container", original_create))
    line.wrap(DockerRuntime, "start_container",
              lambda self, cid: f"start {workers[cid]}" if cid in workers else None)
    line.wrap(deployment, "block_host_access", lambda rt, recipe, cid, **k: f"guard {_slot(recipe.name)}")
    line.wrap(deployment.Deployment, "wait_ready",
              lambda self, worker, **k: f"wait_ready {_slot(worker.name)}")
    line.wrap(BridgeClient, "connect", "connect")
    original_recipe = recipes.worker_recipe

    def probed(*args: Any, **kwargs: Any) -> Any:
        kwargs["environment"] = {**kwargs["environment"], "PYTHONPATH": "/benchmark-probe"}
        kwargs["mounts"] = (*kwargs["mounts"], recipes.Mount(str(probe_dir), "/benchmark-probe", True))
        return original_recipe(*args, **kwargs)

    recipes.worker_recipe = probed
    load = os.getloadavg()
    try:
        line.wall0, line.t0, line.on = time.time(), time.perf_counter(), True
        host_cpu0 = time.process_time()
        env = open_environment("proc", project_dir=folder)
        try:
            with env.session() as first:
                start = line.now()
                first.adapter.ping()
                line.events.append((start, line.now(), "first ping"))
            line.on = False
            cpu = {"host": time.process_time() - host_cpu0, **_cgroup_cpu_s(env)}
            env.pool.wait_replacements(300)
            containers = _container_marks(env, line)
        finally:
            env.close()
    finally:
        line.on = False
        recipes.worker_recipe = original_recipe
        line.restore()
    # A container start is create + start: join the two wrapped calls of one worker.
    steps: dict[str, list[float]] = {}
    for start, end, what in sorted(line.events):
        span = steps.setdefault(what, [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    return {"steps": steps, "containers": containers, "cpu": cpu, "load": [load[0], os.getloadavg()[0]]}


def _cgroup_cpu_s(env: Any) -> dict[str, float]:
    """CPU seconds each of the run's containers used so far (cgroup counters): the workers and the
    relay (the guards are gone by then; the host's engine processes are not in it)."""
    deployment = env.pool.environment
    runtime = env.containers.runtime
    out: dict[str, float] = {}
    # A copy: a worker started meanwhile (the pool's growth, in its own thread) adds to the dict.
    for name, container_id in list(deployment.container_ids.items()):
        try:
            out[_slot(name)] = bench_fork.cgroup_cpu_ns(runtime, container_id) / 1e9
        except Exception:  # a container gone meanwhile has no figure
            continue
    return out


def _container_marks(env: Any, line: Timeline) -> dict[str, dict[str, float]]:
    """Per worker: ms from the start of the profile to its probe's marks and its log lines."""
    runtime = env.containers.runtime
    out: dict[str, dict[str, float]] = {}
    for worker in env.pool.environment.workers:
        marks: dict[str, float] = {}
        logs = runtime.client.api.logs(worker.container_id, timestamps=True).decode(errors="replace")
        for row in logs.splitlines():
            stamp, _, text = row.partition(" ")
            at = (datetime.fromisoformat(stamp[:26] + "+00:00").timestamp() - line.wall0) * 1000.0
            if text.startswith("BENCHMARK "):
                _, when, rest = text.split(" ", 2)
                what, _, cpu = rest.partition(" cpu ")
                marks[what] = (float(when) - line.wall0) * 1000.0
                if cpu:
                    marks[f"{what} cpu"] = float(cpu)  # the worker process's CPU seconds at the mark
            elif "listening on" in text:
                marks.setdefault("listening", at)
            elif text.startswith("PROVISION_WORKER_READY"):
                marks.setdefault("PROVISION_WORKER_READY", at)
        out[_slot(worker.name)] = marks
    return out


def rows(profiles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step: start and end (ms) in the pool start whose first ``ping`` came at the median time
    (one coherent timeline; medians taken step by step could put a step before the one it waits
    for); worker rows: the first worker to reach the step."""
    def first_ping(p: dict[str, Any]) -> float:
        return float(p["steps"].get("first ping", [0.0, 0.0])[1])

    profiles = [sorted(profiles, key=first_ping)[len(profiles) // 2]]
    table = []
    for label, host_key, mark in STEPS:
        starts: list[float] = []
        ends: list[float] = []
        for p in profiles:
            steps, marks = p["steps"], p["containers"]
            if mark is not None:
                times = [m[mark] for m in marks.values() if mark in m]
                if times:
                    ends.append(min(times))
                continue
            matching = [span for key, span in steps.items() if key == host_key or key.startswith(host_key)]
            if host_key == "wait_ready":  # the first worker ready is what the first test waits for
                matching = sorted(matching, key=lambda s: s[1])[:1]
            if matching:
                starts.append(min(s[0] for s in matching))
                ends.append(max(s[1] for s in matching))
        if ends:
            table.append({"step": label, "start_ms": statistics.median(starts) if starts else None,
                          "end_ms": statistics.median(ends)})
    return table


def measure(rounds: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="provision-bench-fork-start-"))
    (folder / "pyproject.toml").write_text(bench_fork.LAYERS.format(workers=2))
    probe_dir = Path(tempfile.mkdtemp(prefix="provision-bench-probe-"))
    probe_dir.chmod(0o755)
    from provisioner.runtime.recipes import WORKER_PRELOAD

    (probe_dir / "sitecustomize.py").write_text(PROBE.replace("LAST_PRELOAD", repr(WORKER_PRELOAD[-1])))
    (probe_dir / "sitecustomize.py").chmod(0o644)
    profiles = [profile_once(folder, probe_dir) for _ in range(rounds)]
    return {"rounds": rounds, "rows": rows(profiles), "cpu": cpu_rows(profiles), "profiles": profiles,
            "load": [min(p["load"][0] for p in profiles), max(p["load"][1] for p in profiles)]}


def cpu_rows(profiles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CPU seconds until the first ``ping`` answered, median over the pool starts: the host process,
    each container (by slot: w0, w1, relay), and the first worker's process at the end of its imports."""
    def median_of(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    out = [{"what": "host process (open_environment + first session; this process's CPU)",
            "s": median_of([p["cpu"]["host"] for p in profiles if "cpu" in p])}]
    for key, what in (("w0", "worker w0's container (cgroup)"), ("w1", "worker w1's container (cgroup)"),
                      ("relay", "relay container (cgroup)")):
        seen = [p["cpu"][key] for p in profiles if key in p.get("cpu", {})]
        out.append({"what": what, "s": median_of(seen)})
    imports = [min(m["imports done cpu"] for m in p["containers"].values() if "imports done cpu" in m)
               for p in profiles if any("imports done cpu" in m for m in p["containers"].values())]
    out.append({"what": "a worker's process at the end of its imports (Python start-up + the gate's preload)",
                "s": median_of(imports)})
    return [row for row in out if row["s"] is not None]


def markdown_rows(start: dict[str, Any]) -> list[str]:
    """The table for docs/benchmarks.md (empty when not measured)."""
    if not start:
        return []
    out = [
        f"The pool start's critical path (`benchmarks/bench_fork_start.py`"
        f"{' at commit ' + start['commit'] if start.get('commit') else ''}, the median of {start['rounds']}"
        f" pool starts, load {start['load'][0]:.1f} → {start['load'][1]:.1f}; ms from `open_environment`,",
        "i.e. the first `isolated` request; worker rows: the first worker to reach the step; the",
        "method is in the script's docstring):",
        "",
        "| step | from ms | to ms |",
        "|---|---:|---:|",
    ]
    for row in start["rows"]:
        begin = "" if row["start_ms"] is None else f"{row['start_ms']:.0f}"
        out.append(f"| {row['step']} | {begin} | {row['end_ms']:.0f} |")
    if start.get("cpu"):
        out += ["", "CPU until the first `ping` was answered (same pool starts, medians; CPU holds under",
                "load better than wall time; the engine's own processes and the egress guards are not",
                "in it):", "",
                "| CPU until the first `ping` | s |", "|---|---:|"]
        out += [f"| {row['what']} | {row['s']:.2f} |" for row in start["cpu"]]
    return [*out, ""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = measure(args.rounds)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print("\n".join(markdown_rows(results)))


if __name__ == "__main__":
    main()
