"""Run-wide limits: the request window and the dollar budget hold across processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.errors import ConfigError, CostLimitExceeded, RateLimitExceeded
from provisioner.lm.ledger import read_ledger
from provisioner.lm.limits import RUN_LIMITS_FILE, RunLimits, read_run_limits, write_run_limits
from provisioner.lm.standin import GeminiStandin


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_window_admits_rpm_then_waits_for_the_oldest(tmp_path: Path) -> None:
    clock = FakeClock()
    limits = RunLimits(tmp_path, rpm=3, cost_limit_usd=1, clock=clock, sleep=clock.sleep)
    starts = []
    for _ in range(3):
        starts.append(limits.acquire_request())
        clock.now += 1
    assert clock.slept == []
    clock.now += 9
    fourth = limits.acquire_request()
    assert clock.slept == [pytest.approx(48.0)]  # until the first request is 60 s old
    assert fourth == pytest.approx(starts[0] + 60.0)
    assert limits.requests_in_window() == 3


def test_no_slot_within_the_wait_budget_is_an_error(tmp_path: Path) -> None:
    clock = FakeClock()
    limits = RunLimits(tmp_path, rpm=1, cost_limit_usd=1, wait_s=5, clock=clock, sleep=clock.sleep)
    limits.acquire_request()
    with pytest.raises(RateLimitExceeded, match=r"lm\.rate_limit_rpm"):
        limits.acquire_request()
    assert clock.slept == []  # it knew at once that 60 s > 5 s: no pointless waiting


def test_reservations_count_until_settled_and_expire(tmp_path: Path) -> None:
    clock = FakeClock()
    limits = RunLimits(tmp_path, rpm=10, cost_limit_usd=1.0, reservation_ttl_s=100, clock=clock)
    first = limits.reserve(0.6)
    in_flight = r"spent \$0\.000000, reserved by calls in flight \$0\.600000"
    with pytest.raises(CostLimitExceeded, match=in_flight):
        limits.reserve(0.5)
    limits.settle(first, 0.1)
    second = limits.reserve(0.5)
    assert limits.snapshot().spent_usd == pytest.approx(0.1)
    assert limits.snapshot().reserved_usd == pytest.approx(0.5)
    # A reservation of a process that died is dropped once it expires.
    clock.now += 101
    limits.reserve(0.85)
    limits.settle(second, 0.0)  # settling an expired reservation is harmless
    assert limits.snapshot().spent_usd == pytest.approx(0.1)


def test_two_runs_do_not_share_state(tmp_path: Path) -> None:
    one = RunLimits(tmp_path / "a", rpm=10, cost_limit_usd=1.0)
    two = RunLimits(tmp_path / "b", rpm=10, cost_limit_usd=1.0)
    one.reserve(0.9)
    two.reserve(0.9)  # a different run has its own budget
    with pytest.raises(CostLimitExceeded):
        one.reserve(0.2)


def test_the_run_limits_file_wins_over_the_configured_values(tmp_path: Path) -> None:
    """The controller's file holds, however generous the LM's own configuration."""
    clock = FakeClock()
    greedy = RunLimits(tmp_path, rpm=1000, cost_limit_usd=1000.0, wait_s=600, clock=clock, sleep=clock.sleep)
    greedy.reserve(0.5)  # no file yet: the configured values
    write_run_limits(tmp_path, rate_limit_rpm=2, cost_limit_usd=0.6, rate_limit_wait_s=5.0)
    assert greedy.effective() == (2, 0.6, 5.0)
    with pytest.raises(CostLimitExceeded, match=r"lm\.cost_limit_usd=\$0\.60 "):
        greedy.reserve(0.2)
    assert greedy.snapshot().limit_usd == 0.6
    greedy.acquire_request()
    greedy.acquire_request()
    with pytest.raises(RateLimitExceeded, match=r"2 requests/minute .* lm\.rate_limit_wait_s=5s"):
        greedy.acquire_request()
    assert clock.slept == []


def test_the_run_limits_file_is_atomic_readable_and_checked(tmp_path: Path) -> None:
    path = write_run_limits(tmp_path / "run", rate_limit_rpm=3, cost_limit_usd=0.25, rate_limit_wait_s=1.5)
    assert path.name == RUN_LIMITS_FILE and oct(path.stat().st_mode & 0o777) == "0o644"
    assert read_run_limits(tmp_path / "run") == {
        "rate_limit_rpm": 3, "cost_limit_usd": 0.25, "rate_limit_wait_s": 1.5,
    }
    assert list((tmp_path / "run").glob("*.tmp")) == []
    assert read_run_limits(tmp_path / "none") is None
    with pytest.raises(ConfigError, match=r"lm\.rate_limit_rpm must be an integer >= 1, got 0"):
        write_run_limits(tmp_path, rate_limit_rpm=0, cost_limit_usd=1, rate_limit_wait_s=1)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "cannot be read"),
        ("[1, 2]", "must be a JSON object"),
        ('{"rate_limit_rpm": 5, "cost_limit_usd": NaN, "rate_limit_wait_s": 1}', "lm.cost_limit_usd"),
        ('{"rate_limit_rpm": 5, "cost_limit_usd": -1, "rate_limit_wait_s": 1}', "lm.cost_limit_usd"),
        ('{"rate_limit_rpm": true, "cost_limit_usd": 1, "rate_limit_wait_s": 1}', "lm.rate_limit_rpm"),
        ('{"cost_limit_usd": 1, "rate_limit_wait_s": 1}', "lm.rate_limit_rpm"),
    ],
)
def test_a_corrupt_run_limits_file_refuses_calls(tmp_path: Path, content: str, fragment: str) -> None:
    """Fail closed: a budget that cannot be read is no budget to spend against."""
    (tmp_path / RUN_LIMITS_FILE).write_text(content)
    limits = RunLimits(tmp_path, rpm=10, cost_limit_usd=1.0)
    with pytest.raises(ConfigError, match=fragment):
        limits.reserve(0.01)
    with pytest.raises(ConfigError, match=fragment):
        limits.acquire_request()


_RATE_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from provisioner.lm.limits import RunLimits
    limits = RunLimits(Path(sys.argv[1]), rpm=4, cost_limit_usd=1.0, window_s=1.0, wait_s=30)
    print(json.dumps([limits.acquire_request() for _ in range(6)]))
    """
)


