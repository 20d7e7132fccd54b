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
import threading
import time
import warnings
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


ANY = "*"


class LMRuleWarning(UserWarning):
    """A test's own mock rule names input or output fields that no request's signature of the test
    had (a typo, or a rule for a program the test never ran): warned once per rule, when the test ends."""


def applies_to(rule: MockRule, view: PromptView) -> bool:
    """Whether ``rule`` is checked against the request ``view``.

    A rule with a ``signature`` applies to requests whose signature has exactly its input and output
    field names; a rule without one to every request whose signature has the fields it names, and
    to every request without a signature (``lm("text")``).
    """
    fields = rule.signature_fields()
    has_signature = bool(view.input_names or view.outputs)
    if fields is not None:
        inputs = set(view.input_names) | set(view.inputs)
        return has_signature and fields == (frozenset(inputs), frozenset(o.name for o in view.outputs))
    missing_in, missing_out = unknown_fields(rule, view)
    return not missing_in and not missing_out


def rule_matches(rule: MockRule, view: PromptView) -> bool:
    """True when every ``match`` entry of the rule holds for the request's inputs.

    ``"*"`` as a field name means any input field (or, without a signature, the last user turn);
    ``"*"`` as a pattern means any value (the named field must be there).
    """
    for name, pattern in rule.match.items():
        if name == ANY:
            if pattern == ANY:
                continue
            candidates = list(view.inputs.values()) or [view.last_user_text]
            if not any(_matches(pattern, value, rule.kind) for value in candidates):
                return False
        else:
            value = view.inputs.get(name)
            if value is None:
                return False
            if pattern != ANY and not _matches(pattern, value, rule.kind):
                return False
    return True


def unknown_fields(rule: MockRule, view: PromptView) -> tuple[list[str], list[str]]:
    """(input fields, output fields) the rule names that the request's signature lacks.

    Requests without a signature (``lm("text")``) have no fields to check: nothing is unknown there.
    """
    if not view.input_names and not view.outputs:
        return [], []
    inputs = set(view.input_names) | set(view.inputs)
    outputs = {o.name for o in view.outputs}
    missing_in = [n for n in rule.match if n != ANY and n not in inputs]
    missing_out = [n for n in rule.outputs if n != ANY and n not in outputs]
    return missing_in, missing_out


def signature_text(view: PromptView) -> str:
    """A request's signature as field names, ``"question -> answer"``."""
    return f"{', '.join(view.input_names)} -> {', '.join(o.name for o in view.outputs)}"


def describe_rule(rule: MockRule) -> str:
    """A rule in one line, as the end-of-run list shows it."""
    return rule.model_dump_json(exclude_defaults=True)


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
        self._lock = threading.Lock()
        self._matched: set[int] = set()  # indexes of rules that answered at least one request
        self._applied: set[int] = set()  # indexes of rules checked against at least one request
        self._signatures: dict[str, PromptView] = {}  # signatures of the requests seen, first view each

    def first_match(self, view: PromptView) -> MockRule | None:
        """The first rule that applies to ``view`` (:func:`applies_to`) and matches it (None: no rule).

        Remembers which rules matched (:meth:`unmatched`) and which applied to no request
        (:meth:`misfits`); it never warns per request.
        """
        if view.input_names or view.outputs:
            key = signature_text(view)
            if key not in self._signatures:
                with self._lock:
                    self._signatures.setdefault(key, view)
        for index, rule in enumerate(self.rules):
            if not applies_to(rule, view):
                continue
            if index not in self._applied:
                with self._lock:
                    self._applied.add(index)
            if rule_matches(rule, view):
                with self._lock:
                    self._matched.add(index)
                return rule
        return None

    def misfits(self) -> list[tuple[MockRule, str]]:
        """Rules that applied to no request although requests with a signature were seen, each
        with why (the fields no seen signature had, and the signatures seen) — typos, or rules for
        a program that never ran."""
        with self._lock:
            views = list(self._signatures.values())
            rules = [(i, r) for i, r in enumerate(self.rules) if i not in self._applied]
        if not views:
            return []
        seen = "; ".join(signature_text(v) for v in views)
        out = []
        for _index, rule in rules:
            if rule.signature is not None:
                why = f"its signature {rule.signature!r} is none of the requests' ({seen})"
            else:
                missing_in: set[str] = set()
                missing_out: set[str] = set()
                for v in views:
                    m_in, m_out = unknown_fields(rule, v)
                    missing_in.update(m_in)
                    missing_out.update(m_out)
                named = [f"the input field {n!r}" for n in sorted(missing_in)]
                named += [f"the output field {n!r}" for n in sorted(missing_out)]
                why = f"names {' and '.join(named)}, which no request's signature had together ({seen})"
            out.append((rule, why))
        return out

    def unmatched(self) -> list[MockRule]:
        """The rules that have not answered any request of this engine yet."""
        with self._lock:
            return [rule for index, rule in enumerate(self.rules) if index not in self._matched]

    @safe_repr
    def __repr__(self) -> str:
        return f"MockEngine(rules={len(self.rules)}, default={self.default!r})"

    def answer(self, view: PromptView) -> tuple[str, MockRule | None]:
        """The answer text for a parsed prompt, and the rule that decided it (if any)."""
        rule = self.first_match(view)
        return self.render(view, rule), rule

    def render(self, view: PromptView, rule: MockRule | None) -> str:
        """The answer text for ``view`` with ``rule``'s outputs (or the per-type defaults)."""
        fixed: dict[str, Any] = dict(rule.outputs) if rule else {}
        if view.format == "plain":
            value = fixed.get("*", next(iter(fixed.values()), self.default))
            return render_answer(view, {"*": value})
        wildcard = fixed.get("*")
        values: dict[str, Any] = {}
        for output in view.outputs:
            if output.name in fixed:
                values[output.name] = fixed[output.name]
            elif wildcard is not None:
                values[output.name] = wildcard
            else:
                values[output.name] = default_value(output, self.default)
        return render_answer(view, values)

    def complete(self, request: Request) -> Response:
        view = request_view(request)
        rule = self.first_match(view)
        return self.respond(request, view, rule)

    def respond(self, request: Request, view: PromptView, rule: MockRule | None) -> Response:
        """Answer ``request`` as ``rule`` says (None: the per-type defaults), or raise its error."""
        system = system_text(request)
        text = self.render(view, rule)
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


