"""Shards of one run merged into one run: ``provision history merge``.

A suite split across CI runners (pytest-split's ``--splits N --group i``, one matrix job per group)
gives N pytest runs, each with its own run id and its own ``--provision-report`` JSON. The shards of
one suite are the reports **with the same file name** in the downloaded artifacts (every shard job
writes ``reports/example-integration.json``; ``actions/download-artifact`` puts each artifact in a
folder of its own). :func:`merge_shards` turns them into one run — the tests of every shard, one
cost total — which ``provision history import`` then records as one run (the shards are *not*
imported themselves: the history's month totals would count their money twice).

The merged run row (:class:`~provisioner.history.store.RunRow`):

- ``run_id``: ``m<earliest shard start, %Y%m%d-%H%M%S>-<6 hex of the shard run ids>`` — the same
  shards always merge to the same id, so importing a merge again replaces it;
- ``started_at`` / ``finished_at``: the earliest start and the latest finish; ``duration_s`` the
  wall clock between them (shards run side by side); counts recounted over the merged test rows;
- ``lm_calls``, ``cost_usd``, ``list_cost_usd``, ``standin_calls``, ``cache_hits``,
  ``cache_misses``, ``leaks``, ``lm_refused``: sums over the shards' run rows (a run row's dollars
  are its ledger's total, which also counts calls outside any test, so the sum is the sharded
  run's spend);
- ``exit_status``: the worst shard's (an empty shard's 5, "no tests collected", counts only when
  every shard was empty); ``layers`` / ``retained``: every shard's, in order;
- ``revision``, ``branch``, ``project``: the shards' (they must agree: shards of different commits or
  projects are not one run); ``host`` / ``ci_job`` / ``shard``: the distinct values, comma-separated.

Test rows keep everything but their ``run_id``. A node id in two shards of one group is refused:
the reports are then not shards of one suite (two matrix legs, or one shard downloaded twice).

**All N shards, or say which are missing.** A shard knows its part of the split: the report's
``split`` (``{"group": i, "splits": N}``, written by the pytest plugin from pytest-split's
``--group``/``--splits`` whatever ``PROVISION_SHARD`` calls the shard) or a shard label ``"i/N"``.
A merge of 2 of 3 is refused naming the missing group (a shard job that died before writing its
report would otherwise vanish from the run's tests and cost); ``allow_partial`` merges what is
there and records the missing groups (``MergedRun.missing``, ``"missing_shards"`` in the merged
report, and the run row's ``shard`` text). Reports without split information are merged unchecked.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from provisioner.errors import HistoryError
from provisioner.history.store import TEST_OUTCOMES, RunRow, TestRow, rows_from_report

#: pytest's exit status when it collected no test (an empty pytest-split group).
NO_TESTS_COLLECTED = 5
_SUMMED = ("lm_calls", "cost_usd", "list_cost_usd", "standin_calls", "cache_hits", "cache_misses", "leaks",
           "lm_refused", "lm_rate_limit_wait_s", "lm_errors")


@dataclass(frozen=True)
class ShardReport:
    """One shard's ``--provision-report`` document as read from ``source``."""

    source: Path
    run: RunRow
    tests: list[TestRow]
    document: dict[str, Any]


class ShardInfo(TypedDict):
    """What the merged report keeps of each shard (``"shards"`` in its JSON)."""

    source: str
    run_id: str
    shard: str | None
    exit_status: int
    tests: int
    cost_usd: float
    list_cost_usd: float
    layers: dict[str, Any]  # the shard report's per-layer sections, as the shard wrote them


@dataclass(frozen=True)
class MergedRun:
    """The shards of one suite (``name``: their common file name) merged into one run."""

    name: str
    run: RunRow
    tests: list[TestRow]
    shards: list[ShardInfo]
    # "i/N" of each shard of the split that was not given (only with allow_partial)
    missing: list[str] = dataclasses.field(default_factory=list)

    def as_report(self) -> dict[str, Any]:
        """The merged ``--provision-report`` document: ``run`` and ``tests`` as a shard's (what
        ``provision history import`` reads), ``run_cost_usd`` the total, ``shards`` each shard's part.
        Keys: ``schema_version``, ``run_id``, ``processes``, ``run_cost_usd``, ``leaks_found``, ``run``,
        ``tests``, ``shards``."""
        return {
            "schema_version": 1,
            "run_id": self.run["run_id"],
            "processes": len(self.shards),
            "run_cost_usd": self.run["cost_usd"],
            "leaks_found": self.run["leaks"],
            "run": self.run,
            "tests": self.tests,
            "shards": self.shards,
            **({"missing_shards": self.missing} if self.missing else {}),
        }


