"""What the benchmarks share: their command line, the lines that say where a figure was measured, and
``--write-docs`` (replace the script's own section of docs/benchmarks.md).

A section runs from its ``## `` heading to the next ``## `` heading (or the end); a section not
there yet is appended. The scripts run as ``python benchmarks/bench_x.py``, so this folder is on
``sys.path`` and ``from _docs import replace_section`` finds this module. Importing it also puts the
checkout's root on ``sys.path``: a benchmark takes what it shares with the tests (a scratch project's
environment without provisioner's settings, the clean-up of a run) from ``tests._helpers``, one copy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def replace_section(doc_path: Path, heading: str, text: str) -> None:
    """Write ``text`` (starting with ``heading``) in place of the section ``heading`` of ``doc_path``."""
    doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
    if heading in doc:
        head, _, rest = doc.partition(heading)
        tail = rest.split("\n## ", 1)
        doc = head + text.rstrip("\n") + "\n" + ("\n## " + tail[1] if len(tail) > 1 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    doc_path.write_text(doc)


def publish(heading: str, text: str, write_docs: bool,
            write: Callable[[str], None] | None = None) -> None:
    """Print a benchmark's section ``text``; with ``write_docs`` also put it in docs/benchmarks.md
    (``write(text)``; default: :func:`replace_section` of ``heading``)."""
    print(text)
    if write_docs:
        (write or (lambda text: replace_section(DOC, heading, text)))(text)


def run(
    heading: str,
    measure: Callable[[argparse.Namespace], dict[str, Any]],
    markdown: Callable[[dict[str, Any], argparse.Namespace], str],
    *,
    rounds: int,
    options: Callable[[argparse.ArgumentParser], None] = lambda _parser: None,
    description: str | None = None,
    write: Callable[[str], None] | None = None,
) -> None:
    """A benchmark's command: ``[--rounds N] [its options] [--json] [--write-docs]``. Measures
    (``measure(args)``), then prints the results as JSON (``--json``) or as its section of
    docs/benchmarks.md (``markdown(results, args)``), which ``--write-docs`` also writes there
    (``write(text)``; default: :func:`replace_section` of ``heading``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=rounds)
    options(parser)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the '{heading}' section of {DOC}")
    args = parser.parse_args()
    results = measure(args)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    publish(heading, markdown(results, args), args.write_docs, write)


def commit() -> str:
    """The checkout's commit, short (``"?"`` outside a git checkout)."""
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or "?"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else ``"?"``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def machine() -> str:
    """``<host>: <CPU>, <n> vCPUs, Linux <release>, Python <version>, Docker <engine version>``: the
    machine line of a section (the engine's version from the engine this environment points at)."""
    from provisioner.runtime.engine import open_runtime

    rt = open_runtime()
    try:
        docker_version = rt.engine_info().version
    finally:
        rt.close()
    return (
        f"{platform.node()}: {cpu_model()}, {os.cpu_count()} vCPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, Docker {docker_version}"
    )


def timed_child(argv: Sequence[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, bytes]:
    """Run ``argv`` to its end: (wall clock s, CPU s of the child: user + system from ``os.wait4``,
    its output, stdout and stderr together).

    Raises:
        SystemExit: the child exited non-zero (its output in the message).
    """
    started = time.monotonic()
    proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed in {cwd}:\n{output.decode(errors='replace')}")
    return wall, usage.ru_utime + usage.ru_stime, output
