"""Killed parts: SIGKILL of the pytest controller under xdist (issue 14, item 9), and Ctrl-C of it.

Usage::

    .venv/bin/python benchmarks/bench_controller_kill.py [--rounds 3] [--json] [--write-docs]

Method (real Docker engine, the worker image already built; wall clock with ``time.perf_counter``):
a scratch project runs ``pytest -n 2 --layer integration --lm mock`` with two tests that each take an
``isolated`` session (so each xdist worker starts its own pool: relay, worker, two networks) and then
sleep. Once both tests are running, the controller gets SIGKILL, and we poll every 50 ms until

* **resources gone** — no container and no network labelled with the run exists;
* **processes gone** — none of the run's processes lives (the xdist workers, the run's watchdog).

Both are measured with SIGINT ignored in the controller and its workers (``signal.SIG_IGN`` in
``preexec_fn``: what a shell does to a background job of a script) and with the default handler.
The controller runs in a session of its own, so the benchmark can clean up after a round that fails.

**Ctrl-C** (the same suite, SIGINT to the controller's process group, as a terminal sends it to its
foreground job): seconds until pytest has exited, until no container/network of the run is left, and
until no process of the run is left.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _docs import DOC, run  # run as a script: this folder is on sys.path; it puts the root there too

from tests._helpers import end_run, lives, run_processes, run_resources, start_held_run

SECTION = "## Killed parts"
DEADLINE_S = 60.0


def start_run(**popen: Any) -> tuple[subprocess.Popen[bytes], Path]:
    """A 2-worker xdist run of the tests' scratch suite (tests/_helpers.py) in a new folder, its
    output discarded; the controller and its folder."""
    folder = Path(tempfile.mkdtemp(prefix="provision-bench-kill-"))
    proc, _ = start_held_run(folder, "bench", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    return proc, folder


def held_run_id(proc: subprocess.Popen[bytes], folder: Path) -> str:
    """Wait (300 s at most) until both tests of the run in ``folder`` hold their session; its run id."""
    deadline = time.monotonic() + 300
    while len(list((folder / "out").iterdir())) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the scratch suite did not start (exit {proc.poll()}) in {folder}")
        time.sleep(0.1)  # polling the folder the tests write to, with the deadline above
    return next((folder / ".provision" / "runs").iterdir()).name


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _default_sigint() -> None:
    """SIGINT at its default in the controller, as in a terminal, also when this script runs as a
    background job (which inherits SIGINT ignored, and would hand that on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def one_round(client: Any, *, sigint_ignored: bool) -> dict[str, float]:
    """SIGKILL the controller of a 2-worker xdist run once its tests run; seconds until clean."""
    import psutil

    proc, folder = start_run(preexec_fn=_ignore_sigint if sigint_ignored else _default_sigint)
    run_id = ""
    try:
        run_id = held_run_id(proc, folder)
        watched = {p.pid: p for p in run_processes(run_id) if p.pid != proc.pid}
        watched.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
        start = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        marks: dict[str, float] = {}
        while time.perf_counter() - start < DEADLINE_S and len(marks) < 2:
            now = time.perf_counter() - start
            if "resources" not in marks and not run_resources(client, run_id):
                marks["resources"] = now
            if "processes" not in marks and not [p for p in watched.values() if lives(p)]:
                marks["processes"] = now
            time.sleep(0.05)
        for key in ("resources", "processes"):
            marks.setdefault(key, float("inf"))
        return marks
    finally:
        end_run(proc, run_id)


def ctrl_c_round(client: Any) -> dict[str, float]:
    """SIGINT to the process group of a 2-worker xdist run once its tests run; seconds until pytest
    exited and until the run is clean."""
    import psutil

    proc, folder = start_run(preexec_fn=_default_sigint)
    run_id = ""
    try:
        run_id = held_run_id(proc, folder)
        watched = {p.pid: p for p in run_processes(run_id)}
        watched.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
        start = time.perf_counter()
        os.killpg(proc.pid, signal.SIGINT)
        marks: dict[str, float] = {}
        while time.perf_counter() - start < DEADLINE_S and len(marks) < 3:
            now = time.perf_counter() - start
            if "exit" not in marks and proc.poll() is not None:
                marks["exit"] = now
            if "resources" not in marks and not run_resources(client, run_id):
                marks["resources"] = now
            if "processes" not in marks and not [p for p in watched.values() if lives(p)]:
                marks["processes"] = now
            time.sleep(0.05)
        for key in ("exit", "resources", "processes"):
            marks.setdefault(key, float("inf"))
        return marks
    finally:
        end_run(proc, run_id)


def measure(rounds: int) -> dict[str, Any]:
    import docker

    client = docker.from_env()
    results: dict[str, Any] = {}
    for name, ignored in (("sigint_ignored", True), ("default", False)):
        samples = [one_round(client, sigint_ignored=ignored) for _ in range(rounds)]
        results[name] = {
            key: {"median": statistics.median(s[key] for s in samples), "min": min(s[key] for s in samples),
                  "max": max(s[key] for s in samples), "n": len(samples)}
            for key in ("resources", "processes")
        }
    samples = [ctrl_c_round(client) for _ in range(rounds)]
    results["ctrl_c"] = {
        key: {"median": statistics.median(s[key] for s in samples), "min": min(s[key] for s in samples),
              "max": max(s[key] for s in samples), "n": len(samples)}
        for key in ("exit", "resources", "processes")
    }
    return results


def markdown(results: dict[str, Any], rounds: int) -> str:
    load = os.getloadavg()[0]
    lines = [
        SECTION,
        "",
        f"`.venv/bin/python benchmarks/bench_controller_kill.py --rounds {rounds} --write-docs` — SIGKILL of "
        "the controller of `pytest -n 2 --layer integration` (each xdist worker with its own pool); seconds "
        f"from the kill until nothing of the run is left; median of {rounds} rounds (min, max beside it). "
        f"Date: {time.strftime('%Y-%m-%d')}. Load average (1 min) after: {load:.1f}.",
        "",
        "| controller started with | no container/network left, median s | min | max "
        "| no process left, median s | min | max | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, label in (("sigint_ignored", "SIGINT ignored"), ("default", "default SIGINT")):
        r, p = results[name]["resources"], results[name]["processes"]
        lines.append(
            f"| {label} | {r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} | {p['median']:.2f} "
            f"| {p['min']:.2f} | {p['max']:.2f} | ≤ 3 s / ≤ 10 s |"
        )
    c = results["ctrl_c"]
    lines += [
        "",
        "Ctrl-C (SIGINT to the controller's process group, as a terminal sends it): seconds from the "
        "signal until pytest exited, until no container/network of the run is left, until no process of "
        "it is left; median (min to max).",
        "",
        "| pytest exited | no container/network left | no process left |",
        "|---:|---:|---:|",
        "| " + " | ".join(f"{c[k]['median']:.2f} ({c[k]['min']:.2f} to {c[k]['max']:.2f})"
                         for k in ("exit", "resources", "processes")) + " |",
    ]
    return "\n".join(lines) + "\n"


def write_docs(text: str) -> None:
    doc = DOC.read_text()
    start = doc.find(SECTION)
    if start == -1:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", start + len(SECTION))
        keep = "" if end == -1 else doc[end:]
        # Notes under the tables (the bullet list after them, up to the next section) are kept.
        old = doc[start:] if end == -1 else doc[start:end]
        at = old.find("\n\n- ")
        notes = old[at + 2:] if at != -1 else ""
        doc = doc[:start] + text + ("\n" + notes.rstrip("\n") + "\n" if notes.strip() else "") + keep
    DOC.write_text(doc)


def main() -> None:
    run(SECTION, lambda args: measure(args.rounds), lambda results, args: markdown(results, args.rounds),
        rounds=3, description=__doc__.splitlines()[0], write=write_docs)


if __name__ == "__main__":
    main()
