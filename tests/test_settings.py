from __future__ import annotations

from pathlib import Path

import pytest

from provisioner import ConfigError, load_settings
from provisioner.lmconfig import LMConfig, worker_secrets

from ._helpers import clear_settings, without_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_settings(monkeypatch)
    monkeypatch.chdir(tmp_path)


def test_the_tests_clean_environment_has_no_variable_a_setting_is_read_from(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """tests/_helpers.py's ``clear_settings`` (the ``no_settings_env`` fixture) and ``without_settings``
    (the environment of the processes tests start), one list for every test: after them no setting's
    source is the environment — the prefix in any case (pydantic-settings matches it so) and the three
    aliases. The copies they replaced missed ``LM_CACHE_DIR``, or everything but ``PROVISION_*``."""
    given = {"PROVISION_MAX_POOL_SIZE": "7", "provision_lm__mode": "real", "TEST_MODE": "e2e",
             "LM_CACHE_DIR": str(tmp_path / "cassettes"), "GEMINI_TEST_API_KEY": "key-0123456789"}
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    read = load_settings(project_dir=tmp_path)
    assert {path for path, label in read.sources.items() if label.startswith("env")} == {
        "max_pool_size", "lm.mode", "layer", "lm.cache_dir", "lm.api_key"}
    assert not set(given) & set(without_settings()) and "PATH" in without_settings()
    clear_settings(monkeypatch)
    after = load_settings(project_dir=tmp_path).sources
    assert not [label for label in after.values() if label.startswith("env")], after


def test_defaults_match_the_plan(tmp_path: Path) -> None:
    s = load_settings(project_dir=tmp_path)
    assert s.max_python_processes == 4
    assert s.max_pool_size == 2
    assert s.process_timeout == 30
    assert s.lm_modes == {"unit": "mock", "integration": "cached", "e2e": "real"}
    assert s.cleanup_policy == "aggressive"
    assert s.retain_on_failure is True
    assert s.max_parallel_cases >= 1
    assert s.source_of("max_pool_size") == "default"


def test_precedence_cli_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pyproject.toml").write_text(
        "[tool.provisioner]\nmax_pool_size = 5\nmax_python_processes = 7\nlayer = 'integration'\n"
        "[tool.provisioner.lm]\nrate_limit_rpm = 3\n"
    )
    monkeypatch.setenv("PROVISION_MAX_POOL_SIZE", "6")
    s = load_settings(cli={"max_pool_size": 9}, project_dir=tmp_path)
    assert s.max_pool_size == 9 and s.source_of("max_pool_size") == "cli --max-pool-size"
    s = load_settings(project_dir=tmp_path)
    assert s.max_pool_size == 6 and s.source_of("max_pool_size") == "env PROVISION_MAX_POOL_SIZE"
    assert s.max_python_processes == 7 and "pyproject.toml" in s.source_of("max_python_processes")
    assert s.lm.rate_limit_rpm == 3 and "pyproject.toml" in s.source_of("lm.rate_limit_rpm")
    assert s.layer == "integration"


def test_test_mode_alias_and_prefixed_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_MODE", "e2e")
    s = load_settings(project_dir=tmp_path)
    assert s.layer == "e2e" and s.source_of("layer") == "env TEST_MODE"
    monkeypatch.setenv("PROVISION_LAYER", "integration")
    assert load_settings(project_dir=tmp_path).layer == "integration"


def test_provision_toml_is_read(tmp_path: Path) -> None:
    (tmp_path / "provision.toml").write_text("cleanup_policy = 'never'\n")
    s = load_settings(project_dir=tmp_path)
    assert s.cleanup_policy == "never" and s.source_of("cleanup_policy") == "provision.toml"


@pytest.mark.parametrize(
    ("env", "value", "field"),
    [
        ("PROVISION_LM__RATE_LIMIT_RPM", "abc", "lm.rate_limit_rpm"),
        ("PROVISION_CLEANUP_POLICY", "sometimes", "cleanup_policy"),
        ("PROVISION_MAX_POOL_SIZE", "0", "max_pool_size"),
    ],
)
def test_bad_value_names_field_value_and_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str, value: str, field: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings(project_dir=tmp_path)
    text = str(info.value)
    assert field in text and repr(value) in text and f"env {env}" in text


def test_bad_value_in_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.provisioner]\nretain_on_failure = 'maybe'\nbogus = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(project_dir=tmp_path)
    text = str(info.value)
    assert "retain_on_failure" in text and "'maybe'" in text and "pyproject.toml" in text
    assert "bogus" in text


def test_api_key_is_secret_and_never_serialised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_TEST_API_KEY", "sk-very-secret")
    s = load_settings(project_dir=tmp_path)
    assert s.lm.api_key is not None and s.lm.api_key.get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in s.model_dump_json()
    assert "sk-very-secret" not in repr(s)
    assert "sk-very-secret" not in s.lm.public_json()


