"""Per-test LM rules (issue 9): a test's own rules over the layer's LM, as DSPy's DummyLM allows —
answers by input, injected errors, ``"*"`` as any value, warnings for fields a signature lacks,
unmatched rules listed; never recorded into cassettes nor sent to Gemini."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import dspy
import pytest
from dspy.utils.exceptions import LMRateLimitError

from provisioner.lm import build_lm, stats
from provisioner.lm.mock import LMRuleWarning, TestRules
from provisioner.lm.standin import GeminiStandin
from provisioner.lmconfig import LMConfig, MockRule

from .._helpers import clear_settings
from .conftest import STANDIN_KEY

pytest_plugins = ["pytester"]


def _ask(question: str, signature: str = "question -> answer") -> str:
    return str(dspy.Predict(signature)(question=question).answer)


def test_star_pattern_means_any_value_of_that_field() -> None:
    rules = TestRules([{"match": {"question": "*"}, "outputs": {"answer": "any"}}])
    with dspy.context(lm=build_lm(LMConfig(mode="mock"), rules=rules)), warnings.catch_warnings():
        warnings.simplefilter("error", LMRuleWarning)
        assert _ask("whatever?") == "any"
        # Another program (no `question` field): the rule does not apply there, and nothing warns.
        assert str(dspy.Predict("text -> answer")(text="t").answer) == "mock_response"
        assert rules.warn_misfits() == 0  # it applied to the `question -> answer` request


def test_star_pattern_is_valid_for_regex_rules() -> None:
    assert MockRule(match={"question": "*"}, kind="regex").match == {"question": "*"}


def test_test_rules_go_first_then_the_layer_rules_then_defaults() -> None:
    layer = LMConfig(mode="mock", mock_rules=[
        MockRule(match={"question": "layer"}, outputs={"answer": "L"}),
        MockRule(match={"question": "both"}, outputs={"answer": "L2"}),
    ])
    rules = TestRules([MockRule(match={"question": "both"}, outputs={"answer": "T"})])
    with dspy.context(lm=build_lm(layer, rules=rules)):
        assert [_ask("layer?"), _ask("both?"), _ask("neither?")] == ["L", "T", "mock_response"]


def test_injected_error_and_rules_added_while_running() -> None:
    rules = TestRules()
    with dspy.context(lm=build_lm(LMConfig(mode="mock"), rules=rules)):
        assert _ask("q?") == "mock_response"
        rules.add(match={"question": "q"}, error="rate_limit")
        with pytest.raises(LMRateLimitError):
            _ask("q?")


def test_a_rule_whose_fields_fit_no_request_is_warned_about_once_when_the_test_ends() -> None:
    rules = TestRules([{"match": {"questoin": "x"}, "outputs": {"answr": "y"}},
                       {"match": {"question": "a"}, "outputs": {"answer": "A"}}])
    lm = build_lm(LMConfig(mode="mock"), rules=rules)
    with dspy.context(lm=lm), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert [_ask("a?"), _ask("b?"), _ask("c?")] == ["A", "mock_response", "mock_response"]
        assert [w for w in seen if w.category is LMRuleWarning] == []  # nothing per request
        assert rules.warn_misfits() == 1
    messages = [str(w.message) for w in seen if w.category is LMRuleWarning]
    assert len(messages) == 1  # one per rule, naming every field no signature had
    assert "the input field 'questoin' and the output field 'answr'" in messages[0]
    assert "(question -> answer)" in messages[0] and "`signature`" in messages[0]
    assert [r.match for r in rules.unmatched()] == [{"questoin": "x"}]


def test_layer_rules_for_two_programs_warn_about_nothing() -> None:
    """The reported case: a layer's mock_rules target two programs; each request is checked only
    against the rules that apply to it, scoped (``signature``) or not."""
    layer = LMConfig(mode="mock", mock_rules=[
        MockRule(match={"ticket": "refund"}, outputs={"category": "billing"}),
        MockRule(signature="question -> answer", match={"question": "*"}, outputs={"answer": "42"}),
    ])
    rules = TestRules([{"signature": "ticket -> category, urgent: bool", "match": {"ticket": "crash"},
                        "outputs": {"urgent": True}}])
    with dspy.context(lm=build_lm(layer, rules=rules)), warnings.catch_warnings():
        warnings.simplefilter("error", LMRuleWarning)
        triage = dspy.Predict("ticket -> category, urgent: bool")
        for _ in range(2):
            assert triage(ticket="refund please").category == "billing"
            assert triage(ticket="app crash").urgent is True
            assert _ask("meaning of life?") == "42"
        assert rules.warn_misfits() == 0


def test_a_scoped_rule_applies_to_its_signature_only_and_must_name_its_fields() -> None:
    rules = TestRules([{"signature": "question -> answer", "match": {"question": "*"},
                        "outputs": {"answer": "s"}}])
    with dspy.context(lm=build_lm(LMConfig(mode="mock"), rules=rules)):
        assert _ask("q?") == "s"
        # Same input field, another output: another program, so the rule does not apply.
        assert _ask("q?", "question -> answer, confidence: float") == "mock_response"
    with pytest.raises(ValueError, match=r"match\['qestion'\] is not an input field of the rule's signature"):
        MockRule(signature="question -> answer", match={"qestion": "x"})
    with pytest.raises(ValueError, match=r"outputs\['answr'\] is not an output field"):
        MockRule(signature="question -> answer", outputs={"answr": "x"})
    with pytest.raises(ValueError, match="must read 'inputs -> outputs'"):
        MockRule(signature="question, answer")
    assert MockRule(signature="a, b: dict[str, int] -> c: list[str]").signature_fields() == (
        frozenset({"a", "b"}), frozenset({"c"}))
    # A rule for another program that never ran in the test is named once, with its signature.
    other = TestRules([{"signature": "ticket -> category", "match": {"ticket": "x"}}])
    with dspy.context(lm=build_lm(LMConfig(mode="mock"), rules=other)):
        _ask("q?")
    with pytest.warns(LMRuleWarning, match=r"signature 'ticket -> category' is none of the requests'"):
        assert other.warn_misfits() == 1


def test_rules_without_a_signature_keep_their_cassette_identity() -> None:
    """Adding ``signature`` to MockRule must not turn every recorded mock cassette into a miss."""
    from provisioner.lm.cached import endpoint_identity

    rule = MockRule(match={"ticket": "refund"}, outputs={"category": "billing", "urgent": False})
    config = LMConfig(mode="cached", cached_inner="mock", mock_rules=[rule])
    assert endpoint_identity(config) == "mock:72c771848bb38952"  # the digest before the field existed
    scoped = rule.model_copy(update={"signature": "ticket -> category, urgent: bool"})
    assert endpoint_identity(config.model_copy(update={"mock_rules": [scoped]})) != endpoint_identity(config)


def test_in_cached_mode_matched_requests_are_never_recorded(tmp_path: Path) -> None:
    config = LMConfig(mode="cached", cached_inner="mock", cache_dir=tmp_path / "cassettes",
                      run_dir=tmp_path / "run")
    rules = TestRules([{"match": {"question": "mine"}, "outputs": {"answer": "test-only"}}])
    before = stats()
    with dspy.context(lm=build_lm(config, rules=rules)):
        assert _ask("mine?") == "test-only"
        assert not list((tmp_path / "cassettes").rglob("*.json"))
        _ask("shared?")
    assert len(list((tmp_path / "cassettes").rglob("*.json"))) == 1  # only the unmatched request
    delta = stats() - before
    assert (delta.mock, delta.recorded) == (1, 1)


def test_in_real_mode_matched_requests_are_never_sent(standin: GeminiStandin, tmp_path: Path) -> None:
    config = LMConfig(mode="real", api_key=STANDIN_KEY, base_url=standin.url, run_dir=tmp_path)
    rules = TestRules([{"match": {"question": "*"}, "outputs": {"answer": "local"}}])
    with dspy.context(lm=build_lm(config, rules=rules)):
        assert _ask("q?") == "local"
    assert standin.request_count == 0


PROJECT = """
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[[tool.provisioner.lm.mock_rules]]
match = { question = "layer" }
outputs = { answer = "from-the-layer" }
"""

SUITE = """
import threading
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
from dspy.utils.exceptions import LMServerError


