"""Per-test and per-run rows from what pytest reports (duck-typed: no pytest import here).

The process that runs a test (the only one, or an xdist worker) attaches the test's LM usage and
leaks to its teardown report as ``user_properties`` (:func:`usage_properties`); those travel to the
xdist controller with the report — the path every test report takes — and into JUnit XML as test
properties. The controller's :class:`TestRowCollector` turns the reports into :class:`TestRow` s as
they arrive, so a worker process that dies loses no finished test's row (xdist reports the test it
was running as failed).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import socket
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from provisioner.history.store import TEST_OUTCOMES, RunRow, TestRow

PROPERTY_PREFIX = "provision_"
#: user_properties names (JUnit XML test properties) and the TestRow field each fills.
USAGE_PROPERTIES: dict[str, str] = {
    "provision_lm_calls": "",  # total, for JUnit readers; not a row field
    "provision_lm_mock": "lm_mock",
    "provision_lm_replayed": "lm_replayed",
    "provision_lm_recorded": "lm_recorded",
    "provision_lm_real": "lm_real",
    "provision_lm_standin": "lm_standin",
    "provision_cost_usd": "cost_usd",
    "provision_list_cost_usd": "list_cost_usd",
    "provision_cache_misses": "cache_misses",
    "provision_lm_refused": "lm_refused",  # refused by the run's cost or rate limit (not in the calls)
    "provision_lm_rate_limit_wait_s": "lm_rate_limit_wait_s",  # seconds waited for a rate-limit slot
    "provision_lm_errors": "lm_errors",  # LM calls that raised an error (not in the calls)
}
LEAKS_PROPERTY = "provision_leaks"
#: The test's bridge workers kept for debugging, and the worker logs saved for its failure report
#: (each "; "-separated; the TestRow fields ``retained`` and ``log_path``).
RETAINED_PROPERTY = "provision_retained"
WORKER_LOG_PROPERTY = "provision_worker_log"


def usage_properties(usage: Mapping[str, Any],
                     leaks: Iterable[tuple[str, str]] = ()) -> list[tuple[str, Any]]:
    """The test properties for an LM usage (``LMUsage.as_dict()`` keys: mock, replayed, recorded, real,
    standin, cost_usd, list_cost_usd, cache_misses, calls, refused_cost_limit, refused_rate_limit —
    those two summed into ``provision_lm_refused`` —, rate_limit_wait_s, errors) and the test's leaks
    (``(kind, name)``)."""
    props: list[tuple[str, Any]] = [
        ("provision_lm_calls", int(usage.get("calls", 0))),
        ("provision_lm_mock", int(usage.get("mock", 0))),
        ("provision_lm_replayed", int(usage.get("replayed", 0))),
        ("provision_lm_recorded", int(usage.get("recorded", 0))),
        ("provision_lm_real", int(usage.get("real", 0))),
        ("provision_lm_standin", int(usage.get("standin", 0))),
        ("provision_cost_usd", round(float(usage.get("cost_usd", 0.0)), 10)),
        ("provision_list_cost_usd", round(float(usage.get("list_cost_usd", 0.0)), 10)),
        ("provision_cache_misses", int(usage.get("cache_misses", 0))),
        ("provision_lm_refused",
         int(usage.get("refused_cost_limit", 0)) + int(usage.get("refused_rate_limit", 0))),
        ("provision_lm_rate_limit_wait_s", round(float(usage.get("rate_limit_wait_s", 0.0)), 3)),
        ("provision_lm_errors", int(usage.get("errors", 0))),
    ]
    found = [f"{kind} {name}" for kind, name in leaks]
    if found:
        props.append((LEAKS_PROPERTY, "; ".join(found)))
    return props


def worker_properties(retained: Iterable[str], logs: Iterable[str]) -> list[tuple[str, Any]]:
    """The test properties naming its retained workers and the worker logs saved for its failure report
    (none when there are none)."""
    props: list[tuple[str, Any]] = []
    kept, saved = "; ".join(retained), "; ".join(logs)
    if kept:
        props.append((RETAINED_PROPERTY, kept))
    if saved:
        props.append((WORKER_LOG_PROPERTY, saved))
    return props


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return _dt.datetime.fromtimestamp(timestamp, _dt.UTC).isoformat(timespec="milliseconds")


def empty_test_row(run_id: str, node_id: str, layer: str) -> TestRow:
    return TestRow(run_id=run_id, node_id=node_id, layer=layer, outcome="passed", reruns=0, started_at=None,
                   setup_s=0.0, call_s=0.0, teardown_s=0.0, xdist_worker=None, lm_mock=0, lm_replayed=0,
                   lm_recorded=0, lm_real=0, lm_standin=0, cost_usd=0.0, list_cost_usd=0.0, cache_hits=0,
                   cache_misses=0, leaks=[], retained=None, log_path=None, lm_refused=0,
                   lm_rate_limit_wait_s=0.0, lm_errors=0)


class TestRowCollector:
    """Builds one :class:`TestRow` per node id from pytest's ``TestReport`` s (in any process)."""

    __test__ = False  # not a pytest test class

    def __init__(self, run_id: str, layer: str) -> None:
        self.run_id = run_id
        self.layer = layer
        self.rows: dict[str, TestRow] = {}
        # Tests pytest gave an outcome: a call report, a setup that failed or skipped, a teardown
        # error, a crashed worker's report. A test with none (cut off by Ctrl-C in its call, or a
        # --setup-plan run that sets up and tears down without calling) is not a row.
        self.decided: set[str] = set()

    def logreport(self, report: Any) -> None:
        """Take one phase's report (``nodeid``, ``when``, ``outcome``, ``duration``, ``start``,
        ``user_properties``, ``wasxfail`` when xfail applies, ``node`` under xdist)."""
        node_id = str(report.nodeid)
        row = self.rows.get(node_id)
        if row is None:
            row = self.rows[node_id] = empty_test_row(self.run_id, node_id, self.layer)
        when = getattr(report, "when", None)
        outcome = str(report.outcome)
        duration = float(getattr(report, "duration", 0.0) or 0.0)
        # Under xdist the controller's report names the worker process's gateway: its id is
        # pytest-xdist's worker id (gw0, ...).
        xdist_worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", None)
        if xdist_worker is not None:
            row["xdist_worker"] = str(xdist_worker)
        if when == "call" or outcome == "rerun" or (when != "setup" and outcome == "failed") or (
            when == "setup" and outcome != "passed"
        ):
            self.decided.add(node_id)
        if outcome == "rerun":  # pytest-rerunfailures: this attempt failed and will run again
            row["reruns"] += 1
            row["setup_s"] = row["call_s"] = row["teardown_s"] = 0.0
            row["outcome"] = "passed"
            return
        if when == "setup":
            row["started_at"] = _iso(getattr(report, "start", None))
            row["setup_s"] = duration
            if outcome == "failed":
                row["outcome"] = "error"
            elif outcome == "skipped":
                row["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif when == "call":
            row["call_s"] = duration
            if outcome == "passed":
                row["outcome"] = "xpassed" if hasattr(report, "wasxfail") else "passed"
            elif outcome == "failed":
                row["outcome"] = "failed"
            else:
                row["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif when == "teardown":
            row["teardown_s"] = duration
            if outcome == "failed" and row["outcome"] in ("passed", "skipped", "xfailed", "xpassed"):
                row["outcome"] = "error"
            self._properties(row, getattr(report, "user_properties", ()) or ())
        elif outcome == "failed":  # xdist's report for a test whose worker process died
            row["outcome"] = "failed"

    @staticmethod
    def _properties(row: TestRow, properties: Iterable[Any]) -> None:
        for item in properties:
            try:
                name, value = item
            except (TypeError, ValueError):
                continue
            field = USAGE_PROPERTIES.get(str(name))
            if field:
                number = float(value) if field.endswith(("_usd", "_s")) else int(value)
                row[field] = number  # type: ignore[literal-required]
            elif name == LEAKS_PROPERTY:
                row["leaks"] = [part.split(" ", 1) for part in str(value).split("; ") if part]
            elif name == RETAINED_PROPERTY:
                row["retained"] = str(value)
            elif name == WORKER_LOG_PROPERTY:
                row["log_path"] = str(value)
        row["cache_hits"] = row["lm_replayed"]

    def add_leaks(self, leaks: Iterable[tuple[str, Iterable[tuple[str, str]]]]) -> None:
        """Leaks reported at the end by processes (``(test id, [(kind, name), ...])``), for tests whose
        teardown report did not carry them."""
        for node_id, found in leaks:
            row = self.rows.get(node_id)
            if row is not None and not row["leaks"]:
                row["leaks"] = [[kind, name] for kind, name in found]

    def test_rows(self) -> list[TestRow]:
        """The rows of the tests pytest gave an outcome, by node id (see ``decided``)."""
        return [self.rows[k] for k in sorted(self.rows) if k in self.decided]


def apply_ledger(rows: Iterable[TestRow], by_test: Mapping[str, Any]) -> None:
    """Set each row's ledger-kept numbers (replayed, recorded, real and stand-in calls, dollars, cache
    misses, calls the run's limits refused) from the run ledger read at the end of the run
    (``by_test``: node id -> ``LMUsage``, see :func:`provisioner.lm.ledger.usage_by_test`). A call a
    worker finished after its test had ended (the client timed out, the worker went on) is then the
    test's too, and the rows sum to the ledger; mock calls (never in the ledger) keep the test's own count."""
    for row in rows:
        usage = by_test.get(row["node_id"])
        row["lm_replayed"] = usage.replayed if usage else 0
        row["lm_recorded"] = usage.recorded if usage else 0
        row["lm_real"] = usage.real if usage else 0
        row["lm_standin"] = usage.standin if usage else 0
        row["cost_usd"] = round(usage.cost_usd, 10) if usage else 0.0
        row["list_cost_usd"] = round(usage.list_cost_usd, 10) if usage else 0.0
        row["cache_misses"] = usage.cache_misses if usage else 0
        row["lm_refused"] = usage.refused if usage else 0
        row["lm_rate_limit_wait_s"] = round(usage.rate_limit_wait_s, 3) if usage else 0.0
        # The test's own count has its mock errors too (never in the ledger); the ledger's has a
        # worker's failed call whose reply never reached the test: at least the larger of the two.
        row["lm_errors"] = max(row["lm_errors"], usage.errors if usage else 0)
        row["cache_hits"] = row["lm_replayed"]


def git_revision(project_dir: Path) -> tuple[str | None, str | None]:
    """``(revision, branch)`` of the git work tree at ``project_dir``; ``(None, None)`` outside git.

    A work tree with changes to tracked files is its own revision: ``<commit>+dirty.<first 12 hex
    digits of the sha256 of git diff HEAD>`` (untracked files are not part of it).
    """

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=project_dir, capture_output=True, timeout=30,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    revision = commit.strip()
    branch = (git("rev-parse", "--abbrev-ref", "HEAD") or "").strip() or None
    diff = git("diff", "HEAD", "--binary")
    if diff:
        revision += "+dirty." + hashlib.sha256(diff.encode("utf-8")).hexdigest()[:12]
    return revision, None if branch == "HEAD" else branch


def ci_identity(environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """``(ci_job, shard)`` from GitHub Actions' variables (``GITHUB_RUN_ID``/``GITHUB_JOB``,
    ``PROVISION_SHARD``) or ``CI_JOB_ID`` (GitLab); ``(None, None)`` outside CI."""
    env = os.environ if environ is None else environ
    job = None
    if env.get("GITHUB_RUN_ID"):
        job = f"{env['GITHUB_RUN_ID']}/{env.get('GITHUB_JOB', '')}".rstrip("/")
    elif env.get("CI_JOB_ID"):
        job = env["CI_JOB_ID"]
    return job, env.get("PROVISION_SHARD") or None


def run_row(*, run_id: str, started_at: str, project_dir: Path, layers: list[str], exit_status: int,
            tests: Iterable[TestRow], retained: Iterable[str] = (), cost_usd: float | None = None,
            list_cost_usd: float | None = None, finished_at: str | None = None,
            shard: str | None = None, lm_refused: int | None = None,
            lm_rate_limit_wait_s: float | None = None, lm_errors: int | None = None) -> RunRow:
    """A run row with totals over ``tests``. ``cost_usd``/``list_cost_usd``: the run ledger's totals
    when there is one (they also count calls outside any test); otherwise the tests' sums.
    ``shard``: the shard's label when ``PROVISION_SHARD`` does not set one (pytest-split's group);
    ``lm_refused``: LM calls the run's limits refused (the ledger's "refused" lines, also those
    outside any test); None: the tests' sum. ``lm_rate_limit_wait_s``: seconds the run's calls waited
    for a slot of its rate limit (the ledger's, also outside any test); None: the tests' sum.
    ``lm_errors``: LM calls that raised an error; None: the tests' sum."""
    rows = list(tests)
    finished = finished_at or now_iso()
    revision, branch = git_revision(project_dir)
    ci_job, shard_of_ci = ci_identity()
    shard = shard_of_ci or shard
    counts = {k: sum(1 for r in rows if r["outcome"] == k) for k in TEST_OUTCOMES}
    duration = (_dt.datetime.fromisoformat(finished) - _dt.datetime.fromisoformat(started_at)).total_seconds()
    return RunRow(
        run_id=run_id, started_at=started_at, finished_at=finished, duration_s=max(duration, 0.0),
        project=project_dir.name, revision=revision, branch=branch, host=socket.gethostname(),
        ci_job=ci_job, shard=shard, layers=layers, exit_status=exit_status, tests=len(rows),
        passed=counts["passed"], failed=counts["failed"], error=counts["error"], skipped=counts["skipped"],
        xfailed=counts["xfailed"], xpassed=counts["xpassed"], reruns=sum(r["reruns"] for r in rows),
        lm_calls=sum(row_lm_calls(r) for r in rows),
        cost_usd=round(sum(r["cost_usd"] for r in rows) if cost_usd is None else cost_usd, 10),
        list_cost_usd=round(sum(r["list_cost_usd"] for r in rows) if list_cost_usd is None
                            else list_cost_usd, 10),
        standin_calls=sum(r["lm_standin"] for r in rows), cache_hits=sum(r["cache_hits"] for r in rows),
        cache_misses=sum(r["cache_misses"] for r in rows), leaks=sum(len(r["leaks"]) for r in rows),
        retained=list(retained),
        lm_refused=sum(r["lm_refused"] for r in rows) if lm_refused is None else lm_refused,
        lm_rate_limit_wait_s=round(sum(r["lm_rate_limit_wait_s"] for r in rows)
                                   if lm_rate_limit_wait_s is None else lm_rate_limit_wait_s, 3),
        lm_errors=sum(r["lm_errors"] for r in rows) if lm_errors is None else lm_errors,
    )


def row_lm_calls(row: TestRow) -> int:
    """A test row's LM calls of every kind (stand-in calls are their own kind, never in ``lm_real``)."""
    return row["lm_mock"] + row["lm_replayed"] + row["lm_recorded"] + row["lm_real"] + row["lm_standin"]


def costliest_lines(tests: Iterable[TestRow], count: int) -> list[str]:
    """``--provision-costs N``: the N most expensive tests of the run, like pytest's ``--durations``
    (billed dollars first, then list-price dollars, then LM calls; ``count`` 0 lists every test with
    LM calls). Stand-in calls are billed $0 and shown apart."""
    spent = [t for t in tests if t["cost_usd"] or t["list_cost_usd"] or row_lm_calls(t)]
    spent.sort(key=lambda t: (-t["cost_usd"], -t["list_cost_usd"], -row_lm_calls(t), t["node_id"]))
    lines = []
    for t in spent[:count] if count else spent:
        by_kind = (("mock", t["lm_mock"]), ("replayed", t["lm_replayed"]), ("recorded", t["lm_recorded"]),
                   ("real", t["lm_real"]), ("standin", t["lm_standin"]))
        kinds = ", ".join(f"{name} {n}" + (" ($0)" if name == "standin" else "") for name, n in by_kind if n)
        calls = f"{row_lm_calls(t):>4} LM calls ({kinds or 'none'})"
        lines.append(f"${t['cost_usd']:.6f}  {calls}  {t['node_id']}")
    return lines
