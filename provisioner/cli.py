"""The ``provision`` command: a thin click edge over provisioner's Python API.

Each command parses flags, calls one plain function, and prints. No logic lives here.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from provisioner.errors import ProvisionerError, UnknownNameError
from provisioner.layers import get_layer, resolve_layers
from provisioner.settings import Settings, load_settings

LOG_LEVEL_ENV = "PROVISION_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class UsageProblem(click.ClickException):
    """A name or value on the command line that is not known: exit status 2, like click's usage errors."""

    exit_code = 2


def _settings(**cli: Any) -> Settings:
    """The effective settings of the project at or above the current directory (``project_root``).

    Raises:
        UsageProblem: an unknown layer or setting key (exit 2, with "did you mean").
        click.ClickException: any other invalid setting (exit 1).
    """
    try:
        settings = load_settings(cli=cli)
        if cli.get("layer") is not None:
            get_layer(settings, settings.layer)  # an unknown --layer is a usage error, not a default
        return settings
    except UnknownNameError as exc:
        raise UsageProblem(str(exc)) from None
    except ProvisionerError as exc:
        raise click.ClickException(str(exc)) from None


def known_name(what: str, name: str, known: Iterable[str], *, hint: str = "") -> str:
    """``name`` if it is one of ``known``, else a usage error (exit 2) with "did you mean" and the list.

    The one check every command uses for names a user types (layer, run id, month, setting key).

    Raises:
        UsageProblem: ``name`` is not in ``known``.
    """
    values = list(known)
    if name not in values:
        raise UsageProblem(str(UnknownNameError(what, name, values, hint=hint)))
    return name


#: How many run ids an unknown-run error shows (the newest); a project has hundreds after a while.
RUNS_SHOWN = 5


def known_run(run_id: str, known: Iterable[str], *, hint: str, list_with: str) -> str:
    """``run_id`` if it is one of ``known``, else a usage error (exit 2) that suggests close matches
    (runs whose id contains what was typed, e.g. a prefix or the time part, else difflib's closest
    one of ratio ≥ 0.85), shows the :data:`RUNS_SHOWN` newest ids and the command that lists them all
    (``list_with``). Run ids are ``r<UTC date>-<time>-<hex>``: sorted descending is newest first.

    The one check for every run-id argument (``--run`` of cost report, status, down, reap,
    cassettes prune; ``history show RUN_ID``).

    Raises:
        UsageProblem: ``run_id`` is not in ``known``.
    """
    import difflib

    ids = sorted(set(known), reverse=True)
    if run_id in ids:
        return run_id
    # Ids share their shape: only a near-identical one (a typo) is a close match, not any of them.
    close = [i for i in ids if run_id and run_id in i][:3] or difflib.get_close_matches(run_id, ids, n=1,
                                                                                         cutoff=0.85)
    message = f"unknown run {run_id!r}"
    if close:
        message += f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    if ids:
        more = f" and {len(ids) - RUNS_SHOWN} more" if len(ids) > RUNS_SHOWN else ""
        message += f"; newest: {', '.join(ids[:RUNS_SHOWN])}{more}; `{list_with}` lists them"
    else:
        message += f"; no runs are known; `{list_with}` lists them once there are"
    raise UsageProblem(f"{message} ({hint})")


def _quiet() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().meta.get("provision.quiet"))


_VERBOSITY = re.compile(r"^(-[qv]+|--quiet|--verbose)$")


def _takes_value(command: click.Command, *, optional: bool = False) -> set[str]:
    """The option strings of *command* that take a value (``--layer X``), so a scan of its
    arguments can step over the value; ``optional``: those whose value may be left out
    (``--month`` alone means the current month), whose next argument is their value only when it
    is not an option, as click reads them."""
    names: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option) and not param.is_flag and not param.count \
                and bool(getattr(param, "_flag_needs_value", False)) == optional:
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def _runs_a_command(command: click.Command) -> bool:
    """Whether *command* ends with a command of the user's (``provision run ... -- pytest -q``): a
    variadic unprocessed argument, whose first plain word starts the user's command."""
    return any(isinstance(p, click.Argument) and p.nargs == -1
               and isinstance(p.type, click.types.UnprocessedParamType) for p in command.params)


def _hoist_verbosity(args: list[str], group: click.Group | None = None) -> list[str]:
    """``provision up -q`` as ``provision -q up``: the global -q/-v (and -qq, --quiet, --verbose)
    given anywhere after the subcommand move before it, where the group's options are (click parses
    a group's options only before its subcommand). The scan follows click's own tree of commands and
    steps over option values (``--layer integration -q``), so a value is never taken for the user's
    command. Nothing after ``--`` moves, nor, for a command that runs the user's command
    (``provision run``), anything from its first plain word on (that command's own -q/-v)."""
    root = group if group is not None else main
    at = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if at is None:
        return args
    command: click.Command | None = root.commands.get(args[at])
    moved: list[str] = []
    rest: list[str] = []
    scanning = True
    skip_value = maybe_value = False
    for arg in args[at + 1:]:
        if not scanning:
            rest.append(arg)
            continue
        if skip_value or (maybe_value and not arg.startswith("-")):
            skip_value = maybe_value = False
            rest.append(arg)
            continue
        maybe_value = False
        if arg == "--":
            scanning = False
        elif _VERBOSITY.match(arg):
            moved.append(arg)
            continue
        elif arg.startswith("-"):
            skip_value = command is not None and arg in _takes_value(command)
            maybe_value = command is not None and arg in _takes_value(command, optional=True)
        elif isinstance(command, click.Group):
            command = command.commands.get(arg)  # a subcommand: go on with its options
        elif command is not None and _runs_a_command(command):
            scanning = False  # the user's command starts here
        rest.append(arg)
    return [*args[:at], *moved, args[at], *rest]


