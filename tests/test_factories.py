from __future__ import annotations

import multiprocessing
import re

import dspy
import pytest
from pydantic import ValidationError

from provisioner import factories, specs
from provisioner.factories import (
    FieldSpec,
    ProgramFactory,
    ProgramSpec,
    SessionFactory,
    SignatureFactory,
    SignatureSpec,
    unique_id,
)

ID_SHAPE = re.compile(r"^program_[a-z0-9]+_[a-z0-9]+_\d+_\d+$")


def _ids_in_child(_: int) -> list[str]:
    return [ProgramFactory.build().id for _ in range(50)]


def test_program_ids_are_unique_and_well_formed() -> None:
    programs = ProgramFactory.build_batch(200)
    ids = [p.id for p in programs]
    assert len(set(ids)) == 200
    assert all(ID_SHAPE.match(i) for i in ids), ids[:3]


def test_ids_carry_run_worker_and_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(specs, "_run_id", None)
    monkeypatch.setenv("PROVISION_RUN_ID", "Run-2026-XY")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    assert unique_id("program").startswith(f"program_run2026xy_gw3_{os.getpid()}_")
    factories.set_run_id("abc")
    assert unique_id("session").startswith("session_abc_gw3_")
    factories.set_run_id(None)


def test_ids_do_not_collide_across_processes() -> None:
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: counters all start at 1
    with ctx.Pool(3) as pool:
        batches = pool.map(_ids_in_child, range(3))
    ids = [i for batch in batches for i in batch] + [p.id for p in ProgramFactory.build_batch(50)]
    assert len(ids) == len(set(ids)) == 200


def test_unique_id_rejects_non_identifier_kind() -> None:
    with pytest.raises(ValueError, match="identifier"):
        unique_id("bad kind")


def test_content_is_deterministic_so_cached_prompts_repeat() -> None:
    first, second = ProgramFactory.build(), ProgramFactory.build()
    assert first.id != second.id
    assert first.signature == second.signature
    assert first.signature.as_string() == "question: str -> answer: str"
    assert first.signature.instructions == "Answer the question."


def test_overrides_and_nested_signature() -> None:
    sig = SignatureFactory.build(
        instructions="Classify.",
        inputs=[FieldSpec(name="text")],
        outputs=[FieldSpec(name="label", type="int", description="a class number")],
    )
    program = ProgramFactory.build(id="fixed", signature=sig, program_type="chain_of_thought")
    assert program.id == "fixed"
    args = program.create_args()
    assert args == {
        "program_id": "fixed",
        "program_type": "chain_of_thought",
        "signature": {
            "name": "QuestionAnswer",
            "description": "Classify.",
            "inputs": [{"name": "text", "type": "str"}],
            "outputs": [{"name": "label", "type": "int", "description": "a class number"}],
        },
    }
    batch = ProgramFactory.build_batch(3, program_type="chain_of_thought")
    assert {p.program_type for p in batch} == {"chain_of_thought"}
    assert len({p.id for p in batch}) == 3


def test_signature_validation_names_the_problem() -> None:
    with pytest.raises(ValidationError, match="distinct"):
        SignatureSpec(inputs=(FieldSpec(name="x"),), outputs=(FieldSpec(name="x"),))
    with pytest.raises(ValidationError, match="identifier"):
        FieldSpec(name="not valid")
    with pytest.raises(ValidationError, match="starting with a letter"):
        FieldSpec(name="_private")
    with pytest.raises(ValidationError, match="type"):
        FieldSpec(name="x", type="frobnicate[")
    assert FieldSpec(name="x", type="Literal['a', 'b']").type == "Literal['a', 'b']"
    with pytest.raises(ValidationError, match="at least one output"):
        SignatureSpec(outputs=())


def test_to_dspy_builds_real_modules() -> None:
    program = ProgramFactory.build(program_type="chain_of_thought")
    module = program.to_dspy()
    assert isinstance(module, dspy.ChainOfThought)
    predict = ProgramSpec(id="p", signature=SignatureSpec()).to_dspy()
    assert isinstance(predict, dspy.Predict)
    assert list(predict.signature.input_fields) == ["question"]
    assert list(predict.signature.output_fields) == ["answer"]
    assert predict.signature.instructions == "Answer the question."
    typed = SignatureSpec(
        inputs=(FieldSpec(name="n", type="int"),), outputs=(FieldSpec(name="ok", type="bool"),)
    )
    assert typed.to_dspy().output_fields["ok"].annotation is bool


