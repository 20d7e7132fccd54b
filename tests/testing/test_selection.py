from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.testing.selection import split_by_layer

pytestmark = pytest.mark.usefixtures("no_settings_env")


def test_split_by_layer_keeps_unmarked_and_matching() -> None:
    items = [("a", ["unit"]), ("b", ["integration"]), ("c", []), ("d", ["unit", "e2e"]), ("e", ["slow"])]
    kept, dropped = split_by_layer(items, "e2e", ["unit", "integration", "e2e"])
    assert kept == ["c", "d", "e"]
    assert dropped == ["a", "b"]


@pytest.mark.parametrize(
    ("policy", "retain_on_failure", "failed", "kept"),
    [
        ("aggressive", True, True, False),
        ("on_success", True, True, True),
        ("on_success", False, True, False),
        ("on_success", True, False, False),
        ("never", False, False, True),
    ],
)
def test_retain_follows_the_cleanup_policy(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    retain_on_failure: bool,
    failed: bool,
    kept: bool,
) -> None:
    from provisioner.testing.plugin_state import ProvisionRun

    monkeypatch.setenv("PROVISION_CLEANUP_POLICY", policy)
    monkeypatch.setenv("PROVISION_RETAIN_ON_FAILURE", str(retain_on_failure).lower())
    run = ProvisionRun.from_pytest(
        layer="integration", lm_mode=None, record_mode=None, report_path=None,
        project_dir=tmp_path, invocation_dir=tmp_path, workerinput=None,
    )
    assert run.retain(failed) is kept
