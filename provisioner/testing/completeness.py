"""Whether a pytest run ran its layer's whole suite to the end — and so may vouch for which
cassettes nobody uses (``provision cassettes prune``).

A run is *partial* when it ran less than the suite (a positional path or node id narrower than
the suite, ``-k``, ``-m``, ``--lf``, ``--deselect``, ``--ignore``, ``--sw``, ``--co``) or did not
run it to the end (``-x``/``--maxfail``/the layer's ``max_failures`` stopped it, an interrupt, an
internal or usage error, a test or session timeout, a crashed xdist worker). Plain Python (no
pytest import): the plugin feeds it what pytest says.
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
)


@dataclass
class Completeness:
    """The reasons a run is partial, collected while it runs (empty: complete)."""

    reasons: list[str] = field(default_factory=list)

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

    def worker_crash(self, nodeid: str) -> None:
        self.add(f"an xdist worker crashed running {nodeid}")

    def selection(self, *, args: Sequence[str], invocation_dir: Path, rootdir: Path, testpaths: Sequence[str],
                  options: Mapping[str, Any]) -> None:
        """What the command line selected: ``args`` (pytest's ``config.args``, relative to
        ``invocation_dir``), the suite (``testpaths`` under ``rootdir``, else ``rootdir``) and
        ``options`` (pytest's ``config.option`` as a mapping)."""
        for name, text in _NARROWING:
            value = options.get(name)
            if value:
                shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                self.add(text.format(shown))
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

    def ending(self, *, exitstatus: int, stopped: str | None) -> None:
        """How the session ended: its exit status and pytest's/xdist's ``shouldstop``/``shouldfail``."""
        if stopped:
            self.add(f"stopped early ({stopped}: -x/--maxfail or the layer's max_failures)"
                     if "failure" in stopped else f"stopped early ({stopped})")
        elif int(exitstatus) in _EXIT_REASONS:
            self.add(_EXIT_REASONS[int(exitstatus)])


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)
