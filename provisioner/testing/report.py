"""The run report: what each layer's tests cost and used, in the terminal and as JSON.

Every process of a run (the only one, or each xdist worker) fills a
:class:`~provisioner.run.ProcessReport`; xdist
workers ship theirs to the controller as JSON, which merges them into one :class:`RunReport` and adds
the test outcomes it saw. Costs of calls made inside worker containers come from the run's shared
ledger (:func:`provisioner.lm.ledger.ledger_usage`); calls made in-process come from
:func:`provisioner.lm.stats`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.lm.callstats import CALL_KINDS, LMUsage
from provisioner.lm.ledger import rate_limit_wait_text, refused_text
from provisioner.lm.pricing import format_usd
from provisioner.run import LeakRecord, ProcessReport

OUTCOMES: tuple[str, ...] = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
SCHEMA_VERSION = 1


@dataclass
class LayerReport:
    name: str
    lm_mode: str
    cost_limit_usd: float  # this process's limit: a shard's share of the run's when limits_share_of > 1
    rate_limit_rpm: int = 10
    limits_share_of: int = 1  # a shard of this many (pytest-split's --splits): the limits are its share
    outcomes: Counter[str] = field(default_factory=Counter)
    workers_started: int = 0
    lm: LMUsage = field(default_factory=LMUsage)
    leaks: list[LeakRecord] = field(default_factory=list)
    retained: list[str] = field(default_factory=list)
    unmatched_lm_rules: list[list[str]] = field(default_factory=list)

    @property
    def tests(self) -> int:
        return sum(self.outcomes.values())

    def limit_text(self) -> str:
        """"the run's $0.50 limit", or in a shard "this shard's share (1/2 of $0.50)" of the run's limit."""
        if self.limits_share_of <= 1:
            return f"the run's {format_usd(self.cost_limit_usd)} limit"
        whole = format_usd(self.cost_limit_usd * self.limits_share_of)
        return f"this shard's share (1/{self.limits_share_of} of {whole}) of the run's limit"

    def as_dict(self) -> dict[str, Any]:
        return {
            "tests": self.tests,
            "outcomes": {k: self.outcomes.get(k, 0) for k in OUTCOMES},
            "lm_mode": self.lm_mode,
            "workers_started": self.workers_started,
            "lm_calls": {k: getattr(self.lm, k) for k in CALL_KINDS},
            "lm": self.lm.as_dict(),
            "cost_usd": round(self.lm.cost_usd, 6),
            "cost_limit_usd": self.cost_limit_usd,
            "cache_misses": self.lm.cache_misses,
            "lm_refused": self.lm.refused,  # refused by the run's limits before sending: not in lm_calls
            # Calls that waited for a slot of lm.rate_limit_rpm, and the seconds they waited in all.
            "rate_limit_rpm": self.rate_limit_rpm,
            "lm_rate_limit_waits": self.lm.rate_limit_waits,
            "lm_rate_limit_wait_s": round(self.lm.rate_limit_wait_s, 3),
            "lm_errors": self.lm.errors,  # LM calls that raised an error: not in lm_calls
            "leaks_found": sum(len(r.leaks) for r in self.leaks),
            "leaks": [{"test": r.test, "leaks": [list(x) for x in r.leaks]} for r in self.leaks],
            "retained": list(self.retained),
            "unmatched_lm_rules": [{"test": test, "rule": rule} for test, rule in self.unmatched_lm_rules],
        }


