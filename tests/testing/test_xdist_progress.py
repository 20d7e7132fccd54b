"""An xdist worker says what it waits for while the run's pool warms: one whole line per process
on its stderr (which xdist leaves on the terminal), not one per test and no half-lines; a single
process keeps its ``provisioner: <phase> … done in`` line."""

from __future__ import annotations

import io

import pytest

from provisioner.testing.progress import Phases

pytest_plugins = ["pytester"]


def test_a_worker_process_writes_one_whole_line_per_phase() -> None:
    out = io.StringIO()
    with Phases(out.write, process="gw1").phase("warm pool of layer e2e: 1 worker") as update:
        assert out.getvalue() == "\nprovisioner [gw1]: warm pool of layer e2e: 1 worker …\n"  # while it runs
        update("step")  # sub-steps are a terminal's
    assert out.getvalue().count("\n") == 2  # on a line of its own: the controller's dots may be mid-line
    with pytest.raises(RuntimeError), Phases(out.write, process="gw1").phase("warm pool") as _:
        raise RuntimeError("worker did not start")
    assert out.getvalue().endswith("\nprovisioner [gw1]: warm pool …\n"
                                   "\nprovisioner [gw1]: warm pool: failed: worker did not start\n")


def test_a_worker_s_line_starts_a_line_only_once_the_controller_may_be_mid_line() -> None:
    """A new user's trial: a blank line before each worker's warm-pool line under "2 workers [N
    items]" (the controller was at the start of a line; the leading newline made an empty one)."""
    out = io.StringIO()
    shown = False
    phases = Phases(out.write, process="gw0", midline=lambda: shown)
    with phases.phase("warm pool"):
        pass
    assert out.getvalue() == "provisioner [gw0]: warm pool …\n"
    shown = True  # the controller printed a test's outcome: its line of dots may be open
    with phases.phase("warm pool"):
        pass
    assert out.getvalue() == "provisioner [gw0]: warm pool …\n\nprovisioner [gw0]: warm pool …\n"


SUITE = """
import pytest

@pytest.mark.parametrize("n", range(4))
@pytest.mark.e2e
def test_session(isolated, n):
    assert isolated.adapter is not None
"""


@pytest.mark.slow
@pytest.mark.docker
def test_under_xdist_each_process_says_once_that_it_waits_for_the_warm_pool(pytester: pytest.Pytester,
                                                                           docker_engine: object) -> None:
    pytester.makepyprojecttoml("[project]\nname = 'progress'\n")
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess("--layer", "e2e", "--lm", "mock", "-n", "2",
                                           "-p", "no:cacheprovider", timeout=600)
    result.assert_outcomes(passed=4)
    err = result.stderr.str()
    for worker in ("gw0", "gw1"):
        assert err.count(f"provisioner [{worker}]: warm pool of layer e2e") == 1, err
    # Both warm before any outcome is shown: no blank line before either (the terminal's lines are
    # stdout's and stderr's interleaved; stderr alone has no blank line then).
    assert "\n\n" not in err and not err.startswith("\n"), repr(err)


@pytest.mark.parametrize(("when", "outcome", "verbose", "shown"), [
    ("setup", "passed", False, False),  # nothing printed: the terminal is still at a line's start
    ("teardown", "passed", False, False),
    ("call", "passed", False, True),  # "."
    ("setup", "skipped", False, True),  # "s"
    ("setup", "failed", False, True),  # "E"
    ("setup", "passed", True, False),
    ("call", "passed", True, True),  # "PASSED"
])
def test_the_controller_marks_the_progress_mid_line_only_when_it_prints_an_outcome(
    pytester: pytest.Pytester, when: str, outcome: str, verbose: bool, shown: bool
) -> None:
    """A new user's trial (-n 2, a first run under load): two blank lines under "2 workers [4
    items]". One process's passed set-up reached the controller before the other started its pool;
    the controller marked its progress as mid-line though it printed nothing, so the other's phase
    line began with a newline. Only what the terminal prints for a report counts."""
    from provisioner.pytest_plugin import _shows_outcome

    config = pytester.parseconfigure(*(["-v"] if verbose else []))
    longrepr = ("t.py", 1, "skipped") if outcome == "skipped" else ("boom" if outcome == "failed" else None)
    report = pytest.TestReport(nodeid="t.py::t", location=("t.py", 0, "t"), keywords={},
                               outcome=outcome, longrepr=longrepr, when=when)  # type: ignore[arg-type]
    assert _shows_outcome(config, report) is shown
