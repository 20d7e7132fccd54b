"""provisioner.lm.callstats: per-process LM call counters and the aggregate LMUsage."""

from __future__ import annotations

import pytest

from provisioner.lm import LMCallStats
from provisioner.lm.callstats import LMUsage


def test_usage_from_stats_counts_recorded_calls_as_misses() -> None:
    usage = LMUsage.from_stats(LMCallStats(mock=1, replayed=2, recorded=3, real=4, cost_usd=0.5))
    assert usage.calls == 10 and usage.cache_misses == 3 and usage.cost_usd == 0.5


def test_a_tally_counts_its_block_and_a_reply_of_another_process_adds_to_this_one() -> None:
    """A bridge worker tallies each execute_program's LM calls and sends them back (lm_usage); the
    client adds them to its process's counters — the only record of mock calls made in a worker."""
    from provisioner.lm.callstats import record_call, record_elsewhere, record_error, stats, tally

    with tally() as outer:
        record_call("mock", input_tokens=3, output_tokens=2)
        record_error()
    record_call("mock")  # outside: not in the tally
    usage = outer.as_dict()
    assert {k: usage[k] for k in ("mock", "errors", "input_tokens", "output_tokens")} == {
        "mock": 1, "errors": 1, "input_tokens": 3, "output_tokens": 2}
    before = stats()
    record_elsewhere(usage)  # this process's own tally (a worker it serves itself): counted already
    assert stats() == before
    remote = {**usage, "process": "another-process", "real": -4, "recorded": "2", "replayed": True,
              "unknown": 9, "cost_usd": 0.5}
    record_elsewhere(remote)  # negative, non-numeric, boolean and unknown values are ignored
    delta = stats() - before
    assert (delta.mock, delta.errors, delta.real, delta.recorded, delta.replayed) == (1, 1, 0, 0, 0)
    assert delta.cost_usd == pytest.approx(0.5) and delta.input_tokens == 3
