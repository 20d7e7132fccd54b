"""`provision history merge`: shards of one suite (same report file name) become one run; bad input
is refused with the file named and nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from provisioner.cli import main
from provisioner.errors import HistoryError
from provisioner.history.merge import merge_reports, merged_run_id, read_shard
from provisioner.history.rows import empty_test_row
from provisioner.history.store import RUN_FIELDS


def shard_report(folder: Path, run_id: str, nodes: list[str], *, started: str, finished: str,
                 name: str = "example-unit.json", outcome: str = "passed", cost: float = 0.0,
                 **run: Any) -> Path:
    tests = []
    for node in nodes:
        row = dict(empty_test_row(run_id, node, "unit"))
        row.update(outcome=outcome, lm_real=1, cost_usd=cost / max(len(nodes), 1),
                   list_cost_usd=cost / max(len(nodes), 1))
        tests.append(row)
    row_data: dict[str, Any] = {name: 0 for name in RUN_FIELDS}
    row_data.update(run_id=run_id, started_at=started, finished_at=finished, duration_s=1.0, project="qa",
                    revision="abc", branch="main", host=f"runner-{run_id}", ci_job="99/layers",
                    shard=f"unit-{run_id}", layers=["unit"], exit_status=0, tests=len(nodes),
                    passed=len(nodes) if outcome == "passed" else 0,
                    failed=len(nodes) if outcome == "failed" else 0, lm_calls=len(nodes),
                    cost_usd=cost, list_cost_usd=cost, retained=[])
    row_data.update(run)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"schema_version": 1, "run_id": run_id, "layers": {"unit": {"x": run_id}},
                                "run": row_data, "tests": tests}))
    return path


def two_shards(root: Path) -> tuple[Path, Path]:
    a = shard_report(root / "reports-unit-shard1", "r1", ["t.py::a", "t.py::b"], cost=0.25,
                     started="2026-11-30T10:00:05+00:00", finished="2026-11-30T10:01:00+00:00")
    b = shard_report(root / "reports-unit-shard2", "r2", ["t.py::c"], cost=0.125, outcome="failed",
                     started="2026-11-30T10:00:00+00:00", finished="2026-11-30T10:02:30+00:00", exit_status=1)
    return a, b


def test_shards_merge_into_one_run_with_every_test_and_one_cost_total(tmp_path: Path) -> None:
    two_shards(tmp_path / "artifacts")
    (merged,) = merge_reports([tmp_path / "artifacts"])
    run = merged.run
    assert merged.name == "example-unit.json"
    assert [t["node_id"] for t in merged.tests] == ["t.py::a", "t.py::b", "t.py::c"]
    assert {t["run_id"] for t in merged.tests} == {run["run_id"]}
    assert (run["tests"], run["passed"], run["failed"]) == (3, 2, 1)
    assert run["cost_usd"] == run["list_cost_usd"] == pytest.approx(0.375)
    assert run["lm_calls"] == 3
    assert run["exit_status"] == 1  # the worst shard's
    assert run["started_at"] == "2026-11-30T10:00:00+00:00"  # earliest start, latest finish
    assert run["finished_at"] == "2026-11-30T10:02:30+00:00" and run["duration_s"] == 150.0
    assert run["shard"] == "2 shards: unit-r2, unit-r1"  # in start order
    assert run["host"] == "runner-r2, runner-r1" and run["ci_job"] == "99/layers"
    assert run["run_id"].startswith("m20261130-100000-")
    assert [s["run_id"] for s in merged.shards] == ["r2", "r1"]
    assert merged.shards[1]["layers"] == {"unit": {"x": "r1"}}  # each shard's sections are kept


def test_the_merged_id_depends_only_on_the_shards(tmp_path: Path) -> None:
    a, b = two_shards(tmp_path)
    first = merged_run_id([read_shard(a), read_shard(b)])
    assert first == merged_run_id([read_shard(b), read_shard(a)])
    c = shard_report(tmp_path / "other", "r3", ["t.py::d"], started="2026-11-30T10:00:00+00:00",
                     finished="2026-11-30T10:00:01+00:00")
    assert merged_run_id([read_shard(a), read_shard(c)]) != first


def test_an_empty_shard_does_not_fail_the_merged_run(tmp_path: Path) -> None:
    shard_report(tmp_path / "s1", "r1", ["t.py::a"], started="2026-11-30T10:00:00+00:00",
                 finished="2026-11-30T10:00:01+00:00")
    shard_report(tmp_path / "s2", "r2", [], started="2026-11-30T10:00:00+00:00",
                 finished="2026-11-30T10:00:01+00:00", exit_status=5)  # pytest: no tests collected
    (merged,) = merge_reports([tmp_path])
    assert merged.run["exit_status"] == 0 and merged.run["tests"] == 1


def test_reports_with_other_file_names_are_other_runs(tmp_path: Path) -> None:
    two_shards(tmp_path)
    shard_report(tmp_path / "reports-unit-shard1", "r5", ["t.py::a"], name="project-unit.json",
                 started="2026-11-30T10:00:00+00:00", finished="2026-11-30T10:00:01+00:00")
    merged = merge_reports([tmp_path])
    assert [(m.name, m.run["tests"]) for m in merged] == [("example-unit.json", 3), ("project-unit.json", 1)]


@pytest.mark.parametrize(("change", "message"), [
    ({"revision": "def"}, r"disagree on 'revision'"),
    ({"project": "other"}, r"disagree on 'project'"),
])
def test_shards_of_different_commits_or_projects_are_refused(tmp_path: Path, change: dict[str, Any],
                                                             message: str) -> None:
    shard_report(tmp_path / "s1", "r1", ["t.py::a"], started="2026-11-30T10:00:00+00:00",
                 finished="2026-11-30T10:00:01+00:00")
    shard_report(tmp_path / "s2", "r2", ["t.py::b"], started="2026-11-30T10:00:00+00:00",
                 finished="2026-11-30T10:00:01+00:00", **change)
    with pytest.raises(HistoryError, match=message):
        merge_reports([tmp_path])


def test_overlapping_shards_are_refused_naming_both_files(tmp_path: Path) -> None:
    a = shard_report(tmp_path / "py3.11", "r1", ["t.py::a"], started="2026-11-30T10:00:00+00:00",
                     finished="2026-11-30T10:00:01+00:00")
    b = shard_report(tmp_path / "py3.12", "r2", ["t.py::a"], started="2026-11-30T10:00:00+00:00",
                     finished="2026-11-30T10:00:01+00:00")
    with pytest.raises(HistoryError, match=r"test 't\.py::a' is in .* and in .*not shards of one") as info:
        merge_reports([tmp_path])
    assert str(a) in str(info.value) and str(b) in str(info.value)


def test_the_same_shard_twice_is_refused(tmp_path: Path) -> None:
    a = shard_report(tmp_path / "s1", "r1", ["t.py::a"], started="2026-11-30T10:00:00+00:00",
                     finished="2026-11-30T10:00:01+00:00")
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / a.name).write_text(a.read_text())
    with pytest.raises(HistoryError, match=r"run r1 is in .* the same shard twice"):
        merge_reports([tmp_path])


def test_cli_merges_imports_and_writes_one_summary(tmp_path: Path) -> None:
    two_shards(tmp_path / "artifacts")
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    env = {"PROVISION_STATE_DIR": str(tmp_path / ".provision")}
    runner = CliRunner()
    result = runner.invoke(main, ["history", "merge", str(tmp_path / "artifacts"), "--out",
                                  str(tmp_path / "merged"), "--summary", str(summary)], env=env)
    assert result.exit_code == 0, result.output
    assert "merged 2 shards into" in result.output and "3 tests, $0.375000 billed" in result.output
    text = summary.read_text()
    assert text.startswith("earlier step\n## provisioner: 1 run merged from 2 shard reports")  # appended
    assert "**Total: 3 tests (2 passed, 1 failed, 0 errors, 0 skipped) · cost $0.3750 billed" in text
    merged_file = tmp_path / "merged" / "example-unit.json"
    # A CI user merging shards then runs `provision report html`: the merge is in the history already.
    assert f"imported {json.loads(merged_file.read_text())['run_id']} into " in result.output, result.output
    runs = json.loads(runner.invoke(main, ["history", "list", "--json"], env=env).output)
    assert len(runs) == 1 and runs[0]["tests"] == 3 and runs[0]["cost_usd"] == pytest.approx(0.375)
    assert json.loads(merged_file.read_text())["run_cost_usd"] == pytest.approx(0.375)
    result = runner.invoke(main, ["history", "import", str(merged_file)], env=env)  # again: idempotent
    assert result.exit_code == 0, result.output
    assert len(json.loads(runner.invoke(main, ["history", "list", "--json"], env=env).output)) == 1


def test_cli_merge_with_no_import_only_writes_the_files_and_says_how_to_import(tmp_path: Path) -> None:
    two_shards(tmp_path / "artifacts")
    env = {"PROVISION_STATE_DIR": str(tmp_path / ".provision")}
    runner = CliRunner()
    result = runner.invoke(main, ["history", "merge", str(tmp_path / "artifacts"), "--out",
                                  str(tmp_path / "merged"), "--no-import"], env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "example-unit.json").exists() and "\nimported " not in result.output
    how = f"not imported (--no-import): `provision history import {tmp_path / 'merged'}/*.json`"
    assert how in result.output, result.output
    assert not (tmp_path / ".provision" / "history.sqlite").exists()
    shown = json.loads(runner.invoke(main, ["history", "merge", str(tmp_path / "artifacts"), "--out",
                                            str(tmp_path / "merged"), "--json"], env=env).output)
    assert shown[0]["imported"] is True and shown[0]["replaced_shard_runs"] == 0


def test_cli_refuses_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    two_shards(tmp_path / "artifacts")
    (tmp_path / "artifacts" / "broken").mkdir()
    (tmp_path / "artifacts" / "broken" / "example-unit.json").write_text("{not json")
    runner = CliRunner()
    result = runner.invoke(main, ["history", "merge", str(tmp_path / "artifacts"), "--out",
                                  str(tmp_path / "merged")])
    assert result.exit_code == 1 and "broken/example-unit.json: not JSON" in result.output
    assert not (tmp_path / "merged").exists()
    result = runner.invoke(main, ["history", "merge", str(tmp_path / "artifacts" / "reports-unit-shard1"),
                                  "--out", str(tmp_path / "artifacts" / "reports-unit-shard1")])
    assert result.exit_code == 1 and "would replace a shard report" in result.output


def test_importing_a_merge_replaces_its_shards_recorded_on_this_machine(tmp_path: Path) -> None:
    """Shards run side by side on one machine each record themselves in the local history; the merged
    run must replace them, or the month's cost counts their money twice."""
    a, b = two_shards(tmp_path / "artifacts")
    env = {"PROVISION_STATE_DIR": str(tmp_path / ".provision")}
    runner = CliRunner()
    other = shard_report(tmp_path / "elsewhere", "r9", ["t.py::z"], started="2026-11-29T10:00:00+00:00",
                         finished="2026-11-29T10:00:01+00:00")
    assert runner.invoke(main, ["history", "import", str(a), str(b), str(other)], env=env).exit_code == 0
    result = runner.invoke(main, ["history", "merge", str(tmp_path / "artifacts"), "--out",
                                  str(tmp_path / "merged")], env=env)
    assert result.exit_code == 0 and "replacing its 2 shard runs" in result.output, result.output
    merged = tmp_path / "merged" / "example-unit.json"
    result = runner.invoke(main, ["history", "import", str(merged)], env=env)  # e.g. the docs' old recipe
    assert result.exit_code == 0 and "replacing" not in result.output, result.output
    runs = json.loads(runner.invoke(main, ["history", "list", "--json"], env=env).output)
    assert sorted(r["run_id"][0] for r in runs) == ["m", "r"] and {r["run_id"] for r in runs} >= {"r9"}
    assert sum(r["cost_usd"] for r in runs) == pytest.approx(0.375)  # counted once


def test_a_file_given_twice_is_refused_naming_it(tmp_path: Path) -> None:
    """A user's trial: the same shard file twice gave "unit.json:  does not say which shard it is"
    (an empty name where the file belongs), though the file says which shard it is."""
    a, _b = two_shards(tmp_path)
    report = json.loads(a.read_text())
    report["split"] = {"group": 1, "splits": 2}
    a.write_text(json.dumps(report))
    result = CliRunner().invoke(main, ["history", "merge", str(a), str(a), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert f"{a} is given twice" in result.output and "does not say which shard" not in result.output
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_merged_shard_label_lists_the_groups_in_order(tmp_path: Path) -> None:
    """A user's trial: a merged run's shard read "2 shards: 2/2, 1/2" (start order, shard 2 started
    first). Shards that know their place in the split are listed by group."""
    a, b = two_shards(tmp_path)  # r2 (in b) started first
    for path, group in ((a, 1), (b, 2)):
        report = json.loads(path.read_text())
        report["run"]["shard"] = f"{group}/2"
        path.write_text(json.dumps(report))
    (merged,) = merge_reports([b, a])
    assert merged.run["shard"] == "2 shards: 1/2, 2/2"
