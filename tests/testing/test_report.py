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