class _Group(click.Group):
    """Turns provisioner's own errors into clean one-line failures instead of tracebacks; accepts
    -q/-v after the subcommand too (:func:`_hoist_verbosity`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _hoist_verbosity(list(args)))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UnknownNameError as exc:
            raise UsageProblem(str(exc)) from None
        except ProvisionerError as exc:
            raise click.ClickException(str(exc)) from None


def _log_level(verbose: int, quiet: int) -> int:
    """-v/-q over PROVISION_LOG_LEVEL over WARNING."""
    import logging

    named = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    if named:
        known_name(f"log level (env {LOG_LEVEL_ENV})", named, LOG_LEVELS)
        base = logging.getLevelName(named)
    else:
        base = logging.WARNING
    return max(logging.DEBUG, min(logging.CRITICAL, base - 10 * verbose + 10 * quiet))


@click.group(cls=_Group)
@click.version_option(package_name="dspy-provisioner")
@click.option("-v", "--verbose", count=True, help="more log output (repeatable; also PROVISION_LOG_LEVEL)")
@click.option("-q", "--quiet", count=True, help="less output: no progress lines, only warnings and errors")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Isolated, cheap container test environments for DSPy programs.

    Paths in the settings (state_dir, lm.cache_dir) are relative to the project root: the folder of
    the nearest provision.toml or pyproject.toml at or above the current directory.
    """
    import logging

    level = _log_level(verbose, quiet)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("provisioner")
    logger.handlers = [h for h in logger.handlers if not getattr(h, "_provision_cli", False)]
    handler._provision_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    ctx.meta["provision.quiet"] = quiet > 0


# --- settings and layers ------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def layers(as_json: bool) -> None:
    """List the layers (built-in and user-defined) and their recipes.

    ``workers`` is what each entry point starts (:func:`provisioner.runtime.workers.worker_starts`):
    ``pytest 1-2, up 2`` — a pytest run starts 1 and up to 2 on demand (one pool per run, shared by
    its xdist processes), ``provision up`` starts 2; ``-`` for an in-process layer. ``--json`` gives
    each layer's fields plus ``starts`` (``{"pytest_first", "pytest_up_to", "up"}`` or null), the
    same facts (its ``workers``: the configured field, null for an in-process layer, as the table's ``-``)."""
    from provisioner.runtime.workers import worker_starts

    resolved = resolve_layers(_settings())
    if as_json:
        out = {}
        for name, layer in resolved.items():
            starts = worker_starts(layer)
            fields = layer.model_dump(mode="json")
            if starts is None:
                fields["workers"] = None  # as the table's "-": an in-process layer starts none
            out[name] = {**fields, "starts": starts.to_json() if starts else None}
        click.echo(json.dumps(out, indent=2))
        return
    # What runs: a layer without containers runs in-process (LocalBridge) and starts no workers, so
    # its `workers` field (a default) is shown as "-" rather than a count that never happens.
    rows = []
    for layer in resolved.values():
        starts = worker_starts(layer)
        rows.append((layer, "containers" if starts else "in-process", starts.text() if starts else "-"))
    width = max(len("workers"), *(len(workers) for _, _, workers in rows)) + 2
    click.echo(f"{'layer':<14}{'adapter':<9}{'runs':<12}{'pooling':<9}{'lm':<8}{'isolation':<11}"
               f"{'workers':<{width}}description")
    for layer, runs, workers in rows:
        click.echo(
            f"{layer.name:<14}{layer.adapter:<9}{runs:<12}"
            f"{'yes' if layer.pooling_enabled else 'no':<9}{layer.lm_mode:<8}{layer.isolation:<11}"
            f"{workers:<{width}}{layer.description}"
        )
    click.echo("workers: what each starts — pytest: one pool per run, shared by its xdist processes (the "
               "first worker before the first test, the others on demand); up: `provision up`")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--layer", default=None, help="the active layer (overrides TEST_MODE)")
def config(as_json: bool, layer: str | None) -> None:
    """Print the effective settings and where each value came from.

    Below the settings, ``effective.<layer>.lm_mode``: the LM mode each layer runs with and the
    setting it comes from (an ``lm_modes`` entry you set beats the layer's ``lm_mode``; the default
    ``lm_modes`` do not: :func:`provisioner.layers.lm_mode_origin`). ``--json`` adds them as
    ``effective: {<layer>: {"lm_mode": ..., "from": <setting>, "source": <where it was set>}}``.
    """
    from provisioner.layers import lm_mode_origin, resolve_layers
    from provisioner.settings import user_values

    settings = _settings(layer=layer)
    values = user_values(settings)  # not the fields the run fills in itself (lm.run_id, ...)
    if settings.lm.api_key is not None:
        values["lm"]["api_key"] = "**********"
    rows = []
    for path, value in _leaves(values):
        rows.append({"field": path, "value": value, "source": settings.source_of(path)})
    effective: dict[str, dict[str, str]] = {}
    for name, resolved in resolve_layers(settings).items():
        origin = lm_mode_origin(settings, name)
        where = settings.source_of(origin) if origin.startswith(("lm_modes.", "layers.")) else origin
        effective[name] = {"lm_mode": resolved.lm_mode, "from": origin, "source": where}
        rows.append({"field": f"effective.{name}.lm_mode", "value": resolved.lm_mode,
                     "source": origin if origin == where else f"{origin} ({where})"})
    if as_json:
        sources = {r["field"]: r["source"] for r in rows if not r["field"].startswith("effective.")}
        click.echo(json.dumps({"settings": values, "sources": sources, "effective": effective}, indent=2))
        return
    width = max(len(r["field"]) for r in rows)
    for row in rows:
        click.echo(f"{row['field']:<{width}}  {json.dumps(row['value']):<40}  {row['source']}")


def _leaves(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("lm_modes", "prices"):
            out.extend(_leaves(value, path + "."))
        else:
            out.append((path, value))
    return out


# --- bridge worker (provisioner.bridge) ---------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option(
    "--port", default=0, show_default=True, type=click.IntRange(0, 65535), help="0: the OS picks a free port"
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write the port to this file (atomically) once listening",
)
@click.option("--stdio", is_flag=True, help="serve the protocol over stdin/stdout instead of TCP")
@click.option(
    "--lm-config",
    "lm_config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="start-up LMConfig as JSON (used when PROVISION_LM_CONFIG is not set)",
)
@click.option("--fork", is_flag=True,
              help="a fresh process per connection, forked from this pre-imported one "
                   "(layer isolation 'process')")
