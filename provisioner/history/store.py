"""The run history database: ``<state_dir>/history.sqlite`` (stdlib :mod:`sqlite3`).

WAL journal (readers never block the writer; one pytest controller writes per run), a versioned
schema: ``PRAGMA user_version`` is the number of :data:`MIGRATIONS` applied, each run in one
transaction on open, so an older database is upgraded in place and a newer one is refused.

A run row (:class:`RunRow`) and its test rows (:class:`TestRow`) are written together in one
transaction by :meth:`History.record` — a run is in the history whole or not at all; recording the
same run id again (``provision history import`` of a CI artifact) replaces it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict, cast

from provisioner.errors import HistoryError

HISTORY_FILE = "history.sqlite"

#: Outcomes of a test row: pytest's, plus ``error`` (setup/teardown failed) and ``rerun`` counts.
TEST_OUTCOMES: tuple[str, ...] = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


class RunRow(TypedDict):
    """One pytest run. Times are ISO 8601 UTC strings; durations seconds; money US dollars billed
    (stand-in calls $0); counts are over the run's test rows."""

    run_id: str
    started_at: str
    finished_at: str
    duration_s: float
    project: str
    revision: str | None  # git commit, or "<commit>+dirty.<hash of the diff>" for a changed work tree
    branch: str | None
    host: str
    ci_job: str | None  # e.g. GITHUB_JOB / GITHUB_RUN_ID
    shard: str | None  # e.g. the xdist worker count or a CI matrix leg
    layers: list[str]
    exit_status: int
    tests: int
    passed: int
    failed: int
    error: int
    skipped: int
    xfailed: int
    xpassed: int
    reruns: int
    lm_calls: int
    cost_usd: float
    list_cost_usd: float  # every call at list prices (stand-in calls included): what cost limits count
    standin_calls: int
    cache_hits: int
    cache_misses: int
    leaks: int
    retained: list[str]
    lm_refused: int  # LM calls the run's cost or rate limit refused before sending (not in lm_calls)
    # Seconds the run's LM calls waited for a slot of lm.rate_limit_rpm (summed over calls, so it can
    # pass duration_s under xdist): time spent waiting, not working.
    lm_rate_limit_wait_s: float
    lm_errors: int  # LM calls that raised an error (sent and failed, or a mock rule's injected error)


class TestRow(TypedDict):
    """One test of one run (its last attempt when it was rerun). Durations in seconds per phase;
    LM calls by kind (``lm_standin``: direct calls the Gemini stand-in answered, $0; never in ``lm_real``);
    ``cache_hits`` = replayed calls; ``leaks`` = what the leak check found (``[kind, name]`` pairs)."""

    run_id: str
    node_id: str
    layer: str
    outcome: str
    reruns: int
    started_at: str | None
    setup_s: float
    call_s: float
    teardown_s: float
    # pytest-xdist's worker id (gw0, gw1, ...: its ``worker_id`` fixture, ``PYTEST_XDIST_WORKER``) of
    # the pytest process that ran it; None in a single process. Not a bridge worker container.
    # Called ``worker`` before schema version 2 (old report files are read with either name).
    xdist_worker: str | None
    lm_mock: int
    lm_replayed: int
    lm_recorded: int
    lm_real: int
    lm_standin: int
    cost_usd: float
    list_cost_usd: float
    cache_hits: int
    cache_misses: int
    leaks: list[list[str]]
    retained: str | None  # the bridge workers kept for debugging ("; "-separated), if any
    log_path: str | None  # the worker logs saved for its failure report ("; "-separated), if any
    lm_refused: int  # LM calls the run's cost or rate limit refused before sending (not in the lm_* kinds)
    lm_rate_limit_wait_s: float  # of its time, seconds its LM calls waited for a slot of lm.rate_limit_rpm
    lm_errors: int  # its LM calls that raised an error (not in the lm_* kinds)


_RUN_JSON = ("layers", "retained")
_TEST_JSON = ("leaks",)

