"""Unit layer: in-process DSPy with the mock LM. No containers, no network, $0.

Run: ``pytest --layer unit`` (or just ``pytest``: unit is this project's default layer).
"""

from __future__ import annotations

from typing import Any

import pytest
from qa_app import CATEGORIES, TRIAGE_PROGRAM, triage

pytestmark = pytest.mark.unit


def test_refund_tickets_are_billing(lm: Any) -> None:
    # The `lm` fixture is active for the test: no dspy.configure, never "No LM is loaded".
    assert triage("I want a refund for last month") == ("billing", False)


def test_crashes_are_urgent_bugs(lm: Any) -> None:
    assert triage("The app crashes on start") == ("bug", True)


def test_every_answer_is_a_known_category(lm: Any, lm_cost: Any) -> None:
    category, urgent = triage("Where is my parcel?")
    assert category in CATEGORIES and isinstance(urgent, bool)
    assert lm_cost.mock == 1 and lm_cost.cost_usd == 0


def test_the_program_spec_runs_on_the_in_process_bridge(bridge: Any) -> None:
    # `bridge` is this test's own session on an in-process bridge; program ids never clash.
    bridge.create_program(**TRIAGE_PROGRAM.create_args())
    outputs = bridge.execute_program("triage", {"ticket": "refund please"})["outputs"]
    assert outputs == {"category": "billing", "urgent": False}
