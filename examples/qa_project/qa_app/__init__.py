"""A support-ticket triage program built with DSPy: the code under test in this example."""

from qa_app.triage import CATEGORIES, TRIAGE_PROGRAM, Triage, TriageTicket, triage

__all__ = ["CATEGORIES", "TRIAGE_PROGRAM", "Triage", "TriageTicket", "triage"]