#: Migration n (1-based) brings the schema from version n-1 to n. Append; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT NOT NULL,
        duration_s REAL NOT NULL, project TEXT NOT NULL, revision TEXT, branch TEXT, host TEXT NOT NULL,
        ci_job TEXT, shard TEXT, layers TEXT NOT NULL, exit_status INTEGER NOT NULL,
        tests INTEGER NOT NULL, passed INTEGER NOT NULL, failed INTEGER NOT NULL, error INTEGER NOT NULL,
        skipped INTEGER NOT NULL, xfailed INTEGER NOT NULL, xpassed INTEGER NOT NULL,
        reruns INTEGER NOT NULL, lm_calls INTEGER NOT NULL, cost_usd REAL NOT NULL,
        list_cost_usd REAL NOT NULL, standin_calls INTEGER NOT NULL, cache_hits INTEGER NOT NULL,
        cache_misses INTEGER NOT NULL, leaks INTEGER NOT NULL, retained TEXT NOT NULL
    );
    CREATE INDEX runs_started ON runs (started_at);
    CREATE TABLE tests (
        run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE, node_id TEXT NOT NULL,
        layer TEXT NOT NULL, outcome TEXT NOT NULL, reruns INTEGER NOT NULL, started_at TEXT,
        setup_s REAL NOT NULL, call_s REAL NOT NULL, teardown_s REAL NOT NULL, worker TEXT,
        lm_mock INTEGER NOT NULL, lm_replayed INTEGER NOT NULL, lm_recorded INTEGER NOT NULL,
        lm_real INTEGER NOT NULL, lm_standin INTEGER NOT NULL, cost_usd REAL NOT NULL,
        list_cost_usd REAL NOT NULL, cache_hits INTEGER NOT NULL, cache_misses INTEGER NOT NULL,
        leaks TEXT NOT NULL, retained TEXT, log_path TEXT,
        PRIMARY KEY (run_id, node_id)
    );
    CREATE INDEX tests_node ON tests (node_id);
    """,
    # 2: "worker" was read as the bridge worker container; it is pytest-xdist's worker id.
    """
    ALTER TABLE tests RENAME COLUMN worker TO xdist_worker;
    """,
    # 3: calls the run's limits refused were counted nowhere a user looks.
    """
    ALTER TABLE runs ADD COLUMN lm_refused INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: ... and per test: which tests the limits stopped (the run row had only the total).
    """
    ALTER TABLE tests ADD COLUMN lm_refused INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: time LM calls waited for the rate limit looked like slow tests.
    """
    ALTER TABLE runs ADD COLUMN lm_rate_limit_wait_s REAL NOT NULL DEFAULT 0;
    ALTER TABLE tests ADD COLUMN lm_rate_limit_wait_s REAL NOT NULL DEFAULT 0;
    """,
    # 6: LM calls that failed (a 429 or 5xx after every retry) left no count a user sees.
    """
    ALTER TABLE runs ADD COLUMN lm_errors INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tests ADD COLUMN lm_errors INTEGER NOT NULL DEFAULT 0;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

RUN_FIELDS: tuple[str, ...] = tuple(RunRow.__annotations__)
TEST_FIELDS: tuple[str, ...] = tuple(TestRow.__annotations__)
# Column names are the constants above; every value is a bound parameter.
_INSERT_RUN = f"INSERT INTO runs ({', '.join(RUN_FIELDS)}) VALUES ({', '.join('?' for _ in RUN_FIELDS)})"  # noqa: S608
_INSERT_TEST = (f"INSERT OR REPLACE INTO tests ({', '.join(TEST_FIELDS)}) "  # noqa: S608
                f"VALUES ({', '.join('?' for _ in TEST_FIELDS)})")


def _row(data: sqlite3.Row, json_fields: Iterable[str]) -> dict[str, Any]:
    out = dict(data)
    for name in json_fields:
        out[name] = json.loads(out[name]) if out[name] is not None else []
    return out


