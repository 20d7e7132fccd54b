"""Worker start-up pieces: which LM configuration wins, the atomic ready file, the process-wide LM."""

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


_PROCESS_LM_CHILD = r"""
import json, sys, threading
import dspy
from provisioner.bridge.server import install_process_lm
from provisioner.bridge.service import BridgeService
from provisioner.lmconfig import LMConfig

service = BridgeService(LMConfig(mode="mock", mock_default="layer-lm"))
install_process_lm(service)  # what run_worker does, in the main thread
seen = {}

def bare_thread():  # a thread a program starts itself: no dspy.context around it
    seen["same_lm"] = dspy.settings.lm is service.default_lm
    seen["answer"] = dspy.Predict("question -> answer")(question="hi").answer

thread = threading.Thread(target=bare_thread)
thread.start()
thread.join()

# Sessions keep their own LMs (dspy.context per execution), also side by side on pool threads.
for name in ("a", "b"):
    service.call("configure_lm", {"session_id": name, "mode": "mock", "mock_default": f"lm-{name}"})
    service.call("create_program", {"session_id": name, "program_id": "qa", "signature": "q -> answer"})
answers = {}
def run(name):
    answers[name] = [service.call("execute_program", {"session_id": name, "program_id": "qa",
                                                      "inputs": {"q": "q"}})["outputs"]["answer"]
                     for _ in range(10)]
threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
for t in threads: t.start()
for t in threads: t.join()
seen["sessions"] = answers
service.call("create_program", {"program_id": "qa", "signature": "question -> answer"})
default = service.call("execute_program", {"program_id": "qa", "inputs": {"question": "q"}})
seen["default"] = default["outputs"]["answer"]
print(json.dumps(seen))
"""


def test_the_startup_lm_is_the_process_lm_and_sessions_keep_their_own() -> None:
    """Threads started without a dspy.context see the layer's LM; per-session LMs still win inside
    executions. In a child process: dspy.configure is process-global."""
    import subprocess
    import sys

    from .conftest import clean_env

    done = subprocess.run([sys.executable, "-c", _PROCESS_LM_CHILD], capture_output=True, text=True,
                          timeout=120, env=clean_env())
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["same_lm"] is True and seen["answer"] == "layer-lm"
    assert seen["sessions"] == {"a": ["lm-a"] * 10, "b": ["lm-b"] * 10}
    assert seen["default"] == "layer-lm"
