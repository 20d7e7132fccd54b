"""Signature specs -> typed DSPy signatures, and the per-session program namespaces."""

from __future__ import annotations

from typing import Any, Literal

import dspy
import pytest

from provisioner.bridge.programs import (
    ProgramRegistry,
    build_program,
    make_dspy_signature,
    parse_signature_spec,
    parse_type,
)
from provisioner.errors import BridgeError, SignatureSpecError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("str", str),
        ("int", int),
        ("float", float),
        ("bool", bool),
        ("string", str),
        ("integer", int),
        ("number", float),
        ("boolean", bool),
        ("list[str]", list[str]),
        ("List[int]", list[int]),
        ("list", list[Any]),
        ("dict", dict[str, Any]),
        ("dict[str, int]", dict[str, int]),
        ("dict[str, list[float]]", dict[str, list[float]]),
        ("tuple[int, str]", tuple[int, str]),
        ("Optional[float]", float | None),
        ("int | None", int | None),
        ("Union[int, str]", int | str),
        ("Literal['yes', 'no']", Literal["yes", "no"]),
        ('Literal["a", 1, True]', Literal["a", 1, True]),
        ("typing.Any", Any),
        ("  list[ str ]  ", list[str]),
    ],
)
def test_type_expressions(text: str, expected: object) -> None:
    assert parse_type(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("strng", "unknown type 'strng'"),
        ("MyModel", "unknown type 'MyModel'"),
        ("list[", "missing type"),
        ("list[int", "expected ']'"),
        ("list[int, str]", "list[...] takes one type"),
        ("dict[float, int]", "dict keys must be str or int"),
        ("dict[str]", "takes a key type and a value type"),
        ("Literal[yes]", "must be quoted"),
        ("int]", "unexpected ']'"),
        ("", "non-empty type expression"),
        ("list[" * 12 + "int" + "]" * 12, "nesting deeper than"),
        ("int; import os", "cannot read type"),
    ],
)
def test_bad_type_expressions_name_the_field(text: str, fragment: str) -> None:
    with pytest.raises(SignatureSpecError) as info:
        parse_type(text, "signature.outputs[2].type")
    assert info.value.where == "signature.outputs[2].type"
    assert fragment in str(info.value)


def test_a_spec_becomes_a_typed_dspy_signature_in_order() -> None:
    spec = parse_signature_spec(
        {
            "name": "Grade",
            "description": "Grade the essay.",
            "inputs": [{"name": "essay", "description": "the text"}, {"name": "rubric", "type": "list[str]"}],
            "outputs": [
                {"name": "score", "type": "int", "description": "0-10"},
                {"name": "passed", "type": "bool"},
                "comment",
            ],
        }
    )
    signature = make_dspy_signature(spec)
    assert issubclass(signature, dspy.Signature)
    assert signature.__name__ == "Grade"
    assert signature.instructions == "Grade the essay."
    assert list(signature.input_fields) == ["essay", "rubric"]
    assert list(signature.output_fields) == ["score", "passed", "comment"]
    assert signature.input_fields["rubric"].annotation == list[str]
    assert signature.output_fields["score"].annotation is int
    assert signature.output_fields["passed"].annotation is bool
    assert signature.output_fields["comment"].annotation is str
    assert signature.input_fields["essay"].json_schema_extra["desc"] == "the text"
    assert signature.output_fields["score"].json_schema_extra["desc"] == "0-10"
    assert spec.public()["outputs"][2] == {"name": "comment", "type": "str"}


def test_a_dspy_signature_string_is_accepted_with_its_types() -> None:
    spec = parse_signature_spec("question: str, context: list[str] -> answer: int")
    assert [(f.name, f.annotation) for f in spec.inputs] == [("question", str), ("context", list[str])]
    assert [(f.name, f.annotation) for f in spec.outputs] == [("answer", int)]