@dataclass
class RunReport:
    """The whole run: one section per layer (a run has one active layer; custom ones included)."""

    run_id: str
    layers: dict[str, LayerReport] = field(default_factory=dict)
    processes: int = 0
    run_cost_usd: float | None = None  # the run ledger's total, when the run has one
    # The run's history rows (provisioner.history.store.RunRow / TestRow, as plain dicts)
    history_run: dict[str, Any] | None = None
    tests: list[dict[str, Any]] = field(default_factory=list)
    # This report's part of a split suite, {"group": i, "splits": N} (pytest-split's --group/--splits),
    # whatever PROVISION_SHARD calls the shard: `provision history merge` checks that all N are there.
    split: dict[str, int] | None = None

    def layer(self, name: str, lm_mode: str = "mock", cost_limit_usd: float = 0.0, rate_limit_rpm: int = 10,
              limits_share_of: int = 1) -> LayerReport:
        if name not in self.layers:
            self.layers[name] = LayerReport(name=name, lm_mode=lm_mode, cost_limit_usd=cost_limit_usd,
                                            rate_limit_rpm=rate_limit_rpm, limits_share_of=limits_share_of)
        return self.layers[name]

    def add_outcome(self, layer: str, outcome: str) -> None:
        self.layer(layer).outcomes[outcome] += 1

    def merge(self, process: ProcessReport) -> None:
        self.processes += 1
        section = self.layer(process.layer)
        section.workers_started += process.workers_started
        section.lm.add(process.lm)
        section.leaks.extend(process.leaks)
        section.retained.extend(process.retained)
        section.unmatched_lm_rules.extend(process.unmatched_lm_rules)

    @property
    def leaks_found(self) -> int:
        return sum(len(r.leaks) for section in self.layers.values() for r in section.leaks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "processes": self.processes,
            "run_cost_usd": None if self.run_cost_usd is None else round(self.run_cost_usd, 6),
            "leaks_found": self.leaks_found,
            "layers": {name: section.as_dict() for name, section in self.layers.items()},
            "run": self.history_run,
            "tests": self.tests,
            **({"split": self.split} if self.split else {}),
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")

    def lines(self) -> list[str]:
        """The terminal summary, one block per layer."""
        out = [f"run {self.run_id}"]
        for name, section in self.layers.items():
            counts = ", ".join(f"{section.outcomes[k]} {k}" for k in OUTCOMES if section.outcomes.get(k))
            lm = section.lm
            calls = ", ".join(f"{getattr(lm, k)} {k}" for k in CALL_KINDS)
            tests = f"{section.tests} test{'' if section.tests == 1 else 's'}"
            out.append(f"layer {name}: {tests} ({counts or 'none run'})")
            out.append(f"  workers started: {section.workers_started}")
            # By what answered (the layer's mode, e.g. real without a key, is not what happened).
            out.append(f"  LM calls: {lm.calls} — {calls}")
            if lm.refused:  # stopped by the run's limits before they were sent: not among the calls
                by_reason = {"cost_limit": lm.refused_cost_limit, "rate_limit": lm.refused_rate_limit}
                out.append("  " + refused_text({k: v for k, v in by_reason.items() if v},
                                               {"cost_limit": section.cost_limit_usd}))
            if lm.errors:  # raised to the program (sent and failed, or a mock rule's injected error)
                out.append(f"  LM errors: {lm.errors} (calls that raised an error: failed, refused or an"
                           " injected fault; not among the calls above)")
            if lm.rate_limit_waits:  # time the tests spent waiting for a slot, not working
                out.append("  " + rate_limit_wait_text(lm.rate_limit_waits, lm.rate_limit_wait_s,
                                                       section.rate_limit_rpm))
            out.append(f"  cache misses: {lm.cache_misses}")
            whose = section.limit_text()
            if not lm.standin or lm.cost_usd:
                out.append(f"  cost: ${lm.cost_usd:.4f} of {whose}")
            if lm.standin:
                at_list = max(lm.list_cost_usd - lm.cost_usd, 0.0)  # billed calls cost their list price
                calls = f"{lm.standin} call{'s' if lm.standin != 1 else ''}"
                out.append(f"  Gemini stand-in: {calls}, $0 billed (${at_list:.6f} at list prices "
                           f"counted against {whose})")
            leaks = sum(len(r.leaks) for r in section.leaks)
            out.append(f"  leaks found: {leaks}")
            for record in section.leaks:
                listed = ", ".join(f"{kind} {name}" for kind, name in record.leaks)
                out.append(f"    {record.test}: {listed}")
            if section.unmatched_lm_rules:
                out.append(f"  LM rules that never matched: {len(section.unmatched_lm_rules)}")
                for test, rule in section.unmatched_lm_rules:
                    out.append(f"    {test}: {rule}")
            for retained in section.retained:
                out.append(f"  retained for debugging: {retained}")
        return out