def worker(host: str, port: int, ready_file: Path | None, stdio: bool, lm_config_file: Path | None,
           fork: bool) -> None:
    """Run a DSPy bridge worker in the foreground.

    Prints one line `PROVISION_WORKER_READY port=<n>` when it accepts requests; exits 0 after the
    `shutdown` command or SIGTERM, once in-flight requests have been answered. With --fork every
    connection is served by its own child process, which ends when the connection closes.
    """
    from provisioner.bridge.server import startup_lm_config
    from provisioner.bridge.worker import run_worker

    settings = _settings()
    sys.exit(
        run_worker(
            host=host,
            port=port,
            ready_file=ready_file,
            stdio=stdio,
            lm_config=startup_lm_config(os.environ, lm_config_file),
            max_frame_bytes=settings.worker.max_frame_bytes,
            max_inflight=settings.worker.max_inflight,
            max_connections=settings.worker.max_connections,
            request_timeout_s=settings.process_timeout,
            max_inflight_bytes=settings.worker.max_inflight_bytes,
            frame_timeout_s=settings.worker.frame_timeout_s,
            max_programs=settings.worker.max_programs,
            max_sessions=settings.worker.max_sessions,
            max_inflight_per_session=settings.worker.max_inflight_per_session,
            fork=fork,
        )
    )


# --- LM modes, cassettes, cost, Gemini stand-in (provisioner.lm) --------------------------------


def _cache_dir_option(fn: Any) -> Any:
    return click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="cassette directory (default: lm.cache_dir / LM_CACHE_DIR)")(fn)


@main.group()
def cassettes() -> None:
    """Inspect and maintain the cached mode's recorded LM responses."""


def _cassette_dir(cache_dir: Path | None, settings: Settings | None = None) -> Path:
    """``--cache-dir`` (relative to the current directory, as typed) or the settings' ``lm.cache_dir``
    (anchored at the project root); a warning on stderr when it does not exist."""
    root = cache_dir.absolute() if cache_dir is not None else (settings or _settings()).lm.cache_dir
    if not root.is_dir():
        click.echo(f"warning: cassette directory {root} does not exist (set lm.cache_dir or "
                   "LM_CACHE_DIR, or pass --cache-dir; a cached-mode run that records creates it)", err=True)
    return root


@cassettes.command("list")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def cassettes_list(cache_dir: Path | None, as_json: bool) -> None:
    """List the recorded entries: key, when, what answered (mock, Gemini stand-in, real Gemini),
    the test that recorded it, and the request it answers."""
    from provisioner.lm.cassettes import SOURCE_LABELS, list_cassettes

    root = _cassette_dir(cache_dir)
    infos = list_cassettes(root) if root.is_dir() else []
    if as_json:
        click.echo(json.dumps([{"key": i.key, "path": str(i.path), "recorded_at": i.recorded_at,
                                "request": i.description, "bytes": i.size, "test_id": i.test_id,
                                "source": i.source, "problem": i.problem}
                               for i in infos], indent=2))
        return
    if infos:
        from rich import box
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for name in ("key", "recorded at", "answered by", "test", "request"):
            table.add_column(name)
        for info in infos:
            if info.problem is not None:
                table.add_row(info.key[:12], "", "", "", f"CORRUPT {info.path}: {info.problem}")
                continue
            source = SOURCE_LABELS.get(info.source, info.source)
            table.add_row(info.key[:12], info.recorded_at, source, info.test_id or "(no test)",
                          info.description)
        _print_table(table)
    corrupt = sum(1 for i in infos if i.problem is not None)
    click.echo(f"{len(infos)} entries under {root}" + (f", {corrupt} corrupt" if corrupt else ""))


@cassettes.command("verify")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def cassettes_verify(cache_dir: Path | None, as_json: bool) -> None:
    """Check every entry (JSON, key matches request, has a response, holds no API key); exit 1 on
    problems or when the cassette directory does not exist.

    Temporary files of killed writers are removed (those of writes in progress are left alone).
    """
    from provisioner.lm.cassettes import verify_cassettes

    settings = _settings()
    root = _cassette_dir(cache_dir, settings)
    if not root.is_dir():
        if as_json:
            click.echo(json.dumps({"cache_dir": str(root), "exists": False, "checked": 0, "problems": []}))
        sys.exit(1)
    secrets = [settings.lm.api_key.get_secret_value()] if settings.lm.api_key else []
    report = verify_cassettes(root, secrets=secrets)
    if as_json:
        click.echo(json.dumps({"cache_dir": str(root), "exists": True, "checked": report.checked,
                               "problems": [{"path": str(p), "problem": w} for p, w in report.problems],
                               "removed_temp": [str(p) for p in report.removed_temp]}))
    else:
        for path in report.removed_temp:
            click.echo(f"removed {path}: a temporary file its writer abandoned (killed mid-write)")
        for path, problem in report.problems:
            click.echo(f"{path}: {problem}", err=True)
        click.echo(f"{report.checked} entries checked under {root}, {len(report.problems)} problem(s)")
    if not report.ok:
        sys.exit(1)


@cassettes.command("prune")
@_cache_dir_option
@click.option("--run", "run_id", default=None,
              help="the complete run that vouches for its layer (default: each layer's latest complete run)")
@click.option("--yes", is_flag=True, help="really delete; without it prune only lists what it would remove")
@click.option("--dry-run", is_flag=True, help="only list what would be removed (the default)")
@click.option("--force", is_flag=True,
              help="prune although a layer using the directory has no complete run (its cassettes may go)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def cassettes_prune(cache_dir: Path | None, run_id: str | None, yes: bool, dry_run: bool, force: bool,
                    as_json: bool) -> None:
    """List (or, with --yes, remove) entries no complete run of any layer used.

    Only a complete run vouches: one that ran its layer's whole suite to the end (no node id or
    narrower path, no -k/-m, not stopped by -x/--maxfail/max_failures, an interrupt, a timeout or
    an internal error). Every layer that uses the directory needs one, else prune refuses.
    """
    from provisioner.lm.cassettes import prune_unused
    from provisioner.lm.ledger import ledger_sources

    if yes and dry_run:
        raise click.UsageError("--yes and --dry-run contradict each other")
    settings = _settings()
    root = _cassette_dir(cache_dir, settings)
    if run_id is not None:  # a typo gets close matches; a known run that cannot vouch: prune says why
        from provisioner.lm.cassettes import read_runs

        known_run(run_id, read_runs(ledger_sources(settings.state_dir)),
                  hint="runs in this project's ledgers", list_with="provision history list")
    # The layers configured to use this directory (all layers share lm.cache_dir; cached ones use it).
    same_dir = root.resolve() == Path(settings.lm.cache_dir).resolve()
    layers = [n for n, lay in resolve_layers(settings).items() if lay.lm_mode == "cached"] if same_dir else []
    result = prune_unused(root, ledger_sources(settings.state_dir), layers=layers, run_id=run_id, apply=yes,
                          force=force)
    if as_json:
        click.echo(json.dumps({"vouching": result.vouching, "applied": result.applied, "kept": result.kept,
                               "removed": [str(path) for path in result.removed]}))
        return
    for path in result.removed:
        click.echo(f"{'removed' if yes else 'would remove'} {path}")
    vouching = ", ".join(f"{layer} by run {run}" for layer, run in result.vouching.items())
    click.echo(f"{len(result.removed)} unused, {result.kept} kept (vouched for: {vouching})")
    if not yes and result.removed:
        click.echo("nothing removed: add --yes to remove them")


