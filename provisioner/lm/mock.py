"""The deterministic, signature-aware mock LM.

It reads the signature back from the adapter's prompt (:mod:`provisioner.lm.signature`) and
answers every output field with a value of its declared type, in the format of the adapter that
asked (ChatAdapter markers, a JSON object for JSONAdapter, XML tags for XMLAdapter). Rules
(:class:`provisioner.lmconfig.MockRule`) match on input values and fix output values or inject a
failure. The answer depends only on the request text and the rules, so the same request gets the
same answer in any process on any machine; usage figures are deterministic token estimates.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import regex

from provisioner.errors import ConfigError
from provisioner.lm import callstats as _stats
from provisioner.lm.engine import (
    EngineBase,
    estimate_tokens,
    message_pairs,
    request_input_tokens,
    system_text,
    text_response,
)
from provisioner.lm.signature import PromptView, default_value, parse_prompt, render_answer
from provisioner.lmconfig import MockRule
from provisioner.reprs import safe_repr

if TYPE_CHECKING:
    from dspy.lm15 import Request, Response

# What an injected "malformed" answer looks like: no field markers, not JSON, not XML, so every
# adapter (including JSONAdapter's repair step) fails to parse it and raises AdapterParseError.
MALFORMED_OUTPUT = "[[ ## ?? ## ]] this mock answer is deliberately malformed"


def rules_from_mapping(mapping: Mapping[str, Any]) -> list[MockRule]:
    """The plan's shorthand ``{"test_input": "test_output"}``: substring on any input → every output."""
    return [MockRule(match={"*": key}, kind="substring", outputs={"*": value})
            for key, value in mapping.items()]


# Regex rules may come over the wire (configure_lm): a pattern that backtracks exponentially must
# not hold a worker thread (or, with the stdlib's re, the GIL) for minutes. The `regex` package
# bounds each match in time and releases the GIL while it matches (concurrent=True); inputs longer
# than the cap are refused instead of scanned.
REGEX_TIMEOUT_S = 0.5
REGEX_MAX_INPUT_CHARS = 100_000


def _matches(pattern: str, value: str, kind: str) -> bool:
    """Whether ``value`` matches ``pattern`` under ``kind``.

    Raises:
        ConfigError: a ``regex`` rule met an input over ``REGEX_MAX_INPUT_CHARS`` characters, or
            did not finish within ``REGEX_TIMEOUT_S`` seconds (a pattern that backtracks
            exponentially) — an error, never a silent non-match.
    """
    if kind == "exact":
        return value == pattern
    if kind == "substring":
        return pattern in value
    shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
    if len(value) > REGEX_MAX_INPUT_CHARS:
        raise ConfigError(
            f"mock rule regex {shown!r}: the input has {len(value)} characters; regex rules match inputs"
            f" of at most {REGEX_MAX_INPUT_CHARS} (use kind 'substring' or 'exact' for longer ones)"
        )
    try:
        return regex.search(pattern, value, timeout=REGEX_TIMEOUT_S, concurrent=True) is not None
    except TimeoutError:
        raise ConfigError(
            f"mock rule regex {shown!r} did not finish matching an input of {len(value)} characters"
            f" within {REGEX_TIMEOUT_S:g} s; nested quantifiers such as (a|aa)+ backtrack exponentially:"
            " simplify the pattern, or use kind 'substring' or 'exact'"
        ) from None


def rule_matches(rule: MockRule, view: PromptView) -> bool:
    """True when every ``match`` entry of the rule holds for the request's inputs."""
    for name, pattern in rule.match.items():
        if name == "*":
            candidates = list(view.inputs.values()) or [view.last_user_text]
            if not any(_matches(pattern, value, rule.kind) for value in candidates):
                return False
        else:
            value = view.inputs.get(name)
            if value is None or not _matches(pattern, value, rule.kind):
                return False
    return True


def _injected_error(rule: MockRule, model: str) -> Exception:
    from dspy import lm15

    where = f"mock LM ({model}): injected {rule.error}"
    if rule.error == "rate_limit":
        return lm15.RateLimitError(f"{where}: 429 RESOURCE_EXHAUSTED", status=429,
                                   provider="mock", provider_code="RESOURCE_EXHAUSTED")
    if rule.error == "timeout":
        return lm15.TimeoutError(f"{where}: 504 DEADLINE_EXCEEDED", status=504,
                                 provider="mock", provider_code="DEADLINE_EXCEEDED")
    return lm15.ServerError(f"{where}: 500 INTERNAL", status=500, provider="mock", provider_code="INTERNAL")


class MockEngine(EngineBase):
    """A DSPy engine answering from rules and per-type defaults; never touches the network."""

    kind = "mock"

    def __init__(self, rules: Sequence[MockRule] = (), default: str = "mock_response",
                 *, count_calls: bool = True) -> None:
        self.rules = list(rules)
        self.default = default
        # A mock used as the inner engine of the cached mode is counted as "recorded" there.
        self.count_calls = count_calls

    @safe_repr
    def __repr__(self) -> str:
        return f"MockEngine(rules={len(self.rules)}, default={self.default!r})"

    def answer(self, view: PromptView) -> tuple[str, MockRule | None]:
        """The answer text for a parsed prompt, and the rule that decided it (if any)."""
        rule = next((r for r in self.rules if rule_matches(r, view)), None)
        fixed: dict[str, Any] = dict(rule.outputs) if rule else {}
        if view.format == "plain":
            value = fixed.get("*", next(iter(fixed.values()), self.default))
            return render_answer(view, {"*": value}), rule
        wildcard = fixed.get("*")
        values: dict[str, Any] = {}
        for output in view.outputs:
            if output.name in fixed:
                values[output.name] = fixed[output.name]
            elif wildcard is not None:
                values[output.name] = wildcard
            else:
                values[output.name] = default_value(output, self.default)
        return render_answer(view, values), rule

    def complete(self, request: Request) -> Response:
        system = system_text(request)
        response_format = request.config.response_format
        view = parse_prompt(system, message_pairs(request), json_requested=response_format is not None)
        text, rule = self.answer(view)
        if rule is not None and rule.latency_ms:
            time.sleep(rule.latency_ms / 1000)  # the simulated slow LM a rule asked for
        if rule is not None and rule.error is not None and rule.error != "malformed":
            if self.count_calls:
                _stats.record_error()
            raise _injected_error(rule, request.model)
        if rule is not None and rule.error == "malformed":
            text = MALFORMED_OUTPUT
        input_tokens = request_input_tokens(request)
        output_tokens = estimate_tokens(text)
        digest = hashlib.sha256(f"{system}\x00{message_pairs(request)!r}".encode()).hexdigest()[:24]
        if self.count_calls:
            _stats.record_call("mock", input_tokens=input_tokens, output_tokens=output_tokens)
        return text_response(request, text, input_tokens=input_tokens, output_tokens=output_tokens,
                             response_id=f"mock-{digest}")
