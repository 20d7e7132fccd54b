"""``provision report html``: the history as one self-contained page (``index.html``).

No network: the CSS is inline and the charts are SVG rendered by pygal (LGPL-3.0-or-later) on the
host and embedded in the page, with pygal's optional tooltip script turned off (``js=[]``: it would
load from a CDN). Every number is also in an HTML table, so the page reads without JavaScript — it
has none. What each number means: docs/reporting.md.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from provisioner._files import atomic_write
from provisioner.history.analysis import TestSummary
from provisioner.history.store import RunRow, TestRow
from provisioner.lm.pricing import format_cost as _usd
from provisioner.reporting.dashboard import Dashboard, pass_rate, run_ended

PAGE_FILE = "index.html"
_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script>", re.DOTALL)

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;color:#1d2733}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ccd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{padding:.25em .6em;border-bottom:1px solid #e3e6ea;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:12px}.tiles{display:flex;flex-wrap:wrap;gap:.8em}.tile{border:1px solid #ccd;border-radius:6px;
padding:.5em .9em;min-width:8em}.tile b{display:block;font-size:1.5em}
.passed{color:#1a7f37}.failed,.error{color:#c62828}
.skipped,.xfailed,.xpassed{color:#8a6d00}.strip span{display:inline-block;width:1.1em;text-align:center}
.over{color:#c62828;font-weight:bold}.muted{color:#667}.charts{display:flex;flex-wrap:wrap;gap:1em}
.charts figure{margin:0;width:380px}
.worker-log pre{font-size:11px;max-width:640px;overflow-x:auto;background:#f6f8fa;padding:.4em}
"""

