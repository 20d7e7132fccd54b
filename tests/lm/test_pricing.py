"""Prices and the cost of a call from Gemini's usage figures."""

from __future__ import annotations

import pytest

from provisioner.errors import UnknownModelPriceError
from provisioner.lm.pricing import GEMINI_PRICES, TokenUsage, cost_usd, format_usd, price_for, worst_case_usd
from provisioner.lmconfig import LMConfig, ModelPrice


def test_cost_bills_thinking_as_output_and_cached_at_the_cache_rate() -> None:
    price = ModelPrice(input_per_mtok=1.0, output_per_mtok=10.0, cached_input_per_mtok=0.25)
    usage = TokenUsage(prompt_tokens=1000, candidates_tokens=100, thoughts_tokens=50, cached_tokens=400)
    assert cost_usd(price, usage) == pytest.approx((600 * 1.0 + 400 * 0.25 + 150 * 10.0) / 1e6)


def test_cached_tokens_without_a_cache_rate_cost_the_input_rate() -> None:
    price = ModelPrice(input_per_mtok=2.0, output_per_mtok=4.0)
    assert cost_usd(price, TokenUsage(prompt_tokens=10, cached_tokens=10)) == pytest.approx(20 / 1e6)


def test_worst_case_covers_every_allowed_token() -> None:
    price = GEMINI_PRICES["gemini-2.5-flash-lite"]
    worst = worst_case_usd(price, 1000, 500)
    assert worst == pytest.approx((1000 * 0.10 + 500 * 0.40) / 1e6)
    most = TokenUsage(prompt_tokens=1000, candidates_tokens=300, thoughts_tokens=200)
    assert worst >= cost_usd(price, most)


def test_configured_price_wins_and_prefixes_are_ignored() -> None:
    custom = ModelPrice(input_per_mtok=9, output_per_mtok=9)
    assert price_for(LMConfig(model="models/gemini-2.5-flash")) == GEMINI_PRICES["gemini-2.5-flash"]
    assert price_for(LMConfig(model="gemini-2.5-flash", prices={"gemini-2.5-flash": custom})) == custom
    with pytest.raises(UnknownModelPriceError, match="gemini-x-preview"):
        price_for(LMConfig(model="gemini-x-preview"))


@pytest.mark.parametrize(("value", "text"), [
    (0.0, "$0"), (0.25, "$0.25"), (10.0, "$10.00"), (1.5, "$1.50"), (0.0123, "$0.0123"),
    (0.001, "$0.001"), (0.000005, "$0.000005"), (0.000017, "$0.000017"), (0.0012345, "$0.00123"),
])
def test_a_limit_people_set_is_shown_as_set_and_never_as_zero(value: float, text: str) -> None:
    """``lm.cost_limit_usd = 0.000005`` showed as "$0.0000" in the refusal and "$0.00" in the summary."""
    assert format_usd(value) == text


@pytest.mark.parametrize(("value", "text"), [
    (0.0, "$0.0000"), (0.00003, "$0.000030"), (0.009876, "$0.009876"), (0.01, "$0.0100"), (2.5, "$2.5000"),
])
def test_a_computed_cost_has_one_format_on_the_page_and_in_the_markdown(value: float, text: str) -> None:
    """The HTML page and the Markdown summary each had an identical copy of this rule; now both use it."""
    from provisioner.lm.pricing import format_cost
    from provisioner.reporting import html, markdown

    assert format_cost(value) == text
    assert html._usd is format_cost and markdown._usd is format_cost
