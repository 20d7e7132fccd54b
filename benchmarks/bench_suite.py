"""A pooled 200-test suite through the plugin's ``isolated`` fixture, against one container per test.

Usage::

    .venv/bin/python benchmarks/bench_suite.py [--rounds 3] [--tests 200] [--naive-tests 10]
                                               [--xdist-rounds 2] [--json] [--write-docs]
    .venv/bin/python benchmarks/bench_suite.py --profile [--tests 200]   # where a test's overhead goes

Method (real Docker engine; the worker image already built, as ``bash .ci/setup`` leaves it):

* A project is generated into a temporary folder: ``pyproject.toml`` (default settings, so the
  ``e2e`` layer pools ``max_pool_size`` = 2 workers), ``test_suite.py`` and ``test_naive.py``
  with the same test body — create a program with the same id (``qa``) in every test, execute it
  once, check the answer — and a ``conftest.py`` that records pytest's own phase durations
  (``TestReport.duration`` of setup, call and teardown: the figures ``--durations`` prints) and the
  wall clock from the start of the run loop (before the plugin warms its pool) to the end of the
  last teardown.
* **provisioner**: ``pytest --layer e2e --lm mock test_suite.py``: every test takes ``isolated``
  (a session pinned to a warm pool worker, closed on teardown) and the plugin's per-test leak check
  runs around it. The pool starts one worker and grows on demand (up to ``max_pool_size`` = 2);
  one test at a time needs one. Suite time = pool start + every test, i.e. the run loop's wall clock.
* **naive anchor**: ``pytest -p no:provisioner test_naive.py``: a function-scoped fixture starts one
  worker container per test with testcontainers (``DockerContainer`` of the same worker image,
  ``provision worker`` on a loopback-published port, mock LM), polls ``ping`` until it answers,
  yields a session client, and stops (removes) the container on teardown. Ryuk is off through
  testcontainers' documented ``TESTCONTAINERS_RYUK_DISABLED``. It times ``--naive-tests`` tests and
  extrapolates: naive suite time = mean per-test wall time x ``--tests``.
* The two runs alternate within each round (naive first in odd rounds), so load from other work on
  the machine hits both alike; ``os.getloadavg()`` is recorded before and after each round.
* Reported: per-test setup, teardown and setup+teardown p50/p99 (milliseconds) on both sides, pool
  start, suite times and the ratio naive / provisioner, per round.
* **xdist** (``--xdist-rounds``): ``pytest --layer e2e`` on a copy of ``examples/qa_project`` with
  ``-n 1`` and with ``-n 2`` (alternating), each with ``--provision-report``: the workers the run
  started (the report's ``workers_started``; one shared pool per run, so the same for both) and the
  wall clock of the whole ``pytest`` command (start-up and pool start included).
* **reuse ping**: ``--tests`` sessions one after another through the Python API on ``e2e`` (mock
  LM), each creating and executing ``qa``; every call of the pool's reuse ping (one ``ping`` on an
  idle connection before a new session reuses it) timed, wall and this thread's CPU, next to the
  whole session's wall time (:func:`measure_reuse_ping`).
* **profile** (``--profile``): the provisioner side once more under cProfile, enabled only around
  pytest's setup and teardown phases of each test (the first 5 tests left out); prints the functions
  with the most cumulative time per phase, divided by the tests profiled (ms per test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _docs import commit, machine, replace_section  # run as a script: this folder is on sys.path

from tests._helpers import without_settings

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Per-test overhead (pooled suite)"
BENCH_LABEL = "provisioner.bench"
TIMES = "\N{MULTIPLICATION SIGN}"

CONFTEST = '''
import json
import os
import time

import pytest

_OUT = os.environ["BENCH_TIMES"]
_state = {"loop_start": None, "last_end": None}
_rows = []


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtestloop(session):
    _state["loop_start"] = time.perf_counter()
    yield


def pytest_runtest_logreport(report):
    _rows.append([report.nodeid, report.when, report.duration, report.outcome])
    if report.when == "teardown":
        _state["last_end"] = time.perf_counter()


def pytest_sessionfinish(session):
    with open(_OUT, "w") as fh:
        json.dump({"rows": _rows, "loop_s": (_state["last_end"] or 0) - (_state["loop_start"] or 0)}, fh)
'''

BODY = '''
    client.create_program(**ProgramFactory.build(id="qa").create_args())
    out = client.execute_program("qa", {{"question": "q{{}}".format(i)}})
    assert "answer" in out["outputs"]
'''

SUITE = '''
import pytest

from provisioner.factories import ProgramFactory


@pytest.mark.e2e
@pytest.mark.parametrize("i", range({tests}))
def test_program(isolated, i):
    client = isolated.adapter
''' + BODY

NAIVE = '''
import os
import time

import pytest
from testcontainers.core.container import DockerContainer

from provisioner.bridge.client import BridgeClient
from provisioner.factories import ProgramFactory
PORT = 8765


@pytest.fixture
def naive_session():
    container = (
        DockerContainer(os.environ["BENCH_IMAGE"])
        .with_command(["provision", "worker", "--host", "0.0.0.0", "--port", str(PORT)])
        .with_envs(HOME="/tmp", PYTHONUNBUFFERED="1", DSPY_CACHEDIR="/tmp/dspy_cache")
        .with_kwargs(labels={{"{label}": os.environ["BENCH_RUN"]}})
    )
    container.ports[f"{{PORT}}/tcp"] = ("127.0.0.1", None)  # loopback only, a free host port
    container.start()
    try:
        port = int(container.get_exposed_port(PORT))
        deadline = time.monotonic() + 120
        while True:
            try:
                bridge = BridgeClient("127.0.0.1", port, request_timeout=30)
                bridge.ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.025)  # poll interval of the readiness loop, as provisioner's
        session = bridge.session("s1")
        try:
            yield session
        finally:
            bridge.close()
    finally:
        container.stop()


@pytest.mark.parametrize("i", range({tests}))
def test_program(naive_session, i):
    client = naive_session
''' + BODY


PROFILE_PLUGIN = '''
import cProfile
import os

import pytest

_profiles = {"setup": cProfile.Profile(), "teardown": cProfile.Profile()}
_seen = [0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    _seen[0] += 1
    on = _seen[0] > 5
    if on:
        _profiles["setup"].enable()
    try:
        return (yield)
    finally:
        if on:
            _profiles["setup"].disable()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    on = _seen[0] > 5
    if on:
        _profiles["teardown"].enable()
    try:
        return (yield)
    finally:
        if on:
            _profiles["teardown"].disable()


def pytest_sessionfinish(session):
    for phase, profile in _profiles.items():
        profile.dump_stats(os.path.join(os.environ["BENCH_PROFILE_DIR"], f"{phase}.pstats"))
'''


def make_project(tests: int, naive_tests: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="provision-bench-suite-"))
    (folder / "pyproject.toml").write_text("[project]\nname = 'bench-suite'\nversion = '0'\n")
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "test_suite.py").write_text(textwrap.dedent(SUITE.format(tests=tests)))
    (folder / "test_naive.py").write_text(textwrap.dedent(NAIVE.format(tests=naive_tests, label=BENCH_LABEL)))
    (folder / "bench_profile.py").write_text(PROFILE_PLUGIN)
    return folder


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in without_settings().items() if k != "CI"}
    env["TESTCONTAINERS_RYUK_DISABLED"] = "true"  # testcontainers' documented switch; no Ryuk image here
    return env


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run_side(folder: Path, env: dict[str, str], args: list[str], name: str) -> dict[str, Any]:
    out = folder / f"times-{name}.json"
    env = {**env, "BENCH_TIMES": str(out)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=folder, env=env, capture_output=True, text=True, timeout=1800,
    )
    if done.returncode != 0:
        raise SystemExit(
            f"{name} suite failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
        )
    data = json.loads(out.read_text())
    phases: dict[str, dict[str, float]] = {}
    for nodeid, when, duration, _outcome in data["rows"]:
        phases.setdefault(nodeid, {})[when] = duration * 1000.0
    setup = [p["setup"] for p in phases.values()]
    teardown = [p["teardown"] for p in phases.values()]
    both = [p["setup"] + p["teardown"] for p in phases.values()]
    total = [p["setup"] + p["call"] + p["teardown"] for p in phases.values()]
    return {
        "tests": len(phases),
        "setup_p50_ms": pct(setup, 0.5), "setup_p99_ms": pct(setup, 0.99),
        "teardown_p50_ms": pct(teardown, 0.5), "teardown_p99_ms": pct(teardown, 0.99),
        "overhead_p50_ms": pct(both, 0.5), "overhead_p99_ms": pct(both, 0.99),
        "call_p50_ms": pct([p["call"] for p in phases.values()], 0.5),
        "test_mean_ms": statistics.fmean(total),
        "loop_s": data["loop_s"],
        "sum_tests_s": sum(total) / 1000.0,
    }


def measure(rounds: int, tests: int, naive_tests: int) -> dict[str, Any]:
    from provisioner.runtime.engine import open_runtime
    from provisioner.runtime.images import ensure_worker_image

    rt = open_runtime()
    image = ensure_worker_image(rt)
    folder = make_project(tests, naive_tests)
    env = clean_env()
    env["BENCH_IMAGE"] = image
    env["BENCH_RUN"] = f"bench-{os.getpid()}"
    results: dict[str, Any] = {"image": image, "tests": tests, "naive_tests": naive_tests, "rounds": [],
                               "commit": commit()}
    try:
        for number in range(rounds):
            load_before = os.getloadavg()
            order = ["naive", "provisioner"] if number % 2 == 0 else ["provisioner", "naive"]
            sides: dict[str, dict[str, Any]] = {}
            for side in order:
                if side == "naive":
                    sides[side] = run_side(folder, env, ["-p", "no:provisioner", "test_naive.py"], "naive")
                else:
                    sides[side] = run_side(folder, env, ["--layer", "e2e", "--lm", "mock", "test_suite.py"],
                                           "provisioner")
            ours, naive = sides["provisioner"], sides["naive"]
            ours["pool_start_s"] = ours["loop_s"] - ours["sum_tests_s"]
            naive_suite = naive["test_mean_ms"] / 1000.0 * tests
            results["rounds"].append({
                "load_before": load_before, "load_after": os.getloadavg(),
                "provisioner": ours, "naive": naive,
                "naive_suite_s": naive_suite, "ratio": naive_suite / ours["loop_s"],
            })
            print(json.dumps(results["rounds"][-1]), file=sys.stderr, flush=True)
    finally:
        for ref in rt.list_resources({BENCH_LABEL: env["BENCH_RUN"]}):
            if ref.kind == "container":
                rt.remove_container(ref.id)
        rt.close()
    return results


def measure_reuse_ping(tests: int) -> dict[str, Any]:
    """The pool's reuse ping (``pool._answers_ping``: one ``ping`` round trip on an idle connection
    before a new session reuses it), timed per call — wall and this thread's CPU — over ``tests``
    sessions one after another through the Python API on the ``e2e`` layer with the mock LM (each
    creates ``qa`` and executes it, as the suite's tests do), next to the whole session's time."""
    from provisioner.api import open_environment
    from provisioner.factories import ProgramFactory
    from provisioner.runtime import pool as pool_module

    folder = make_project(tests, 1)
    real = pool_module._answers_ping
    wall: list[float] = []
    cpu: list[float] = []

    def timed(client: Any) -> bool:
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            return real(client)
        finally:
            wall.append((time.perf_counter() - started) * 1000.0)
            cpu.append((time.thread_time() - cpu_started) * 1000.0)

    load = os.getloadavg()
    sessions: list[float] = []
    pool_module._answers_ping = timed
    env = open_environment("e2e", lm="mock", project_dir=folder, attach=False)
    try:
        for i in range(tests):
            started = time.perf_counter()
            with env.session() as session:
                session.adapter.create_program(**ProgramFactory.build(id="qa").create_args())
                session.adapter.execute_program("qa", {"question": f"q{i}"})
            sessions.append((time.perf_counter() - started) * 1000.0)
    finally:
        env.close()
        pool_module._answers_ping = real
    return {"sessions": tests, "pings": len(wall), "ping_p50_ms": pct(wall, 0.5),
            "ping_p99_ms": pct(wall, 0.99), "ping_cpu_ms": statistics.fmean(cpu) if cpu else float("nan"),
            "session_p50_ms": pct(sessions[1:], 0.5), "load": [load[0], os.getloadavg()[0]]}


def profile(tests: int, top: int = 25) -> None:
    """The provisioner side under cProfile, setup and teardown phases apart (see the docstring)."""
    import pstats

    from provisioner.runtime.engine import open_runtime
    from provisioner.runtime.images import ensure_worker_image

    rt = open_runtime()
    try:
        ensure_worker_image(rt)
    finally:
        rt.close()
    folder = make_project(tests, 1)
    env = {**clean_env(), "BENCH_PROFILE_DIR": str(folder), "PYTHONPATH": str(folder)}
    load = os.getloadavg()
    run_side(folder, env, ["-p", "bench_profile", "--layer", "e2e", "--lm", "mock", "test_suite.py"],
             "profile")
    profiled = max(1, tests - 5)
    print(f"cProfile of {profiled} tests (load average {load[0]:.1f} → {os.getloadavg()[0]:.1f}); "
          "cumulative seconds are for all of them, divide by the count for per test", flush=True)
    for phase in ("setup", "teardown"):
        print(f"\n===== {phase}")
        stats = pstats.Stats(str(folder / f"{phase}.pstats"))
        print(f"{stats.total_tt / profiled * 1000:.3f} ms per test under the profiler")  # type: ignore[attr-defined]
        stats.sort_stats("cumulative").print_stats(top)


def measure_xdist(rounds: int) -> list[dict[str, Any]]:
    """``pytest --layer e2e`` on examples/qa_project, ``-n 1`` against ``-n 2``: workers started
    (from the run report) and wall seconds of the whole command."""
    import shutil

    example = ROOT / "examples" / "qa_project"
    folder = Path(tempfile.mkdtemp(prefix="provision-bench-xdist-"))
    project = folder / "qa_project"
    shutil.copytree(example, project, ignore=shutil.ignore_patterns(".provision", "__pycache__", "*.pyc"))
    env = clean_env()
    out = []
    for number in range(rounds):
        order = [1, 2] if number % 2 == 0 else [2, 1]
        row: dict[str, Any] = {"load_before": os.getloadavg()}
        for n in order:
            report = folder / f"report-{n}.json"
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "--layer", "e2e", "-n", str(n),
                 "--provision-report", str(report)],
                cwd=project, env=env, capture_output=True, text=True, timeout=1800,
            )
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(
                    f"-n {n} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
                )
            data = json.loads(report.read_text())
            section = data["layers"]["e2e"]
            row[f"n{n}"] = {"wall_s": wall, "workers_started": section["workers_started"],
                            "tests": section["tests"]}
        row["load_after"] = os.getloadavg()
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def xdist_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []

    def cells(n: int, key: str, fmt: str) -> str:
        return " / ".join(fmt.format(r[f"n{n}"][key]) for r in rows)

    return [
        "",
        f"`pytest --layer e2e` on a copy of examples/qa_project ({rows[0]['n1']['tests']} tests, Gemini",
        "stand-in: no key), `-n 1` against `-n 2`, alternating, "
        f"{len(rows)} round(s) (load average " + "; ".join(
            f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f}" for r in rows) + "):",
        "",
        "| | `-n 1` | `-n 2` |",
        "|---|---|---|",
        "| workers started (run report) | "
        f"{cells(1, 'workers_started', '{}')} | {cells(2, 'workers_started', '{}')} |",
        f"| wall clock of the command, s | {cells(1, 'wall_s', '{:.1f}')} | {cells(2, 'wall_s', '{:.1f}')} |",
    ]


NOTES = [
    "- Where a test's overhead went before this version (cProfile over the same suite, setup and",
    "  teardown only, `--profile`; issue 10). At commit 92c3677 (load ≈ 3, 2026-11-30): setup ≈ 0.9 ms",
    "  of which the session factory (polyfactory's build) ≈ 0.3 ms, the spending guard ≈ 0.17 ms",
    "  (pytest-socket's guard rebuilt and the project's files looked up per test), three autouse",
    "  fixtures (a fixture definition, `request` object and finalizer each); teardown ≈ 1 ms, most of",
    "  it the leak check's bounded `/events` read: one engine round trip per test, ≈ 0.28 ms through",
    "  `http.client` on a quiet machine and ≈ 3 ms at load 10 to 18 (the engine's answer waits for a",
    "  core like everything else).",
    "- What changed: one autouse fixture instead of three; the session's identity made directly",
    "  (`factories.new_session`); the connect guard built once per allow-list; the engine read made",
    "  only when this process sent the engine a changing request since the last exact view (the Docker",
    "  runtime counts every docker-py client's non-GET requests; resources with this process's labels",
    "  are made only by it), and then through a kept-open socket (≈ 0.06 ms quiet). The leak check keeps",
    "  its power: a container or network made with docker-py directly is still named, processes are",
    "  this process's descendants, ports and files the tracked ones (tests/runtime/test_resources.py,",
    "  tests/test_pytest_plugin.py, tests/testing/test_plugin_containers.py).",
    "- Left per test: pytest's own fixture machinery (≈ 0.3 ms for the test's fixtures), the pool's",
    "  lease (one idle connection reused, no engine call), the leak check's local part (`waitid`, the",
    "  tracked files and ports) and handing the session to the pool's closer thread.",
]


def verdict(rounds: list[dict[str, Any]]) -> list[str]:
    overhead = [r["provisioner"]["overhead_p50_ms"] for r in rounds]
    ratio = [r["ratio"] for r in rounds]

    def met(ok: bool) -> str:
        return "met" if ok else "not met"

    return [
        "",
        f"Targets: setup + teardown ≤ 2 ms p50 — {met(max(overhead) <= 2)} in these rounds "
        f"({min(overhead):.1f} to {max(overhead):.1f} ms); ratio ≥ 60{TIMES} including pool start — "
        f"{met(min(ratio) >= 60)} ({min(ratio):.0f}{TIMES} to {max(ratio):.0f}{TIMES}).",
    ]


def reuse_lines(reuse: dict[str, Any] | None) -> list[str]:
    """The reuse ping's row (:func:`measure_reuse_ping`)."""
    if not reuse:
        return []
    return [
        "",
        f"The pool's reuse ping ({reuse['sessions']} sessions one after another through the Python API, "
        f"`e2e`, mock LM; load {reuse['load'][0]:.1f} → {reuse['load'][1]:.1f}): before a session reuses "
        "an idle connection, one `ping` on it (a dead worker's connection is closed by the relay only a "
        "moment after the death; isolation `process` never reuses, so it does not pay it).",
        "",
        "| per reused session, ms | p50 | p99 |",
        "|---|---:|---:|",
        f"| reuse ping, wall ({reuse['pings']} of {reuse['sessions']} sessions reused a connection) "
        f"| {reuse['ping_p50_ms']:.2f} | {reuse['ping_p99_ms']:.2f} |",
        f"| reuse ping, this process's CPU (mean) | {reuse['ping_cpu_ms']:.2f} | |",
        f"| the whole session (open, create + execute, close), wall | {reuse['session_p50_ms']:.2f} | |",
    ]


def pool_note(runs: list[dict[str, Any]]) -> list[str]:
    starts = [r["provisioner"]["pool_start_s"] for r in runs]
    return [
        "- Pool start (" + f"{min(starts):.1f} to {max(starts):.1f} s in these rounds) is most of the",
        "  provisioner suite's time: creating the run's networks, relay and worker (with its egress",
        "  guard), then the worker's Python start-up (dspy's import) until `ping` answers. The pool now",
        "  starts one worker and grows on demand (issue 10): before, both workers of the e2e layer",
        "  started at once and the second, never needed by a suite that runs one test at a time,",
        "  shared the two cores with the first (commit 92c3677: pool start 2.66 s at load 0.8 to 1.4).",
        "  Under xdist the pool grows when the run's processes hold more sessions at once than it has",
        "  workers (each records its peak in `pool-demand/`; the deploying process grows to the sum,",
        "  looking on each session it opens — one `stat` of the folder — and on its monitor's tick).",
        "  The run's watchdog (a Python process: 1.4 to 2.7 s to start at load 10) now starts alongside",
        "  the pool instead of before it: spawned first, so it covers the deploy, and waited for after.",
        "- Under load every figure grows, the naive side's most (each of its tests starts a container",
        "  and imports dspy in it), so a loaded round's ratio is higher than a quiet one's: compare",
        "  quiet runs with quiet runs (the lead's, above).",
    ]


def baseline_lines(title: str, baseline: dict[str, Any]) -> list[str]:
    """The same measurement of other code (``--compare "TITLE=FILE"``, a ``--json`` output)."""
    rounds = baseline["rounds"]

    def cells(side: str, key: str) -> str:
        return " / ".join(f"{r[side][key]:.1f}" for r in rounds)

    return [
        "",
        f"{title} (same script, {len(rounds)} round(s); load average "
        + "; ".join(f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f}" for r in rounds) + "):",
        "",
        "| | " + " | ".join(f"round {i + 1}" for i in range(len(rounds))) + " |",
        "|---|" + "---:|" * len(rounds),
        "| provisioner: setup p50 / teardown p50, ms | "
        + " | ".join(f"{r['provisioner']['setup_p50_ms']:.1f} / {r['provisioner']['teardown_p50_ms']:.1f}"
                     for r in rounds) + " |",
        "| provisioner: setup + teardown p50 / p99, ms | "
        + " | ".join(f"{r['provisioner']['overhead_p50_ms']:.1f} / {r['provisioner']['overhead_p99_ms']:.1f}"
                     for r in rounds) + " |",
        "| provisioner: pool start / suite, s | "
        + " | ".join(f"{r['provisioner']['pool_start_s']:.1f} / {r['provisioner']['loop_s']:.1f}"
                     for r in rounds) + " |",
        "| ratio naive / provisioner | " + " | ".join(f"{r['ratio']:.0f}{TIMES}" for r in rounds) + " |",
    ]


