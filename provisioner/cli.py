"""The ``provision`` command: a thin click edge over provisioner's Python API.

Each command parses flags, calls one plain function, and prints. No logic lives here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from provisioner.errors import ProvisionerError
from provisioner.layers import resolve_layers
from provisioner.settings import Settings, load_settings


def _settings(**cli: Any) -> Settings:
    try:
        return load_settings(cli=cli)
    except ProvisionerError as exc:
        raise click.ClickException(str(exc)) from None


class _Group(click.Group):
    """Turns provisioner's own errors into clean one-line failures instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ProvisionerError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group)
@click.version_option(package_name="provisioner")
def main() -> None:
    """Isolated, cheap container test environments for DSPy programs."""


# --- settings and layers ------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def layers(as_json: bool) -> None:
    """List the layers (built-in and user-defined) and their recipes."""
    resolved = resolve_layers(_settings())
    if as_json:
        click.echo(json.dumps({n: layer.model_dump(mode="json") for n, layer in resolved.items()}, indent=2))
        return
    header = f"{'layer':<14}{'adapter':<9}{'python':<8}{'pooling':<9}{'lm':<8}{'isolation':<11}{'workers':<8}"
    click.echo(header)
    for layer in resolved.values():
        click.echo(
            f"{layer.name:<14}{layer.adapter:<9}{'yes' if layer.python else 'no':<8}"
            f"{'yes' if layer.pooling_enabled else 'no':<9}{layer.lm_mode:<8}{layer.isolation:<11}"
            f"{layer.workers:<8}{layer.description}"
        )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--layer", default=None, help="the active layer (overrides TEST_MODE)")
def config(as_json: bool, layer: str | None) -> None:
    """Print the effective settings and where each value came from."""
    settings = _settings(layer=layer)
    values = settings.model_dump(mode="json")
    if settings.lm.api_key is not None:
        values["lm"]["api_key"] = "**********"
    rows = []
    for path, value in _leaves(values):
        rows.append({"field": path, "value": value, "source": settings.source_of(path)})
    if as_json:
        sources = {r["field"]: r["source"] for r in rows}
        click.echo(json.dumps({"settings": values, "sources": sources}, indent=2))
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
def worker(host: str, port: int, ready_file: Path | None, stdio: bool, lm_config_file: Path | None) -> None:
    """Run a DSPy bridge worker in the foreground.

    Prints one line `PROVISION_WORKER_READY port=<n>` when it accepts requests; exits 0 after the
    `shutdown` command or SIGTERM, once in-flight requests have been answered.
    """
    from provisioner.bridge.server import run_worker, startup_lm_config

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
        )
    )


# --- LM modes, cassettes, cost, Gemini stand-in (provisioner.lm) --------------------------------


def _cache_dir_option(fn: Any) -> Any:
    return click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="cassette directory (default: lm.cache_dir / LM_CACHE_DIR)")(fn)


@main.group()
def cassettes() -> None:
    """Inspect and maintain the cached mode's recorded LM responses."""


@cassettes.command("list")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def cassettes_list(cache_dir: Path | None, as_json: bool) -> None:
    """List the recorded entries: key, when, and the request they answer."""
    from provisioner.lm.cassettes import list_cassettes

    root = cache_dir or _settings().lm.cache_dir
    infos = list_cassettes(root)
    if as_json:
        click.echo(json.dumps([{"key": i.key, "path": str(i.path), "recorded_at": i.recorded_at,
                                "request": i.description, "bytes": i.size, "test_id": i.test_id}
                               for i in infos], indent=2))
        return
    for info in infos:
        click.echo(f"{info.key[:12]}  {info.recorded_at}  {info.description}")
    click.echo(f"{len(infos)} entries under {root}")


@cassettes.command("verify")
@_cache_dir_option
def cassettes_verify(cache_dir: Path | None) -> None:
    """Check every entry (JSON, key matches request, has a response, holds no API key); exit 1 on problems."""
    from provisioner.lm.cassettes import verify_cassettes

    settings = _settings()
    root = cache_dir or settings.lm.cache_dir
    secrets = [settings.lm.api_key.get_secret_value()] if settings.lm.api_key else []
    report = verify_cassettes(root, secrets=secrets)
    for path, problem in report.problems:
        click.echo(f"{path}: {problem}", err=True)
    click.echo(f"{report.checked} entries checked under {root}, {len(report.problems)} problem(s)")
    if not report.ok:
        sys.exit(1)


@cassettes.command("prune")
@_cache_dir_option
@click.option("--run", "run_id", default=None, help="prune against this run (default: the last full run)")
@click.option("--dry-run", is_flag=True, help="only list what would be removed")
@click.option("--force", is_flag=True, help="prune even against a partial run")
def cassettes_prune(cache_dir: Path | None, run_id: str | None, dry_run: bool, force: bool) -> None:
    """Remove entries that no test used in the last full run."""
    from provisioner.lm.cassettes import prune_unused
    from provisioner.lm.ledger import ledger_sources

    settings = _settings()
    root = cache_dir or settings.lm.cache_dir
    result = prune_unused(root, ledger_sources(settings.state_dir), run_id=run_id, dry_run=dry_run,
                          force=force)
    for path in result.removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    click.echo(f"run {result.run_id}: {len(result.removed)} unused, {result.kept} kept")


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

    settings = _settings()
    if month == "current":
        month = datetime.datetime.now(datetime.UTC).strftime("%Y-%m")
    report = build_report(ledger_sources(settings.state_dir, extra), run_id=run_id, month=month,
                          monthly_budget_usd=settings.lm.monthly_budget_usd)
    if not as_json:
        click.echo(format_cost_report(report))  # budget warnings are part of the text
        return
    click.echo(json.dumps(report.as_dict(), indent=2))
    for over in report.over_budget_months:
        click.echo(f"warning: {over} is over the monthly budget of ${settings.lm.monthly_budget_usd:.2f}",
                   err=True)


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
def standin_gemini(host: str, port: int, ready_file: Path | None, api_key_env: str, latency_ms: int) -> None:
    """Serve Gemini's generateContent REST API locally.

    Prints one line `PROVISION_STANDIN_READY port=<n>` when listening; stops on SIGTERM/SIGINT.
    """
    from provisioner.lm.standin import serve

    serve(host=host, port=port, api_key=os.environ.get(api_key_env) or None, ready_file=ready_file,
          latency_ms=latency_ms)


# --- containers: images, up/down/status/run/reap/doctor, compose (provisioner.runtime) ----------


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
