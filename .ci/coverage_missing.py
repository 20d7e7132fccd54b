"""List each line and branch the last coverage run missed in the given files, with its source text.

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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
