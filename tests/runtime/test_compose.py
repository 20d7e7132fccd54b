"""The checked-in compose files are exactly what the recipes produce."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from provisioner.runtime.compose import container_layers, export_layer
from provisioner.runtime.images import project_root
from provisioner.settings import load_settings

ROOT = project_root()


@pytest.fixture
def repo_settings(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for key in list(os.environ):
        if key.startswith("PROVISION_") or key in ("TEST_MODE", "LM_CACHE_DIR", "GEMINI_TEST_API_KEY"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(ROOT)
    return load_settings(project_dir=ROOT)


def test_every_container_layer_has_an_up_to_date_compose_file(repo_settings) -> None:  # type: ignore[no-untyped-def]
    layers = container_layers(repo_settings)
    assert layers == ["integration", "e2e"]
    for layer in layers:
        path = ROOT / "compose" / f"{layer}.yml"
        assert path.is_file(), f"{path} is missing: run `provision compose export`"
        assert path.read_text() == export_layer(repo_settings, layer), (
            f"{path} drifted from the recipes: run `provision compose export --layer {layer}`"
        )


def test_compose_files_keep_the_security_properties(repo_settings) -> None:  # type: ignore[no-untyped-def]
    for layer in ("integration", "e2e"):
        doc = yaml.safe_load(export_layer(repo_settings, layer))
        assert doc["version"] == "2.4"
        assert doc["networks"]["run"]["internal"] is True  # e2e talks to the stand-in, not the internet
        for name, service in doc["services"].items():
            assert service["cap_drop"] == ["ALL"] and service["read_only"] is True, name
            assert not str(service["user"]).startswith("0") and "privileged" not in service
            for port in service.get("ports", []):
                assert port.startswith("127.0.0.1::"), (name, port)
            if name.startswith("w"):
                assert "ports" not in service and list(service["networks"]) == ["run"]
        assert all(
            "GEMINI_TEST_API_KEY" not in s["environment"]
            or s["environment"]["GEMINI_TEST_API_KEY"].startswith("provision-standin")
            for s in doc["services"].values()
        )
    e2e = yaml.safe_load(export_layer(repo_settings, "e2e"))
    assert "gemini-standin" in e2e["services"] and e2e["services"]["w0"]["depends_on"] == ["gemini-standin"]


def test_export_to_a_folder(repo_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from provisioner.runtime.compose import export_layers

    written = export_layers(repo_settings, ["e2e"], tmp_path)
    assert written == [tmp_path / "e2e.yml"]
    assert written[0].read_text() == (ROOT / "compose" / "e2e.yml").read_text()
