"""Failing closed on missing usage data (issue 9, kind 3): a count the answer lacks is booked at its
worst case, the ledger says ``usage: "estimated"``, and the run's cost limit holds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import dspy
import pytest
from dspy.utils.exceptions import LMBillingError

from provisioner.errors import CostLimitExceeded
from provisioner.lm import build_lm, provisioner_error
from provisioner.lm.gemini import usage_of
from provisioner.lm.ledger import read_ledger
from provisioner.lm.limits import RunLimits
from provisioner.lm.pricing import GEMINI_PRICES, TokenUsage, cost_usd
from provisioner.lm.standin import GeminiStandin
from provisioner.lmconfig import LMConfig

from .conftest import STANDIN_KEY

PRICE = GEMINI_PRICES["gemini-2.5-flash-lite"]


def _real(standin: GeminiStandin, run_dir: Path, **updates: object) -> LMConfig:
    values: dict[str, object] = {"mode": "real", "api_key": STANDIN_KEY, "base_url": standin.url,
                                 "run_dir": run_dir, "rate_limit_rpm": 1000, "max_retries": 0}
    values.update(updates)
    return LMConfig.model_validate(values)


def test_issue_input_answers_without_usage_are_booked_at_worst_case_and_the_third_call_is_refused(
        standin: GeminiStandin, tmp_path: Path) -> None:
    standin.set_usage(omit={"usageMetadata"})
    lm = build_lm(_real(standin, tmp_path, cost_limit_usd=0.001))
    outcomes: list[str] = []
    for i in range(5):
        try:
            lm(f"hi {i}")
            outcomes.append("sent")
        except LMBillingError as exc:
            assert isinstance(provisioner_error(exc), CostLimitExceeded)
            outcomes.append("refused")
    assert outcomes == ["sent", "sent", "refused", "refused", "refused"]
    assert standin.request_count == 2  # refused calls are never sent
    lines = [e for e in read_ledger(tmp_path / "ledger.jsonl") if e["event"] == "call"]
    assert len(lines) == 2
    for line in lines:
        assert line["usage"] == "estimated"
        assert set(line["estimated"]) == {"promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount"}
        assert line["cost_usd"] == pytest.approx(0.00041, abs=0.000005)
        assert line["output_tokens"] == 1024
    spent = RunLimits(tmp_path, rpm=1000, cost_limit_usd=0.001).snapshot().spent_usd
    assert spent == pytest.approx(sum(line["cost_usd"] for line in lines))


def test_reported_usage_is_booked_as_reported(standin: GeminiStandin, tmp_path: Path) -> None:
    lm = build_lm(_real(standin, tmp_path))
    lm("hi")
    (line,) = read_ledger(tmp_path / "ledger.jsonl")
    assert line["usage"] == "reported" and line["estimated"] == []
    assert line["cost_usd"] < 0.00001


@pytest.mark.parametrize(("omit", "thoughts", "estimated"), [
    # Gemini omits thoughtsTokenCount when nothing was thought: the total says it was 0.
    ({"thoughtsTokenCount"}, 0, set()),
    # a missing count is derived exactly from totalTokenCount when the prompt count is known
    ({"candidatesTokenCount"}, 5, set()),
    ({"thoughtsTokenCount"}, 5, set()),
    # without the total, the missing output counts are booked at max_tokens
    ({"thoughtsTokenCount", "totalTokenCount"}, 5, {"thoughtsTokenCount"}),
    ({"candidatesTokenCount", "totalTokenCount"}, 0, {"candidatesTokenCount", "thoughtsTokenCount"}),
    # an unknown prompt count is booked at the prompt's upper bound (and nothing is derived from it)
    ({"promptTokenCount"}, 0, {"promptTokenCount", "thoughtsTokenCount"}),
])
def test_each_missing_count_through_the_real_client(standin: GeminiStandin, tmp_path: Path, omit: set[str],
                                                    thoughts: int, estimated: set[str]) -> None:
    standin.set_usage(thoughts_tokens=thoughts)
    reference = build_lm(_real(standin, tmp_path / "reference"))
    reference("the same prompt")
    (full,) = read_ledger(tmp_path / "reference" / "ledger.jsonl")
    standin.set_usage(omit=omit)
    build_lm(_real(standin, tmp_path / "run", max_tokens=200))("the same prompt")
    (line,) = read_ledger(tmp_path / "run" / "ledger.jsonl")
    assert set(line["estimated"]) == estimated
    assert line["usage"] == ("estimated" if estimated else "reported")
    if not estimated:
        counts = ("output_tokens", "thoughts_tokens")
        assert [line[c] for c in counts] == [full[c] for c in counts]
        assert line["cost_usd"] == pytest.approx(full["cost_usd"])
    else:
        assert line["cost_usd"] > full["cost_usd"]  # never less than the truth
        assert line["output_tokens"] + line["thoughts_tokens"] == 200


def test_missing_cached_count_bills_every_prompt_token_at_the_full_rate() -> None:
    raw = SimpleNamespace(usage_metadata=SimpleNamespace(prompt_token_count=100, candidates_token_count=10,
                                                         total_token_count=110))
    usage, estimated = usage_of(raw, prompt_tokens_upper_bound=500, max_output_tokens=64)
    assert usage == TokenUsage(prompt_tokens=100, candidates_tokens=10, thoughts_tokens=0, cached_tokens=0)
    assert estimated == ()
    cached = TokenUsage(prompt_tokens=100, candidates_tokens=10, cached_tokens=40)
    assert cost_usd(PRICE, usage) >= cost_usd(PRICE, cached)  # the missing count never lowers the bill


@pytest.mark.parametrize("bad", [None, -1, "12", 3.5, True])
def test_counts_that_are_not_non_negative_integers_count_as_missing(bad: object) -> None:
    raw = SimpleNamespace(usage_metadata=SimpleNamespace(prompt_token_count=bad, candidates_token_count=bad,
                                                         thoughts_token_count=None, total_token_count=None))
    usage, estimated = usage_of(raw, prompt_tokens_upper_bound=500, max_output_tokens=64)
    assert (usage.prompt_tokens, usage.output_tokens) == (500, 64)
    assert set(estimated) == {"promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount"}


def test_inconsistent_total_is_not_trusted() -> None:
    raw = SimpleNamespace(usage_metadata=SimpleNamespace(prompt_token_count=100, candidates_token_count=50,
                                                         total_token_count=120))
    usage, estimated = usage_of(raw, prompt_tokens_upper_bound=500, max_output_tokens=64)
    assert estimated == ("thoughtsTokenCount",) and usage.thoughts_tokens == 14


def test_estimated_calls_through_a_dspy_program(standin: GeminiStandin, tmp_path: Path) -> None:
    standin.set_usage(omit={"usageMetadata"})
    with dspy.context(lm=build_lm(_real(standin, tmp_path))):
        assert dspy.Predict("question -> answer")(question="q?").answer
    (line,) = read_ledger(tmp_path / "ledger.jsonl")
    assert line["usage"] == "estimated" and line["input_tokens"] > 100