@main.group()
def cost() -> None:
    """What real and recorded LM calls cost (from the run ledgers)."""


@cost.command("report")
@click.option("--run", "run_id", default=None, help="only this run")
@click.option("--month", is_flag=False, flag_value="current", default=None,
              help="only this month (YYYY-MM; without a value: the current month)")
@click.option("--ledger", "extra", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="also read this ledger file (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def cost_report(run_id: str | None, month: str | None, extra: tuple[Path, ...], as_json: bool) -> None:
    """Sum cost per run, per test and per month; warn when a month passes lm.monthly_budget_usd."""
    import datetime

    from provisioner.lm.ledger import cost_report as build_report
    from provisioner.lm.ledger import format_cost_report, ledger_sources
    from provisioner.lm.pricing import format_usd

    settings = _settings()
    if month == "current":
        month = datetime.datetime.now(datetime.UTC).strftime("%Y-%m")
    elif month is not None:
        _check_month(month)
    sources = ledger_sources(settings.state_dir, extra)
    if run_id is not None:
        everything = build_report(sources)
        runs_on_disk = [p.name for p in sorted((settings.state_dir / "runs").glob("*")) if p.is_dir()]
        known_run(run_id, {*everything.by_run, *runs_on_disk},
                  hint=f"runs recorded under {settings.state_dir}", list_with="provision history list")
    report = build_report(sources, run_id=run_id, month=month,
                          monthly_budget_usd=settings.lm.monthly_budget_usd)
    if not as_json:
        click.echo(format_cost_report(report))  # budget warnings are part of the text
        return
    click.echo(json.dumps(report.as_dict(), indent=2))
    for over in report.over_budget_months:
        budget = format_usd(settings.lm.monthly_budget_usd)
        click.echo(f"warning: {over} is over the monthly budget of {budget}", err=True)


def _check_month(month: str) -> None:
    """``YYYY-MM`` with a real month, else a usage error (exit 2)."""
    import datetime

    try:
        datetime.datetime.strptime(month, "%Y-%m")
    except ValueError:
        example = f"{datetime.datetime.now(datetime.UTC):%Y-%m}"
        raise UsageProblem(f"--month {month!r} is not a month: use YYYY-MM (e.g. {example}), or --month "
                           "alone for the current one") from None
    if len(month) != 7:  # strptime accepts 2026-1
        raise UsageProblem(f"--month {month!r} is not a month: use YYYY-MM with two digits for the month")


@main.group()
def standin() -> None:
    """Local stand-ins for remote services (for offline tests)."""


@standin.command("gemini")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="0: the OS picks a free port")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path),
              help="also write the port to this file (atomically) once listening")
@click.option("--api-key-env", default="GEMINI_TEST_API_KEY", show_default=True,
              help="accept only the key in this environment variable (unset: any non-empty key)")
@click.option("--latency-ms", default=0, type=click.IntRange(0), help="delay every reply (a slow server)")
@click.option("--fail-first", default=0, type=click.IntRange(0), show_default=True,
              help="answer the first N requests with --fail-status (to test retries and error paths)")
@click.option("--fail-status", default="429", type=click.Choice(["429", "500", "503", "504"]),
              show_default=True,
              help="the HTTP status of the --fail-first answers (429 RESOURCE_EXHAUSTED, 500 INTERNAL, ...)")
@click.option("--retry-after", type=click.FloatRange(0), default=None,
              help="seconds the --fail-first answers ask the client to wait (Retry-After and RetryInfo)")
def standin_gemini(host: str, port: int, ready_file: Path | None, api_key_env: str, latency_ms: int,
                   fail_first: int, fail_status: str, retry_after: float | None) -> None:
    """Serve Gemini's generateContent REST API locally.

    Prints one line `PROVISION_STANDIN_READY port=<n>` when listening; stops on SIGTERM/SIGINT.
    """
    from provisioner.lm.standin import serve

    serve(host=host, port=port, api_key=os.environ.get(api_key_env) or None, ready_file=ready_file,
          latency_ms=latency_ms, fail_first=fail_first, fail_status=int(fail_status), retry_after=retry_after)


# --- containers: images, up/down/status/run/reap/doctor, compose (provisioner.runtime) ----------
# Heavy imports (docker, rich, the runtime) happen inside the commands: `provision --help` and the
# worker image (which has no docker-py) never pay for them.

_LM_CHOICE = click.Choice(["mock", "cached", "real"])


def _say(message: str) -> None:
    """A progress line on stderr (none with -q)."""
    if not _quiet():
        click.echo(message, err=True)


@main.group("images")
def images_group() -> None:
    """The worker image (content-hashed; rebuilt only when its inputs change)."""


@images_group.command("build")
@click.option("--base", type=click.Choice(["auto", "python", "debootstrap"]), default=None,
              help="base image: python:3.11-slim, a local debootstrap bookworm, or auto (default: settings)")
@click.option("--force", is_flag=True, help="rebuild even when an image with the same content hash exists")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def images_build(base: str | None, force: bool, as_json: bool) -> None:
    """Build the worker image (skipped in well under a second when nothing changed).

    The image holds this installation's provisioner; the project's tag provisioner-worker:<project
    id> is moved to it (what `provision compose export` names).
    """
    from provisioner.runtime.images import build_worker_image
    from provisioner.runtime.labels import project_id

    settings = _settings()
    result = build_worker_image(base=base or settings.container.base, force=force,  # type: ignore[arg-type]
                                project=project_id(settings.project_dir),
                                show_progress=not as_json and sys.stderr.isatty(),
                                progress=None if sys.stderr.isatty() and not as_json else _say)
    if as_json:
        click.echo(json.dumps({"tag": result.tag, "built": result.built, "seconds": round(result.seconds, 3),
                               "base": result.base, "project_tag": result.project_tag, "sent": result.sent}))
    else:
        verb = "built" if result.built else "up to date:"
        # A remote engine's image is built (or found) on the local engine and sent by save | load.
        sent = "; sent to the engine from the local one" if result.sent else ""
        click.echo(f"{verb} {result.tag} (base {result.base}, {result.seconds:.2f}s); "
                   f"project tag {result.project_tag}{sent}")


