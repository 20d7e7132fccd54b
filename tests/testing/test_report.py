from __future__ import annotations

import json
from pathlib import Path

from provisioner.lm.callstats import LMUsage
from provisioner.run import LeakRecord, ProcessReport
from provisioner.testing.report import RunReport


def test_process_reports_round_trip_and_merge(tmp_path: Path) -> None:
    worker = ProcessReport(
        layer="integration",
        workers_started=2,
        lm=LMUsage(replayed=5, recorded=1, cache_misses=1, cost_usd=0.01),
        leaks=[LeakRecord("t.py::test_x", [("container", "prov-x")])],
        retained=["container prov-y"],
    )
    again = ProcessReport.from_json(worker.to_json())
    assert again == worker
    report = RunReport(run_id="r-1")
    report.layer("integration", lm_mode="cached", cost_limit_usd=1.0)
    report.merge(again)
    report.merge(ProcessReport(layer="integration", workers_started=1, lm=LMUsage(replayed=1)))
    report.add_outcome("integration", "passed")
    report.add_outcome("integration", "failed")
    data = report.as_dict()
    section = data["layers"]["integration"]
    assert data["processes"] == 2 and data["leaks_found"] == 1
    assert section["tests"] == 2 and section["workers_started"] == 3
    assert section["lm_calls"] == {"mock": 0, "replayed": 6, "recorded": 1, "real": 0, "standin": 0}
    assert section["cache_misses"] == 1 and section["cost_usd"] == 0.01
    assert section["leaks"] == [{"test": "t.py::test_x", "leaks": [["container", "prov-x"]]}]
    lines = "\n".join(report.lines())
    assert "t.py::test_x: container prov-x" in lines
    assert "retained for debugging: container prov-y" in lines
    path = tmp_path / "deep" / "r.json"
    report.write_json(path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(data))


def test_a_shard_s_summary_says_its_limit_is_its_share_of_the_run_s() -> None:
    """A user's trial: `--splits 2 --group 1` said "cost: $0.0000 of the run's $0.25 limit" when
    $0.25 was this shard's half of the run's $0.50."""
    from provisioner.layers import get_layer
    from provisioner.settings import Settings

    lm = get_layer(Settings(), "e2e").lm_config(
        Settings().lm.model_copy(update={"cost_limit_usd": 0.5, "shards": 2}), "real")
    shard = RunReport(run_id="r-shard")
    shard.layer("e2e", lm_mode="real", cost_limit_usd=lm.cost_limit_usd, rate_limit_rpm=lm.rate_limit_rpm,
                limits_share_of=lm.limits_share_of)
    shard.merge(ProcessReport(layer="e2e", lm=LMUsage(real=1, cost_usd=0.00001)))
    assert "  cost: $0.0000 of this shard's share (1/2 of $0.50) of the run's limit" in shard.lines()
    whole = RunReport(run_id="r-whole")
    whole.layer("e2e", lm_mode="real", cost_limit_usd=0.5)
    whole.merge(ProcessReport(layer="e2e", lm=LMUsage(real=1, cost_usd=0.00001)))
    assert "  cost: $0.0000 of the run's $0.50 limit" in whole.lines()
