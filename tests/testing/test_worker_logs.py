"""A failed test's report shows the log lines of the workers it used from its own time window, and where
the full log is: on the fake engine (the window arithmetic, a gone container) and with real workers in
pytest subprocesses (a pool worker shared by two tests, a dedicated worker, one process and xdist)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from provisioner.history.store import HISTORY_FILE, History
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.recipes import ContainerRecipe
from provisioner.testing.worker_logs import WorkerLogs

from .._helpers import clear_settings

pytest_plugins = ["pytester"]


class _Pool:
    """What WorkerLogs asks of a pool: the worker a session is pinned to, and the workers."""

    def __init__(self, pinned: dict[str, str]) -> None:
        self.pinned = pinned

    def session(self, session_id: str) -> Any:
        if session_id not in self.pinned:
            raise KeyError(session_id)
        return type("Pinned", (), {"worker": self.pinned[session_id]})()

    def stats(self) -> dict[str, Any]:
        return {"workers": [{"name": n} for n in sorted(set(self.pinned.values()))]}


def _worker(rt: FakeRuntime, name: str) -> Any:
    recipe = ContainerRecipe(name=name, image="img", role="worker", command=(), environment={}, labels={},
                             networks=())
    cid = rt.create_container(recipe)
    rt.start_container(cid)
    container = rt.containers[cid]
    container.created = 1000.0
    return container


def test_the_window_holds_the_tests_lines_only_and_the_full_log_is_saved(tmp_path: Path) -> None:
    rt = FakeRuntime(images=("img",))
    w0 = _worker(rt, "prov-r-main-w0")
    w0.log_lines.append("bridge worker listening")  # stamped at the container's creation
    for at, text in ((1010.0, "alpha refused"), (1020.0, "beta refused"), (1030.0, "gamma refused")):
        w0.write_log(text, at=at)
    logs = WorkerLogs(lambda: rt, tmp_path / "logs")
    logs.used_session("t.py::test_b", "s-b", _Pool({"s-b": "prov-r-main-w0"}))
    logs.used_session("t.py::test_b", "s-lost", _Pool({}))  # a lost session points nowhere
    (excerpt,) = logs.excerpts("t.py::test_b", 1015.0, 1025.0)
    assert excerpt.lines == ("beta refused",) and excerpt.problem is None
    text = excerpt.text()
    assert "1 lines between 00:16:55.000 and 00:17:05.000 UTC (this test's window):\nbeta refused\n" in text
    assert "alpha" not in text and "gamma" not in text
    full = tmp_path / "logs" / "prov-r-main-w0.log"
    assert f"full log: {full} (`docker logs prov-r-main-w0` while the container exists)" in text
    assert full.read_text().splitlines() == ["bridge worker listening", "alpha refused", "beta refused",
                                             "gamma refused"]
    assert logs.excerpts("t.py::test_a", 1005.0, 1015.0) == []  # test_a used no worker
    assert logs.finish("t.py::test_b") == ([str(full)], [])
    assert logs.excerpts("t.py::test_b", 1015.0, 1025.0) == []  # forgotten after its teardown


def test_a_long_window_shows_its_newest_lines_and_a_gone_container_says_so(tmp_path: Path) -> None:
    rt = FakeRuntime(images=("img",))
    w0 = _worker(rt, "w0")
    for i in range(10):
        w0.write_log(f"line {i}", at=2000.0 + i)
    logs = WorkerLogs(lambda: rt, tmp_path, max_lines=3)
    logs.used("t::x", "w0", w0.id)
    logs.used("t::x", "w-gone")
    logs.used_pool("t::y", _Pool({"s": "w0"}))
    kept, gone = logs.excerpts("t::x", 2000.0, 2009.0)
    assert kept.lines == ("line 7", "line 8", "line 9") and kept.omitted == 7
    assert kept.text().startswith("10 lines between") and ", the last 3 shown:" in kept.text()
    assert gone.log_path is None and "the container is gone" in gone.text()
    assert [e.worker for e in logs.excerpts("t::y", 2000.0, 2001.0)] == ["w0"]
    logs.retained("t::x", "w0")
    assert logs.finish("t::x") == ([str(tmp_path / "w0.log")], ["w0"])
    no_engine = WorkerLogs(lambda: None, tmp_path)
    no_engine.used("t::z", "w0")
    assert "no container engine" in no_engine.excerpts("t::z", 0.0, 1.0)[0].text()


def test_fake_runtime_logs_window_matches_the_engines_rules() -> None:
    rt = FakeRuntime(images=("img",))
    c = _worker(rt, "w")
    c.write_log("a", at=1.0)
    c.write_log("b", at=2.0)
    c.write_log("c", at=3.0)
    assert rt.logs("w", tail=None, since=2.0) == "b\nc"
    assert rt.logs("w", tail=None, until=2.0) == "a\nb"
    assert rt.logs("w", tail=1, since=1.5, until=2.5) == "b"
    assert rt.logs("w", tail=0) == "" and rt.logs("nope") == ""


PROJECT = """
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[tool.provisioner.lm]
cached_inner = "mock"
"""

SUITE = '''
import pytest

from provisioner.errors import BridgeError

pytestmark = pytest.mark.integration


def _refused(session, program_id):
    with pytest.raises(BridgeError, match=program_id):
        session.execute_program(program_id, {"question": "?"})


def test_a_passes(bridge):
    _refused(bridge, "alpha-missing")


def test_b_fails(bridge):
    _refused(bridge, "beta-missing")
    assert False, "b fails on purpose"


def test_c_dedicated_fails(bridge_worker):
    _refused(bridge_worker.session("mine"), "gamma-missing")
    assert False, "c fails on purpose"
'''


def _sections(out: str, test: str) -> str:
    """The failure block of ``test`` in pytest's output (up to the next failure's header)."""
    start = out.index(f"_ {test} _")
    rest = out[start + 1:]
    following = re.search(r"\n_{3,} \S+ _{3,}\n|\n=+ ", rest)
    return rest[: following.start()] if following else rest


@pytest.mark.docker
@pytest.mark.parametrize("xdist", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["one-process", "xdist"])
def test_a_failed_tests_report_shows_its_workers_lines_of_its_window(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: bool,
) -> None:
    clear_settings(monkeypatch)
    pytester.makefile(".toml", pyproject=PROJECT)
    pytester.makepyfile(test_suite=SUITE)
    # One process: test_a and test_b share the process's pool worker. Under xdist, --dist loadfile keeps
    # them on one xdist worker too (its own pool): the other test's lines are in the same log.
    args = ["-n", "2", "--dist", "loadfile"] if xdist else ["-p", "no:xdist"]
    result = pytester.runpytest_subprocess("--layer", "integration", "--junitxml", "junit.xml", *args,
                                           timeout=280)
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()

    b = _sections(out, "test_b_fails")
    assert "provisioner: log of worker prov-" in b, out[-4000:]
    assert "beta-missing" in b and "alpha-missing" not in b and "gamma-missing" not in b
    # The worker names the session by id; the report shows the test that opened it next to the id.
    assert re.search(r"refused \(session test_suite\.py::test_b_fails \(session_\w+\)\)", b), b
    full_b = Path(re.search(r"full log: (\S+\.log) ", b).group(1))  # type: ignore[union-attr]
    log_b = full_b.read_text()
    assert "alpha-missing" in log_b and "beta-missing" in log_b  # the other window is in the full log

    c = _sections(out, "test_c_dedicated_fails")
    assert "gamma-missing" in c and "beta-missing" not in c and "alpha-missing" not in c
    assert "bridge worker listening" in c  # the dedicated worker started inside this test's window
    full_c = Path(re.search(r"full log: (\S+\.log) ", c).group(1))  # type: ignore[union-attr]
    assert full_c != full_b and "gamma-missing" in full_c.read_text()
    assert full_b.parent == full_c.parent and full_b.parent.name == "logs"

    with History(pytester.path / ".provision" / HISTORY_FILE) as db:
        (run,) = db.runs()
        rows = {t["node_id"].split("::")[1]: t for t in db.tests(run["run_id"])}
    assert rows["test_b_fails"]["log_path"] == str(full_b)
    assert rows["test_c_dedicated_fails"]["log_path"] == str(full_c)
    assert rows["test_a_passes"]["log_path"] is None
    assert full_b.parent == pytester.path / ".provision" / "runs" / run["run_id"] / "logs"
    # The page shows the failed tests' saved worker logs (their last lines).
    from click.testing import CliRunner

    from provisioner.cli import main

    shown = CliRunner().invoke(main, ["report", "html", "--out", str(pytester.path / "page")],
                               env={"PROVISION_STATE_DIR": str(pytester.path / ".provision")})
    assert shown.exit_code == 0, shown.output
    page = (pytester.path / "page" / "index.html").read_text()
    failures = page.split('id="last-failures"', 1)[1].split("</table>", 1)[0]
    assert f'data-log-path="{full_b}"' in failures
    assert "beta-missing" in failures and "gamma-missing" in failures
    xml = (pytester.path / "junit.xml").read_text()
    assert f'<property name="provision_worker_log" value="{full_c}" />' in xml
    assert f'<property name="provision_worker_log" value="{full_b}" />' in xml
