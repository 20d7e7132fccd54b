"""The ``provision`` command: a thin click edge over provisioner's Python API.

Each command parses flags, calls one plain function, and prints. No logic lives here.
"""

from __future__ import annotations

import json
import sys
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


# --- LM modes, cassettes, cost, Gemini stand-in (provisioner.lm) --------------------------------


# --- containers: images, up/down/status/run/reap/doctor, compose (provisioner.runtime) ----------


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