def test_sessions_share_one_suffix_and_differ_from_each_other() -> None:
    one, two = SessionFactory.build_batch(2)
    suffix = one.session_id.removeprefix("session_")
    assert one.namespace == f"ns_{suffix}"
    assert one.program_prefix == f"p_{suffix}_"
    assert one.program_id("qa") == f"p_{suffix}_qa"
    assert len({one.session_id, two.session_id, one.namespace, two.namespace}) == 4
    custom = SessionFactory.build(namespace="mine", metadata={"test": "t"})
    assert custom.namespace == "mine" and custom.metadata == {"test": "t"}


def test_session_ids_carry_a_random_part_beyond_the_run_and_counter() -> None:
    """Naming a session gives access to it on a worker: its id must not be guessable."""
    one, two = SessionFactory.build_batch(2)
    head_one, random_one = one.session_id.rsplit("_", 1)
    head_two, random_two = two.session_id.rsplit("_", 1)
    assert re.fullmatch(r"[0-9a-f]{16}", random_one) and random_one != random_two
    assert re.fullmatch(r"session_\w+_\d+_\d+", head_one) and head_one != head_two


def test_new_session_is_the_factorys_session_without_polyfactory() -> None:
    """The isolated fixture's per-test session (issue 10: polyfactory's build was ≈ 0.3 ms of it):
    the same fields, the same shared suffix and the same 64-bit random part as the factory's."""
    from provisioner.factories import new_session

    one, two = new_session({"label": "t::a"}), new_session()
    assert one.metadata == {"label": "t::a"} and two.metadata == {}
    for spec in (one, two):
        suffix = spec.session_id.removeprefix("session_")
        assert spec.namespace == f"ns_{suffix}" and spec.program_prefix == f"p_{suffix}_"
        head, random_part = spec.session_id.rsplit("_", 1)
        assert re.fullmatch(r"[0-9a-f]{16}", random_part)
        assert re.fullmatch(r"session_\w+_\d+_\d+", head)
    assert one.session_id != two.session_id
    assert type(one) is type(SessionFactory.build()) and set(one.model_dump()) == set(
        SessionFactory.build().model_dump())


def test_programs_create_and_run_on_an_in_process_bridge() -> None:
    from provisioner.bridge import LocalBridge

    with LocalBridge() as bridge:
        session = bridge.session(SessionFactory.build().session_id)
        programs = ProgramFactory.build_batch(3)
        for program in programs:
            assert session.create_program(**program.create_args())["program_id"] == program.id
        listed = {p["program_id"] for p in session.list_programs()["programs"]}
        assert listed == {p.id for p in programs}
        result = session.execute_program(programs[0].id, {"question": "2+2?"})
        assert set(result["outputs"]) == {"answer"}


WITHOUT_THE_EXTRA = """
import sys
sys.modules[{blocked!r}] = None  # as if not installed: importing it raises ModuleNotFoundError
from provisioner.factories import FieldSpec, ProgramSpec, SessionSpec, SignatureSpec, new_session, unique_id
assert ProgramSpec(id=unique_id("program")).signature == SignatureSpec() and new_session().session_id
try:
    from provisioner.factories import {name}
except ImportError as exc:
    print(type(exc).__name__, exc.name, exc, sep="|")
"""


@pytest.mark.parametrize("blocked", ["polyfactory", "faker"])
@pytest.mark.parametrize("name", ["ProgramFactory", "SignatureFactory", "SessionFactory"])
def test_without_the_factories_extra_the_specs_import_and_a_factory_names_the_extra(
    blocked: str, name: str
) -> None:
    """polyfactory (and Faker, which it pulls in) is the ``factories`` extra: the base install imports
    the specs through provisioner.factories, and a factory's name raises an ImportError saying what to
    install. A fresh interpreter: this one has the factories imported already."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", WITHOUT_THE_EXTRA.format(blocked=blocked, name=name)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    kind, missing, message = done.stdout.strip().split("|")
    assert (kind, missing) == ("ImportError", blocked)
    assert message.startswith(f"provisioner.factories.{name} is built on polyfactory, and {blocked} is not "
                              "installed")
    assert "pip install 'dspy-provisioner[factories]'" in message and "provisioner.specs" in message


def test_an_unknown_name_of_the_factories_module_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'ModelFactory'"):
        _ = factories.ModelFactory  # type: ignore[attr-defined]
    with pytest.raises(ImportError, match="cannot import name 'Nope'"):
        from provisioner.factories import Nope  # type: ignore[attr-defined]  # noqa: F401
