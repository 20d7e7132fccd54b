"""The history page at scale: 1 000 runs x 200 tests in ``history.sqlite``, then ``provision report
html``'s work (read the history, compute flaky/slowest/cost tables, render the page) timed.

Rows are synthetic but shaped like real ones: 200 node ids, outcomes mostly passed with a few failing
tests and 3 flaky ones, durations 0.01-3 s, LM calls and dollars on a quarter of the tests, one run
every 2 hours going back from now (so several months and a current-month forecast). Each run is
written with :meth:`History.record` (one transaction per run, as the plugin does). Reported: fill
time, page build time (median of 3, default window of 100 runs and with the whole history as the
window), page size, database size.

    .venv/bin/python benchmarks/bench_report.py [--runs 1000] [--tests 200]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from provisioner.history.rows import empty_test_row
from provisioner.history.store import HISTORY_FILE, History, RunRow
from provisioner.reporting.dashboard import gather
from provisioner.reporting.html import render


def fill(db: History, runs: int, tests: int, seed: int = 7) -> float:
    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    node_ids = [f"tests/test_mod{n // 20}.py::test_case_{n}" for n in range(tests)]
    flaky = set(node_ids[5:8])
    broken = set(node_ids[10:12])
    started = time.perf_counter()
    for r in range(runs):
        run_id = f"r{r:05d}"
        start = now - dt.timedelta(hours=2 * (runs - r))
        rows = []
        for n, node_id in enumerate(node_ids):
            row = empty_test_row(run_id, node_id, "integration")
            row["outcome"] = ("failed" if node_id in broken or (node_id in flaky and rng.random() < 0.3)
                              else "skipped" if n % 50 == 0 else "passed")
            row["setup_s"] = rng.uniform(0.001, 0.2)
            row["call_s"] = rng.uniform(0.01, 3)
            row["teardown_s"] = rng.uniform(0.001, 0.1)
            row["xdist_worker"] = f"gw{n % 2}"
            if n % 4 == 0:
                row["lm_replayed"] = rng.randint(0, 4)
                row["cache_hits"] = row["lm_replayed"]
                row["lm_recorded"] = row["cache_misses"] = int(rng.random() < 0.05)
                row["lm_mock"] = rng.randint(0, 3)
                row["cost_usd"] = row["list_cost_usd"] = row["lm_recorded"] * 0.00002
            rows.append(row)
        counts = {k: sum(1 for x in rows if x["outcome"] == k) for k in ("passed", "failed", "skipped")}
        run = RunRow(run_id=run_id, started_at=start.isoformat(timespec="seconds"),
                     finished_at=(start + dt.timedelta(minutes=3)).isoformat(timespec="seconds"),
                     duration_s=180.0, project="bench", revision=f"{r // 10:040x}", branch="main",
                     host="bench",
                     ci_job=None, shard=None, layers=["integration"], exit_status=int(counts["failed"] > 0),
                     tests=len(rows),
                     passed=counts["passed"], failed=counts["failed"], error=0, skipped=counts["skipped"],
                     xfailed=0, xpassed=0, reruns=0,
                     lm_calls=sum(x["lm_mock"] + x["lm_replayed"] + x["lm_recorded"] for x in rows),
                     cost_usd=sum(x["cost_usd"] for x in rows),
                     list_cost_usd=sum(x["cost_usd"] for x in rows),
                     standin_calls=0, cache_hits=sum(x["cache_hits"] for x in rows),
                     cache_misses=sum(x["cache_misses"] for x in rows), leaks=0, retained=[])
        db.record(run, rows)
    return time.perf_counter() - started


def build(db: History, window: int) -> tuple[float, int, int]:
    times, size, flaky = [], 0, 0
    for _ in range(3):
        started = time.perf_counter()
        board = gather(db, window=window, budget_usd=10.0)
        page = render(board)
        times.append(time.perf_counter() - started)
        size, flaky = len(page.encode("utf-8")), len(board.flaky)
    return statistics.median(times), size, flaky


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--tests", type=int, default=200)
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, "
          f"{args.runs} runs x {args.tests} tests")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / HISTORY_FILE
        with History(path) as db:
            fill_s = fill(db, args.runs, args.tests)
            print(f"fill: {fill_s:.1f} s ({1000 * fill_s / args.runs:.1f} ms per run of {args.tests} tests); "
                  f"database {path.stat().st_size / 1e6:.1f} MB")
            for window in (100, args.runs):
                seconds, size, flaky = build(db, window)
                print(f"page over the newest {window} runs: built in {seconds:.2f} s (median of 3), "
                      f"{size / 1e3:.0f} kB, {flaky} flaky tests found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