@images_group.command("prune")
@click.option("--dry-run", is_flag=True, help="only list what would be removed")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def images_prune(dry_run: bool, as_json: bool) -> None:
    """Remove worker images other than the current build (and the tags containers still use)."""
    from provisioner.runtime.images import prune_worker_images

    removed = prune_worker_images(dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": list(removed)}))
        return
    for tag in removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {tag}")


@images_group.command("lock")
def images_lock() -> None:
    """Re-pin the worker image's requirements.txt (provisioner/assets/worker/) to what is installed here."""
    from provisioner.runtime.images import write_requirements

    click.echo(f"wrote {write_requirements()}")


def _worker_table(state: Any, health: dict[str, Any] | None = None) -> None:
    from rich.table import Table

    table = Table(title=f"run {state.run_id} · layer {state.layer} · LM {state.lm_mode}")
    for column in ("worker", "container", "address", "LM mode", *(["health"] if health is not None else [])):
        table.add_column(column)
    for w in state.workers:
        mode = f"{state.lm_mode} (stand-in)" if state.uses_standin else state.lm_mode
        row = [f"w{w['slot']}", w["name"], w["address"], mode]
        if health is not None:
            row.append(health.get(w["name"], "?"))
        table.add_row(*row)
    _print_table(table)


def _print_table(table: Any) -> None:
    """Print a rich table with every cell whole: container names, addresses and run ids are what
    people copy into `docker logs` or `--run`, so never cut to "…". Into a pipe or file (scripts,
    CI logs, `| grep`) the table is as wide as its content; on a narrower terminal long cells wrap
    (fold) inside their column instead of being cut."""
    from rich.console import Console

    for column in table.columns:
        column.overflow = "fold"
    # Cells are data, never rich markup: "test_x[first]" (a pytest parametrize id) kept its "[first]"
    # only as long as rich did not read it as a style tag.
    console = Console(markup=False, emoji=False)
    if not console.is_terminal:
        wide = console.measure(table, options=console.options.update_width(10_000)).maximum
        if wide > console.width:
            console = Console(width=wide, markup=False, emoji=False)
    console.print(table)


@main.command("up")
@click.option("--layer", default=None, help="the layer to bring up (default: settings' layer)")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="number of workers (default: the layer's)")
@click.option("--lm", "lm_mode", type=_LM_CHOICE, default=None, help="override the layer's LM mode")
@click.option("--require-key", is_flag=True, help="real mode must use the real Gemini API, not the stand-in")
@click.option("--run-id", default=None, help="use this run id instead of a random one")
@click.option("--new", is_flag=True,
              help="start another run even when this project's layer is already up (default: refuse)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def up_command(layer: str | None, workers: int | None, lm_mode: str | None, require_key: bool,
               run_id: str | None, new: bool, as_json: bool) -> None:
    """Start a layer's workers and keep them up until `provision down`.

    Refuses when the layer of this project is already up (naming the run): `provision down` it, or
    pass --new to start another one alongside.

    Writes .provision/runs/<id>/state.json and an env file (also .provision/current.env) with
    PROVISION_RUN_ID, PROVISION_BRIDGE_ADDRS=127.0.0.1:p1,... for any test suite to `source`.
    """
    from provisioner.runtime.lifecycle import STANDIN_NOTE, UpOptions, up
    from provisioner.runtime.runs import opened_runtime
    from provisioner.runtime.state import CURRENT_ENV, run_dir_of

    settings = _settings(layer=layer)
    options = UpOptions(layer=layer, workers=workers, lm_mode=lm_mode,  # type: ignore[arg-type]
                        require_key=require_key, run_id=run_id, new=new)
    try:
        with opened_runtime(None, settings) as rt:
            env = up(settings, options, runtime=rt, progress=None if as_json else _say)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted: everything started so far was removed") from None
    state = env.state
    assert state is not None
    run_dir = run_dir_of(settings, state.run_id)
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps({**asdict(state), "state_file": str(run_dir.state_file),
                               "env_file": str(run_dir.env_file), "warnings": env.warnings}))
        return
    _worker_table(state)
    if state.uses_standin:
        click.echo(STANDIN_NOTE)
    current = Path(settings.state_dir) / CURRENT_ENV
    click.echo(f"env file: {run_dir.env_file}  (or: source {current})")
    click.echo("stop with: provision down")


@main.command("down")
@click.option("--run", "run_id", default=None, help="the run to remove (default: the current one)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def down_command(run_id: str | None, as_json: bool) -> None:
    """Remove a run's containers and networks (idempotent).

    Without --run: this project's run that is up (with several, a list to choose from; exit 2).
    """
    from provisioner.errors import AmbiguousRunError
    from provisioner.runtime.lifecycle import down
    from provisioner.runtime.runs import opened_runtime

    settings = _settings()
    with opened_runtime(None, settings) as rt:
        if run_id is not None:
            _check_run(settings, run_id, rt)
        try:
            result = down(settings, run_id=run_id, runtime=rt)
        except AmbiguousRunError as exc:
            raise UsageProblem(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"run_id": result.run_id, "removed": result.removed,
                               "state_problem": result.state_problem}))
        return
    if result.state_problem:
        click.echo(f"warning: {result.state_problem}; the run's resources were found by their labels",
                   err=True)
    if result.run_id is None:
        click.echo("nothing to do: no current run")
    else:
        click.echo(f"run {result.run_id}: removed {len(result.removed)} resource(s)")


