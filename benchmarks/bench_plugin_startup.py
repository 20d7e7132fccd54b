"""What the pytest plugin adds to every ``pytest`` start: a user's project with provisioner installed,
with and without the plugin.

Usage (from the checkout, after ``bash .ci/setup``)::

    .venv/bin/python benchmarks/bench_plugin_startup.py [--runs 15] [--json FILE] [--write-docs]

Method:

* A fresh project in a temporary directory: a ``pyproject.toml`` with ``[tool.pytest.ini_options]``
  and one trivial test, no ``[tool.provisioner]`` table and no layer marker (a suite that has the
  plugin installed but does not use it — also every inner pytest run of our own suite that tests
  something else), and the same project with ``[tool.provisioner]`` and a ``@pytest.mark.unit`` test
  (the unit layer: in-process, no Docker).
* ``python -m pytest -q -p no:cacheprovider`` in it with this checkout's interpreter, ``--runs`` times
  each, alternating "with the plugin" and ``-p no:provisioner`` so load drifts hit both alike.
  Median wall clock (``time.monotonic()`` around the subprocess) and median CPU seconds (user + system
  of the child, from ``os.wait4``): CPU time is the steadier figure on a shared machine.
* Which heavy packages a run imported (``faker``, ``polyfactory``, ``docker``, ``dspy``, ``litellm``,
  ``pydantic``): the test writes ``sys.modules`` at its end.
* ``os.getloadavg()`` before and after. ``--write-docs`` replaces the "pytest start-up with the
  plugin" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _docs import commit as current_commit
from _docs import publish, timed_child

from tests._helpers import without_settings

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## pytest start-up with the plugin"
PYTHON = ROOT / ".venv" / "bin" / "python"
HEAVY = ("faker", "polyfactory", "docker", "dspy", "litellm", "pydantic")

TEST = '''import json, os, sys
import pytest

{mark}
def test_it():
    heavy = {heavy!r}
    loaded = sorted(name for name in heavy if name in sys.modules)
    with open(os.environ["BENCH_MODULES_OUT"], "w") as f:
        json.dump(loaded, f)
'''

PROJECTS = {
    "plain": ('[tool.pytest.ini_options]\naddopts = "-p no:cacheprovider"\n', ""),
    "unit layer": ('[tool.pytest.ini_options]\naddopts = "-p no:cacheprovider"\n\n[tool.provisioner]\n'
                   'layer = "unit"\n', "@pytest.mark.unit"),
}


def make_project(base: Path, name: str) -> Path:
    pyproject, mark = PROJECTS[name]
    project = base / name.replace(" ", "-")
    project.mkdir()
    (project / "pyproject.toml").write_text(pyproject)
    (project / "test_it.py").write_text(TEST.format(mark=mark, heavy=HEAVY))
    (project / ".gitignore").write_text(".provision/\n")
    return project


def run_once(project: Path, extra: list[str]) -> tuple[float, float, list[str]]:
    """(wall s, CPU s of the child, heavy packages the run imported)."""
    out = project / "modules.json"
    env = {**without_settings(), "BENCH_MODULES_OUT": str(out)}
    env.pop("PYTEST_ADDOPTS", None)
    wall, cpu, _ = timed_child([str(PYTHON), "-m", "pytest", "-q", *extra], project, env)
    return wall, cpu, json.loads(out.read_text())


def measure(runs: int) -> dict[str, Any]:
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        for name in PROJECTS:
            project = make_project(Path(tmp), name)
            run_once(project, [])  # warm: .pyc files and the page cache, not counted
            samples: dict[str, list[tuple[float, float, list[str]]]] = {"with": [], "without": [], "bare": []}
            for _ in range(runs):
                samples["with"].append(run_once(project, []))
                samples["without"].append(run_once(project, ["-p", "no:provisioner"]))
                samples["bare"].append(run_once(project, ["-p", "no:provisioner", "-p", "no:faker"]))
            results[name] = {
                kind: {"wall_s": round(statistics.median(s[0] for s in rows), 3),
                       "cpu_s": round(statistics.median(s[1] for s in rows), 3),
                       "imported": rows[-1][2]}
                for kind, rows in samples.items()
            }
    results["load_before"] = [round(x, 2) for x in load_before]
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results["runs"] = runs
    return results


def render(results: dict[str, Any], commit: str) -> str:
    rows = []
    for name in PROJECTS:
        w, wo, bare = results[name]["with"], results[name]["without"], results[name]["bare"]
        added = f"{w['wall_s'] - wo['wall_s']:+.2f} s / {w['cpu_s'] - wo['cpu_s']:+.2f} s"
        rows.append(f"| {name} | {w['wall_s']:.2f} s / {w['cpu_s']:.2f} s | {wo['wall_s']:.2f} s / "
                    f"{wo['cpu_s']:.2f} s | {added} | {', '.join(w['imported']) or 'none'} | "
                    f"{wo['wall_s'] - bare['wall_s']:+.2f} s / {wo['cpu_s'] - bare['cpu_s']:+.2f} s |")
    load = f"{results['load_before'][0]:.1f} → {results['load_after'][0]:.1f}"
    return f"""{SECTION}

`.venv/bin/python benchmarks/bench_plugin_startup.py --runs {results['runs']} --write-docs` — a fresh
project with one trivial test, `python -m pytest -q` with the plugin and with `-p no:provisioner`,
alternating, {results['runs']} runs each after a warm-up run; medians of wall clock and of the child's
CPU time (user + system). "plain": no `[tool.provisioner]`, no layer marker (the plugin installed but
unused); "unit layer": a `@pytest.mark.unit` test. "loaded" lists the heavy packages
({', '.join(HEAVY)}) loaded by the end of the test with the plugin. Faker's own pytest plugin (Faker
is installed with polyfactory, a dependency of `provisioner.factories`) loads in both columns; the
last column is what it adds (`-p no:provisioner` against `-p no:provisioner -p no:faker`).
Machine: {platform.node()}, {os.cpu_count()} vCPUs, Python {platform.python_version()}.
Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, load (1 min) {load}.

Before the plugin's imports were made lazy (commit cdfea18, 2026-11-30 15:55 UTC, load 6.4 → 7.4,
5 runs, same script): "plain" +1.41 s wall / +0.80 s CPU, loading faker and polyfactory; "unit layer"
+4.91 s / +2.42 s, loading docker-py too.

| project | with plugin (wall / CPU) | `-p no:provisioner` | plugin adds | loaded | Faker's plugin adds |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--write-docs", action="store_true", help=f"replace the '{SECTION}' section of {DOC}")
    args = parser.parse_args()
    commit = current_commit()
    results = measure(args.runs)
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, **results}, indent=1))
    publish(SECTION, render(results, commit), args.write_docs)
    sys.exit(0)


if __name__ == "__main__":
    main()
