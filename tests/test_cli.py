"""The settings/layers edge of the CLI (other commands are tested beside their modules)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from provisioner.cli import main


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import os

    for name in list(os.environ):
        if name.startswith("PROVISION_") or name in ("TEST_MODE", "LM_CACHE_DIR", "GEMINI_TEST_API_KEY"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        "[tool.provisioner]\nmax_pool_size = 3\n[tool.provisioner.layers.smoke]\nlm_mode = 'mock'\n"
    )
    return tmp_path


def test_layers_json_lists_builtins_and_custom(project: Path) -> None:
    result = CliRunner().invoke(main, ["layers", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert list(data) == ["unit", "integration", "e2e", "smoke"]
    assert data["e2e"]["pooling_enabled"] is True and data["e2e"]["workers"] == 3
    assert data["unit"]["lm_mode"] == "mock"


def test_layers_table(project: Path) -> None:
    result = CliRunner().invoke(main, ["layers"])
    assert result.exit_code == 0
    assert "integration" in result.output and "cached" in result.output and "smoke" in result.output


def test_config_shows_values_and_sources(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_MODE", "integration")
    monkeypatch.setenv("GEMINI_TEST_API_KEY", "top-secret-key")
    result = CliRunner().invoke(main, ["config", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["settings"]["layer"] == "integration"
    assert data["sources"]["layer"] == "env TEST_MODE"
    assert data["sources"]["max_pool_size"] == "pyproject.toml [tool.provisioner]"
    assert data["sources"]["cleanup_policy"] == "default"
    assert "top-secret-key" not in result.output
    cli = CliRunner().invoke(main, ["config", "--layer", "e2e", "--json"])
    assert json.loads(cli.output)["sources"]["layer"] == "cli --layer"


def test_bad_setting_is_a_clean_error(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVISION_MAX_POOL_SIZE", "many")
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code != 0
    assert "max_pool_size" in result.output and "'many'" in result.output
    assert "PROVISION_MAX_POOL_SIZE" in result.output
    assert "Traceback" not in result.output