def test_rate_limit_holds_over_a_window_across_two_processes(tmp_path: Path) -> None:
    children = [subprocess.Popen([sys.executable, "-c", _RATE_CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                                 text=True) for _ in range(2)]
    starts: list[float] = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        starts.extend(json.loads(out))
    starts.sort()
    assert len(starts) == 12
    # In any window of 1 s there were at most 4 request starts, counting both processes together.
    for i in range(len(starts) - 4):
        assert starts[i + 4] - starts[i] >= 1.0 - 1e-6


_COST_CHILD = textwrap.dedent(
    """
    import sys
    import threading
    from pathlib import Path
    from dspy import lm15
    from dspy.lm15 import Message, Request
    from provisioner.lm.gemini import GeminiEngine
    from provisioner.lmconfig import LMConfig

    config = LMConfig(mode="real", api_key=sys.argv[3], base_url=sys.argv[2], run_dir=Path(sys.argv[1]),
                      run_id="cost-run", max_tokens=200, cost_limit_usd=float(sys.argv[4]),
                      rate_limit_rpm=1000)
    engine = GeminiEngine(config)
    counts = {"ok": 0, "refused": 0}
    lock = threading.Lock()

    def caller(n):
        for i in range(5):
            request = Request(model=config.model, system="Answer briefly.",
                              messages=(Message.user(f"question {n}-{i} " + "x" * 400),))
            try:
                engine.complete(request)
                outcome = "ok"
            except lm15.BillingError:
                outcome = "refused"
            with lock:
                counts[outcome] += 1

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(int(sys.argv[5]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(counts["ok"], counts["refused"])
    """
)


@pytest.fixture
def thinking_standin() -> Iterator[GeminiStandin]:
    # Slow replies keep eight callers in flight at once; thinking tokens make real costs near the worst case.
    with GeminiStandin(api_key="cost-key", latency_ms=60, thoughts_tokens=180) as server:
        yield server


def test_cost_limit_never_passed_with_eight_concurrent_callers(tmp_path: Path,
                                                                thinking_standin: GeminiStandin) -> None:
    limit = 0.0005  # eight concurrent calls at ~$0.00009 each would pass it without reservations
    # Eight callers: four threads in each of two processes (each thread opens its own lock file
    # descriptor, so flock excludes threads of one process as well as the other process).
    children = [
        subprocess.Popen([sys.executable, "-c", _COST_CHILD, str(tmp_path), thinking_standin.url, "cost-key",
                          str(limit), "4"], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    ok = refused = 0
    for child in children:
        out, _ = child.communicate(timeout=180)
        assert child.returncode == 0
        done, denied = map(int, out.split())
        ok, refused = ok + done, refused + denied
    assert ok + refused == 40
    assert ok >= 2 and refused >= 1
    ledger = [e for e in read_ledger(tmp_path / "ledger.jsonl") if e.get("event") == "call"]
    assert len(ledger) == ok == thinking_standin.request_count
    spent = sum(e["cost_usd"] for e in ledger)
    assert spent <= limit
    state = json.loads((tmp_path / "lm-limits.json").read_text())
    assert state["spent_usd"] <= limit and state["reservations"] == {}
    assert state["spent_usd"] == pytest.approx(spent, rel=1e-6)


def test_files_of_the_run_dir_are_group_writable_whatever_the_umask(tmp_path: Path) -> None:
    # Worker containers (non-root, in the run directory's group) share these files with the host: a
    # lock the host created first with 0644 locked them out ("Permission denied: lm-limits.lock").
    import os
    import stat

    from provisioner.lm.ledger import Ledger
    from provisioner.lm.limits import locked, write_json_atomic

    old = os.umask(0o022)
    try:
        with locked(tmp_path):
            pass
        write_json_atomic(tmp_path / "state.json", {"a": 1})
        Ledger(tmp_path, run_id="r1", layer="e2e").append({"event": "note"})
    finally:
        os.umask(old)
    for path in tmp_path.iterdir():
        mode = path.stat().st_mode
        assert mode & stat.S_IRGRP and mode & stat.S_IWGRP, (path.name, oct(mode))


@pytest.mark.parametrize("content", [b'{"requests": [1.0], "spent_usd": 0.4', b"", b"[]", b"\xff\xfe",
                                     b'{"spent_usd": "a lot"}', b'{"reservations": []}'])
def test_an_unreadable_budget_file_refuses_calls_naming_it(tmp_path: Path, content: bytes) -> None:
    """The run's spend so far is unknown (a writer killed mid-write, a hand edit): fail closed with
    the file's path and what to do, never a TypeError or a budget silently restarted from zero."""
    from provisioner.lm.limits import STATE_FILE

    (tmp_path / STATE_FILE).write_bytes(content)
    limits = RunLimits(tmp_path, rpm=10, cost_limit_usd=1.0)
    for call in (lambda: limits.reserve(0.01), limits.acquire_request, limits.snapshot):
        with pytest.raises(ConfigError, match=r"budget file .*lm-limits\.json is unreadable.*remove"):
            call()


def test_lines_appended_after_a_torn_line_are_kept(tmp_path: Path) -> None:
    """A writer killed mid-line leaves a torn last line; the next line starts on a line of its own
    (ledger, sessions.jsonl, the monthly archive) and readers skip only the torn one."""
    from provisioner.lm.cached import session_test
    from provisioner.lm.ledger import LEDGER_FILE, Ledger, note_session_test

    ledger_file = tmp_path / LEDGER_FILE
    ledger_file.write_bytes(b'{"event": "call", "kind": "real", "cost_u')
    ledger = Ledger(tmp_path, run_id="r1", layer="e2e")
    ledger.call(model="gemini-2.5-flash-lite", kind="real", cost_usd=0.5)
    ledger.close()
    assert [(e["run_id"], e["cost_usd"]) for e in read_ledger(ledger_file)] == [("r1", 0.5)]
    with ledger_file.open("ab") as handle:
        handle.write(b"\xff\xfe\x00 not utf-8\n")
    assert len(read_ledger(ledger_file)) == 1

    sessions = tmp_path / "sessions.jsonl"
    sessions.write_bytes(b'{"session_id": "s0", "test_id": "t::zero"}\n{"session_id": "s1"}\n'
                         b'[1]\n\xff\n{"session_id": "s2", "test_id": "t::t')
    note_session_test(tmp_path, "s2", "t::two")
    assert session_test(tmp_path, "s2") == "t::two"
    assert session_test(tmp_path, "s0") == "t::zero"
    assert session_test(tmp_path, "s1") is None


def test_the_private_run_dir_is_one_per_process() -> None:
    from provisioner.lm.limits import private_run_dir

    first = private_run_dir()
    assert first.is_dir() and private_run_dir() == first  # RunLimits(None) and Ledger(None) share it


def test_a_failed_atomic_write_leaves_the_old_content_and_no_temporary_file(tmp_path: Path) -> None:
    from provisioner.lm.limits import write_json_atomic

    path = tmp_path / "state.json"
    write_json_atomic(path, {"spent_usd": 1.5})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"spent_usd": object()})  # fails midway through writing
    assert json.loads(path.read_text()) == {"spent_usd": 1.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_no_call_waits_past_or_starts_after_its_caller_s_deadline(tmp_path: Path) -> None:
    """A user's trial: a call held by the rate limit (wait up to 120 s) outlived the bridge request
    (30 s): the client gave up, and the worker could still send, and bill, the call later."""
    import time

    from provisioner.lm.limits import caller_deadline

    clock = FakeClock()
    limits = RunLimits(tmp_path, rpm=1, cost_limit_usd=1.0, wait_s=120, clock=clock, sleep=clock.sleep)
    with caller_deadline(time.monotonic() + 30, "the request's deadline (30 s, process_timeout)"):
        limits.acquire_request()  # a free slot: no wait
        # The next slot frees in 60 s, after the caller's deadline: refused at once, not after 30 s.
        with pytest.raises(RateLimitExceeded, match=r"no free slot before the request's deadline \(30 s, "):
            limits.acquire_request()
    assert clock.slept == []
    with (caller_deadline(time.monotonic() - 1, "the request's deadline (30 s, process_timeout)"),
          pytest.raises(RateLimitExceeded, match=r"not sent: the request's deadline .* has passed")):
        limits.acquire_request()
    clock.now += 61  # outside any caller's deadline the configured wait applies, as before
    limits.acquire_request()
    with pytest.raises(RateLimitExceeded, match=r"within lm\.rate_limit_wait_s=1s \(the next in 60s\)"):
        RunLimits(tmp_path, rpm=1, cost_limit_usd=1.0, wait_s=1, clock=clock,
                  sleep=clock.sleep).acquire_request()
