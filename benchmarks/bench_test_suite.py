"""The project's own test suite: how long the README's test command and the slow tier take, whether
any run failed, and whether a run left anything behind.

Usage (from the checkout, after ``bash .ci/setup``)::

    .venv/bin/python benchmarks/bench_test_suite.py [--fast-runs 5] [--slow-runs 1] [--json FILE]
                                                     [--write-docs]

Method:

* The fast tier is the README's test command (read from README.md's "Set up and run" section, as
  tests/test_readme.py and .ci/run do, without its ``bash .ci/setup &&`` prefix); the slow tier is
  ``.ci/run``'s ``pytest -q -m slow``. ``--fast-runs`` runs of the first in a row, then
  ``--slow-runs`` of the second; each with ``--junitxml`` (per-file totals: the sum of each test's
  setup, call and teardown, as pytest-xdist's processes report them, so under ``-n 2`` they add up
  to about twice the wall clock) and a ``--basetemp`` of its own.
* Wall clock: ``time.monotonic()`` around the whole command (collection, xdist start-up, every
  test). ``os.getloadavg()`` before and after each run: the machine may be shared.
* Leftovers after each run (the run's processes have exited by then):
  - containers and networks labelled ``provisioner.managed=true`` created during the run whose
    owner process (``provisioner.owner.pid``) is gone — the engine may be shared with other
    people's runs, so each is listed with its project label for a look;
  - processes whose command line names the run's ``--basetemp`` (workers, watchdogs, ``provision``
    commands and nested pytest runs the tests started), 10 s after the run ended (the watchdogs'
    late sweeps take 4 s);
  - entries of the temporary directory that appeared during the run outside its ``--basetemp``
    (pytest keeps the last three basetemps by design; the check is for files tests made elsewhere).
* ``--write-docs`` replaces the "Test suite time" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

from _docs import commit as current_commit
from _docs import machine, publish

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Test suite time (the README's command and the slow tier)"
SLOW_TIER = [".venv/bin/python", "-m", "pytest", "-q", "-m", "slow"]
LATE_S = 10.0  # after a run, before looking for its processes (watchdogs sweep for 4 s after a run)


def readme_command() -> list[str]:
    """The README's test command without its ``bash .ci/setup &&`` prefix."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    command = re.findall(r"```sh\n(.+?)\n```", section, flags=re.S)[1]
    return shlex.split(command.split("&&", 1)[1])


def _docker_json(*args: str) -> list[dict[str, Any]]:
    done = subprocess.run(["docker", *args, "--format", "{{json .}}"], capture_output=True, text=True,
                          check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def engine_leftovers(since: float) -> list[str]:
    """Managed containers and networks created at or after ``since`` (epoch seconds) whose owner is gone."""
    found = []
    ids = [c["ID"] for c in _docker_json("ps", "-a", "--filter", "label=provisioner.managed=true")]
    nets = [n["ID"] for n in _docker_json("network", "ls", "--filter", "label=provisioner.managed=true")]
    for kind, refs in (("container", ids), ("network", nets)):
        if not refs:
            continue
        inspect = ["docker", *(["network"] if kind == "network" else []), "inspect", *refs]
        inspected = json.loads(subprocess.run(inspect, capture_output=True, text=True).stdout or "[]")
        for item in inspected:
            labels = (item.get("Config") or {}).get("Labels") or item.get("Labels") or {}
            created = float(labels.get("provisioner.created", "0") or 0)
            if created >= since - 1 and not _alive(labels.get("provisioner.owner.pid", "")):
                name = str(item.get("Name", "")).lstrip("/")
                found.append(f"{kind} {name} (project {labels.get('provisioner.project', '?')})")
    return sorted(found)


def process_leftovers(basetemp: Path) -> list[str]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if str(basetemp) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"process {proc.info['pid']}: {cmdline[:160]}")
    return found


def per_file(junit: Path) -> tuple[Counter[str], dict[str, int]]:
    seconds: Counter[str] = Counter()
    outcomes: dict[str, int] = Counter()
    if not junit.exists():
        return seconds, outcomes
    for case in ET.parse(junit).getroot().iter("testcase"):
        seconds[case.get("classname", "?")] += float(case.get("time", "0"))
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        outcomes[kind] += 1
    return seconds, outcomes


