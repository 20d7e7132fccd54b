"""One test's critical path at isolation ``process``, host side: a timeline per test (issue 12).

Usage::

    .venv/bin/python benchmarks/bench_fork_test_path.py [--tests 200] [--skip 20] [--json]

Method (real Docker engine): the 200-test suite of ``bench_fork.py`` (layer ``proc``: 2 fork-mode
workers, mock LM) run through pytest with one more plugin, written into the scratch project, that
reads ``time.perf_counter()`` at pytest's setup/call/teardown hooks and around the pool's pick
(``WorkerPool.open_session``/``close_session``), the session's ``BridgeClient.connect`` (connect +
``hello``: the worker's forked process answers), every ``call`` (the test's create + execute), its
``close``, and the plugin's leak snapshot and check (``ProvisionRun.leak_snapshot``/``leaks_since``).
Printed: for every mark, the median over the tests after ``--skip`` (the pool start and the first
tests left out) in ms from the test's start, in time order, with the load average before and after.
The wrappers only read the clock; the worker's own stages are ``bench_fork_child.py``'s.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fork
import bench_suite

PLUGIN = '''
import functools, json, os, time
import pytest

_clock = time.perf_counter
_current = {}
_rows = []


def _mark(what):
    if "t0" in _current:
        _current["marks"].append((what, (_clock() - _current["t0"]) * 1000.0))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    _current.clear()
    _current.update(t0=_clock(), marks=[])
    yield
    _mark("end of the test's protocol")
    _rows.append(_current["marks"])


def _phase(name):
    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def hook(item, **_):
        _mark(f"{name} hooks: start")
        yield
        _mark(f"{name} hooks: end")
    return hook


pytest_runtest_setup = _phase("setup")
pytest_runtest_call = _phase("call")
pytest_runtest_teardown = _phase("teardown")


def _wrap(owner, name, label):
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        _mark(f"{label}: start")
        try:
            return original(*args, **kwargs)
        finally:
            _mark(f"{label}: end")

    setattr(owner, name, timed)


def pytest_configure(config):
    from provisioner.bridge.client import BridgeClient
    from provisioner.runtime.pool import WorkerPool
    from provisioner.testing.plugin_state import ProvisionRun

    _wrap(WorkerPool, "open_session", "pool pick")
    _wrap(WorkerPool, "close_session", "pool: session closed")
    _wrap(BridgeClient, "connect", "connect + hello")
    _wrap(BridgeClient, "call", "bridge call")
    _wrap(BridgeClient, "close", "connection close")
    _wrap(ProvisionRun, "leak_snapshot", "leak snapshot")
    _wrap(ProvisionRun, "leaks_since", "leak check")


def pytest_unconfigure(config):
    with open(os.environ["BENCH_TIMELINE"], "w") as out:
        json.dump(_rows, out)
'''


def timeline(rows: list[list[tuple[str, float]]], skip: int) -> list[dict[str, Any]]:
    """``[{mark, ms, tests}]`` in time order: each mark's median over the tests after ``skip``; a
    mark repeated in one test (the second bridge call) is numbered; marks fewer than half of those
    tests have are left out."""
    seen: dict[str, list[float]] = {}
    for marks in rows[skip:]:
        counts: dict[str, int] = {}
        for what, ms in marks:
            counts[what] = counts.get(what, 0) + 1
            key = what if counts[what] == 1 else f"{what} #{counts[what]}"
            seen.setdefault(key, []).append(ms)
    counted = len(rows[skip:])
    # Marks most tests have (a test with an extra call or connection is rare: left out).
    out = [{"mark": k, "ms": statistics.median(v), "tests": len(v)} for k, v in seen.items()
           if len(v) * 2 >= counted]
    return sorted(out, key=lambda r: r["ms"])


def measure(tests: int, skip: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="provision-bench-fork-path-"))
    (folder / "pyproject.toml").write_text(bench_fork.LAYERS.format(workers=2))
    (folder / "conftest.py").write_text(bench_suite.CONFTEST)
    (folder / "timeline_plugin.py").write_text(PLUGIN)
    (folder / "test_process.py").write_text(textwrap.dedent(bench_fork.SUITE.format(tests=tests)))
    env = bench_suite.clean_env()
    env["BENCH_TIMES"] = str(folder / "times.json")
    env["BENCH_TIMELINE"] = str(folder / "timeline.json")
    env["PYTHONPATH"] = str(folder)
    load_before = os.getloadavg()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "timeline_plugin",
         "--layer", "proc", "test_process.py"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=1800, check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the suite failed ({done.returncode}):\n"
                         f"{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
    rows = json.loads((folder / "timeline.json").read_text())
    return {"commit": bench_suite.commit(), "tests": tests, "skipped": skip, "timeline": timeline(rows, skip),
            "load_before": load_before, "load_after": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--skip", type=int, default=20, help="first tests left out (pool start, warm-up)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = measure(args.tests, args.skip)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    load = f"{results['load_before'][0]:.1f} -> {results['load_after'][0]:.1f}"
    print(f"commit {results['commit']}, load {load};"
          f" medians of tests {args.skip + 1}-{args.tests}, ms from the test's start")
    previous = 0.0
    for row in results["timeline"]:
        print(f"{row['mark']:34s} {row['ms']:8.2f}  (+{row['ms'] - previous:6.2f})")
        previous = row["ms"]


if __name__ == "__main__":
    main()
