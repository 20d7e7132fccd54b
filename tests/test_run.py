"""provisioner.run: options resolved into a run, the run identity shared by its processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.errors import ConfigError, UnknownLayerError
from provisioner.run import RunIdentity, RunOptions, check_run_id, new_run_id, resolve_run, state_dir

pytestmark = pytest.mark.usefixtures("no_settings_env")


def test_resolve_run_applies_flags_and_anchors_paths(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.provisioner]\nlayer = "integration"\n')
    options = RunOptions(lm_mode="mock", record_mode="none")
    resolved = resolve_run(options, tmp_path, run_id="r1x", run_dir=tmp_path)
    assert resolved.layer.name == "integration"
    assert resolved.lm_config.mode == "mock"  # --lm beats the layer's cached mode
    assert resolved.lm_config.record_mode == "none"
    assert resolved.lm_config.cache_dir == tmp_path / "test/fixtures/lm_responses"
    assert resolved.lm_config.run_id == "r1x" and resolved.lm_config.layer == "integration"
    assert resolve_run(RunOptions(layer="e2e"), tmp_path).lm_config.mode == "real"
    assert state_dir(resolved.settings, tmp_path) == tmp_path / ".provision"


def test_resolve_run_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(UnknownLayerError, match="unknown layer 'nope'"):
        resolve_run(RunOptions(layer="nope"), tmp_path)
    with pytest.raises(ConfigError, match="--lm must be one of mock, cached, real"):
        RunOptions(lm_mode="fake")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--record-mode"):
        RunOptions(record_mode="sometimes")  # type: ignore[arg-type]


def test_run_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = new_run_id(), new_run_id()
    assert first != second and check_run_id(first) == first
    identity = RunIdentity.create(tmp_path)
    assert identity.controller and identity.run_dir == tmp_path / "runs" / identity.run_id
    monkeypatch.setenv("PROVISION_RUN_ID", "r-shared-1")
    monkeypatch.setenv("PROVISION_RUN_DIR", str(tmp_path / "elsewhere"))
    inherited = RunIdentity.create(tmp_path)
    assert inherited.run_id == "r-shared-1" and inherited.run_dir == tmp_path / "elsewhere"
    joined = RunIdentity.joined("r-shared-1", tmp_path)
    assert not joined.controller and joined.as_env()["PROVISION_RUN_ID"] == "r-shared-1"
    with pytest.raises(ValueError, match="container and network names"):
        check_run_id("Bad Run!")


def test_shards_split_the_runs_limits_and_splits_sets_them(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROVISION_LM__SHARDS", raising=False)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.provisioner]\nlayer = "e2e"\nlm.cost_limit_usd = 1.0\nlm.rate_limit_rpm = 10\n')
    whole = resolve_run(RunOptions(), tmp_path).lm_config
    assert (whole.cost_limit_usd, whole.rate_limit_rpm) == (1.0, 10)
    share = resolve_run(RunOptions(shards=4), tmp_path).lm_config  # pytest-split's --splits 4
    assert (share.cost_limit_usd, share.rate_limit_rpm) == (0.25, 2)
    assert (share.shards, share.limits_share_of) == (1, 4)
    assert "lm.shards=4" in share.limits_note and whole.limits_note == ""
    assert share.shard_share() == share  # a share is not split again
    # The same split from the settings (e.g. PROVISION_LM__SHARDS on each CI shard, or `provision up`):
    monkeypatch.setenv("PROVISION_LM__SHARDS", "4")
    assert resolve_run(RunOptions(), tmp_path).lm_config.cost_limit_usd == 0.25
    assert resolve_run(RunOptions(shards=4), tmp_path).lm_config.cost_limit_usd == 0.25
    with pytest.raises(ConfigError, match=r"--splits 3 and lm.shards=4 \(from env PROVISION_LM__SHARDS\)"):
        resolve_run(RunOptions(shards=3), tmp_path)
    monkeypatch.setenv("PROVISION_LM__SHARDS", "11")
    with pytest.raises(ConfigError, match=r"lm.rate_limit_rpm=10 cannot be shared by lm.shards=11"):
        resolve_run(RunOptions(), tmp_path)


def test_the_gemini_stand_in_does_not_wait_for_the_real_api_s_rate_limit_unless_it_was_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's trial: 29 calls the stand-in answered waited 137 s for the real API's default 10 rpm."""
    from provisioner.lmconfig import STANDIN_RATE_LIMIT_RPM

    standin = resolve_run(RunOptions(layer="e2e"), tmp_path).lm_config
    assert standin.rate_limit_rpm == STANDIN_RATE_LIMIT_RPM > 10
    assert resolve_run(RunOptions(layer="e2e", shards=2), tmp_path).lm_config.rate_limit_rpm == (
        STANDIN_RATE_LIMIT_RPM // 2)
    monkeypatch.setenv("GEMINI_TEST_API_KEY", "a-key")  # real Gemini: its default protects the account
    assert resolve_run(RunOptions(layer="e2e"), tmp_path).lm_config.rate_limit_rpm == 10
    monkeypatch.delenv("GEMINI_TEST_API_KEY")
    monkeypatch.setenv("PROVISION_LM__RATE_LIMIT_RPM", "10")  # the user's (a test of the limit): it holds
    assert resolve_run(RunOptions(layer="e2e"), tmp_path).lm_config.rate_limit_rpm == 10
    monkeypatch.delenv("PROVISION_LM__RATE_LIMIT_RPM")
    (tmp_path / "pyproject.toml").write_text("[tool.provisioner]\nlm.rate_limit_rpm = 3\n")
    assert resolve_run(RunOptions(layer="e2e"), tmp_path).lm_config.rate_limit_rpm == 3
