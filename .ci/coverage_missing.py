"""List each line and branch the last coverage run missed in the given files, with its source text;
with ``--failures JUNIT_XML``, the tests that failed or errored in the run.

Used by .ci/coverage (reads the combined data in .coverage-data/); the list is what docs/quality.md
explains line by line. Written here because `coverage report --show-missing` gives only numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import coverage


def main(paths: list[str]) -> int:
    cov = coverage.Coverage()
    cov.load()
    for name in paths:
        _, statements, _excluded, missing, _ = cov.analysis2(name)
        source = Path(name).read_text(encoding="utf-8").splitlines()
        arcs = cov._analyze(name).missing_branch_arcs()  # no public API gives the arcs per line
        lines = sorted(set(missing) | set(arcs))
        print(f"== {name}: {len(missing)} of {len(statements)} lines missed, "
              f"{sum(len(v) for v in arcs.values())} branch arcs missed")
        for line in lines:
            what = "line" if line in missing else "branch to " + ",".join(
                "exit" if to < 0 else str(to) for to in arcs[line])
            print(f"{line:5}  {what:<18} {source[line - 1].strip()}")
    return 0


def failures(junit_xml: str) -> int:
    """Print each test that failed or errored in the run's JUnit XML (pytest's --junitxml), with
    the first line of its message; the count first."""
    import xml.etree.ElementTree as ET  # our own pytest run's report, not untrusted input

    try:
        root = ET.parse(junit_xml).getroot()  # noqa: S314 - written by this run's pytest
    except (OSError, ET.ParseError) as exc:
        print(f"failures: no readable JUnit report ({exc})")
        return 0
    bad = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            found = case.find(kind)
            if found is not None:
                message = (found.get("message") or "").strip().splitlines()
                test = f"{case.get('classname', '')}::{case.get('name', '')}"
                bad.append(f"{kind:<7} {test}: {message[0][:200] if message else ''}")
    print(f"failures: {len(bad)} failed or errored test(s)")
    for line in bad:
        print(line)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--failures"]:
        sys.exit(failures(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
