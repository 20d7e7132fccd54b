"""e2e layer: a warm pool of workers and the real Gemini API, bounded by the run's limits.

Run: ``GEMINI_TEST_API_KEY=... pytest --layer e2e`` (CI does this only on pushes to main).
Real answers vary, so these tests check shapes and budgets, not exact words.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from qa_app import CATEGORIES, TRIAGE_PROGRAM, triage

pytestmark = pytest.mark.e2e


def test_triage_on_the_pool(bridge: Any) -> None:
    bridge.create_program(**TRIAGE_PROGRAM.create_args())
    outputs = bridge.execute_program("triage", {"ticket": "I was charged twice, please refund"})["outputs"]
    assert outputs["category"] in CATEGORIES
    assert isinstance(outputs["urgent"], bool)


@pytest.mark.skipif(
    not os.environ.get("GEMINI_TEST_API_KEY"),
    reason="in-process real calls need GEMINI_TEST_API_KEY (workers fall back to the Gemini stand-in)",
)
def test_in_process_with_the_real_lm(lm: Any, lm_cost: Any, provision_settings: Any) -> None:
    category, _urgent = triage("The app crashes every time I open settings")
    assert category in CATEGORIES
    assert lm_cost.real == 1
    assert lm_cost.cost_usd <= provision_settings.lm.cost_limit_usd