_MARK = {
    "passed": "✓",
    "failed": "✗",
    "error": "E",
    "skipped": "s",
    "xfailed": "x",
    "xpassed": "X",
    None: "·",
}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    table_id: str,
    numeric: frozenset[int] | set[int] = frozenset(),
    empty: str = "none",
) -> str:
    """``rows`` are already-escaped cell HTML."""
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    if not body:
        return f'<p id="{table_id}" class="muted">{_e(empty)}</p>'
    head = "".join(
        f'<th class="n">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>" for i, h in enumerate(headers)
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


#: At most this many x labels per chart (evenly spaced, pygal's ``x_labels_major_count``), rotated
#: by :data:`X_LABEL_ROTATION` degrees: 31 runs' "MM-DD HH:MM" labels at every 5th overlapped in a
#: 380 px chart. And at most about this many y ticks (pygal's ``max_scale``): pass rates 85-100 got
#: 16 ticks whose labels overlapped.
X_LABELS_SHOWN = 5
X_LABEL_ROTATION = 40
Y_TICKS_MAX = 5


def usd_tick(value: float) -> str:
    """A dollar amount for an axis: as many decimals as its first two significant digits need,
    never exponent notation (``1.8e-06`` → ``$0.0000018``, ``0.25`` → ``$0.25``, ``12`` → ``$12``)."""
    import math

    if value == 0 or not math.isfinite(value):
        return "$0"
    decimals = max(0, 1 - math.floor(math.log10(abs(value))))
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return ("-$" + text[1:]) if text.startswith("-") else "$" + text


def _number_tick(value: float) -> str:
    return f"{value:g}"


def _chart(kind: str, title: str, labels: list[str], series: dict[str, list[float | None]], *,
           usd: bool = False) -> str:
    """One pygal chart as inline SVG. ``usd``: the y axis is dollars (:func:`usd_tick`). The title is
    drawn in the SVG (and is its ``<title>``): no caption repeats it."""
    import pygal
    from pygal.style import CleanStyle

    chart_type = pygal.Bar if kind == "bar" else pygal.Line
    chart = chart_type(
        js=[],
        disable_xml_declaration=True,
        width=380,
        height=220,
        style=CleanStyle,
        show_legend=len(series) > 1,
        legend_at_bottom=True,
        x_label_rotation=X_LABEL_ROTATION,
        x_labels_major_count=min(X_LABELS_SHOWN, len(labels)),
        show_minor_x_labels=False,
        truncate_label=12,
        min_scale=3,
        max_scale=Y_TICKS_MAX,
        value_formatter=usd_tick if usd else _number_tick,
        title=title,
        print_values=False,
    )
    chart.x_labels = labels
    for name, values in series.items():
        chart.add(name, values)
    # pygal always writes an inline <script> with its config for the tooltip script we do not load
    # (it would come from a CDN): drop it, so the page has no script at all and a strict CSP.
    svg = _SCRIPT.sub("", chart.render(is_unicode=True))
    return f'<figure aria-label="{_e(title)}">{svg}</figure>'


def _duration(row: TestRow) -> float:
    return row["setup_s"] + row["call_s"] + row["teardown_s"]


def _last_run(board: Dashboard) -> str:
    run = board.last
    if run is None:
        return '<p id="last-run">No runs recorded yet: run pytest with provisioner in this project.</p>'
    tiles = [
        ("tests", run["tests"]),
        ("passed", run["passed"]),
        ("failed", run["failed"]),
        ("error", run["error"]),
        ("skipped", run["skipped"]),
        ("duration", f"{run['duration_s']:.1f} s"),
        ("cost", _usd(run["cost_usd"])),
        ("LM calls", run["lm_calls"]),
        ("leaks", run["leaks"]),
    ]
    tile_html = "".join(
        f'<div class="tile {_e(k)}" data-name="{_e(k)}"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in tiles
    )
    facts = (
        f"run <code>{_e(run['run_id'])}</code> · layers {_e(', '.join(run['layers']))} · "
        f"revision <code>{_e((run['revision'] or 'none')[:24])}</code>"
        f"{' on ' + _e(run['branch']) if run['branch'] else ''} · host {_e(run['host'])} · "
        f"started {_e(run['started_at'][:19])} UTC · exit status {run['exit_status']}"
    )
    standin = ""
    if run["standin_calls"]:
        standin = (
            f'<p id="standin" data-standin-calls="{run["standin_calls"]}" '
            f'data-cost-usd="{run["cost_usd"]!r}" data-list-cost-usd="{run["list_cost_usd"]!r}">'
            f"{run['standin_calls']} {'LM call was' if run['standin_calls'] == 1 else 'LM calls were'} "
            "answered "
            f"by the Gemini stand-in: billed $0; at list prices the run's calls came to "
            f"{_usd(run['list_cost_usd'])}, which is what its cost limit counted.</p>"
        )
    refused_calls = run.get("lm_refused") or 0
    if refused_calls:
        standin += (
            f'<p id="refused" data-lm-refused="{refused_calls}">{refused_calls} LM '
            f"call{'s were' if refused_calls != 1 else ' was'} refused by the run's cost or rate limit "
            "before being sent (not among the LM calls above): the tests that needed them failed or "
            "got an error.</p>"
        )
        stopped = [r for r in board.last_tests if r.get("lm_refused")]
        if stopped:
            standin += _table(["test", "LM calls refused"],
                              ([_e(r["node_id"]), str(r["lm_refused"])] for r in stopped),
                              table_id="refused-tests", numeric={1}, empty="")
    problems = [r for r in board.last_tests if r["outcome"] in ("failed", "error")]
    failed = _table(
        ["test", "outcome", "duration s", "xdist worker",
         "bridge worker log (last lines, saved at the failure)"],
        (
            [
                _e(r["node_id"]),
                f'<span class="{_e(r["outcome"])}">{_e(r["outcome"])}</span>',
                f"{_duration(r):.3f}",
                _e(r["xdist_worker"] or "-"),
                _worker_logs(board, r),
            ]
            for r in problems
        ),
        table_id="last-failures",
        numeric={2},
        empty="no failures",
    )
    retained = "".join(f"<li><code>{_e(x)}</code></li>" for x in run["retained"])
    retained_html = (
        "<p>Workers retained for debugging (their last log lines are with the failed test above):</p>"
        f"<ul id='retained'>{retained}</ul>" if retained else ""
    )
    return (
        f'<section id="last-run"><h2>Last run</h2><p>{facts}</p><div class="tiles">{tile_html}</div>'
        f"{standin}<h3>Failures</h3>{failed}{retained_html}</section>"
    )


def _worker_logs(board: Dashboard, row: TestRow) -> str:
    """The saved worker logs of a failed test: path, retained worker, and the last lines (or why not)."""
    if not row["log_path"]:
        return '<span class="muted">-</span>'
    parts = []
    kept = f' · retained: <code>{_e(row["retained"])}</code>' if row["retained"] else ""
    for path in row["log_path"].split("; "):
        tail = board.log_tails.get(path) or []
        lines = (f"<pre>{_e(chr(10).join(tail))}</pre>" if tail
                 else '<p class="muted">(not on this machine, or empty)</p>')
        parts.append(f'<details class="worker-log" data-log-path="{_e(path)}"><summary><code>{_e(path)}'
                     f"</code>{kept}</summary>{lines}</details>")
    return "".join(parts)


def _trends(board: Dashboard, runs: list[RunRow]) -> str:
    recent = runs[-50:]
    labels = [r["started_at"][5:16].replace("T", " ") for r in recent]
    charts = "".join(
        [
            _chart("line", "pass rate %", labels, {"pass rate": [pass_rate(r) for r in recent]}),
            _chart(
                "line", "suite duration s", labels, {"duration": [round(r["duration_s"], 2) for r in recent]}
            ),
            _chart("line", "cost per run", labels, {"cost": [r["cost_usd"] for r in recent]}, usd=True),
        ]
    )
    rows = (
        [
            _e(r["run_id"]),
            _e(r["started_at"][:19]),
            f"{r['passed']}/{r['tests']}",
            _e(run_ended(r)),
            "-" if pass_rate(r) is None else f"{pass_rate(r):.1f}",
            f"{r['duration_s']:.1f}",
            f'<span data-cost-usd="{r["cost_usd"]!r}">{_usd(r["cost_usd"])}</span>',
            str(r["lm_calls"]),
            f'<span data-lm-refused="{int(r["lm_refused"])}">{int(r["lm_refused"])}</span>',
            str(r["leaks"]),
        ]
        for r in reversed(recent)
    )
    # "LM refused": calls the run's cost or rate limit stopped before they were sent (not in "LM
    # calls"), the column `provision history list` shows under the same name.
    table = _table(
        ["run", "started (UTC)", "passed", "ended", "pass rate %", "duration s", "cost", "LM calls",
         "LM refused", "leaks"],
        rows,
        table_id="runs",
        numeric={2, 4, 5, 6, 7, 8, 9},
    )
    return (
        f'<section id="trends"><h2>Trends (last {len(recent)} runs)</h2><div class="charts">{charts}</div>'
        f"{table}</section>"
    )


def _flaky(board: Dashboard) -> str:
    rows = []
    for flaky in board.flaky:
        strip = "".join(
            f'<span class="{_e(o or "absent")}" title="{_e(run_id)}: {_e(o or "not run")}">'
            f"{_MARK.get(o, '?')}</span>"
            for run_id, o in flaky.strip[-40:]
        )
        rows.append(
            [
                f'<span data-node-id="{_e(flaky.node_id)}">{_e(flaky.node_id)}</span>',
                _e("; ".join(flaky.reasons)),
                f'<span class="strip">{strip}</span>',
            ]
        )
    table = _table(
        ["test", "why", "history (oldest → newest; ✓ passed ✗ failed E error s skipped · not run)"],
        rows,
        table_id="flaky",
        empty="no flaky tests in these runs",
    )
    return (
        f'<section id="flaky-tests"><h2>Flaky tests ({len(board.flaky)})</h2><p class="muted">Both outcomes '
        "on the same revision (a changed work tree is its own revision), or passed on a rerun. A failure "
        "whose LM calls the run's cost or rate limit refused is not counted: its cause is the limit; nor "
        "is one whose cassette miss failed it (e.g. after an lm.mock_rules change).</p>"
        f"{table}</section>"
    )


def _slowest(board: Dashboard) -> str:
    # "of which rate-limit wait s": the part of the mean its LM calls waited for a slot of
    # lm.rate_limit_rpm — a test slow only because it waited is not slow code.
    rows = ([_e(t.node_id), f"{t.mean_s:.3f}",
             f'<span data-rate-limit-wait-s="{t.mean_rate_limit_wait_s:.3f}">'
             f"{t.mean_rate_limit_wait_s:.1f}</span>", f"{t.max_s:.3f}", str(t.runs)]
            for t in board.slowest())
    waited = any(t.rate_limit_wait_s for t in board.slowest())
    note = ("<p>Part of these tests' time was their LM calls waiting for a slot of the run's rate limit "
            "(lm.rate_limit_rpm), not working: see the column.</p>") if waited else ""
    return (
        '<section id="slowest-tests"><h2>Slowest tests</h2>' + note
        + _table(["test", "mean s", "of which rate-limit wait s", "max s", "runs"], rows, table_id="slowest",
                 numeric={1, 2, 3, 4})
        + "</section>"
    )


def _cost(board: Dashboard) -> str:
    budget = board.budget_usd
    month_rows = []
    for m in board.months:
        over = ' class="over"' if m.over_budget else ""
        month_rows.append(
            [
                _e(m.month),
                str(m.runs),
                f'<span data-cost-usd="{m.cost_usd!r}">{_usd(m.cost_usd)}</span>',
                f"<span{over}>{_usd(m.forecast_usd)}</span>",
                "-" if budget is None else _usd(budget),
            ]
        )
    months = _table(
        ["month", "runs", "spent", "forecast", "monthly budget"],
        month_rows,
        table_id="months",
        numeric={1, 2, 3, 4},
        empty="no runs",
    )
    recent = board.months[-12:]
    chart = ""
    if recent:
        series: dict[str, list[float | None]] = {
            "spent": [m.cost_usd for m in recent],
            "forecast": [m.forecast_usd for m in recent],
        }
        if budget is not None:
            series["budget"] = [budget for _ in recent]
        svg = _chart("bar", "cost per month", [m.month for m in recent], series, usd=True)
        chart = f'<div class="charts">{svg}</div>'
    test_rows = (
        [
            f'<span data-node-id="{_e(t.node_id)}">{_e(t.node_id)}</span>',
            f'<span data-cost-usd="{t.cost_usd!r}">{_usd(t.cost_usd)}</span>',
            _usd(t.cost_usd / t.runs if t.runs else 0.0),
            f'<span data-list-cost-usd="{t.list_cost_usd!r}">{_usd(t.list_cost_usd)}</span>',
            str(t.lm_calls),
            f'<span data-standin-calls="{t.standin_calls}">{t.standin_calls}</span>',
            str(t.runs),
        ]
        for t in board.costliest()
    )
    tests = _table(
        ["test", "billed (all runs shown)", "billed per run", "at list prices (what cost limits count)",
         "LM calls", "stand-in calls ($0 billed)", "runs"],
        test_rows,
        table_id="cost-per-test",
        numeric={1, 2, 3, 4, 5, 6},
        empty="no LM calls",
    )
    current = board.current_month
    headline = ""
    if current is not None:
        over = " — over the budget" if current.over_budget else ""
        headline = (
            f"<p id='month-forecast'>This month: {_usd(current.cost_usd)} spent, forecast "
            f"{_usd(current.forecast_usd)}"
            f"{'' if budget is None else ' of the ' + _usd(budget) + ' monthly budget'}{over}.</p>"
        )
    return (
        f'<section id="cost"><h2>Cost</h2>{headline}{chart}<h3>Per month</h3>{months}'
        f"<h3>Per test</h3>{tests}</section>"
    )


def _cache(board: Dashboard) -> str:
    def ratio(t: TestSummary) -> str:
        value = t.hit_ratio
        return "-" if value is None else f"{100 * value:.1f}"

    rows = ([_e(t.node_id), str(t.cache_hits), str(t.cache_misses), ratio(t)] for t in board.cache_tests())
    hits = sum(t.cache_hits for t in board.tests.values())
    misses = sum(t.cache_misses for t in board.tests.values())
    overall = f"{100 * hits / (hits + misses):.1f} %" if hits + misses else "no cassette lookups"
    return (
        f'<section id="cache"><h2>LM cache</h2><p>Hit ratio over these runs: {_e(overall)} '
        f"({hits} replayed, {misses} misses).</p>"
        + _table(
            ["test", "hits", "misses", "hit ratio %"],
            rows,
            table_id="cache-per-test",
            numeric={1, 2, 3},
            empty="no cached LM calls",
        )
        + "</section>"
    )


def _leaks(board: Dashboard) -> str:
    rows = ([_e(t.node_id), str(t.leaks), str(t.runs)] for t in board.leaky())
    return (
        '<section id="leaks"><h2>Leaks</h2>'
        + _table(
            ["test", "leaks found", "runs"],
            rows,
            table_id="leaks-per-test",
            numeric={1, 2},
            empty="no leaks found",
        )
        + "</section>"
    )


def render(board: Dashboard, *, title: str = "provisioner test report") -> str:
    """The whole page as one string (UTF-8 HTML, no external resources)."""
    body = "".join(
        [
            _last_run(board),
            _trends(board, board.runs),
            _flaky(board),
            _slowest(board),
            _cost(board),
            _cache(board),
            _leaks(board),
        ]
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" "
        "content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"
        f'<p class="muted">{len(board.runs)} runs · generated {_e(board.generated_at)}</p>'
        f"{body}</body></html>\n"
    )


def write_page(board: Dashboard, out_dir: Path) -> tuple[Path, float]:
    """Write ``<out_dir>/index.html``; returns its path and the render time in seconds."""
    started = time.perf_counter()
    page = render(board)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PAGE_FILE
    atomic_write(path, page)
    return path, time.perf_counter() - started
