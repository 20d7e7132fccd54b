"""Integration layer: the program on a real bridge worker container, with the cached LM.

Run: ``pytest --layer integration``. Each test gets its own session (namespace) on the worker;
LM answers are replayed from ``test/fixtures/lm_responses`` and recorded on a miss.
"""

from __future__ import annotations

from typing import Any

import pytest
from qa_app import CATEGORIES, TRIAGE_PROGRAM

from provisioner.specs import ProgramSpec, unique_id

pytestmark = pytest.mark.integration


def test_triage_on_a_worker(bridge: Any) -> None:
    bridge.create_program(**TRIAGE_PROGRAM.create_args())
    outputs = bridge.execute_program("triage", {"ticket": "The app crashes on start"})["outputs"]
    assert outputs == {"category": "bug", "urgent": True}


@pytest.mark.parametrize("ticket", ["refund please", "my order never came", "crash on save"])
def test_sessions_are_isolated(isolated: Any, ticket: str) -> None:
    # The same program id in every test: each test's session has its own namespace.
    isolated.adapter.create_program(**TRIAGE_PROGRAM.create_args())
    outputs = isolated.adapter.execute_program("triage", {"ticket": ticket})["outputs"]
    assert outputs["category"] in CATEGORIES
    listed = isolated.adapter.list_programs()["programs"]
    assert [p["program_id"] for p in listed] == ["triage"]


def test_factory_programs_never_collide(bridge: Any) -> None:
    # unique_id is what provisioner.factories' ProgramFactory draws its ids from (the factories
    # themselves need the `factories` extra; this project installs provisioner without it).
    for program in (ProgramSpec(id=unique_id("program")) for _ in range(5)):
        assert bridge.create_program(**program.create_args())["status"] == "created"
    assert bridge.list_programs()["total_count"] == 5