def read_shard(path: Path) -> ShardReport:
    """One ``--provision-report`` JSON file.

    Raises:
        HistoryError: not readable, not JSON, or not a report with run history rows (the message
            names the file).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise HistoryError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise HistoryError(f"{path}: not JSON ({exc})") from None
    run, tests = rows_from_report(data, str(path))
    return ShardReport(source=Path(path), run=run, tests=tests, document=data)


def find_reports(paths: Iterable[Path]) -> list[Path]:
    """The report files named by ``paths``: files as given, folders searched for ``*.json`` (sorted).

    Raises:
        HistoryError: a path does not exist, or nothing was found.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*.json") if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise HistoryError(f"{path}: no such file or folder (give the downloaded artifacts' folder "
                               "or the shards' --provision-report files)")
    if not found:
        raise HistoryError("no --provision-report JSON file found under "
                           + ", ".join(str(p) for p in paths))
    return found


def group_by_name(reports: Sequence[ShardReport]) -> dict[str, list[ShardReport]]:
    """Shards of one suite: the reports with the same file name, in start-time order."""
    groups: dict[str, list[ShardReport]] = {}
    for report in reports:
        groups.setdefault(report.source.name, []).append(report)
    for members in groups.values():
        members.sort(key=lambda r: (r.run["started_at"], r.run["run_id"]))
    return dict(sorted(groups.items()))


def merged_run_id(shards: Sequence[ShardReport]) -> str:
    """``m<earliest start>-<6 hex>``: deterministic in the shard run ids; a valid run id."""
    earliest = min(_dt.datetime.fromisoformat(s.run["started_at"]) for s in shards)
    digest = hashlib.sha256("\n".join(sorted(s.run["run_id"] for s in shards)).encode()).hexdigest()[:6]
    return earliest.astimezone(_dt.UTC).strftime("m%Y%m%d-%H%M%S-") + digest


def _one(shards: Sequence[ShardReport], field: str, name: str) -> Any:
    values = {s.run[field] for s in shards}  # type: ignore[literal-required]
    if len(values) > 1:
        where = "; ".join(f"{s.source}: {s.run[field]!r}" for s in shards)  # type: ignore[literal-required]
        raise HistoryError(f"{name}: the reports disagree on {field!r} ({where}) — shards of one run come "
                           "from one commit of one project; merge each run's shards separately")
    return values.pop()


def _distinct(values: Iterable[str | None]) -> str | None:
    seen = list(dict.fromkeys(v for v in values if v))
    return ", ".join(seen) or None


def _exit_status(statuses: Sequence[int]) -> int:
    ran = [s for s in statuses if s != NO_TESTS_COLLECTED]
    return max(ran) if ran else NO_TESTS_COLLECTED


_SPLIT_LABEL = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def split_of_label(label: str | None) -> dict[str, int] | None:
    """``{"group": i, "splits": N}`` for a shard label ``"i/N"`` (1 ≤ i ≤ N); None for any other."""
    match = _SPLIT_LABEL.match(label or "")
    if not match:
        return None
    group, splits = int(match[1]), int(match[2])
    return {"group": group, "splits": splits} if 1 <= group <= splits else None


def _split_of(shard: ShardReport) -> tuple[int, int] | None:
    split = shard.document.get("split")
    if isinstance(split, dict):
        group, splits = split.get("group"), split.get("splits")
        if isinstance(group, int) and isinstance(splits, int):
            return group, splits
    parsed = split_of_label(shard.run["shard"])
    return None if parsed is None else (parsed["group"], parsed["splits"])


