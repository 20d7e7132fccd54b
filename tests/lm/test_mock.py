"""The mock LM: signature-aware answers under every adapter, rules, injected errors, determinism."""

from __future__ import annotations

import datetime
import enum
import json
import subprocess
import sys
import textwrap
from typing import Literal

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError, LMRateLimitError, LMServerError, LMTimeoutError
from pydantic import BaseModel

from provisioner.lm import build_lm, reset_stats, stats
from provisioner.lm.mock import MockEngine, rules_from_mapping
from provisioner.lmconfig import LMConfig, MockRule


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(BaseModel):
    x: int
    tags: list[str]
    when: datetime.datetime


class Shape(BaseModel):
    origin: Point
    corners: list[Point]


class Everything(dspy.Signature):
    """Answer with every kind of output."""

    question: str = dspy.InputField()
    count: int = dspy.InputField()
    answer: int = dspy.OutputField()
    ok: bool = dspy.OutputField()
    names: list[str] = dspy.OutputField()
    choice: Literal["left", "right"] = dspy.OutputField()
    number: Literal[3, 4] = dspy.OutputField()
    point: Point = dspy.OutputField()
    shape: Shape = dspy.OutputField()
    maybe: float | None = dspy.OutputField()
    mapping: dict[str, int] = dspy.OutputField()
    color: Color = dspy.OutputField()
    ratio: float = dspy.OutputField()
    summary: str = dspy.OutputField()


ADAPTERS = [
    pytest.param(lambda: dspy.ChatAdapter(use_json_adapter_fallback=False), id="chat"),
    pytest.param(dspy.JSONAdapter, id="json"),
    pytest.param(dspy.XMLAdapter, id="xml"),
]


@pytest.mark.parametrize("make_adapter", ADAPTERS)
@pytest.mark.parametrize("module", [dspy.Predict, dspy.ChainOfThought])
def test_every_output_type_parses(make_adapter: type, module: type) -> None:
    lm = build_lm(LMConfig(mode="mock"))
    with dspy.context(lm=lm, adapter=make_adapter()):
        result = module(Everything)(question="what?", count=2)
    assert isinstance(result.answer, int)
    assert result.ok is False
    assert result.names == []
    assert result.choice == "left"
    assert result.number == 3
    assert isinstance(result.point, Point) and isinstance(result.point.when, datetime.datetime)
    assert isinstance(result.shape, Shape)
    assert result.maybe == 0.0
    assert result.mapping == {}
    assert result.color is Color.RED
    assert isinstance(result.ratio, float)
    assert result.summary == "mock_response"
    if module is dspy.ChainOfThought:
        assert result.reasoning == "mock_response"


@pytest.mark.parametrize("make_adapter", ADAPTERS)
def test_rule_fixes_outputs_and_others_get_defaults(make_adapter: type) -> None:
    rules = [
        MockRule(match={"question": "capital of France"}, kind="substring",
                 outputs={"answer": "Paris", "confidence": 0.9}),
        MockRule(match={"question": r"^\d+ \+ \d+$"}, kind="regex", outputs={"answer": "a sum"}),
    ]
    lm = build_lm(LMConfig(mode="mock", mock_rules=rules, mock_default="fallback"))
    qa = dspy.Predict("question -> answer: str, confidence: float, sources: list[str]")
    with dspy.context(lm=lm, adapter=make_adapter()):
        hit = qa(question="What is the capital of France?")
        regex_hit = qa(question="2 + 2")
        miss = qa(question="something else")
    assert (hit.answer, hit.confidence, hit.sources) == ("Paris", 0.9, [])
    assert regex_hit.answer == "a sum"
    assert (miss.answer, miss.confidence, miss.sources) == ("fallback", 0.0, [])


def test_exact_rule_and_plan_shorthand() -> None:
    engine_rules = [MockRule(match={"question": "hi"}, kind="exact", outputs={"answer": "exact"}),
                    *rules_from_mapping({"test_input": "test_output"})]
    lm = build_lm(LMConfig(mode="mock", mock_rules=engine_rules))
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        assert qa(question="hi").answer == "exact"
        assert qa(question="hi there").answer == "mock_response"  # exact, not substring
        assert qa(question="a test_input here").answer == "test_output"
    # Without a signature the rule matches the raw prompt and answers with plain text.
    assert lm("please test_input") == ["test_output"]
    assert lm("anything") == ["mock_response"]


def test_rules_match_the_real_input_not_few_shot_demos() -> None:
    rule = MockRule(match={"question": "demo question"}, kind="exact", outputs={"answer": "from demo"})
    lm = build_lm(LMConfig(mode="mock", mock_rules=[rule]))
    program = dspy.Predict("question -> answer")
    program.demos = [dspy.Example(question="demo question", answer="demo answer")]
    with dspy.context(lm=lm):
        assert program(question="real question").answer == "mock_response"
        assert program(question="demo question").answer == "from demo"


