"""The package's import boundaries: what runs inside worker containers stays light."""

from __future__ import annotations

import subprocess
import sys

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
