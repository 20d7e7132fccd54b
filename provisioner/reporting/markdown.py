"""``provision report markdown``: the page's headline numbers and top tables as GitHub-flavoured
Markdown (for ``$GITHUB_STEP_SUMMARY``). Same :class:`~provisioner.reporting.dashboard.Dashboard`.
:func:`render_merged` is the summary of a sharded CI run's merged reports."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from provisioner.history.merge import MergedRun
from provisioner.lm.pricing import format_cost as _usd
from provisioner.reporting.dashboard import Dashboard, pass_rate


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    body = [f"| {' | '.join(_cell(c) for c in row)} |" for row in rows]
    if not body:
        return ["_none_"]
    return [f"| {' | '.join(headers)} |", f"|{'|'.join('---' for _ in headers)}|", *body]


def render(board: Dashboard, *, top: int = 10) -> str:
    """Headline of the newest run, this month's cost and forecast, flaky, failed, slowest and costliest."""
    run = board.last
    if run is None:
        return "## provisioner\n\nNo runs recorded yet.\n"
    rate = pass_rate(run)
    lines = [
        f"## provisioner: run `{run['run_id']}`",
        "",
        f"**{run['passed']} passed, {run['failed']} failed, {run['error']} errors, "
        f"{run['skipped']} skipped** "
        f"of {run['tests']} tests · pass rate {'-' if rate is None else f'{rate:.1f} %'} · "
        f"{run['duration_s']:.1f} s · cost {_usd(run['cost_usd'])} · "
        f"{run['lm_calls']} LM call{'s' if run['lm_calls'] != 1 else ''} · "
        f"{run['leaks']} leaks",
    ]
    if run.get("lm_refused"):
        refused = run["lm_refused"]
        lines.append(f"\n**{refused} LM call{'s' if refused != 1 else ''} refused** by the run's cost or "
                     "rate limit before being sent (not among the LM calls above).")
        by_test = [r for r in board.last_tests if r.get("lm_refused")]
        if by_test:
            lines.append("")
            lines += _table(["test", "LM calls refused"],
                            ([f"`{r['node_id']}`", str(r["lm_refused"])] for r in by_test[:top]))
    if run["standin_calls"]:
        were = "LM call was" if run["standin_calls"] == 1 else "LM calls were"
        lines.append(f"\n{run['standin_calls']} {were} answered by the Gemini stand-in: billed $0; "
                     f"{_usd(run['list_cost_usd'])} at list prices (what the run's cost limit counted).")
    month = board.current_month
    if month is not None:
        budget = "" if board.budget_usd is None else f" of the {_usd(board.budget_usd)} monthly budget"
        warn = " **— over budget**" if month.over_budget else ""
        lines.append(f"\nThis month ({month.month}): {_usd(month.cost_usd)} spent over {month.runs} runs, "
                     f"forecast {_usd(month.forecast_usd)}{budget}{warn}.")
    failed = [r for r in board.last_tests if r["outcome"] in ("failed", "error")]
    lines += ["", f"### Failed ({len(failed)})", ""]
    lines += _table(["test", "outcome", "xdist worker"],
                    ([f"`{r['node_id']}`", r["outcome"], r["xdist_worker"] or "-"] for r in failed[:top]))
    lines += ["", f"### Flaky tests ({len(board.flaky)}, last {len(board.runs)} runs)", "",
              "Both outcomes on one revision, or passed on a rerun; a failure whose LM calls the run's "
              "limits refused, or that a cassette miss failed, is not counted.", ""]
    lines += _table(["test", "why"], ([f"`{f.node_id}`", "; ".join(f.reasons)] for f in board.flaky[:top]))
    lines += ["", "### Slowest tests", ""]
    lines += _table(["test", "mean s", "of which rate-limit wait s", "max s"],
                    ([f"`{t.node_id}`", f"{t.mean_s:.3f}", f"{t.mean_rate_limit_wait_s:.1f}",
                      f"{t.max_s:.3f}"] for t in board.slowest(top)))
    lines += ["", "### Costliest tests", ""]
    lines += _table(["test", "billed", "at list prices", "LM calls", "stand-in calls ($0)"],
                    ([f"`{t.node_id}`", _usd(t.cost_usd), _usd(t.list_cost_usd), t.lm_calls, t.standin_calls]
                     for t in board.costliest(top)))
    return "\n".join(lines) + "\n"


def render_merged(merged: Sequence[MergedRun]) -> str:
    """The job summary of a sharded CI run (``provision history merge --summary``): one row per
    merged suite (its shards' tests, outcomes, wall clock, LM calls, dollars) and one total line —
    the run's one cost total, billed and at list prices (what cost limits count)."""
    shards = sum(len(m.shards) for m in merged)
    lines = [f"## provisioner: {len(merged)} run{'s' if len(merged) != 1 else ''} merged from {shards} "
             f"shard report{'s' if shards != 1 else ''}", ""]
    runs = [m.run for m in merged]
    lines += _table(
        ["report", "run", "shards", "tests", "passed", "failed", "errors", "skipped", "wall s", "LM calls",
         "billed", "at list prices"],
        ([f"`{m.name}`", f"`{m.run['run_id']}`", len(m.shards), m.run["tests"], m.run["passed"],
          m.run["failed"], m.run["error"], m.run["skipped"], f"{m.run['duration_s']:.1f}", m.run["lm_calls"],
          _usd(m.run["cost_usd"]), _usd(m.run["list_cost_usd"])] for m in merged))
    for m in merged:
        if m.missing:
            lines += ["", f"**Partial: `{m.name}` is missing shard{'s' if len(m.missing) > 1 else ''} "
                          f"{', '.join(m.missing)}** — their tests and cost are not in this run."]
    total = {k: sum(r[k] for r in runs) for k in
             ("tests", "passed", "failed", "error", "skipped", "lm_calls", "cost_usd", "list_cost_usd")}
    lines += ["", f"**Total: {total['tests']} tests ({total['passed']} passed, {total['failed']} failed, "
                  f"{total['error']} errors, {total['skipped']} skipped) · cost {_usd(total['cost_usd'])} "
                  f"billed, {_usd(total['list_cost_usd'])} at list prices · "
                  f"{total['lm_calls']} LM call{'s' if total['lm_calls'] != 1 else ''}**"]
    return "\n".join(lines) + "\n"
