"""Whether a pytest run ran its layer's whole suite to the end — and so may vouch for which
cassettes nobody uses (``provision cassettes prune``).

A run is *partial* when it ran less than the suite (a positional path or node id narrower than
the suite, ``-k``, ``-m``, ``--lf``, ``--deselect``, ``--ignore``, ``--sw``, or any collected test
of the layer left out of the selection: a pytest-split shard, a plugin that deselects or drops
items), ran no test body at all (``--co``, ``--setup-plan``, ``--setup-only``, ``--fixtures``,
``--fixtures-per-test``, an empty selection), did not run the body of every selected test (one
skipped or failed in its set-up: its cassettes were not used, whatever they hold) or did not run to the end
(``-x``/``--maxfail``/the layer's ``max_failures`` stopped it, an interrupt, an internal or usage
error, a test or session timeout, a crashed xdist worker). Only a complete run vouches for which
cassettes nobody uses: a session that ran no test body would otherwise vouch that *every* cassette
is unused. Plain Python (no pytest import): the plugin feeds it what pytest says.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# pytest-timeout's failure text ("Timeout (>5.0s) from pytest-timeout.") — its only trace in a report.
TIMEOUT_TEXT = "from pytest-timeout"

# pytest's ExitCode values (pytest.ExitCode), spelled out to keep this module free of pytest.
_EXIT_REASONS = {2: "interrupted", 3: "an internal error", 4: "a usage error", 5: "no tests collected"}

# Options that narrow what runs: pytest option name -> how the reason reads.
_NARROWING: tuple[tuple[str, str], ...] = (
    ("keyword", "-k {!r}"),
    ("markexpr", "-m {!r}"),
    ("lf", "--lf"),
    ("deselect", "--deselect {}"),
    ("ignore", "--ignore {}"),
    ("ignore_glob", "--ignore-glob {}"),
    ("stepwise", "--sw"),
    ("collectonly", "--collect-only"),
    # Sessions that run no test body (pytest's own option names; --setup-plan implies setuponly).
    ("setupplan", "--setup-plan"),
    ("setuponly", "--setup-only"),
    ("showfixtures", "--fixtures"),
    ("show_fixtures_per_test", "--fixtures-per-test"),
)


@dataclass
class Completeness:
    """The reasons a run is partial, collected while it runs (empty: complete)."""

    reasons: list[str] = field(default_factory=list)
    # Node ids of the tests whose body ran (a "call" phase report) and of those only set up or torn
    # down (skipped or failed in set-up, or --setup-only): from the controller's test reports.
    bodies: set[str] = field(default_factory=set)
    reported: set[str] = field(default_factory=set)
    # Collected tests of the layer that were not selected by anything but an option named in
    # _NARROWING (pytest-split's shard, a plugin that drops items): (why, node ids), from the process
    # that collected (an xdist worker's arrive with its report).
    dropped: tuple[str, list[str]] | None = None

    @property
    def complete(self) -> bool:
        return not self.reasons

    def add(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)

    def test_report(self, nodeid: str, failed: bool, longrepr_text: str) -> None:
        """A test's report (also one an xdist worker sent): a timed-out test makes the run partial."""
        if failed and TIMEOUT_TEXT in longrepr_text:
            self.add(f"{nodeid} timed out")

    def phase(self, nodeid: str, when: str) -> None:
        """A test's phase report (``when``: pytest's ``"setup"``, ``"call"`` or ``"teardown"``)."""
        self.reported.add(nodeid)
        if when == "call":
            self.bodies.add(nodeid)

    def collection(self, *, layer_tests: Sequence[str], selected: Sequence[str], deselected: Sequence[str],
                   shard: str | None = None) -> None:
        """What collection kept: ``layer_tests`` (node ids of every collected test the layer runs),
        ``selected`` (pytest's final ``session.items``), ``deselected`` (ids passed to
        ``pytest_deselected``) and ``shard`` (pytest-split's ``GROUP/SPLITS``, when it ran). A layer
        test that collection dropped — deselected by pytest-split or a plugin, or removed from
        ``items`` by a plugin that did not call ``pytest_deselected`` — makes the run partial: whatever
        it left out, the run did not use its cassettes."""
        chosen = set(selected)
        missing = [nodeid for nodeid in dict.fromkeys(layer_tests) if nodeid not in chosen]
        if not missing:
            return
        told = set(deselected)
        if shard is not None:
            group, _, splits = shard.partition("/")
            who = f"pytest-split ran group {group} of {splits}: one shard is not the whole suite"
        elif all(nodeid in told for nodeid in missing):
            who = "deselected by a plugin"
        else:
            who = "dropped by a plugin (without pytest_deselected)"
        total = len(set(layer_tests))
        named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        self.dropped = (f"{len(missing)} of {total} collected tests did not run ({who}: {named})", missing)

    def worker_crash(self, nodeid: str) -> None:
        self.add(f"an xdist worker crashed running {nodeid}")

    def selection(self, *, args: Sequence[str], invocation_dir: Path, rootdir: Path, testpaths: Sequence[str],
                  options: Mapping[str, Any]) -> None:
        """What the command line selected: ``args`` (pytest's ``config.args``, relative to
        ``invocation_dir``), the suite (``testpaths`` under ``rootdir``, else ``rootdir``) and
        ``options`` (pytest's ``config.option`` as a mapping)."""
        narrowed = False
        for name, text in _NARROWING:
            value = options.get(name)
            if name == "setuponly" and options.get("setupplan"):
                continue  # pytest sets it for --setup-plan: said once
            if value:
                shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                self.add(text.format(shown))
                narrowed = True
        if self.dropped is not None and not narrowed:  # -k/-m/--deselect… already say why
            self.add(self.dropped[0])
        matches = [p for pattern in testpaths for p in sorted(glob.glob(str(rootdir / pattern)))]
        suite = [Path(p).resolve() for p in matches] or [rootdir.resolve()]
        given: list[Path] = []
        for arg in args:
            path, sep, _ = arg.partition("::")
            if sep:
                self.add(f"a node id ({arg})")
            else:
                given.append((invocation_dir / path).resolve())
        if not given:
            return
        uncovered = [s for s in suite if not any(s == g or s.is_relative_to(g) for g in given)]
        if uncovered:
            shown = ", ".join(_relative(g, rootdir) for g in given)
            self.add(f"a positional path ({shown}) narrower than the suite "
                     f"({', '.join(_relative(s, rootdir) for s in suite)})")

    def ending(self, *, exitstatus: int, stopped: str | None, selected: int | None = None) -> None:
        """How the session ended: its exit status, pytest's/xdist's ``shouldstop``/``shouldfail`` and
        ``selected``, the number of tests it selected (pytest's ``session.testscollected``, also set
        by xdist's controller; None: not known, the bodies are not checked). A run otherwise complete
        is partial when not every selected test's body ran: the first such tests are named."""
        if stopped:
            self.add(f"stopped early ({stopped}: -x/--maxfail or the layer's max_failures)"
                     if "failure" in stopped else f"stopped early ({stopped})")
        elif int(exitstatus) in _EXIT_REASONS:
            self.add(_EXIT_REASONS[int(exitstatus)])
        if self.reasons or selected is None:
            return  # partial already: the reason above says why
        if selected == 0:
            self.add("no test selected")
            return
        missing = sorted(self.reported - self.bodies)
        ran = len(self.bodies)
        if ran >= selected and not missing:
            return
        if not ran:
            self.add(f"no test body ran (0 of {selected} selected)")
            return
        named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        self.add(f"{max(selected - ran, len(missing))} of {selected} selected tests did not run their body"
                 + (f" (skipped or failed in set-up: {named})" if named else ""))


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)
