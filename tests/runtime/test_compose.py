"""The checked-in compose files are exactly what the recipes produce."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from provisioner.runtime.compose import container_layers, export_layer
from provisioner.settings import load_settings

from .._helpers import clear_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo_settings(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    clear_settings(monkeypatch)
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
            assert "privileged" not in service
            if name.endswith("-guard"):
                # The one-shot egress guard: root with CAP_NET_ADMIN only, in its target's namespace.
                target = name.removesuffix("-guard")
                assert service["network_mode"] == f"service:{target}" and service["cap_add"] == ["NET_ADMIN"]
                assert "no-new-privileges:true" in service["security_opt"] and "ports" not in service
                gate = ["python3", "-P", "/opt/provisioner/netguard.py", "wait"]
                assert doc["services"][target]["command"][:4] == gate

                continue
            assert not str(service["user"]).startswith("0") and "cap_add" not in service
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
    # Every container on the internal run network has its guard; the relay (edge network) has none.
    for doc in (e2e, yaml.safe_load(export_layer(repo_settings, "integration"))):
        on_run_only = [n for n, s in doc["services"].items() if list(s.get("networks", {})) == ["run"]]
        assert on_run_only and all(f"{n}-guard" in doc["services"] for n in on_run_only)
        assert "relay-guard" not in doc["services"]


def test_export_to_a_folder_names_the_projects_image_tag_in_env(repo_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from provisioner.runtime.compose import export_layers
    from provisioner.runtime.images import project_tag
    from provisioner.runtime.labels import project_id

    (tmp_path / ".env").write_text("MY_OWN=1\nPROVISION_WORKER_IMAGE=old\n")
    written = export_layers(repo_settings, ["e2e"], tmp_path)
    assert written == [tmp_path / "e2e.yml", tmp_path / ".env"]
    assert written[0].read_text() == (ROOT / "compose" / "e2e.yml").read_text()
    # The machine-specific part lives in .env (read by docker-compose from the files' folder).
    expected = f"MY_OWN=1\nPROVISION_WORKER_IMAGE={project_tag(project_id(ROOT))}\n"
    assert (tmp_path / ".env").read_text() == expected


def test_compose_files_name_no_shared_latest_tag_and_nothing_machine_specific(repo_settings) -> None:  # type: ignore[no-untyped-def]
    from provisioner.runtime.labels import project_id

    for layer in ("integration", "e2e"):
        text = (ROOT / "compose" / f"{layer}.yml").read_text()
        assert ":latest" not in text and project_id(ROOT) not in text and str(ROOT) not in text
        images = {s["image"] for s in yaml.safe_load(text)["services"].values()}
        assert images == {"${PROVISION_WORKER_IMAGE:?is not set: run provision compose export, which writes "
                          "it into .env}"}


def test_a_layer_without_containers_is_explained_and_nothing_is_written(
    repo_settings, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    from provisioner.errors import NoContainersError
    from provisioner.runtime.compose import export_layers

    target = tmp_path / "compose"
    with pytest.raises(NoContainersError, match=r"'unit' runs in-process .* layers with containers: "
                                                r"integration, e2e"):
        export_layers(repo_settings, ["integration", "unit"], target)
    assert not target.exists()  # not even the folder: every layer is checked before writing


def test_cli_compose_export_of_the_unit_layer_exits_2_without_a_traceback(
    repo_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    import subprocess
    import sys

    project = tmp_path / "proj"
    project.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname = 'p'\n[tool.provisioner]\n")
    cli = Path(sys.executable).with_name("provision")
    done = subprocess.run([str(cli), "compose", "export", "--layer", "unit"], cwd=project,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and "has no containers" in done.stderr
    assert sorted(p.name for p in project.iterdir()) == ["pyproject.toml"]  # no empty compose/


def _cassette_source(text: str) -> str:
    doc = yaml.safe_load(text)
    mounts = [v for v in doc["services"]["w0"]["volumes"] if v.endswith(":/provision/cassettes")
              or v.endswith(":/provision/cassettes:ro")]
    assert len(mounts) == 1, doc["services"]["w0"]["volumes"]
    default = mounts[0].split("}:", 1)[0].removeprefix("${LM_CACHE_DIR:-")
    return default


def test_export_from_a_subfolder_writes_the_cassette_path_relative_to_the_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI from ``<project>/tests/unit``: the same file as from the root, no absolute path."""
    import subprocess
    import sys

    clear_settings(monkeypatch)
    project = tmp_path / "proj"
    (project / "tests" / "unit").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        "[project]\nname = 'p'\n[tool.provisioner]\nlm.cache_dir = 'fixtures/cassettes'\n")
    cli = Path(sys.executable).with_name("provision")
    texts = {}
    for cwd in (project, project / "tests" / "unit"):
        done = subprocess.run([str(cli), "compose", "export", "--layer", "integration", "-o", "-"], cwd=cwd,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done
        texts[cwd] = done.stdout
    assert texts[project] == texts[project / "tests" / "unit"]
    assert str(tmp_path) not in texts[project]
    assert _cassette_source(texts[project]) == "../fixtures/cassettes"  # from compose/
    # Written from the subfolder: into <project>/compose, the path relative to that folder.
    done = subprocess.run([str(cli), "compose", "export", "--layer", "integration"], cwd=project / "tests",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done
    written = (project / "compose" / "integration.yml").read_text()
    assert written == texts[project] and not (project / "tests" / "compose").exists()


def test_export_to_another_folder_points_the_cassette_mount_at_the_same_directory(
    repo_settings, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """docker-compose resolves a relative bind path against the compose file's folder: from
    wherever the file is exported to, the path leads to the project's cassettes."""
    from provisioner.runtime.compose import export_layers

    for target in (tmp_path / "deploy" / "compose", tmp_path / "one.yml"):
        written = export_layers(repo_settings, ["integration"], target)
        source = _cassette_source(written[0].read_text())
        assert not Path(source).is_absolute()
        assert (written[0].parent / source).resolve() == repo_settings.lm.cache_dir.resolve()