def run_once(tier: str, command: list[str], workdir: Path, n: int) -> dict[str, Any]:
    basetemp = workdir / f"{tier}-{n}"
    junit = workdir / f"{tier}-{n}.xml"
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    load_before = os.getloadavg()
    since = time.time()
    started = time.monotonic()
    done = subprocess.run([*command, "--basetemp", str(basetemp), "--junitxml", str(junit)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    load_after = os.getloadavg()
    time.sleep(LATE_S)  # not synchronisation: the leftover check looks after the watchdogs' late sweeps
    seconds, outcomes = per_file(junit)
    summary = next((line for line in reversed(done.stdout.splitlines())
                    if re.search(r"\d+ (passed|failed|errors?)\b", line)), "")
    new_tmp = sorted(e for e in set(os.listdir(tempfile.gettempdir())) - tmp_before
                     if not str(workdir).startswith(os.path.join(tempfile.gettempdir(), e)))
    failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {
        "tier": tier, "run": n, "command": shlex.join(command), "exit_status": done.returncode,
        "wall_s": round(wall, 1), "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after], "summary": summary.strip(" ="),
        "outcomes": dict(outcomes), "failed": failed,
        "engine_leftovers": engine_leftovers(since), "process_leftovers": process_leftovers(basetemp),
        "new_temp_entries": new_tmp,
        "per_file_s": {name: round(s, 1) for name, s in seconds.most_common()},
    }


def render(results: list[dict[str, Any]], commit: str) -> str:
    rows = []
    for r in results:
        left = len(r["engine_leftovers"]) + len(r["process_leftovers"]) + len(r["new_temp_entries"])
        rows.append(f"| {r['tier']} #{r['run']} | {r['wall_s']:.0f} s | {r['summary']} | "
                    f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} | {left} |")
    fast = [r for r in results if r["tier"] == "fast"]
    top = ""
    if fast:
        totals: Counter[str] = Counter()
        for r in fast:
            totals.update(r["per_file_s"])
        top = "\n".join(f"| {name} | {s / len(fast):.1f} |" for name, s in totals.most_common(15))
    command = fast[0]["command"] if fast else shlex.join(readme_command())
    return f"""{SECTION}

`.venv/bin/python benchmarks/bench_test_suite.py --fast-runs 5 --slow-runs 1 --write-docs` — the
README's test command (`{command}`, the fast tier) run several times in a row, then the slow tier
(`{shlex.join(SLOW_TIER)}`, as `.ci/run` runs it after the fast tier). Wall clock around the whole
command; load average (1 min) before → after each run; leftovers: managed containers and networks
created during the run whose owner is gone, processes naming the run's `--basetemp` 10 s after it,
new temporary-directory entries outside it (method in the script's docstring). Machine: {machine()}.
Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}.

| run | wall clock | pytest's summary | load (1 min) | leftovers |
|---|---|---|---|---|
{chr(10).join(rows)}

Slowest test files of the fast tier (seconds of setup + call + teardown, summed over the file's
tests, mean of the fast runs; under `-n 2` two files run at a time):

| file | s |
|---|---|
{top}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast-runs", type=int, default=5)
    parser.add_argument("--slow-runs", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    parser.add_argument("--results", type=Path, default=None, help="render this --json output instead")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the '{SECTION}' section of {DOC}")
    args = parser.parse_args()
    commit = current_commit()
    if args.results is not None:
        data = json.loads(args.results.read_text())
        results, commit = data["runs"], data["commit"]
    else:
        results = []
        workdir = Path(tempfile.mkdtemp(prefix="bench-test-suite-"))
        for n in range(1, args.fast_runs + 1):
            results.append(run_once("fast", readme_command(), workdir, n))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "per_file_s"}), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"commit": commit, "runs": results}, indent=1))
        for n in range(1, args.slow_runs + 1):
            results.append(run_once("slow", SLOW_TIER, workdir, n))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "per_file_s"}), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"commit": commit, "runs": results}, indent=1))
    publish(SECTION, render(results, commit), args.write_docs)
    sys.exit(0 if all(r["exit_status"] == 0 for r in results) else 1)


if __name__ == "__main__":
    main()