def _check_run(settings: Settings, run_id: str, runtime: Any) -> None:
    """A usage error (exit 2, did you mean, the known ids) unless ``run_id`` is a run on the engine
    (``runtime``'s) or has a state file in this project."""
    from provisioner.runtime.lifecycle import run_overview
    from provisioner.runtime.state import RUNS_SUBDIR, RunDir

    runs = settings.state_dir / RUNS_SUBDIR
    on_disk = {d.name for d in runs.iterdir() if RunDir(d).state_file.exists()} if runs.is_dir() else set()
    on_engine = {str(row["run_id"]) for row in run_overview(settings, runtime=runtime)}
    known_run(run_id, on_disk | on_engine, list_with="provision status --all-projects",
              hint="runs on this engine and runs with a state file in this project")


@main.command("status")
@click.option("--run", "run_id", default=None, help="the run to check (default: this project's run)")
@click.option("--all-projects", is_flag=True,
              help="list every run on this engine (all projects) instead of one run's health")
@click.option("--repair", is_flag=True,
              help="restart workers whose container exited (killed, OOM-killed), behind the same address")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status_command(run_id: str | None, all_projects: bool, repair: bool, as_json: bool) -> None:
    """Health of every worker of a run (container state + ping). Exit 1 when not all healthy.

    Without --run: this project's run that is up (the current one). --all-projects lists the runs
    of every project on the engine instead. A worker that is not running shows how it ended (exit
    code and signal, OOM-killed: the engine's container state), and a worker whose published port
    refuses connections (its engine forwarder died) shows that; --repair re-creates the relay on the
    same ports and restarts exited workers in place (their sessions and programs are gone), and
    says what it did.
    """
    from dataclasses import asdict

    from provisioner.errors import AmbiguousRunError
    from provisioner.runtime.lifecycle import run_overview, status
    from provisioner.runtime.runs import opened_runtime

    if all_projects:
        if repair:
            raise UsageProblem("--repair works on one run; drop --all-projects (choose the run with --run)")
        rows = run_overview(_settings())  # opens the engine and closes it again
        if as_json:
            click.echo(json.dumps(rows))
            return
        if not rows:
            click.echo("no runs on this engine")
            return
        from rich import box
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for name in ("run", "project", "layer", "owner", "resources"):
            table.add_column(name, justify="right" if name == "resources" else "left")
        for row in rows:
            owner = "persistent" if row["persistent"] else f"pid {row['owner_pid']}"
            project = row["project"] or "(no project label)"
            project += " (this one)" if row["this_project"] else ""
            table.add_row(row["run_id"], project, row["layer"], owner, str(row["resources"]))
        _print_table(table)
        return
    settings = _settings()
    with opened_runtime(None, settings) as rt:
        if run_id is not None:
            _check_run(settings, run_id, rt)
        try:
            report = status(settings, run_id=run_id, repair=repair, runtime=rt)
        except AmbiguousRunError as exc:
            raise UsageProblem(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"run_id": report.run_id, "healthy": report.healthy,
                               "workers": [asdict(w) for w in report.workers], "others": report.others,
                               "state_problem": report.state_problem}))
    elif report.state_problem:
        click.echo(f"run {report.run_id}: state unreadable: {report.state_problem}; "
                   f"`provision down --run {report.run_id}` still removes its resources (by label)")
    elif report.state is None and run_id is not None:
        click.echo(f"run {run_id} has no state file under {settings.state_dir / 'runs'}: only runs of "
                   "`provision up` have one (pytest's and `provision run`'s are private; "
                   "`provision status --all-projects` lists every run on the engine)")
    elif report.state is None:
        click.echo("no current run (provision up starts one)")
    else:
        health = {w.name: ("ok" if w.healthy else w.reason or f"{w.container}: {w.detail or 'no ping'}")
                  + (f" ({w.latency_ms} ms)" if w.latency_ms is not None else "") for w in report.workers}
        _worker_table(report.state, health)
        for w in report.workers:
            if w.repaired:
                click.echo(f"{w.name}: {w.repaired}")
        if not repair and any(w.container not in ("running", "missing") for w in report.workers):
            click.echo("`provision status --repair` restarts the workers that exited")
        for name, st in report.others.items():
            click.echo(f"{name}: {st}")
    if not report.healthy:
        sys.exit(1)


@main.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--layer", default=None, help="the layer to bring up")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="number of workers")
@click.option("--lm", "lm_mode", type=_LM_CHOICE, default=None, help="override the layer's LM mode")
@click.option("--require-key", is_flag=True, help="real mode must use the real Gemini API")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_cmd(layer: str | None, workers: int | None, lm_mode: str | None, require_key: bool,
            command: tuple[str, ...]) -> None:
    """Bring a layer up, run COMMAND with its env, bring it down; exit with COMMAND's code.

    While COMMAND runs, the run is checked every few seconds: a dead published port or relay is
    re-created on the same ports, a dead worker replaced behind the same address; each repair is
    reported on stderr with its reason.

    Example: provision run --layer e2e -- pytest -q
    """
    from provisioner.runtime.lifecycle import UpOptions
    from provisioner.runtime.run_command import run_command

    options = UpOptions(layer=layer, workers=workers, lm_mode=lm_mode,  # type: ignore[arg-type]
                        require_key=require_key, persistent=False)
    try:
        code = run_command(list(command), _settings(layer=layer), options, progress=_say,
                           notify=lambda message: click.echo(message, err=True))  # also with -q
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