def request_view(request: Request) -> PromptView:
    """What a request says about its signature (fields, adapter format, input values)."""
    json_requested = request.config.response_format is not None
    return parse_prompt(system_text(request), message_pairs(request), json_requested=json_requested)


class TestRules:
    """One test's own mock rules, thread-safe and growable while the test runs.

    The ``lm`` fixture layers them over the layer's LM (:class:`RulesOverEngine`); the
    ``@pytest.mark.lm_rules(...)`` marker fills them before the test, ``lm_rules.add(...)`` during it.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, rules: Sequence[MockRule | Mapping[str, Any]] = (), default: str = "mock_response"
                 ) -> None:
        self._engine = MockEngine([], default)
        self.extend(rules)

    @safe_repr
    def __repr__(self) -> str:
        return f"TestRules({len(self._engine.rules)} rules)"

    def add(self, rule: MockRule | Mapping[str, Any] | None = None, **fields: Any) -> MockRule:
        """Add one rule (a :class:`MockRule`, a mapping of its fields, or its fields as keywords).

        Raises:
            pydantic.ValidationError: a field of the rule is invalid (names the field).
        """
        made = rule if isinstance(rule, MockRule) else MockRule.model_validate({**(rule or {}), **fields})
        with self._engine._lock:
            self._engine.rules = [*self._engine.rules, made]
        return made

    def extend(self, rules: Sequence[MockRule | Mapping[str, Any]]) -> None:
        for rule in rules:
            self.add(rule)

    @property
    def rules(self) -> list[MockRule]:
        return list(self._engine.rules)

    @property
    def engine(self) -> MockEngine:
        return self._engine

    def unmatched(self) -> list[MockRule]:
        """The rules that answered no request."""
        return self._engine.unmatched()

    def warn_misfits(self) -> int:
        """Warn (:class:`LMRuleWarning`, once per rule) about rules that applied to no request of the
        test (see :meth:`MockEngine.misfits`); returns how many. The ``lm`` fixture calls it when
        the test ends."""
        misfits = self._engine.misfits()
        for rule, why in misfits:
            warnings.warn(
                f"mock LM rule {describe_rule(rule)} {why}; fix the field name, or give the rule the "
                "`signature` of the program it is for",
                LMRuleWarning, stacklevel=2)
        return len(misfits)


class RulesOverEngine(EngineBase):
    """A test's own rules over the layer's engine: a request one of the rules matches is answered by
    the mock (counted as a mock call, never recorded into cassettes nor sent to Gemini); every other
    request goes to the layer's engine unchanged."""

    def __init__(self, rules: TestRules, inner: EngineBase) -> None:
        self.rules = rules
        self.inner = inner
        self.kind = getattr(inner, "kind", "mock")

    @safe_repr
    def __repr__(self) -> str:
        return f"RulesOverEngine({self.rules!r} over {self.inner!r})"

    def complete(self, request: Request) -> Response:
        engine = self.rules.engine
        if engine.rules:
            view = request_view(request)
            rule = engine.first_match(view)
            if rule is not None:
                return engine.respond(request, view, rule)
        return self.inner.complete(request)

    def close(self) -> None:
        self.inner.close()