@pytest.mark.parametrize(
    ("spec", "where", "fragment"),
    [
        (5, "signature", "must be an object"),
        ("no arrow here", "signature", "invalid signature string"),
        ({"outputs": ["a"]}, "signature.inputs", "is required"),
        ({"inputs": [], "outputs": ["a"]}, "signature.inputs", "non-empty list"),
        ({"inputs": ["q"]}, "signature.outputs", "is required"),
        ({"inputs": ["q"], "outputs": "a"}, "signature.outputs", "non-empty list"),
        ({"inputs": ["q"], "outputs": ["a"], "extra": 1}, "signature.extra", "unknown key"),
        ({"inputs": ["q"], "outputs": ["a"], "name": "has space"}, "signature.name", "identifier"),
        ({"inputs": ["q"], "outputs": ["a"], "description": 3}, "signature.description", "must be a string"),
        ({"inputs": [5], "outputs": ["a"]}, "signature.inputs[0]", "must be an object"),
        ({"inputs": [{"type": "str"}], "outputs": ["a"]}, "signature.inputs[0].name", "identifier"),
        ({"inputs": [{"name": "a b"}], "outputs": ["a"]}, "signature.inputs[0].name", "identifier"),
        ({"inputs": [{"name": "_x"}], "outputs": ["a"]}, "signature.inputs[0].name", "identifier"),
        ({"inputs": [{"name": "class"}], "outputs": ["a"]}, "signature.inputs[0].name", "identifier"),
        ({"inputs": ["q"], "outputs": [{"name": "instructions"}]}, "signature.outputs[0].name", "reserved"),
        ({"inputs": ["q", "r"], "outputs": ["a", "q"]}, "signature.outputs[1].name", "duplicate field"),
        ({"inputs": [{"name": "q", "typ": "str"}], "outputs": ["a"]}, "signature.inputs[0].typ", "unknown"),
        ({"inputs": ["q"], "outputs": [{"name": "a", "type": "flt"}]}, "signature.outputs[0].type", "flt"),
        ({"inputs": [{"name": "q", "description": 1}], "outputs": ["a"]},
         "signature.inputs[0].description", "string"),
    ],
)
def test_invalid_specs_name_the_bad_field_never_fall_back(spec: object, where: str, fragment: str) -> None:
    with pytest.raises(SignatureSpecError) as info:
        parse_signature_spec(spec)
    assert info.value.where == where
    assert fragment in str(info.value)


def _program(program_id: str, session_id: str) -> Any:
    return build_program(program_id, session_id, parse_signature_spec("question -> answer"), "predict")


def test_programs_are_namespaced_by_session() -> None:
    registry = ProgramRegistry()
    registry.add(_program("qa", "s1"))
    registry.add(_program("qa", "s2"))  # the same id in another session is fine
    with pytest.raises(BridgeError) as info:
        registry.add(_program("qa", "s1"))
    assert info.value.error_type == "ProgramExists"
    assert info.value.message == "Program with ID 'qa' already exists in session 's1'"
    assert registry.get("s1", "qa") is not registry.get("s2", "qa")
    with pytest.raises(BridgeError) as missing:
        registry.get("s3", "qa")
    assert missing.value.error_type == "ProgramNotFound"
    assert "session 's3'" in missing.value.message


def test_removing_a_session_removes_exactly_its_programs_and_lm() -> None:
    registry = ProgramRegistry()
    registry.add(_program("a", "s1"))
    registry.add(_program("b", "s1"))
    registry.add(_program("a", "s2"))
    registry.set_lm("s1", "lm-1", {"mode": "mock"})
    removed = registry.remove_session("s1")
    assert removed is not None and sorted(removed.programs) == ["a", "b"] and removed.lm == "lm-1"
    assert registry.programs("s1") == [] and registry.lm_of("s1") is None
    assert [p.program_id for p in registry.programs("s2")] == ["a"]
    assert registry.remove_session("s1") is None
    assert len(registry.clear()) == 1
    assert registry.programs() == []


def test_programs_validate_inputs_against_their_declared_types() -> None:
    spec = parse_signature_spec("n: int, tags: list[str] -> out")
    program = build_program("p", "s", spec, "chain_of_thought")
    assert isinstance(program.module, dspy.ChainOfThought)
    assert program.input_validators["n"]("5") == 5
    with pytest.raises(ValueError):
        program.input_validators["n"]("five")
    with pytest.raises(ValueError):
        program.input_validators["tags"]("not a list")