def _shard_labels(shards: Sequence[ShardReport]) -> list[str]:
    """The shards' labels for the merged run's ``shard``: by group (``1/2, 2/2``) when every shard
    knows its place in the split, else in start order (a user's trial read ``2 shards: 2/2, 1/2``)."""
    splits = [_split_of(s) for s in shards]
    order = list(range(len(shards)))
    if all(split is not None for split in splits):
        order.sort(key=lambda i: splits[i] or (0, 0))
    return [shards[i].run["shard"] or shards[i].run["run_id"] for i in order]


def missing_shards(name: str, shards: Sequence[ShardReport]) -> list[str]:
    """The ``"i/N"`` labels of the groups of a split suite that are not among ``shards`` ([] when
    all are, or when the reports carry no split information).

    Raises:
        HistoryError: a file is given twice, some reports know their split and others do not, the
            reports disagree on N, or two reports are the same group (each message names the files).
    """
    given: dict[Path, Path] = {}
    for shard in shards:
        key = Path(shard.source).resolve()
        if key in given:
            raise HistoryError(f"{name}: {shard.source} is given twice (also as {given[key]}); pass each "
                               "shard's report once")
        given[key] = Path(shard.source)
    splits = {s.source: _split_of(s) for s in shards}
    known = {source: split for source, split in splits.items() if split is not None}
    if not known:
        return []
    if len(known) < len(shards):
        unknown = ", ".join(str(source) for source, split in splits.items() if split is None)
        raise HistoryError(f"{name}: {unknown} does not say which shard it is (no \"split\" in the report, "
                           "no \"i/N\" shard label) while the others do — is it a report of another run?")
    totals = {n for _group, n in known.values()}
    if len(totals) > 1:
        where = "; ".join(f"{source}: {g}/{n}" for source, (g, n) in known.items())
        raise HistoryError(f"{name}: the shards were split differently ({where}); merge the shards of one "
                           "run (one --splits) together")
    (total,) = totals
    seen: dict[int, Path] = {}
    for source, (group, _n) in known.items():
        if group in seen:
            raise HistoryError(f"{name}: shard {group}/{total} is in {seen[group]} and in {source} — the "
                               "same shard twice (two runs of the same group?)")
        seen[group] = source
    return [f"{group}/{total}" for group in range(1, total + 1) if group not in seen]


