"""Gemini prices per model, and the dollar cost of a call from its usage.

Source: Google's Gemini Developer API pricing page, https://ai.google.dev/gemini-api/docs/pricing
(paid tier, text input, prompts up to 200k tokens, standard — not batch — requests), as transcribed
on 2025-09-30. Prices change: override or add models with ``lm.prices`` in the settings, e.g.::

    [tool.provisioner.lm.prices."gemini-2.5-flash-lite"]
    input_per_mtok = 0.10
    output_per_mtok = 0.40

A model with no price here and none configured is refused (:class:`UnknownModelPriceError`) —
a cost limit is only a limit when every call has a price.

Billing rules applied (as Google documents them): thinking tokens are billed as output tokens;
cached prompt tokens (``cachedContentTokenCount``, part of ``promptTokenCount``) are billed at the
context-caching rate when one is known, else at the input rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from provisioner.errors import UnknownModelPriceError
from provisioner.lmconfig import LMConfig, ModelPrice

PRICE_SOURCE = "https://ai.google.dev/gemini-api/docs/pricing"
PRICE_DATE = "2025-09-30"

# USD per 1M tokens: input, output (incl. thinking), cached input.
GEMINI_PRICES: dict[str, ModelPrice] = {
    "gemini-2.5-pro": ModelPrice(input_per_mtok=1.25, output_per_mtok=10.00, cached_input_per_mtok=0.31),
    "gemini-2.5-flash": ModelPrice(input_per_mtok=0.30, output_per_mtok=2.50, cached_input_per_mtok=0.075),
    "gemini-2.5-flash-lite": ModelPrice(input_per_mtok=0.10, output_per_mtok=0.40,
                                        cached_input_per_mtok=0.025),
    "gemini-2.0-flash": ModelPrice(input_per_mtok=0.10, output_per_mtok=0.40, cached_input_per_mtok=0.025),
    "gemini-2.0-flash-lite": ModelPrice(input_per_mtok=0.075, output_per_mtok=0.30),
}


def _bare(model: str) -> str:
    name = model.strip()
    for prefix in ("models/", "gemini/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def price_for(config: LMConfig) -> ModelPrice:
    """The price of ``config.model``: the configured one if any, else the built-in table."""
    name = _bare(config.model)
    for candidate in (config.model, name):
        if candidate in config.prices:
            return config.prices[candidate]
    if name in GEMINI_PRICES:
        return GEMINI_PRICES[name]
    known = ", ".join(sorted(GEMINI_PRICES))
    raise UnknownModelPriceError(
        f"lm.model={config.model!r} has no known price, so its cost limit cannot be enforced; "
        f"configure one as lm.prices.{name!r} (input_per_mtok, output_per_mtok) "
        f"or pick a known model: {known}"
    )


@dataclass(frozen=True)
class TokenUsage:
    """Gemini's ``usageMetadata``, the parts that are billed."""

    prompt_tokens: int = 0
    candidates_tokens: int = 0
    thoughts_tokens: int = 0
    cached_tokens: int = 0

    @property
    def output_tokens(self) -> int:
        return self.candidates_tokens + self.thoughts_tokens


def cost_usd(price: ModelPrice, usage: TokenUsage) -> float:
    """What a call with ``usage`` costs at ``price``."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cached_rate = price.input_per_mtok if price.cached_input_per_mtok is None else price.cached_input_per_mtok
    dollars = (
        (usage.prompt_tokens - cached) * price.input_per_mtok
        + cached * cached_rate
        + usage.output_tokens * price.output_per_mtok
    )
    return dollars / 1_000_000


def worst_case_usd(price: ModelPrice, prompt_tokens_upper_bound: int, max_output_tokens: int) -> float:
    """The most a call can cost: every prompt token at the input rate, every allowed output token."""
    dollars = prompt_tokens_upper_bound * price.input_per_mtok + max_output_tokens * price.output_per_mtok
    return dollars / 1_000_000


def format_cost(value: float) -> str:
    """A dollar amount the run computed (a run's or a test's cost, a forecast) at a fixed precision
    that lines up in tables: six decimals below a cent ("$0.000030"), four from a cent up
    ("$0.2500"), "$0.0000" for nothing spent. :func:`format_usd` is for amounts people set."""
    return f"${value:.6f}" if 0 < value < 0.01 else f"${value:.4f}"


def format_usd(value: float) -> str:
    """A dollar amount people set (a cost limit, a monthly budget) as they set it: never rounded to
    ``$0`` when it is not zero. At least two decimals ("$0.25", "$10.00"), up to four at a cent and
    above, and three significant digits below a cent ("$0.000005", "$0.00123"): ``lm.cost_limit_usd
    = 0.000005`` once showed as "$0.0000" and "$0.00"."""
    if value == 0:
        return "$0"
    if abs(value) >= 0.01:
        whole, _, decimals = f"{value:.4f}".rstrip("0").partition(".")
        return f"${whole}.{decimals.ljust(2, '0')}"
    places = -math.floor(math.log10(abs(value))) + 2
    return f"${value:.{places}f}".rstrip("0")
