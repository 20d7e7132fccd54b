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


# --- containers: images, up/down/status/run/reap/doctor, compose (provisioner.runtime) ----------


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
