"""`provision history merge` checks that every shard of a split suite is there (pytest-split's
``--group i --splits N``): a merge of 2 of 3 names the missing shard and writes nothing, unless
``--allow-partial``, which records the gap in the merged report, its run row and the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from provisioner.cli import main
from provisioner.errors import HistoryError
from provisioner.history.merge import merge_reports, split_of_label

from .._helpers import clear_settings
from .test_merge import shard_report

pytest_plugins = ["pytester"]


def _shards(root: Path, groups: list[int], *, splits: int = 3, in_document: bool = True) -> None:
    """Shards of one split suite: the split in the report (as the plugin writes it) and a free-form
    PROVISION_SHARD label (as the workflow sets it), or only an "i/N" label."""
    for group in groups:
        at = f"2026-11-30T10:0{group}"
        path = shard_report(root / f"shard{group}", f"r{group}", [f"t.py::g{group}"], cost=0.1,
                            started=f"{at}:00+00:00", finished=f"{at}:30+00:00",
                            shard=f"unit-py3.11-shard{group}" if in_document else f"{group}/{splits}")
        if in_document:
            data = json.loads(path.read_text())
            data["split"] = {"group": group, "splits": splits}
            path.write_text(json.dumps(data))


@pytest.mark.parametrize("in_document", [True, False], ids=["split-in-report", "i/N-label"])
def test_a_merge_of_2_of_3_shards_names_the_missing_one(tmp_path: Path, in_document: bool) -> None:
    _shards(tmp_path / "artifacts", [1, 3], in_document=in_document)
    with pytest.raises(HistoryError, match=r"shard 2/3 missing .*--allow-partial"):
        merge_reports([tmp_path / "artifacts"])
    (merged,) = merge_reports([tmp_path / "artifacts"], allow_partial=True)
    assert merged.missing == ["2/3"] and merged.run["tests"] == 2
    assert merged.run["shard"] is not None and merged.run["shard"].endswith("(2/3 missing)")
    assert merged.as_report()["missing_shards"] == ["2/3"]
    _shards(tmp_path / "artifacts", [2], in_document=in_document)
    (complete,) = merge_reports([tmp_path / "artifacts"])
    assert complete.missing == [] and complete.run["tests"] == 3
    assert "missing_shards" not in complete.as_report()


def test_the_cli_refuses_a_partial_merge_and_writes_nothing_unless_allowed(tmp_path: Path) -> None:
    _shards(tmp_path / "artifacts", [1, 2])
    runner = CliRunner()
    out = tmp_path / "merged"
    result = runner.invoke(main, ["history", "merge", str(tmp_path / "artifacts"), "--out", str(out)])
    assert result.exit_code == 1 and "shard 3/3 missing" in result.output and not out.exists()
    summary = tmp_path / "summary.md"
    result = runner.invoke(main, ["history", "merge", str(tmp_path / "artifacts"), "--out", str(out),
                                  "--allow-partial", "--summary", str(summary)])
    assert result.exit_code == 0, result.output
    assert "PARTIAL: shard 3/3 missing" in result.output
    assert "**Partial: `example-unit.json` is missing shard 3/3**" in summary.read_text()
    assert json.loads((out / "example-unit.json").read_text())["missing_shards"] == ["3/3"]


def test_shards_split_differently_or_a_group_twice_are_refused(tmp_path: Path) -> None:
    _shards(tmp_path / "a", [1], splits=2)
    _shards(tmp_path / "a", [2], splits=3)
    with pytest.raises(HistoryError, match="split differently"):
        merge_reports([tmp_path / "a"])
    _shards(tmp_path / "b", [1, 2], splits=2)
    shard_report(tmp_path / "b" / "again", "r9", ["t.py::other"], shard="1/2",
                 started="2026-11-30T11:00:00+00:00", finished="2026-11-30T11:00:30+00:00")
    with pytest.raises(HistoryError, match=r"shard 1/2 is in .* the same shard twice"):
        merge_reports([tmp_path / "b"])
    _shards(tmp_path / "c", [1], splits=2)
    shard_report(tmp_path / "c" / "unknown", "r8", ["t.py::x"], shard="linux",
                 started="2026-11-30T11:00:00+00:00", finished="2026-11-30T11:00:30+00:00")
    with pytest.raises(HistoryError, match="does not say which shard it is"):
        merge_reports([tmp_path / "c"])


def test_reports_without_a_split_merge_unchecked() -> None:
    """Free-form labels (a matrix leg's name) say nothing about N: nothing to check."""
    assert split_of_label("unit-py3.11") is None and split_of_label(None) is None
    assert split_of_label("0/3") is None and split_of_label("4/3") is None
    assert split_of_label("2/3") == {"group": 2, "splits": 3}


def test_real_shards_named_by_provision_shard_still_say_which_group_they_are(
    pytester: pytest.Pytester,
) -> None:
    """The workflow names each shard with PROVISION_SHARD (``unit-py3.11-shard1``), so the history's
    label says nothing about the split; the report's ``split`` does, and the merge uses it."""
    clear_settings(pytester._monkeypatch, also=lambda name: name.startswith("GITHUB_"))
    pytester.makepyfile(test_a="def test_one():\n    pass\n\ndef test_two():\n    pass\n\n"
                                "def test_three():\n    pass\n")
    for group in (1, 2):
        pytester._monkeypatch.setenv("PROVISION_SHARD", f"unit-py3.11-shard{group}")
        result = pytester.runpytest_subprocess("-p", "no:randomly", "--splits", "3", "--group", str(group),
                                               "--provision-report", f"artifacts/s{group}/unit.json")
        result.assert_outcomes(passed=1)
        report = json.loads((pytester.path / "artifacts" / f"s{group}" / "unit.json").read_text())
        assert report["split"] == {"group": group, "splits": 3}
        assert report["run"]["shard"] == f"unit-py3.11-shard{group}"
    with pytest.raises(HistoryError, match="shard 3/3 missing"):
        merge_reports([pytester.path / "artifacts"])