@main.command("reap")
@click.option("--run", "run_id", default=None, help="remove this run")
@click.option("--older-than", default=None, help="remove runs older than this (e.g. 30m, 2h, 1d)")
@click.option("--all", "all_runs", is_flag=True, help="remove every run of this project (see --all-projects)")
@click.option("--all-projects", is_flag=True, help="look at the runs of every project on this engine")
@click.option("--force", is_flag=True, help="also remove runs whose owner processes are alive")
@click.option("--dry-run", is_flag=True, help="only list what would be removed")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def reap_command(
    run_id: str | None, older_than: str | None, all_runs: bool, all_projects: bool, force: bool,
    dry_run: bool, as_json: bool
) -> None:
    """Remove leftovers of earlier runs of this project (default: runs whose owner process is gone).

    A run whose owners (a test session, `provision run`) are alive is kept unless --force. A run
    made by an older version (without a project label) counts as this project's when this project's
    .provision/runs has it; --all-projects finds the others.
    """
    from dataclasses import asdict

    from provisioner.runtime.lifecycle import parse_duration, reap

    older_than_s = parse_duration(older_than) if older_than else None
    settings = _settings()
    if run_id is not None:  # a typo is not "nothing to reap"
        from provisioner.runtime.runs import opened_runtime

        with opened_runtime(None, settings) as rt:
            _check_run(settings, run_id, rt)
    results = reap(settings, run_id=run_id, older_than_s=older_than_s, all_runs=all_runs,
                   all_projects=all_projects, force=force, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in results]))
        return
    if not results:
        click.echo("nothing to reap")
    for r in results:
        note = f" [state unreadable: {r.state_problem}]" if r.state_problem else ""
        if r.kept:
            click.echo(f"kept run {r.run_id} ({r.reason}): {r.kept}{note}")
        else:
            click.echo(f"{'would remove' if dry_run else 'removed'} run {r.run_id} ({r.reason}): "
                       f"{len(r.removed)} resource(s){note}")


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def doctor_command(as_json: bool) -> None:
    """Check the engine, images, base buildability, API key and disk space. Exit 1 on a failure."""
    from dataclasses import asdict

    from provisioner.runtime.doctor import doctor

    checks = doctor(_settings())
    if as_json:
        click.echo(json.dumps([asdict(c) for c in checks]))
    else:
        marks = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
        for c in checks:
            click.echo(f"[{marks[c.status]}] {c.name}: {c.detail}")
    if any(c.status == "fail" for c in checks):
        sys.exit(1)


@main.group("compose")
def compose_group() -> None:
    """Compose files generated from the layer recipes (for docker-compose users)."""


@compose_group.command("export")
@click.option("--layer", "layer_names", multiple=True,
              help="layer(s) to export (default: every container layer)")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="a file (one layer) or folder; default: compose/<layer>.yml; '-' prints")
def compose_export(layer_names: tuple[str, ...], output: Path | None) -> None:
    """Write compose/<layer>.yml from the same recipes `provision up` uses, and compose/.env naming
    this project's worker image tag. A layer without containers (unit) is a usage error (exit 2)."""
    from provisioner.errors import NoContainersError
    from provisioner.runtime.compose import export_layer, export_layers

    settings = _settings()
    try:
        if output is not None and str(output) == "-":
            texts = [export_layer(settings, name) for name in layer_names or ("e2e",)]
            for text in texts:
                click.echo(text, nl=False)
            return
        written = export_layers(settings, list(layer_names) or None, output)
    except NoContainersError as exc:
        raise UsageProblem(str(exc)) from None
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    for path in written:
        click.echo(f"wrote {path}")


# -- run history and reports (provisioner.history, provisioner.reporting) -----------------------------


def _history(settings: Settings | None = None, *, create: bool = False) -> Any:
    """The project's history database. Commands that only read (``create=False``) leave a project
    without one as it is — no ``.provision/history.sqlite`` made by looking — and see an empty
    history (an in-memory database of the current schema)."""
    from provisioner.errors import HistoryError
    from provisioner.history.store import HISTORY_FILE, History

    settings = settings or _settings()
    path = settings.state_dir / HISTORY_FILE
    try:
        return History(path if create or path.exists() else Path(":memory:"))
    except HistoryError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def history() -> None:
    """Runs remembered in <state_dir>/history.sqlite (every pytest run that used provisioner)."""


