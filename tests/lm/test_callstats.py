"""provisioner.lm.callstats: per-process LM call counters and the aggregate LMUsage."""

from __future__ import annotations

from provisioner.lm import LMCallStats
from provisioner.lm.callstats import LMUsage


def test_usage_from_stats_counts_recorded_calls_as_misses() -> None:
    usage = LMUsage.from_stats(LMCallStats(mock=1, replayed=2, recorded=3, real=4, cost_usd=0.5))
    assert usage.calls == 10 and usage.cache_misses == 3 and usage.cost_usd == 0.5
