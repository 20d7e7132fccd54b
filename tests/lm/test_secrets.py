"""The API key never lands in cassettes, ledgers, limit state, logs, reprs or exceptions."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import dspy
import pytest
from pydantic import SecretStr

from provisioner.lm import build_engine, build_lm
from provisioner.lm.standin import GeminiStandin
from provisioner.lmconfig import API_KEY_ENV, LMConfig

SECRET = "AIzaSy-provisioner-secret-value-0123456789"


def test_key_appears_nowhere(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, including httpx and google-genai
    failures: list[str] = []
    with GeminiStandin(api_key=SECRET) as server:
        stopped_url = server.url
        common = {"api_key": SECRET, "base_url": server.url, "run_dir": tmp_path / "run", "max_retries": 1,
                  "retry_base_delay_s": 0.0, "cache_dir": tmp_path / "cassettes"}
        real = LMConfig.model_validate({"mode": "real", **common})
        cached = LMConfig.model_validate({"mode": "cached", **common})
        for config in (real, cached):
            lm = build_lm(config)
            with dspy.context(lm=lm):
                dspy.ChainOfThought("question -> answer")(question=f"{config.mode} question")
                server.fail_next(2, status=429, retry_after=0)
                try:
                    dspy.Predict("question -> answer")(question=f"{config.mode} failing question")
                except Exception as exc:
                    failures.append("".join(traceback.format_exception(exc)))
            failures.append(repr(lm) + repr(build_engine(config)) + repr(config) + str(config.model_dump()))
            failures.append(config.public_json())
            failures.append(str(lm.history))
    # A transport failure and a rejected key are the messages most likely to echo a request.
    for config in (real.model_copy(update={"base_url": stopped_url}),
                   real.model_copy(update={"api_key": SecretStr(SECRET + "-wrong"),
                                           "base_url": "http://127.0.0.1:9/"})):
        with dspy.context(lm=build_lm(config)):
            try:
                dspy.Predict("question -> answer")(question="unreachable")
            except Exception as exc:
                failures.append("".join(traceback.format_exception(exc)))
    assert len(failures) >= 6
    for text in failures:
        assert SECRET not in text
    assert SECRET not in caplog.text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "ledger.jsonl" for p in files) and any(p.suffix == ".json" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


def test_worker_env_carries_the_key_only_where_needed() -> None:
    assert API_KEY_ENV not in LMConfig(mode="mock", api_key=SECRET).to_worker_env()
    assert API_KEY_ENV not in LMConfig(mode="cached", record_mode="none", api_key=SECRET).to_worker_env()
    env = LMConfig(mode="real", api_key=SECRET).to_worker_env()
    assert env[API_KEY_ENV] == SECRET
    assert all(SECRET not in value for name, value in env.items() if name != API_KEY_ENV)
    restored = LMConfig.from_worker_env(env)
    assert restored is not None and restored.api_key is not None
    assert restored.api_key.get_secret_value() == SECRET