def merge_shards(name: str, shards: Sequence[ShardReport], *, allow_partial: bool = False) -> MergedRun:
    """The shards of one suite as one run (see the module docstring for every field).

    Raises:
        HistoryError: no shards; the shards disagree on project, revision or branch; one run id
            appears twice; a node id is in two shards (the message names both files); a shard of
            the split is missing and ``allow_partial`` is False (the message names it); see
            :func:`missing_shards`.
    """
    if not shards:
        raise HistoryError(f"{name}: no shard reports to merge")
    missing = missing_shards(name, shards)
    if missing and not allow_partial:
        have = ", ".join(f"{'/'.join(map(str, _split_of(s) or ()))} ({s.source})" for s in shards)
        raise HistoryError(
            f"{name}: shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing — merged would be "
            f"only {have}. Its tests and cost would be left out of the run: find why that shard job wrote "
            "no report (or re-run it), or pass --allow-partial to merge what is there and record the gap")
    for field in ("project", "revision", "branch"):
        _one(shards, field, name)
    seen_runs: dict[str, Path] = {}
    owner: dict[str, Path] = {}
    for shard in shards:
        if shard.run["run_id"] in seen_runs:
            raise HistoryError(f"{name}: run {shard.run['run_id']} is in {seen_runs[shard.run['run_id']]} "
                               f"and in {shard.source} — the same shard twice")
        seen_runs[shard.run["run_id"]] = shard.source
        for row in shard.tests:
            if row["node_id"] in owner:
                raise HistoryError(
                    f"{name}: test {row['node_id']!r} is in {owner[row['node_id']]} and in {shard.source} — "
                    "these are not shards of one suite (pytest-split's groups never overlap); merge "
                    "each matrix leg's reports separately (a different file name per leg)")
            owner[row["node_id"]] = shard.source
    run_id = merged_run_id(shards)
    tests: list[TestRow] = [{**row, "run_id": run_id} for s in shards for row in s.tests]
    tests.sort(key=lambda r: r["node_id"])
    first, runs = shards[0].run, [s.run for s in shards]
    started = min(runs, key=lambda r: _dt.datetime.fromisoformat(r["started_at"]))["started_at"]
    finished = max(runs, key=lambda r: _dt.datetime.fromisoformat(r["finished_at"]))["finished_at"]
    wall = (_dt.datetime.fromisoformat(finished) - _dt.datetime.fromisoformat(started)).total_seconds()
    counts = {k: sum(1 for t in tests if t["outcome"] == k) for k in TEST_OUTCOMES}
    sums: dict[str, Any] = {k: sum(r[k] for r in runs) for k in _SUMMED}  # type: ignore[literal-required]
    run = RunRow(
        run_id=run_id, started_at=started, finished_at=finished, duration_s=max(wall, 0.0),
        project=first["project"], revision=first["revision"], branch=first["branch"],
        host=_distinct(r["host"] for r in runs) or first["host"],
        ci_job=_distinct(r["ci_job"] for r in runs),
        shard=f"{len(shards)} shards: " + ", ".join(_shard_labels(shards))
        + (f" ({', '.join(missing)} missing)" if missing else ""),
        layers=list(dict.fromkeys(layer for r in runs for layer in r["layers"])),
        exit_status=_exit_status([r["exit_status"] for r in runs]), tests=len(tests),
        passed=counts["passed"], failed=counts["failed"], error=counts["error"], skipped=counts["skipped"],
        xfailed=counts["xfailed"], xpassed=counts["xpassed"], reruns=sum(t["reruns"] for t in tests),
        retained=[name for r in runs for name in r["retained"]],
        lm_calls=sums["lm_calls"], cost_usd=round(sums["cost_usd"], 10),
        list_cost_usd=round(sums["list_cost_usd"], 10), standin_calls=sums["standin_calls"],
        cache_hits=sums["cache_hits"], cache_misses=sums["cache_misses"], leaks=sums["leaks"],
        lm_refused=sums["lm_refused"], lm_rate_limit_wait_s=round(sums["lm_rate_limit_wait_s"], 3),
        lm_errors=sums["lm_errors"],
    )
    infos = [ShardInfo(source=str(s.source), run_id=s.run["run_id"], shard=s.run["shard"],
                       exit_status=s.run["exit_status"], tests=len(s.tests), cost_usd=s.run["cost_usd"],
                       list_cost_usd=s.run["list_cost_usd"], layers=s.document.get("layers") or {})
             for s in shards]
    return MergedRun(name=name, run=run, tests=tests, shards=infos, missing=missing)


def merge_reports(paths: Iterable[Path], *, allow_partial: bool = False) -> list[MergedRun]:
    """Every suite's shards under ``paths`` (files or folders), merged: one :class:`MergedRun` per
    report file name. Every file is read and every group checked before anything is returned, so a
    bad file means no merged run at all (the caller writes nothing).

    Raises:
        HistoryError: see :func:`find_reports`, :func:`read_shard` and :func:`merge_shards`.
    """
    reports = [read_shard(p) for p in find_reports(list(paths))]
    return [merge_shards(name, members, allow_partial=allow_partial)
            for name, members in group_by_name(reports).items()]


def write_merged(merged: Sequence[MergedRun], out_dir: Path) -> list[Path]:
    """Write each merged run to ``out_dir/<its file name>``; returns the paths.

    Raises:
        HistoryError: ``out_dir`` would overwrite one of the shard reports being merged.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = {Path(s["source"]).resolve() for m in merged for s in m.shards}
    targets = [out_dir / m.name for m in merged]
    for target in targets:
        if target.resolve() in sources:
            raise HistoryError(f"--out {out_dir}: writing {target.name} there would replace a shard report "
                               "being merged; choose another folder")
    for merged_run, target in zip(merged, targets, strict=True):
        target.write_text(json.dumps(merged_run.as_report(), indent=2) + "\n", encoding="utf-8")
    return targets
