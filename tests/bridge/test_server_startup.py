"""Worker start-up pieces, in-process: which LM configuration wins, and the atomic ready file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provisioner.bridge.server import startup_lm_config, write_ready_file
from provisioner.errors import ConfigError
from provisioner.lmconfig import API_KEY_ENV, LM_CONFIG_ENV, LMConfig


def test_without_env_or_file_the_worker_gets_the_mock() -> None:
    assert startup_lm_config({}, None) == LMConfig(mode="mock")


def test_the_env_handover_wins_and_carries_the_key(tmp_path: Path) -> None:
    file = tmp_path / "lm.json"
    file.write_text(LMConfig(mode="mock", mock_default="file").model_dump_json())
    env = {**LMConfig(mode="real", model="gemini-x").to_worker_env(), API_KEY_ENV: "k-123"}
    config = startup_lm_config(env, file)
    assert (config.mode, config.model) == ("real", "gemini-x")
    assert config.api_key is not None and config.api_key.get_secret_value() == "k-123"
    assert startup_lm_config({}, file).mock_default == "file"


def test_a_bad_env_config_names_its_source_and_fields_but_never_the_key() -> None:
    env = {LM_CONFIG_ENV: json.dumps({"mode": "psychic", "max_tokens": -1}), API_KEY_ENV: "k-SECRET-9"}
    with pytest.raises(ConfigError) as info:
        startup_lm_config(env, None)
    message = str(info.value)
    assert f"env {LM_CONFIG_ENV}" in message and "mode" in message and "max_tokens" in message
    assert "k-SECRET-9" not in message
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        startup_lm_config({LM_CONFIG_ENV: "[1]"}, None)
    with pytest.raises(ConfigError, match=LM_CONFIG_ENV):
        startup_lm_config({LM_CONFIG_ENV: "{nope"}, None)


def test_a_bad_lm_config_file_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "lm.json"
    file.write_text('{"mode": "mock", "temperature": 7}')
    with pytest.raises(ConfigError) as info:
        startup_lm_config({}, file)
    assert f"--lm-config {file}" in str(info.value) and "temperature" in str(info.value)


def test_the_ready_file_is_written_whole_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "port"
    write_ready_file(target, 41234)
    assert target.read_text() == "41234\n"
    write_ready_file(target, 5)
    assert target.read_text() == "5\n"
    assert [p.name for p in target.parent.iterdir()] == ["port"]