class History:
    """The history database at ``path`` (created with its directory when missing).

    Raises:
        HistoryError: the file was written by a newer provisioner (schema version above
            :data:`SCHEMA_VERSION`), or is not an SQLite database.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise HistoryError(f"{self.path}: not a provisioner history database ({exc}); move it away "
                               "and a new one is created") from None
        except HistoryError:
            self._db.close()
            raise

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise HistoryError(f"{self.path} has schema version {version}, newer than this provisioner's "
                               f"{SCHEMA_VERSION}: upgrade provisioner to read it")
        for number in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction():
                again = int(self._db.execute("PRAGMA user_version").fetchone()[0])
                if again >= number:  # another process migrated meanwhile
                    continue
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    # -- writing -------------------------------------------------------------------------------------

    def record(self, run: RunRow, tests: Iterable[TestRow], *, replaces: Iterable[str] = ()) -> int:
        """Write a run and its tests in one transaction (replacing a run recorded before under its id).

        ``replaces``: run ids this run stands for, deleted in the same transaction — the shards of a
        merged run (:mod:`provisioner.history.merge`), which would otherwise count twice. Returns how
        many of them were in the history.

        Raises:
            HistoryError: a row misses a field (the message names it).
        """
        rows = list(tests)
        run_values = _values(run, RUN_FIELDS, _RUN_JSON, "run")
        test_values = [_values(row, TEST_FIELDS, _TEST_JSON, f"test {row.get('node_id')!r}") for row in rows]
        replaced = 0
        with self._transaction():
            for old in replaces:
                if old != run["run_id"]:
                    replaced += self._db.execute("DELETE FROM runs WHERE run_id = ?", (old,)).rowcount
            self._db.execute("DELETE FROM runs WHERE run_id = ?", (run["run_id"],))
            self._db.execute(_INSERT_RUN, run_values)
            self._db.executemany(_INSERT_TEST, test_values)
        return replaced

    def prune(self, keep: int) -> int:
        """Keep the ``keep`` newest runs (by start time); returns how many runs were deleted."""
        if keep < 0:
            raise HistoryError(f"--keep must be 0 or more, got {keep}")
        with self._transaction():
            cursor = self._db.execute(
                "DELETE FROM runs WHERE run_id NOT IN "
                "(SELECT run_id FROM runs ORDER BY started_at DESC, run_id DESC LIMIT ?)", (keep,))
            deleted = cursor.rowcount
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    # -- reading -------------------------------------------------------------------------------------

    def runs(self, limit: int | None = None) -> list[RunRow]:
        """Runs, newest first."""
        query = "SELECT * FROM runs ORDER BY started_at DESC, run_id DESC"
        params: tuple[Any, ...] = ()
        if limit is not None:
            query += " LIMIT ?"
            params = (limit,)
        return [_row(r, _RUN_JSON) for r in self._db.execute(query, params)]  # type: ignore[misc]

    def run(self, run_id: str) -> RunRow | None:
        """The run with this id, or the only one whose id starts with it; ``None`` if there is none.

        Raises:
            HistoryError: the prefix names several runs.
        """
        found = self._db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchall()
        if not found:
            found = self._db.execute("SELECT * FROM runs WHERE run_id LIKE ? ESCAPE '\\' LIMIT 6",
                                     (run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                                      + "%",)).fetchall()
        if len(found) > 1:
            names = ", ".join(r["run_id"] for r in found[:5])
            raise HistoryError(f"run {run_id!r} is ambiguous: {names}, ... — give more of the id")
        return _row(found[0], _RUN_JSON) if found else None  # type: ignore[return-value]

    def tests(self, run_id: str) -> list[TestRow]:
        """The test rows of a run, in node id order."""
        rows = self._db.execute("SELECT * FROM tests WHERE run_id = ? ORDER BY node_id", (run_id,))
        return [_row(r, _TEST_JSON) for r in rows]  # type: ignore[misc]

    def test_rows(self, run_ids: Iterable[str]) -> list[TestRow]:
        """The test rows of these runs (any order)."""
        ids = list(run_ids)
        out: list[TestRow] = []
        for start in range(0, len(ids), 500):  # below SQLite's bound-parameter limit
            chunk = ids[start:start + 500]
            marks = ", ".join("?" for _ in chunk)  # placeholders only; the values are bound
            rows = self._db.execute(f"SELECT * FROM tests WHERE run_id IN ({marks})", chunk)  # noqa: S608
            out.extend(_row(r, _TEST_JSON) for r in rows)  # type: ignore[misc]
        return out


def _values(row: Any, fields: tuple[str, ...], json_fields: tuple[str, ...], what: str) -> list[Any]:
    values = []
    for name in fields:
        if name not in row:
            raise HistoryError(f"{what}: missing field {name!r}")
        value = row[name]
        values.append(json.dumps(value) if name in json_fields else value)
    return values


#: Test row fields of older report files: old name -> the name now.
RENAMED_TEST_FIELDS = {"worker": "xdist_worker"}


def _renamed(row: Any) -> Any:
    """A test row of an older report file with today's field names (a copy; others as they are)."""
    if not isinstance(row, dict) or not any(old in row for old in RENAMED_TEST_FIELDS):
        return row
    out = dict(row)
    for old, new in RENAMED_TEST_FIELDS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def merged_shard_ids(data: Any) -> list[str]:
    """The shard run ids a merged report (``provision history merge``) stands for; [] for any other."""
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, list):
        return []
    return [str(s["run_id"]) for s in shards if isinstance(s, dict) and s.get("run_id")]


def rows_from_report(data: Any, source: str) -> tuple[RunRow, list[TestRow]]:
    """The run and test rows of a ``--provision-report`` JSON document (its ``run`` and ``tests`` keys).

    Raises:
        HistoryError: the document has no run row (written by a provisioner before the history) or a
            row misses a field; the message names ``source`` and the field.
    """
    if not isinstance(data, dict) or not isinstance(data.get("run"), dict):
        raise HistoryError(f"{source}: no 'run' object — not a --provision-report JSON file of a provisioner "
                           "with run history (re-run the tests with this version to get one)")
    # Reports written before a column: none counted (lm_refused: version 3; rate-limit wait: 5;
    # lm_errors: 6).
    run = cast(RunRow, {"lm_refused": 0, "lm_rate_limit_wait_s": 0.0, "lm_errors": 0, **data["run"]})
    tests = data.get("tests") or []
    if not isinstance(tests, list):
        raise HistoryError(f"{source}: 'tests' must be a list of test rows")
    # Rows of reports written before a field existed: none counted (lm_refused: schema version 4).
    tests = [{"lm_refused": 0, "lm_rate_limit_wait_s": 0.0, "lm_errors": 0, **_renamed(row)}
             if isinstance(row, dict) else row for row in tests]
    for name in RUN_FIELDS:
        if name not in run:
            raise HistoryError(f"{source}: run row misses field {name!r}")
    for index, row in enumerate(tests):
        missing = [name for name in TEST_FIELDS if name not in row]
        if missing:
            raise HistoryError(f"{source}: tests[{index}] misses field {missing[0]!r}")
        if row["run_id"] != run["run_id"]:
            raise HistoryError(f"{source}: tests[{index}] belongs to run {row['run_id']!r}, not "
                               f"{run['run_id']!r}")
    return run, tests
