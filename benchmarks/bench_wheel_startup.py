"""``pytest --co -q`` in a user's project with the built wheel installed: what an installed provisioner
costs every pytest start, with and without the ``factories`` extra (polyfactory, and Faker whose own
pytest plugin imports faker at every start).

Usage (from the checkout, after ``bash .ci/setup``; builds two venvs under a temporary folder, ≈ 4 min
of ``pip install``)::

    .venv/bin/python benchmarks/bench_wheel_startup.py [--runs 15] [--keep DIR] [--write-docs]

Method:

* ``pip wheel --no-deps`` of this checkout; two fresh venvs (this interpreter's ``-m venv``): "base"
  installs the wheel as the README's quick start does (no extra), "factories" installs
  ``<wheel>[factories]``. ``--keep DIR`` keeps them in ``DIR`` and reuses them on the next run.
* A fresh project (``[project]`` + ``[tool.pytest.ini_options]``, one trivial test), ``python -m
  pytest --co -q -p no:cacheprovider`` in it with each venv's interpreter, ``--runs`` times each,
  alternating, after one warm-up run each. Median wall clock (``time.monotonic()``) and median CPU
  seconds of the child (user + system, ``os.wait4``).
* Whether faker and polyfactory were imported by the run: the project's ``conftest.py`` writes
  ``sys.modules``' answer when collection finishes.
* ``os.getloadavg()`` before and after. ``--write-docs`` replaces the section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
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
SECTION = "## pytest start-up in a user's project: the factories extra"

CONFTEST = """import json, os, sys
def pytest_collection_finish(session):
    with open(os.environ["BENCH_OUT"], "w") as f:
        json.dump({"faker": "faker" in sys.modules, "polyfactory": "polyfactory" in sys.modules}, f)
"""


def _venv(folder: Path, wheel: Path, extra: str) -> Path:
    python = folder / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        target = f"{wheel}[{extra}]" if extra else str(wheel)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", target],
                       check=True)
    return python


def _project(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text('[project]\nname = "trial"\nversion = "0"\n\n'
                                           '[tool.pytest.ini_options]\npythonpath = ["."]\n')
    (folder / "test_it.py").write_text("def test_it():\n    assert True\n")
    (folder / "conftest.py").write_text(CONFTEST)
    return folder


def run_once(python: Path, project: Path) -> tuple[float, float, dict[str, bool]]:
    out = project / "loaded.json"
    env = {k: v for k, v in without_settings().items() if not k.startswith(("PYTEST_", "VIRTUAL_ENV"))}
    env["BENCH_OUT"] = str(out)
    argv = [str(python), "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider"]
    wall, cpu, _ = timed_child(argv, project, env)
    return wall, cpu, json.loads(out.read_text())


def measure(base: Path, runs: int) -> dict[str, Any]:
    dist = base / "dist"
    for old in dist.glob("*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(dist)],
                   check=True, capture_output=True)
    [wheel] = dist.glob("dspy_provisioner-*.whl")
    pythons = {"base": _venv(base / "venv-base", wheel, ""),
               "factories": _venv(base / "venv-factories", wheel, "factories")}
    project = _project(base / "project")
    load_before = os.getloadavg()
    samples: dict[str, list[tuple[float, float, dict[str, bool]]]] = {name: [] for name in pythons}
    for python in pythons.values():
        run_once(python, project)  # warm-up: .pyc files and the page cache
    for _ in range(runs):
        for name, python in pythons.items():
            samples[name].append(run_once(python, project))
    return {
        "runs": runs,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        **{name: {"wall_s": round(statistics.median(s[0] for s in rows), 3),
                  "cpu_s": round(statistics.median(s[1] for s in rows), 3),
                  "loaded": rows[-1][2]} for name, rows in samples.items()},
    }


def render(results: dict[str, Any], commit: str) -> str:
    base, extra = results["base"], results["factories"]
    rows = []
    for name, row in (("base install (README's quick start)", base), ("`[factories]` extra", extra)):
        loaded = ", ".join(m for m, on in row["loaded"].items() if on) or "neither"
        rows.append(f"| {name} | {row['wall_s']:.2f} s | {row['cpu_s']:.2f} s | {loaded} |")
    load = f"{results['load_before'][0]:.1f} → {results['load_after'][0]:.1f}"
    extra_wall, extra_cpu = extra["wall_s"] - base["wall_s"], extra["cpu_s"] - base["cpu_s"]
    return f"""{SECTION}

`.venv/bin/python benchmarks/bench_wheel_startup.py --runs {results['runs']} --write-docs` — the wheel of
this checkout in two fresh venvs (the README's install, and `<wheel>[factories]`), a fresh project with
one trivial test, `python -m pytest --co -q` alternating between the venvs, {results['runs']} runs each after
a warm-up; medians of wall clock and of the child's CPU time (user + system). "imported" says whether
faker and polyfactory were in `sys.modules` when collection finished. Faker's pytest plugin (a `pytest11`
entry point) imports faker at every pytest start wherever Faker is installed; polyfactory, which needs
Faker, is the `factories` extra since this measurement's commit, so the base install has neither.
Machine: {platform.node()}, {os.cpu_count()} vCPUs, Python {platform.python_version()}.
Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, load (1 min) {load}.

| install | wall | CPU | imported |
|---|--:|--:|---|
{chr(10).join(rows)}

The extra costs {extra_wall:+.2f} s wall / {extra_cpu:+.2f} s CPU per pytest start.
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--keep", type=Path, default=None, help="build (or reuse) the venvs here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--write-docs", action="store_true", help=f"replace the '{SECTION}' section of {DOC}")
    args = parser.parse_args()
    commit = current_commit()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        results = measure(args.keep, args.runs)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-wheel-startup-") as tmp:
            results = measure(Path(tmp), args.runs)
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, **results}, indent=1))
    publish(SECTION, render(results, commit), args.write_docs)


if __name__ == "__main__":
    main()
