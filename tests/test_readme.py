"""The README's two commands are the ones CI runs, so they cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ._helpers import without_settings

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert "provision up --layer e2e" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_the_readme_command_runs_on_two_xdist_workers_heaviest_files_first() -> None:
    """`-n 2 --dist loadfile` (a file's tests in one process); tests/conftest.py's scheduler hands
    files out in collection order, which it sorts heaviest first; every file of that list exists (a
    renamed heavy file would silently lose its place)."""
    import importlib.util
    import shlex

    command = shlex.split(_readme_commands()[1].split("&&", 1)[1])
    assert command[command.index("-n") + 1] == "2" and command[command.index("--dist") + 1] == "loadfile"
    spec = importlib.util.spec_from_file_location("suite_conftest", ROOT / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    assert [path for path in conftest.HEAVY_FIRST if not (ROOT / path).is_file()] == []
    ranks = [conftest.heavy_rank(f"{path}::test_x") for path in conftest.HEAVY_FIRST]
    assert ranks == sorted(ranks) and conftest.heavy_rank("tests/test_files.py::t") == len(ranks)
    # Files sharing a costly session fixture are one xdist work unit; the rest are their own file.
    assert [path for path in conftest.SAME_WORKER if not (ROOT / path).is_file()] == []
    units = {conftest.file_scope(f"{path}::test_x") for path in conftest.SAME_WORKER}
    assert len(units) == len(set(conftest.SAME_WORKER.values()))
    assert conftest.file_scope("tests/test_files.py::test_x[a::b]") == "tests/test_files.py"


SLOW_TIER = ".venv/bin/python -m pytest -q -m slow"


def test_the_readme_command_is_the_fast_tier_and_ci_runs_the_slow_tier_after_it() -> None:
    """The README's command leaves the `slow` marker out (pyproject's addopts); .ci/run runs that
    tier after it, times it and fails when it fails; the README says how to run it."""
    import shlex
    import tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    addopts = shlex.split(options["addopts"])
    assert addopts[addopts.index("-m") + 1] == "not slow", addopts
    assert any(m.startswith("slow:") for m in options["markers"])
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme_line = ci.index(_readme_commands()[1])
    assert SLOW_TIER in ci and ci.index(SLOW_TIER) > readme_line
    after = "\n".join(ci[ci.index(SLOW_TIER):])
    assert "slow tier:" in after and 'exit "$slow_status"' in after  # its time, and its failure fails CI
    section = (ROOT / "README.md").read_text().split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    assert "-m slow" in section


def test_tests_do_not_inherit_the_outer_xdist_identity(pytestconfig: pytest.Config) -> None:
    """Under `pytest -n 2` of this suite this process is an xdist worker (gw0/gw1); the pytest
    runs and `provision` processes tests start must not believe they are one, nor must provisioner's
    code in this process (tests/conftest.py takes xdist's variables out for the session). The same
    test holds without xdist (`-n 0`, `-p no:xdist`: no `worker_id` fixture then, so the process's
    name comes from xdist's own `workerinput`, which only an xdist worker has)."""
    import os
    import subprocess
    import sys

    worker_id = getattr(pytestconfig, "workerinput", {}).get("workerid", "master")

    xdist_env = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")
    assert [name for name in xdist_env if name in os.environ] == [], worker_id
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('PYTEST_XDIST_WORKER'))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "None"


# --- "Use provisioner in your project" (issue 8): short, complete, and what examples/qa_project is ----

EXAMPLE = ROOT / "examples" / "qa_project"


def _quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Use provisioner in your project\n", 1)[1].split("\n## ", 1)[0]


def _block(language: str, text: str | None = None) -> str:
    found = re.findall(rf"```{language}\n(.+?)```", text if text is not None else _quickstart(), flags=re.S)
    assert len(found) == 1, (language, found)
    return str(found[0])


def test_quickstart_is_at_most_25_lines() -> None:
    lines = [line for line in _quickstart().splitlines() if line.strip()]
    assert len(lines) <= 25, len(lines)


def test_quickstart_has_every_part() -> None:
    import tomllib

    import yaml

    commands = _block("sh")
    steps = [step.strip() for line in commands.splitlines() for step in line.split("#")[0].split("&&")]
    # From a fresh project folder: a venv first, the wheel built from the checkout (no `build` needed),
    # installed with pytest-xdist (-n is mentioned), all before the first pytest.
    assert steps[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"], steps
    wheel_dir = "../provisioner/dist"
    assert f"pip wheel --no-deps ../provisioner -w {wheel_dir}" in steps
    install = next(step for step in steps if step.startswith("pip install "))
    assert install.split()[2:] == [f"{wheel_dir}/dspy_provisioner-*.whl", "pytest-xdist"], install
    assert "-n 2" in commands
    assert steps.index(install) < min(i for i, step in enumerate(steps) if step.startswith("pytest"))
    assert "echo .provision/ >> .gitignore" in steps
    assert 'pythonpath = ["."]' in _quickstart() and "[tool.pytest.ini_options]" in _quickstart()
    record = next(step for step in steps if step.startswith("pytest --layer integration"))
    replay = next(step for step in steps if "--record-mode none" in step)
    assert record == "pytest --layer integration"
    assert replay == "pytest --layer integration --record-mode none"
    assert "test/fixtures/lm_responses" in commands  # where the cassettes go (not tests/)
    assert "pytest --layer unit" in commands and "pytest --layer e2e" in commands
    assert "tool" in tomllib.loads(_block("toml"))
    for layer in ("unit", "integration", "e2e"):
        assert f"@pytest.mark.{layer}" in _block("python")
    step = yaml.safe_load(_block("yaml"))[0]
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert step["uses"].endswith("/provisioner@<commit>")
    assert set(step["with"]) <= set(action["inputs"])
    assert {name for name, spec in action["inputs"].items() if spec.get("required")} <= set(step["with"])


def test_example_follows_the_quickstart_word_for_word() -> None:
    import tomllib

    pyproject = (EXAMPLE / "pyproject.toml").read_text()
    assert _block("toml") in pyproject
    assert tomllib.loads(pyproject)["tool"]["pytest"]["ini_options"]["pythonpath"] == ["."]
    assert (EXAMPLE / "tests" / "test_quickstart.py").read_text() == _block("python")
    assert ".provision/" in (EXAMPLE / ".gitignore").read_text().splitlines()
    assert _block("sh", (EXAMPLE / "README.md").read_text()) == _block("sh")


def _clean_env() -> dict[str, str]:
    return without_settings()


@pytest.mark.docker
@pytest.mark.slow
def test_quickstart_commands_pass_in_order_on_a_quickstart_project(tmp_path: Path) -> None:
    """The example reduced to the quick start (its code, config and test file, no recordings), then every
    command of the quick start in order (the venv and the wheel install are tests/test_wheel_install.py's)."""
    import shutil
    import subprocess
    import sys

    project = tmp_path / "qa_project"
    skipped = shutil.ignore_patterns(".provision", "__pycache__", "lm_responses")
    shutil.copytree(EXAMPLE, project, ignore=skipped)
    for test_file in (project / "tests").glob("test_*.py"):
        if test_file.name != "test_quickstart.py":
            test_file.unlink()
    cassettes = project / "test" / "fixtures" / "lm_responses"
    outputs = []
    for line in _block("sh").splitlines():
        for command in line.split("#")[0].split("&&"):
            words = command.split()
            if words[0] in ("python3", ".", "pip"):  # the venv and the wheel: tests/test_wheel_install.py's
                continue
            if words[0] == "echo":
                subprocess.run(["bash", "-c", command], cwd=project, check=True)
                continue
            assert words[0] == "pytest", command
            before = sorted(cassettes.rglob("*.json")) if cassettes.exists() else []
            proc = subprocess.run([sys.executable, "-m", "pytest", *words[1:]], cwd=project, env=_clean_env(),
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, (command, proc.stdout[-3000:], proc.stderr[-2000:])
            assert "1 passed" in proc.stdout, (command, proc.stdout[-2000:])
            assert "LMRuleWarning" not in proc.stdout + proc.stderr, (command, proc.stdout[-3000:])
            after = sorted(cassettes.rglob("*.json")) if cassettes.exists() else []
            outputs.append((words, before, after, proc.stdout))
    by_command = {" ".join(words[1:]): (before, after, out) for words, before, after, out in outputs}
    before, after, _ = by_command["--layer integration"]
    assert before == [] and len(after) >= 2  # recorded: the in-process call and the worker's
    before, after, _ = by_command["--layer integration --record-mode none"]
    assert before == after  # replayed, nothing new
    assert "LM Gemini stand-in (GEMINI_TEST_API_KEY not set)" in by_command["--layer e2e"][2]
    assert ".provision/" in (project / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md", "docs/containers.md"])
def test_the_label_lists_of_the_docs_are_the_labels_the_code_puts_on_resources(doc: str) -> None:
    """The README's list lacked ``provisioner.project``, then the worker image's labels containers
    inherit (new-user trials found them): each doc's list of the labels every resource carries names
    exactly what :func:`run_labels` writes (with a project), plus a container's role, a worker's
    slot and the image's labels; the legacy ``provisioner.session`` may be named as such."""
    from provisioner.runtime import labels as L

    text = (ROOT / doc).read_text()
    paragraph = next(p for p in text.split("\n\n") if "`provisioner.managed=true`" in p)
    named = set(re.findall(r"`(provisioner\.[a-z.]*[a-z])(?:=[^`]*)?`", paragraph)) - {L.LEGACY_INSTANCE}
    on_every_resource = set(L.run_labels("r1", "unit", "main-1", project="p-0123abcd"))
    from_the_image = {L.IMAGE_HASH, L.PACKAGE_HASH, L.VERSION}  # Docker copies them onto containers
    assert named == on_every_resource | {L.ROLE, L.SLOT} | from_the_image, paragraph
    # The user's trial found the image's labels on containers but not in the list: every label name
    # labels.py defines is in it (a new constant fails here until the docs name it).
    defined = {v for k, v in vars(L).items()
               if k.isupper() and isinstance(v, str) and v.startswith("provisioner.")}
    assert defined - {L.LEGACY_INSTANCE} <= named, sorted(defined - named)