def ask(q):
    return dspy.Predict("question -> answer")(question=q).answer


@pytest.mark.lm_rules({"match": {"question": "France"}, "outputs": {"answer": "Paris"}})
def test_answers_by_input_in_threads_too():
    out = []
    t = threading.Thread(target=lambda: out.append(ask("capital of France?")))
    t.start(); t.join()
    assert out == ["Paris"]
    assert ask("layer?") == "from-the-layer"      # layered over the layer's rules
    assert ask("other?") == "mock_response"


@pytest.mark.lm_rules({"match": {"question": "*"}, "error": "server_error"})
def test_injected_error(lm):
    with pytest.raises(LMServerError):
        ThreadPoolExecutor(1).submit(ask, "q?").result()


def test_fixture_factory(lm_rules):
    lm_rules.add(match={"question": "two"}, outputs={"answer": "2"})
    assert ask("two?") == "2"


@pytest.mark.lm_rules({"match": {"question": "never asked"}, "outputs": {"answer": "x"}},
                      {"match": {"qestion": "typo"}, "outputs": {"answer": "x"}})
def test_unmatched_and_misnamed():
    assert ask("something else") == "mock_response"


def test_other_tests_do_not_see_them(lm):
    assert ask("capital of France?") == "mock_response"
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    clear_settings(monkeypatch)
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_rules_suite=SUITE)
    return pytester


@pytest.mark.parametrize("xdist", [[], pytest.param(["-n", "2"], marks=pytest.mark.slow)],
                         ids=["one-process", "xdist"])
def test_per_test_rules_through_the_plugin(suite: pytest.Pytester, xdist: list[str]) -> None:
    result = suite.runpytest_subprocess("--layer", "unit", "--provision-report", "r.json", *xdist)
    result.assert_outcomes(passed=5)
    out = result.stdout.str()
    assert "LMRuleWarning" in out and "names the input field 'qestion'" in out
    result.stdout.fnmatch_lines([
        "*LM rules that never matched: 2*",
        '*test_unmatched_and_misnamed: {"match":{"question":"never asked"},"outputs":{"answer":"x"}}*',
    ])
    unmatched = json.loads((suite.path / "r.json").read_text())["layers"]["unit"]["unmatched_lm_rules"]
    assert {u["test"].split("::")[-1] for u in unmatched} == {"test_unmatched_and_misnamed"}
    assert len(unmatched) == 2
