"""The active LM reaches every thread the code under test starts (issue 9, kind 2).

Each way a DSPy program can leave the test's thread: a plain thread, a ThreadPoolExecutor, dspy.Parallel,
an asyncio task with ``acall``; through ``activate``, the Python API, the pytest ``lm`` fixture, and
under xdist (two processes, each with its own per-test LM).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dspy
import pytest

import provisioner
from provisioner.lm import build_lm
from provisioner.lm.activation import activate, global_lm
from provisioner.lmconfig import LMConfig, MockRule

from .._helpers import clear_settings

pytest_plugins = ["pytester"]


def _ask(question: str = "a?") -> str:
    return str(dspy.Predict("question -> answer")(question=question).answer)


def _lm(answer: str = "from-this-lm") -> dspy.LM:
    rule = MockRule(match={"*": "?"}, outputs={"answer": answer})
    return build_lm(LMConfig(mode="mock", mock_rules=[rule]))


def test_plain_thread_sees_the_active_lm_and_the_global_is_restored() -> None:
    before = global_lm()
    results: list[str] = []
    with activate(_lm()):
        thread = threading.Thread(target=lambda: results.append(_ask()))
        thread.start()
        thread.join()
    assert results == ["from-this-lm"]
    assert global_lm() is before


def test_thread_pool_executor_sees_the_active_lm() -> None:
    with activate(_lm()), ThreadPoolExecutor(2) as pool:
        assert [f.result() for f in [pool.submit(_ask, f"q{i}?") for i in range(4)]] == ["from-this-lm"] * 4


def test_dspy_parallel_sees_the_active_lm() -> None:
    program = dspy.Predict("question -> answer")
    with activate(_lm()):
        results = dspy.Parallel(num_threads=2)([(program, {"question": f"q{i}?"}) for i in range(3)])
    assert [r.answer for r in results] == ["from-this-lm"] * 3


def test_asyncio_task_and_acall_see_the_active_lm() -> None:
    async def main() -> list[str]:
        program = dspy.Predict("question -> answer")

        async def one(i: int) -> str:
            return str((await program.acall(question=f"q{i}?")).answer)

        tasks = [asyncio.create_task(one(i)) for i in range(2)]
        in_thread = await asyncio.to_thread(_ask)
        return [*(await asyncio.gather(*tasks)), in_thread]

    with activate(_lm()):
        assert asyncio.run(main()) == ["from-this-lm"] * 3


def test_nested_blocks_restore_in_order() -> None:
    outer, inner = _lm("outer"), _lm("inner")
    with activate(outer):
        with activate(inner), ThreadPoolExecutor(1) as pool:
            assert pool.submit(_ask).result() == "inner"
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(_ask).result() == "outer"
    assert global_lm() is not outer


def test_where_dspy_refuses_configure_the_thread_still_has_the_lm_and_a_warning_says_why() -> None:
    # DSPy lets only the first configuring thread configure again: that state is process-wide, so
    # this runs in its own interpreter.
    script = """
import threading, warnings, dspy
from provisioner.lm import build_lm
from provisioner.lm.activation import activate, GlobalLMNotSetWarning
from provisioner.lmconfig import LMConfig
t = threading.Thread(target=lambda: dspy.configure(lm=None)); t.start(); t.join()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with activate(build_lm(LMConfig(mode="mock"))):
        print(dspy.Predict("question -> answer")(question="a?").answer)
print([str(w.message) for w in caught if w.category is GlobalLMNotSetWarning])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "mock_response"
    assert "active in this thread only" in lines[1] and "dspy.configure was refused" in lines[1]


def test_python_api_environment_block_reaches_threads(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings(monkeypatch)
    before = global_lm()
    with provisioner.environment("unit", project_dir=tmp_path), ThreadPoolExecutor(1) as pool:
        answer = pool.submit(lambda: dspy.Predict("question -> answer")(question="a?")).result().answer
    assert answer == "mock_response"
    assert global_lm() is before  # the block's LM is gone again:
    with pytest.raises(ValueError, match="No LM is loaded"), ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: dspy.Predict("question -> answer")(question="a?")).result()


THREADS_SUITE = """
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest


def ask(question="a?"):
    return dspy.Predict("question -> answer")(question=question).answer


def test_issue_input(lm):
    answer = ThreadPoolExecutor(1).submit(lambda: dspy.Predict("question -> answer")(question="a?")).result()
    assert answer.answer == "mock_response"


def test_plain_thread(lm):
    out = []
    t = threading.Thread(target=lambda: out.append(ask()))
    t.start(); t.join()
    assert out == ["mock_response"]


def test_parallel(lm):
    program = dspy.Predict("question -> answer")
    results = dspy.Parallel(num_threads=2)([(program, {"question": "q?"})] * 2)
    assert [r.answer for r in results] == ["mock_response"] * 2


def test_asyncio_acall(lm):
    async def main():
        return (await asyncio.create_task(dspy.Predict("question -> answer").acall(question="q?"))).answer
    assert asyncio.run(main()) == "mock_response"


def test_nothing_leaks_into_a_test_without_the_fixture():
    with pytest.raises(ValueError, match="No LM is loaded"):
        ThreadPoolExecutor(1).submit(ask).result()
"""


def test_lm_fixture_reaches_threads_parallel_and_tasks(pytester: pytest.Pytester,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings(monkeypatch)
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\naddopts = '-p no:cacheprovider'\n")
    pytester.makepyfile(test_threads=THREADS_SUITE)
    result = pytester.runpytest_subprocess("--layer", "unit", "-p", "no:randomly")
    result.assert_outcomes(passed=5)


XDIST_SUITE = """
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest


def ask():
    return dspy.Predict("question -> answer")(question="who?").answer


@pytest.mark.parametrize("name", ["alpha", "beta", "gamma", "delta"])
def test_own_lm(name, lm_rules):
    lm_rules.add(match={"question": "*"}, outputs={"answer": name})  # this test's LM answers its name
    answers = [ThreadPoolExecutor(2).submit(ask).result() for _ in range(5)]
    assert answers == [name] * 5
"""


def test_two_xdist_processes_each_see_their_own_lm_in_threads(pytester: pytest.Pytester,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings(monkeypatch)
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\naddopts = '-p no:cacheprovider'\n")
    pytester.makepyfile(test_xdist_lm=XDIST_SUITE)
    result = pytester.runpytest_subprocess("--layer", "unit", "-n", "2")
    result.assert_outcomes(passed=4)
