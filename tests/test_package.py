"""The package's import boundaries: what runs inside worker containers stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

HOST_ONLY = ("docker", "testcontainers", "polyfactory", "pytest", "rich", "provisioner.runtime")


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_worker_side_imports_pull_no_host_only_packages() -> None:
    worker_side = ", ".join(
        (
            "provisioner",
            "provisioner.bridge",
            "provisioner.bridge.server",
            "provisioner.lm",
            "provisioner.cli",
        )
    )

    loaded = _modules_after(f"import {worker_side}")
    leaked = sorted(m for m in loaded if m.split(".")[0] in HOST_ONLY or m.startswith("provisioner.runtime"))
    assert leaked == []


def test_public_api_is_reexported() -> None:
    import provisioner

    for name in ("load_settings", "get_layer", "LMConfig", "BridgeError", "environment", "Environment"):
        assert getattr(provisioner, name) is not None
    assert set(provisioner.__all__) >= {"load_settings", "environment", "open_environment", "Environment"}


def test_the_distribution_is_dspy_provisioner_and_the_command_reports_its_version() -> None:
    import importlib.metadata as md
    from pathlib import Path

    dist = md.distribution("dspy-provisioner")
    assert dist.metadata["Name"] == "dspy-provisioner"
    assert "provisioner" in (dist.read_text("top_level.txt") or "provisioner").split()
    provision = Path(sys.executable).with_name("provision")
    out = subprocess.run([str(provision), "--version"], capture_output=True, text=True, check=True).stdout
    assert dist.version in out


def test_an_editable_install_is_a_plain_path_entry_not_only_an_import_hook() -> None:
    """setuptools' default editable mode for this flat layout is a meta-path finder that static tools
    (mypy, pyright) cannot follow; pyproject asks for a .pth path entry instead."""
    import importlib.metadata as md
    import json

    # The installed .dist-info (setuptools also leaves a .egg-info in a checkout, first on sys.path).
    dists = [d for d in md.distributions(name="dspy-provisioner") if d.read_text("METADATA")]
    assert dists, "dspy-provisioner is not installed"
    dist = dists[0]
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if not direct.get("dir_info", {}).get("editable"):
        pytest.skip("provisioner is not installed editable here (e.g. from the wheel)")
    pth = [f for f in dist.files or [] if f.name.endswith(".pth")]
    assert pth, "the editable install wrote no .pth file"
    for entry in pth:
        lines = [ln for ln in entry.read_text().splitlines() if ln.strip()]
        assert lines and not any(ln.startswith("import ") for ln in lines), (entry, lines)


def test_mypy_in_a_user_project_sees_the_installed_package(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    (tmp_path / "user.py").write_text("from provisioner import load_settings\nx: int = load_settings()\n")
    mypy = Path(sys.executable).with_name("mypy")
    done = subprocess.run(
        [str(mypy), "--cache-dir", str(tmp_path / ".mypy_cache"), "--no-error-summary", "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert "Cannot find implementation" not in done.stdout and "missing library stubs" not in done.stdout
    assert 'expression has type "Settings", variable has type "int"' in done.stdout, done.stdout
