"""LM modes: per-call cost of the mock and of cassette replay, against DSPy's DummyLM.

Same program for every LM: ``dspy.Predict("question -> answer")`` with the ChatAdapter, in one
process, DSPy's cache off. Each call is timed with ``perf_counter`` after a warm-up; we report the
median and p90 per call and the median's difference from DummyLM (target: within 0.3 ms).
Replay is then timed with 0, 1 000 and 10 000 unrelated entries in the cassette directory (target:
no growth — a lookup is one open() of a path computed from the key).

    .venv/bin/python benchmarks/bench_lm.py [--calls 400]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dspy
from dspy.utils.dummies import DummyLM

from provisioner.lm import build_lm
from provisioner.lm.cassettes import FORMAT, CassetteStore
from provisioner.lmconfig import LMConfig


def _time_calls(lm: dspy.LM, questions: list[str]) -> list[float]:
    program = dspy.Predict("question -> answer")
    adapter = dspy.ChatAdapter()
    timings: list[float] = []
    with dspy.context(lm=lm, adapter=adapter):
        for question in questions[:20]:  # warm-up
            program(question=question)
        for question in questions:
            started = time.perf_counter()
            program(question=question)
            timings.append(time.perf_counter() - started)
    return timings


def _summary(name: str, timings: list[float], baseline: float | None) -> dict[str, object]:
    median = statistics.median(timings)
    p90 = statistics.quantiles(timings, n=10)[-1]
    row: dict[str, object] = {"lm": name, "median_ms": round(median * 1000, 3),
                              "p90_ms": round(p90 * 1000, 3)}
    if baseline is not None:
        row["vs_dummy_ms"] = round((median - baseline) * 1000, 3)
    return row


def _fill(store: CassetteStore, count: int, start: int) -> None:
    """Unrelated but well-formed entries, written directly (recording 10 000 through DSPy is slow)."""
    for i in range(start, start + count):
        request = {"v": 1, "identity": "bench", "model": "m", "system": "", "messages": [["user", str(i)]],
                   "generation": {}}
        key = hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        store.put({"format": FORMAT, "key": key, "recorded_at": "", "identity": "bench", "summary": {},
                   "request": request, "response": {"text": "x"}, "usage": {}, "cost_usd": 0})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5, help="rounds, alternating the LMs, to spread noise")
    args = parser.parse_args(argv)
    questions = [f"question number {i}" for i in range(args.calls)]

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cassettes"
        config = LMConfig(mode="cached", cached_inner="mock", cache_dir=cache, run_dir=Path(tmp) / "run")
        _time_calls(build_lm(config), questions)  # record every question once
        lms: dict[str, dspy.LM] = {
            "DummyLM": DummyLM({"question": {"answer": "mock_response"}}),  # answers any prompt
            "mock": build_lm(LMConfig(mode="mock")),
        }
        # The same recordings plus 0, 1 000 and 10 000 unrelated entries, measured interleaved.
        for extra in (0, 1_000, 10_000):
            copy = Path(tmp) / f"cassettes-{extra}"
            shutil.copytree(cache, copy)
            _fill(CassetteStore(copy), extra, 0)
            total = len(CassetteStore(copy).keys())
            replay = config.model_copy(update={"record_mode": "none", "cache_dir": copy})
            lms[f"cached replay, {total} entries on disk"] = build_lm(replay)
        timings: dict[str, list[float]] = {name: [] for name in lms}
        for _ in range(args.rounds):
            for name, lm in lms.items():
                timings[name].extend(_time_calls(lm, questions))
        baseline = statistics.median(timings["DummyLM"])
        rows = [_summary(name, values, None if name == "DummyLM" else baseline)
                for name, values in timings.items()]
        replays = [statistics.median(v) for name, v in timings.items() if name.startswith("cached replay")]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}, "
          f"dspy {dspy.__version__}, {platform.platform()}")
    print(f"date: {time.strftime('%Y-%m-%d')}, {args.rounds} rounds x {args.calls} calls per LM\n")
    print("| LM | median ms/call | p90 ms/call | median vs DummyLM (ms) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['lm']} | {row['median_ms']} | {row['p90_ms']} | {row.get('vs_dummy_ms', '—')} |")
    growth = (replays[-1] - replays[0]) * 1000
    print(f"\nreplay median change from +0 to +10 000 entries on disk: {growth:+.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