@history.command("list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1), help="newest N runs")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def history_list(limit: int, as_json: bool) -> None:
    """Runs, newest first: outcomes, duration, cost."""
    with _history() as db:
        runs = db.runs(limit)
    if as_json:
        click.echo(json.dumps(runs, indent=2))
        return
    if not runs:
        click.echo("no runs recorded yet (run pytest with provisioner)")
        return
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, right in (("run", False), ("started (UTC)", False), ("layers", False), ("passed", True),
                        ("failed", True), ("error", True), ("skipped", True), ("duration s", True),
                        ("billed $", True), ("LM refused", True), ("ended", False), ("revision", False)):
        table.add_column(name, justify="right" if right else "left")
    from provisioner.reporting.dashboard import run_ended

    for run in runs:
        table.add_row(run["run_id"], run["started_at"][:19].replace("T", " "), "/".join(run["layers"]),
                      str(run["passed"]), str(run["failed"]), str(run["error"]), str(run["skipped"]),
                      f"{run['duration_s']:.1f}", f"{run['cost_usd']:.4f}", str(run["lm_refused"]),
                      run_ended(run), (run["revision"] or "-")[:20])
    _print_table(table)


@history.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def history_show(run_id: str, as_json: bool) -> None:
    """One run (RUN_ID or an unambiguous prefix) and its tests."""
    from provisioner.errors import HistoryError
    from provisioner.history.rows import row_lm_calls

    with _history() as db:
        try:
            run = db.run(run_id)
        except HistoryError as exc:
            raise UsageProblem(str(exc)) from None
        if run is None:
            known_run(run_id, [r["run_id"] for r in db.runs(None)], hint="runs in the history",
                      list_with="provision history list")
            return
        tests = db.tests(run["run_id"])
    if as_json:
        click.echo(json.dumps({"run": run, "tests": tests}, indent=2))
        return
    for key, value in run.items():
        click.echo(f"{key}: {value}")
    from rich import box
    from rich.table import Table

    table = Table(title="tests", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    # "rate-limit wait s": of its duration, the seconds its LM calls waited for a slot of lm.rate_limit_rpm.
    for name, right in (("outcome", False), ("duration s", True), ("rate-limit wait s", True),
                        ("billed $", True), ("LM calls", True), ("LM refused", True), ("LM errors", True),
                        ("xdist worker", False), ("test", False)):
        table.add_column(name, justify="right" if right else "left")
    for row in tests:
        duration = row["setup_s"] + row["call_s"] + row["teardown_s"]
        table.add_row(row["outcome"], f"{duration:.3f}", f"{row['lm_rate_limit_wait_s']:.1f}",
                      f"{row['cost_usd']:.6f}", str(row_lm_calls(row)), str(row["lm_refused"]),
                      str(row["lm_errors"]), row["xdist_worker"] or "-", row["node_id"])
    _print_table(table)
    if run["lm_rate_limit_wait_s"]:
        waited = sum(1 for row in tests if row["lm_rate_limit_wait_s"])
        click.echo(f"LM calls waited {run['lm_rate_limit_wait_s']:.1f} s in all for the rate limit "
                   f"(lm.rate_limit_rpm), in {waited} test{'s' if waited != 1 else ''}: time spent waiting, "
                   "not working (column rate-limit wait s)")


@history.command("import")
@click.argument("reports", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
def history_import(reports: tuple[Path, ...]) -> None:
    """Merge runs recorded elsewhere (--provision-report JSON files: CI artifacts, merged shards).

    A merged report (`provision history merge`) replaces its shards' runs if they are in the history
    (shards run on this machine recorded themselves): their tests and money would count twice.
    """
    from provisioner.errors import HistoryError
    from provisioner.history.store import merged_shard_ids, rows_from_report

    loaded = []
    for path in reports:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            loaded.append((*rows_from_report(data, str(path)), merged_shard_ids(data)))
        except ValueError as exc:
            raise click.ClickException(f"{path}: not JSON ({exc})") from None
        except HistoryError as exc:
            raise click.ClickException(str(exc)) from None
    with _history(create=True) as db:
        for run, tests, shards in loaded:  # all files checked first: a bad one imports nothing
            replaced = db.record(run, tests, replaces=shards)
            note = f", replacing its {replaced} shard run{'s' if replaced != 1 else ''}" if replaced else ""
            click.echo(f"imported {run['run_id']} ({len(tests)} tests{note})")


@history.command("merge")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for the merged reports (one per report file name)")
@click.option("--summary", "summary", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help='append the Markdown summary (one row per merged run, one cost total) to this file, '
                   'e.g. "$GITHUB_STEP_SUMMARY"')
@click.option("--allow-partial", is_flag=True,
              help="merge even when a shard of the split (pytest-split's i/N) has no report; "
                   "the merged run records which are missing")
@click.option("--import/--no-import", "import_", default=True, show_default=True,
              help="also record the merged runs in this project's history (replacing their shards' runs "
                   "recorded here), so `provision report html|markdown` shows them next")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def history_merge(paths: tuple[Path, ...], out_dir: Path, summary: Path | None, allow_partial: bool,
                  import_: bool, as_json: bool) -> None:
    """Merge CI shards' --provision-report files into one run per suite, and record it.

    PATHS are report files or folders (searched for *.json, e.g. the downloaded artifacts); reports
    with the same file name are the shards of one suite and become OUT/<name>: their tests, one cost
    total. Each merged run is also recorded in this project's history (<state_dir>/history.sqlite),
    replacing its shards' runs if they were recorded here; --no-import only writes the files (then
    `provision history import OUT/*.json`, e.g. on another machine). A split suite whose shards
    (pytest-split's i/N) are not all there is refused naming the missing ones, unless --allow-partial.
    """
    from provisioner.errors import HistoryError
    from provisioner.history.merge import merge_reports, write_merged
    from provisioner.reporting.markdown import render_merged

    try:
        merged = merge_reports(paths, allow_partial=allow_partial)
        written = write_merged(merged, out_dir)
    except HistoryError as exc:
        raise click.ClickException(str(exc)) from None
    if summary is not None:
        with summary.open("a", encoding="utf-8") as handle:
            handle.write(render_merged(merged))
    replaced: list[int | None] = [None] * len(merged)
    history_path = None
    if import_:
        with _history(create=True) as db:
            history_path = db.path
            for index, m in enumerate(merged):
                replaced[index] = db.record(m.run, m.tests, replaces=[s["run_id"] for s in m.shards])
    if as_json:
        click.echo(json.dumps([{"report": str(path), "run_id": m.run["run_id"], "shards": len(m.shards),
                                "tests": m.run["tests"], "cost_usd": m.run["cost_usd"],
                                "list_cost_usd": m.run["list_cost_usd"], "missing_shards": m.missing,
                                "imported": import_, "replaced_shard_runs": gone}
                               for m, path, gone in zip(merged, written, replaced, strict=True)], indent=2))
        return
    for m, path, gone in zip(merged, written, replaced, strict=True):
        click.echo(f"merged {len(m.shards)} shard{'s' if len(m.shards) != 1 else ''} into {path}: run "
                   f"{m.run['run_id']}, {m.run['tests']} tests, ${m.run['cost_usd']:.6f} billed "
                   f"(${m.run['list_cost_usd']:.6f} at list prices)"
                   + (f"; PARTIAL: shard{'s' if len(m.missing) > 1 else ''} {', '.join(m.missing)} missing"
                      if m.missing else ""))
        if gone is not None:
            note = f", replacing its {gone} shard run{'s' if gone != 1 else ''}" if gone else ""
            click.echo(f"imported {m.run['run_id']} into {history_path}{note}")
    if not import_:
        click.echo(f"not imported (--no-import): `provision history import {out_dir}/*.json` records them")


@history.command("prune")
@click.option("--keep", required=True, type=click.IntRange(0), help="keep the newest N runs")
def history_prune(keep: int) -> None:
    """Delete all but the newest N runs."""
    with _history() as db:
        deleted = db.prune(keep)
    click.echo(f"deleted {deleted} run{'s' if deleted != 1 else ''}, kept at most {keep}")


@main.group("report")
def report_group() -> None:
    """Views of the run history: an HTML page, a Markdown summary."""


def _dashboard(runs: int) -> Any:
    from provisioner.reporting.dashboard import gather

    settings = _settings()
    with _history(settings) as db:
        return settings, gather(db, window=runs, budget_usd=settings.lm.monthly_budget_usd)


_RUNS_OPTION = click.option("--runs", default=100, show_default=True, type=click.IntRange(1),
                            help="how many of the newest runs trends, flaky and per-test tables cover")


@report_group.command("html")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="directory for index.html (default: <state_dir>/report)")
@_RUNS_OPTION
def report_html(out_dir: Path | None, runs: int) -> None:
    """One self-contained page (no network): last run, trends, flaky and slowest tests, cost, cache, leaks."""
    from provisioner.reporting.html import write_page

    settings, board = _dashboard(runs)
    path, _ = write_page(board, out_dir or settings.state_dir / "report")
    click.echo(f"wrote {path}")


@report_group.command("markdown")
@_RUNS_OPTION
@click.option("--top", default=10, show_default=True, type=click.IntRange(1), help="rows per table")
def report_markdown(runs: int, top: int) -> None:
    """Headline numbers and top tables as Markdown (e.g. >> "$GITHUB_STEP_SUMMARY")."""
    from provisioner.reporting.markdown import render

    _, board = _dashboard(runs)
    click.echo(render(board, top=top), nl=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