def test_lm_config_round_trips_through_worker_env() -> None:
    cfg = LMConfig(mode="real", model="gemini-2.5-flash", rate_limit_rpm=4, api_key="k-123")  # type: ignore[arg-type]
    env = cfg.to_worker_env()
    assert "GEMINI_TEST_API_KEY" not in env and "k-123" not in env["PROVISION_LM_CONFIG"]
    back = LMConfig.from_worker_env({**env, **worker_secrets(cfg, endpoint="api")})
    assert back is not None and back.model == "gemini-2.5-flash" and back.rate_limit_rpm == 4
    assert back.api_key is not None and back.api_key.get_secret_value() == "k-123"


def test_project_root_is_found_from_a_subfolder(tmp_path: Path) -> None:
    from provisioner.settings import project_root

    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    deep = tmp_path / "tests" / "unit"
    deep.mkdir(parents=True)
    assert project_root(deep) == tmp_path
    (tmp_path / "tests" / "provision.toml").write_text("layer = 'integration'\n")
    assert project_root(deep) == tmp_path / "tests"
    lone = tmp_path.parent / f"{tmp_path.name}-lone"
    lone.mkdir()
    assert project_root(lone) == lone  # nothing above: the folder itself


def test_relative_paths_are_anchored_at_the_project_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.provisioner]\nstate_dir = 'var/state'\n")
    sub = tmp_path / "tests"
    sub.mkdir()
    monkeypatch.chdir(sub)
    s = load_settings()
    assert s.project_dir == tmp_path
    assert s.state_dir == tmp_path / "var" / "state"
    assert s.lm.cache_dir == tmp_path / "test" / "fixtures" / "lm_responses"
    monkeypatch.setenv("LM_CACHE_DIR", "/abs/cassettes")
    assert load_settings().lm.cache_dir == Path("/abs/cassettes")


def test_a_mistyped_choice_value_names_the_closest_choice(tmp_path: Path) -> None:
    """A value that must be one of a fixed set (a layer's ``isolation``, ``lm.mode``) says "did you
    mean", as the README promises for unknown values (a new-user trial got only pydantic's list)."""
    (tmp_path / "pyproject.toml").write_text(
        "[tool.provisioner.lm]\nmode = 'cahced'\n[tool.provisioner.layers.smoke]\nisolation = 'proces'\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(project_dir=tmp_path)
    text = str(info.value)
    assert "'layers.smoke.isolation' = 'proces'" in text and "(did you mean 'process'?)" in text
    assert "'lm.mode' = 'cahced'" in text and "(did you mean 'cached'?)" in text
    (tmp_path / "pyproject.toml").write_text("[tool.provisioner.layers.smoke]\nisolation = 'zzz'\n")
    with pytest.raises(ConfigError) as nothing_close:
        load_settings(project_dir=tmp_path)
    assert "did you mean" not in str(nothing_close.value)


def test_unknown_key_names_the_closest_setting(tmp_path: Path) -> None:
    from provisioner.errors import UnknownNameError

    (tmp_path / "pyproject.toml").write_text("[tool.provisioner.container]\nmemroy = '2g'\n")
    with pytest.raises(UnknownNameError) as info:
        load_settings(project_dir=tmp_path)
    assert info.value.suggestion == "memory"
    assert "'memroy'" in str(info.value) and "pyproject.toml [tool.provisioner]" in str(info.value)
    assert "ready_timeout_s" in str(info.value)  # the known keys are listed


def test_an_unknown_lm_key_lists_only_the_keys_a_user_can_set(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """A user's trial: ``PROVISION_LM__COST_LIMT_USD=1 provision config`` listed run_dir, run_id,
    layer, endpoint_kind, limits_share_of and cache_dir_shown, which the run sets itself."""
    from provisioner.errors import UnknownNameError
    from provisioner.lmconfig import INTERNAL_LM_FIELDS

    monkeypatch.setenv("PROVISION_LM__COST_LIMT_USD", "1")
    with pytest.raises(UnknownNameError) as info:
        load_settings(project_dir=tmp_path)
    message = str(info.value)
    assert info.value.suggestion == "cost_limit_usd" and "rate_limit_rpm" in message
    listed = message.split("known keys: ", 1)[1]
    assert not [name for name in INTERNAL_LM_FIELDS if f" {name}," in f" {listed}"], listed


def test_a_sessions_slots_above_the_workers_are_refused_naming_both_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_settings(monkeypatch)
    (tmp_path / "pyproject.toml").write_text("[tool.provisioner.worker]\nmax_inflight_per_session = 10\n")
    with pytest.raises(ConfigError) as info:
        load_settings(project_dir=tmp_path)
    text = str(info.value)
    assert "max_inflight_per_session=10 is more than max_inflight=8" in text and "pyproject.toml" in text
    monkeypatch.setenv("PROVISION_WORKER__MAX_INFLIGHT", "10")
    assert load_settings(project_dir=tmp_path).worker.max_inflight_per_session == 10  # equal: allowed
