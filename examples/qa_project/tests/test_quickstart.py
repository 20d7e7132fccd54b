import pytest


@pytest.mark.unit  # in-process: an in-process bridge, the mock LM, $0
@pytest.mark.integration  # a worker container; LM answers recorded once, then replayed
@pytest.mark.e2e  # a warm pool; real Gemini, or its stand-in when GEMINI_TEST_API_KEY is unset
def test_triage(lm, bridge):  # lm: the layer's dspy.LM, active for the test; bridge: a worker session
    assert lm("Is 'refund please' a billing ticket?")[0]
    bridge.create_program("ticket -> category, urgent: bool", "triage")
    assert bridge.execute_program("triage", {"ticket": "refund please"})["outputs"]["category"]
