"""The real engine: google-genai against the stand-in, through whole DSPy programs."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest
from dspy.utils.exceptions import (
    LMAuthError,
    LMBillingError,
    LMRateLimitError,
    LMServerError,
    LMTransportError,
    is_retryable_lm_error,
)

from provisioner.errors import ConfigError, CostLimitExceeded, UnknownModelPriceError
from provisioner.lm import build_lm, provisioner_error, stats
from provisioner.lm.gemini import GeminiEngine, prompt_tokens_upper_bound
from provisioner.lm.ledger import current_test, read_ledger
from provisioner.lm.limits import RunLimits
from provisioner.lm.pricing import GEMINI_PRICES
from provisioner.lm.standin import GeminiStandin, StandinReply
from provisioner.lmconfig import LMConfig, ModelPrice

from .conftest import STANDIN_KEY

KEY = STANDIN_KEY


def _config(standin: GeminiStandin, run_dir: Path, **updates: object) -> LMConfig:
    values: dict[str, object] = {"mode": "real", "api_key": KEY, "base_url": standin.url, "run_dir": run_dir,
                                 "run_id": "run-1", "layer": "integration", "retry_base_delay_s": 0.01,
                                 "rate_limit_rpm": 1000}
    values.update(updates)
    return LMConfig.model_validate(values)


def test_dspy_program_runs_against_the_standin(standin: GeminiStandin, tmp_path: Path) -> None:
    lm = build_lm(_config(standin, tmp_path))
    before = stats()
    with dspy.context(lm=lm):
        result = dspy.ChainOfThought("question -> answer: int, sure: bool")(question="2 + 2?")
    assert (result.answer, result.sure) == (0, False)
    assert standin.request_count == 1
    body = standin.requests[0].body
    assert "Your output fields are" in body["systemInstruction"]["parts"][0]["text"]
    assert body["contents"][-1]["role"] == "user" and "2 + 2?" in body["contents"][-1]["parts"][0]["text"]
    generation = body["generationConfig"]
    assert generation["maxOutputTokens"] == 1024 and generation["temperature"] == 0
    delta = stats() - before
    assert delta.real == 1 and delta.cost_usd > 0


def test_ledger_line_per_call_with_real_usage(standin: GeminiStandin, tmp_path: Path) -> None:
    standin.set_usage(thoughts_tokens=7, cached_tokens=3)
    lm = build_lm(_config(standin, tmp_path))
    with current_test("tests/x.py::test_y"), dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="hello")
    (line,) = read_ledger(tmp_path / "ledger.jsonl")
    request_usage = lm.history[-1]["usage"]
    assert line["kind"] == "real" and line["run_id"] == "run-1" and line["layer"] == "integration"
    assert line["test_id"] == "tests/x.py::test_y"
    assert line["input_tokens"] == request_usage["prompt_tokens"]
    assert (line["thoughts_tokens"], line["cached_tokens"]) == (7, 3)
    price = GEMINI_PRICES["gemini-2.5-flash-lite"]
    expected = ((line["input_tokens"] - 3) * price.input_per_mtok + 3 * (price.cached_input_per_mtok or 0)
                + (line["output_tokens"] + 7) * price.output_per_mtok) / 1e6
    assert line["cost_usd"] == pytest.approx(expected)
    limits = json.loads((tmp_path / "lm-limits.json").read_text())
    assert limits["spent_usd"] == pytest.approx(expected) and limits["reservations"] == {}


def test_429_is_retried_honouring_retry_after(standin: GeminiStandin, tmp_path: Path) -> None:
    slept: list[float] = []
    engine = GeminiEngine(_config(standin, tmp_path), sleep=slept.append)
    lm = dspy.LM("gemini/gemini-2.5-flash-lite", engine=engine, cache=False, num_retries=0)
    standin.fail_next(2, status=429, retry_after=3)
    with dspy.context(lm=lm):
        assert dspy.Predict("question -> answer")(question="q").answer == "mock_response"
    assert slept == [3.0, 3.0]  # the server's Retry-After, not our own backoff
    assert standin.request_count == 3


def test_5xx_backs_off_exponentially_then_gives_a_clear_error(standin: GeminiStandin, tmp_path: Path) -> None:
    slept: list[float] = []
    config = _config(standin, tmp_path, max_retries=2, retry_base_delay_s=0.5)
    engine = GeminiEngine(config, sleep=slept.append)
    lm = dspy.LM("gemini/gemini-2.5-flash-lite", engine=engine, cache=False, num_retries=0)
    standin.fail_next(5, status=503)
    with dspy.context(lm=lm), pytest.raises(LMServerError) as caught:
        dspy.Predict("question -> answer")(question="q")
    assert slept == [0.5, 1.0]
    assert standin.request_count == 3
    assert "503" in str(caught.value) and "gave up after 2 retries" in str(caught.value)
    # Failed attempts were not billed: every reservation was released at $0.
    assert RunLimits(tmp_path, rpm=1000, cost_limit_usd=1).snapshot().spent_usd == 0


def test_rate_limit_error_after_retries_is_dspy_rate_limit(standin: GeminiStandin, tmp_path: Path) -> None:
    lm = build_lm(_config(standin, tmp_path, max_retries=1))
    standin.fail_next(2, status=429, retry_after=0)
    with dspy.context(lm=lm), pytest.raises(LMRateLimitError) as caught:
        dspy.Predict("question -> answer")(question="q")
    assert caught.value.status == 429 and caught.value.provider_code == "RESOURCE_EXHAUSTED"
    assert standin.request_count == 2  # our bounded retry only: DSPy's own retries are off



@pytest.mark.parametrize("max_retries", [0, 2])
def test_a_429_given_up_says_what_provisioner_did_not_lm15s_advice(
        standin: GeminiStandin, tmp_path: Path, max_retries: int) -> None:
    """A user's trial read "Retry with backoff in your application layer (lm15 never retries for
    you)" next to "(gave up after 3 retries)": the retries are named on the error's line, and the
    advice says what provisioner did (or which setting makes it retry)."""
    lm = build_lm(_config(standin, tmp_path, max_retries=max_retries, retry_base_delay_s=0))
    standin.fail_next(max_retries + 1, status=429, retry_after=0)
    with dspy.context(lm=lm), pytest.raises(LMRateLimitError) as caught:
        dspy.Predict("question -> answer")(question="q")
    text = str(caught.value)
    assert "lm15 never retries for you" not in text and "application layer" not in text
    first, _, advice = text.partition("To fix:")
    if max_retries:
        assert "(gave up after 2 retries)" in first and "gave up" not in advice
        assert "provisioner retried it 2 times with backoff (lm.max_retries = 2" in advice
    else:
        assert "gave up" not in text and "Set lm.max_retries above 0" in advice

@pytest.mark.parametrize("wrong_status", [400, 403])
def test_wrong_key_is_a_clear_auth_error(tmp_path: Path, wrong_status: int) -> None:
    with GeminiStandin(api_key=KEY, wrong_key_status=wrong_status) as server:
        lm = build_lm(_config(server, tmp_path, api_key="sk-wrong-key-abcdef"))
        with dspy.context(lm=lm), pytest.raises(LMAuthError) as caught:
            dspy.Predict("question -> answer")(question="q")
        assert server.request_count == 1  # never retried
    message = str(caught.value)
    assert "API key was rejected" in message and "GEMINI_TEST_API_KEY" in message
    assert "sk-wrong-key-abcdef" not in message
    assert not is_retryable_lm_error(caught.value)


def test_missing_key_fails_when_the_lm_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_TEST_API_KEY", raising=False)
    monkeypatch.setenv("GOOGLE_API_KEY", "never-read")  # a developer's own key is never used
    monkeypatch.setenv("GEMINI_API_KEY", "never-read")
    with pytest.raises(ConfigError, match="GEMINI_TEST_API_KEY is not in the environment"):
        build_lm(LMConfig(mode="real", run_dir=tmp_path))


def test_unknown_model_needs_a_price(standin: GeminiStandin, tmp_path: Path) -> None:
    with pytest.raises(UnknownModelPriceError, match=r"lm\.prices"):
        build_lm(_config(standin, tmp_path, model="gemini-9-ultra"))
    priced = _config(standin, tmp_path, model="gemini-9-ultra",
                     prices={"gemini-9-ultra": ModelPrice(input_per_mtok=1, output_per_mtok=2)})
    with dspy.context(lm=build_lm(priced)):
        dspy.Predict("question -> answer")(question="q")
    assert standin.requests[-1].model == "gemini-9-ultra"


def test_cost_limit_refuses_before_calling(standin: GeminiStandin, tmp_path: Path) -> None:
    config = _config(standin, tmp_path, cost_limit_usd=0.0001, max_tokens=1000)  # worst case > $0.0004
    lm = build_lm(config)
    with dspy.context(lm=lm), pytest.raises(LMBillingError) as caught:
        dspy.Predict("question -> answer")(question="q")
    assert standin.request_count == 0
    cause = provisioner_error(caught.value)
    assert isinstance(cause, CostLimitExceeded)
    assert "lm.cost_limit_usd" in str(cause)
    assert not is_retryable_lm_error(caught.value)


def test_unreachable_endpoint_is_a_transport_error(tmp_path: Path) -> None:
    with GeminiStandin(api_key=KEY) as server:
        url = server.url
    lm = build_lm(LMConfig(mode="real", api_key=KEY, base_url=url, run_dir=tmp_path, max_retries=0))
    with dspy.context(lm=lm), pytest.raises(LMTransportError) as caught:
        dspy.Predict("question -> answer")(question="q")
    assert "lm.base_url" in str(caught.value)


def test_scripted_thinking_is_billed_as_output(standin: GeminiStandin, tmp_path: Path) -> None:
    standin.script(StandinReply(text="[[ ## answer ## ]]\nhi\n\n[[ ## completed ## ]]", thoughts_tokens=40))
    lm = build_lm(_config(standin, tmp_path))
    with dspy.context(lm=lm):
        assert dspy.Predict("question -> answer")(question="q").answer == "hi"
    (line,) = read_ledger(tmp_path / "ledger.jsonl")
    assert line["thoughts_tokens"] == 40
    assert lm.history[-1]["usage"]["completion_tokens"] == line["output_tokens"]


def test_prompt_upper_bound_is_at_least_the_reported_prompt_tokens(standin: GeminiStandin,
                                                                    tmp_path: Path) -> None:
    engine = GeminiEngine(_config(standin, tmp_path))
    from dspy.lm15 import Message, Request

    request = Request(model="gemini-2.5-flash-lite", system="Système: réponds ✓", messages=(
        Message.user("héllo " * 50),))
    outcome = engine.call(request)
    assert prompt_tokens_upper_bound(request) >= outcome.usage.prompt_tokens
