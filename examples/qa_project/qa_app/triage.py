"""Ticket triage: one DSPy signature, used in-process and on a bridge worker."""

from __future__ import annotations

from typing import Literal

import dspy

from provisioner.specs import FieldSpec, ProgramSpec, SignatureSpec

CATEGORIES = ("billing", "bug", "other")


class TriageTicket(dspy.Signature):
    """Classify a support ticket and say whether it is urgent."""

    ticket: str = dspy.InputField()
    category: Literal["billing", "bug", "other"] = dspy.OutputField()
    urgent: bool = dspy.OutputField()


class Triage(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(TriageTicket)

    def forward(self, ticket: str) -> dspy.Prediction:
        return self.classify(ticket=ticket.strip())


def triage(ticket: str) -> tuple[str, bool]:
    """(category, urgent) for a ticket, with whatever LM is active (``dspy.context``)."""
    result = Triage()(ticket=ticket)
    return result.category, result.urgent


# The same signature as data, for creating the program on a bridge worker.
TRIAGE_PROGRAM = ProgramSpec(
    id="triage",
    signature=SignatureSpec(
        name="TriageTicket",
        instructions="Classify a support ticket and say whether it is urgent.",
        inputs=(FieldSpec(name="ticket"),),
        outputs=(
            FieldSpec(name="category", type="Literal['billing', 'bug', 'other']"),
            FieldSpec(name="urgent", type="bool"),
        ),
    ),
)