def markdown(results: dict[str, Any], compare: list[tuple[str, dict[str, Any]]] | None = None) -> str:
    rounds = results["rounds"]
    n = len(rounds)

    def loads(r: dict[str, Any]) -> str:
        return f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f}"

    def cells(side: str, key: str, fmt: str = "{:.2f}") -> str:
        return " / ".join(fmt.format(r[side][key]) for r in rounds)

    def row(label: str, key: str, naive_fmt: str = "{:.0f}") -> str:
        return f"| {label} | {cells('provisioner', key)} | {cells('naive', key, naive_fmt)} |"

    def per_round(label: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"| {label} | " + " | ".join(cell(r) for r in rounds) + " |"

    lines = [
        SECTION,
        "",
        f"`.venv/bin/python benchmarks/bench_suite.py --rounds {n} --xdist-rounds "
        f"{len(results.get('xdist', []))} --write-docs` — code of commit",
        f"{results.get('commit', '?')}, real engine, worker image {results['image']} already built.",
        f"A generated project runs {results['tests']} tests, each taking an isolated, LM-ready bridge",
        "session: it creates a program with the same id (`qa`) and executes",
        "it once. provisioner: the plugin's `isolated` fixture on the pooled `e2e` layer with `--lm mock`",
        "(a pool of up to 2 workers that starts one and grows on demand — one test at a time needs one;",
        "the per-test leak check on). Anchor, measured side by side in the same round: a",
        "naive testcontainers fixture starting one worker container (same image) per test, polling `ping`",
        f"until ready; it times {results['naive_tests']} tests and extrapolates to {results['tests']}.",
        "Per-test phase times are pytest's own (`TestReport.duration`, what `--durations` prints);",
        "suite time is the wall clock from the start of the run loop (before the pool warms) to the",
        "last teardown.",
        "The two sides alternate order each round. See the script's docstring for details.",
        "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Load average (1 min; 2 cores: above 2",
        "other work competes) before → after each round: "
        + "; ".join(loads(r) for r in rounds) + f". {n} rounds, figures per round separated by /.",
        "",
        "| per test, ms | provisioner (pooled, `isolated`) | naive testcontainers |",
        "|---|---|---|",
        row("setup p50", "setup_p50_ms"),
        row("setup p99", "setup_p99_ms"),
        row("teardown p50", "teardown_p50_ms"),
        row("teardown p99", "teardown_p99_ms"),
        row("**setup + teardown p50** (target ≤ 2 ms)", "overhead_p50_ms"),
        row("setup + teardown p99", "overhead_p99_ms"),
        row("call p50 (create + execute)", "call_p50_ms", "{:.2f}"),
        "",
        f"| suite of {results['tests']} tests | " + " | ".join(f"round {i + 1}" for i in range(n)) + " |",
        "|---|" + "---:|" * n,
        per_round("provisioner: pool start, s", lambda r: f"{r['provisioner']['pool_start_s']:.2f}"),
        per_round("provisioner: suite incl. pool start, s", lambda r: f"{r['provisioner']['loop_s']:.2f}"),
        per_round("naive: suite (extrapolated), s", lambda r: f"{r['naive_suite_s']:.1f}"),
        per_round(f"**ratio naive / provisioner** (target ≥ 60{TIMES})",
                  lambda r: f"{r['ratio']:.0f}{TIMES}"),
        *verdict(rounds),
        *reuse_lines(results.get("reuse_ping")),
        *xdist_lines(results.get("xdist", [])),
        *[line for title, other in compare or [] for line in baseline_lines(title, other)],
        "",
        *NOTES,
        *pool_note(rounds),
        "",
    ]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    replace_section(DOC, SECTION, text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--naive-tests", type=int, default=10)
    parser.add_argument("--xdist-rounds", type=int, default=2,
                        help="rounds of `pytest --layer e2e` -n 1 against -n 2 on examples/qa_project "
                             "(0: none)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the '{SECTION}' section of {DOC}")
    parser.add_argument("--compare", action="append", default=[], metavar="TITLE=FILE",
                        help="a --json output of other code (e.g. before a change), shown below the results")
    parser.add_argument("--results", type=Path, default=None,
                        help="render this --json output instead of measuring")
    parser.add_argument("--profile", action="store_true",
                        help="profile the provisioner side's setup and teardown phases instead (cProfile)")
    args = parser.parse_args()
    if args.profile:
        profile(args.tests)
        return
    if args.results is not None:
        results = json.loads(args.results.read_text())
    else:
        results = measure(args.rounds, args.tests, args.naive_tests)
        results["reuse_ping"] = measure_reuse_ping(args.tests)
        results["xdist"] = measure_xdist(args.xdist_rounds)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    compare = []
    for item in args.compare:
        title, _, path = item.partition("=")
        compare.append((title, json.loads(Path(path).read_text())))
    text = markdown(results, compare)
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
