"""The bridge tests' own `provision worker` processes (tests/bridge/conftest.py) never outlive the test
process that started them: after a Ctrl-C of a full run, xdist SIGKILLs a test process whose teardown
has not ended within 10 s, and a worker it started stayed behind (seen once from test_regex_rules)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent

TEST_PROCESS = """
import sys, threading
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.bridge.conftest import WorkerProcess
worker = WorkerProcess(Path({workdir!r}))
print(worker.proc.pid, flush=True)
threading.Event().wait()
"""


def test_a_worker_dies_with_the_test_process_that_started_it(tmp_path: Path, poll: Any) -> None:
    code = TEST_PROCESS.format(root=str(HERE.parents[1]), workdir=str(tmp_path / "w"))
    test_process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker_pid = 0
    try:
        assert test_process.stdout is not None
        worker_pid = int(test_process.stdout.readline())
        worker = psutil.Process(worker_pid)
        assert worker.ppid() == test_process.pid and "worker" in worker.cmdline()
        os.kill(test_process.pid, signal.SIGKILL)  # no teardown runs
        test_process.wait()
        poll(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, 30,
             "the end of the orphaned worker")
    finally:
        test_process.kill()
        test_process.wait()
        if worker_pid and psutil.pid_exists(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