def test_rules_on_several_inputs_must_all_match() -> None:
    rule = MockRule(match={"a": "x", "b": "y"}, kind="exact", outputs={"out": "both"})
    lm = build_lm(LMConfig(mode="mock", mock_rules=[rule]))
    program = dspy.Predict("a, b -> out")
    with dspy.context(lm=lm):
        assert program(a="x", b="y").out == "both"
        assert program(a="x", b="z").out == "mock_response"


@pytest.mark.parametrize(
    ("error", "expected", "status"),
    [("rate_limit", LMRateLimitError, 429), ("timeout", LMTimeoutError, 504),
     ("server_error", LMServerError, 500)],
)
def test_injected_errors_surface_as_dspy_errors(error: str, expected: type[Exception], status: int) -> None:
    rule = MockRule(match={"question": "boom"}, error=error)  # type: ignore[arg-type]
    lm = build_lm(LMConfig(mode="mock", mock_rules=[rule]))
    before = stats()
    with dspy.context(lm=lm), pytest.raises(expected) as caught:
        dspy.Predict("question -> answer")(question="boom now")
    assert caught.value.status == status  # type: ignore[attr-defined]
    assert (stats() - before).errors == 1
    with dspy.context(lm=lm):  # other inputs are unaffected
        assert dspy.Predict("question -> answer")(question="fine").answer == "mock_response"


def test_injected_rate_limit_is_not_retried_by_dspy() -> None:
    rule = MockRule(match={}, error="rate_limit")
    lm = build_lm(LMConfig(mode="mock", mock_rules=[rule]))
    before = stats()
    with dspy.context(lm=lm), pytest.raises(LMRateLimitError):
        dspy.Predict("question -> answer")(question="q")
    assert (stats() - before).errors == 1  # one attempt: the user's own retry code is what gets tested


@pytest.mark.parametrize("make_adapter", [dspy.ChatAdapter, dspy.JSONAdapter])
def test_malformed_output_fails_parsing_even_with_json_fallback(make_adapter: type) -> None:
    rule = MockRule(match={"question": "garble"}, error="malformed")
    lm = build_lm(LMConfig(mode="mock", mock_rules=[rule]))
    with dspy.context(lm=lm, adapter=make_adapter()), pytest.raises(AdapterParseError):
        dspy.Predict("question -> answer: int")(question="garble")


def test_latency_rule_delays_the_answer() -> None:
    import time

    rule = MockRule(match={"question": "slow"}, latency_ms=150, outputs={"answer": "late"})
    lm = build_lm(LMConfig(mode="mock", mock_rules=[rule]))
    started = time.monotonic()
    with dspy.context(lm=lm):
        assert dspy.Predict("question -> answer")(question="slow").answer == "late"
    assert time.monotonic() - started >= 0.15


def test_usage_is_deterministic_and_counted() -> None:
    lm = build_lm(LMConfig(mode="mock"))
    reset_stats()
    with dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="count my tokens")
        dspy.Predict("question -> answer")(question="count my tokens")
    first, second = lm.history[-2]["usage"], lm.history[-1]["usage"]
    assert first == second
    assert first["prompt_tokens"] > 0 and first["completion_tokens"] > 0
    snapshot = stats()
    assert snapshot.mock == 2 and snapshot.calls == 2 and snapshot.cost_usd == 0.0
    assert snapshot.input_tokens == 2 * first["prompt_tokens"]


async def _acall(lm: dspy.LM) -> str:
    with dspy.context(lm=lm):
        result = await dspy.Predict("question -> answer").acall(question="async?")
    return str(result.answer)


def test_async_calls_work() -> None:
    import asyncio

    rule = MockRule(match={"*": "async"}, outputs={"answer": "yes"})
    lm = build_lm(LMConfig(mode="mock", mock_rules=[rule]))
    assert asyncio.run(_acall(lm)) == "yes"


def test_dspy_cache_is_off_for_managed_lms() -> None:
    lm = build_lm(LMConfig(mode="mock"))
    assert lm.cache is False
    assert lm.num_retries == 0


_DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import json, dspy
    from provisioner.lm import build_lm
    from provisioner.lmconfig import LMConfig
    lm = build_lm(LMConfig(mode="mock"))
    with dspy.context(lm=lm):
        dspy.ChainOfThought("question, context: list[str] -> answer: int, notes: dict[str, str]")(
            question="q", context=["a", "b"])
    entry = lm.history[-1]
    print(json.dumps({"text": entry["outputs"], "usage": entry["usage"], "id": entry["response"].id}))
    """
)


def test_same_request_same_answer_across_processes() -> None:
    # Two processes at once, with different hash seeds: nothing may depend on Python's str hash.
    children = [
        subprocess.Popen([sys.executable, "-c", _DETERMINISM_SCRIPT], stdout=subprocess.PIPE, text=True,
                         env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"})
        for seed in ("1", "2")
    ]
    outputs = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]
    assert outputs[0]["id"].startswith("mock-")


def test_engine_repr_has_no_rule_contents() -> None:
    engine = MockEngine([MockRule(match={"q": "secret-ish"})])
    assert "secret-ish" not in repr(engine)
